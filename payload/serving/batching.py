"""Batched generation: one scheduler thread owns the model and runs the waiting requests together.

Requests wait in a bounded queue (a full queue is a 429 the client can retry). The scheduler takes up to `max_batch`
of them after a short collection window, left-pads their prompts, prefills them in one forward pass and then decodes
one token a step for every row with the KV cache. Each row samples with its own temperature, top_p and seed, and ends
on its own (EOS, max_tokens, a stop sequence, its client gone): its stream ends at once and the row leaves the batch,
so the others' steps get cheaper. Rows of different adapters share a batch through PEFT's mixed-adapter forward
(`adapter_names`, `"__base__"` for the base). Requests that arrive while a batch runs join it at the end of a step
(their prompts prefilled together, their KV cache left-padded to the batch's length and appended), as long as the
batch has room; `max_batch` 1 is therefore strictly one request at a time.

torch and transformers are imported inside the functions that use them, as in `engine`.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from typing import Any, AsyncIterator, Iterator, Protocol

from payload.serving.openai_schema import APIError

from payload.serving.sampling import SamplingParams, StopScanner


# What the scheduler needs of the engine and of the model a request asked for (payload.serving.engine implements
# both, and imports this module): described here, so that the two modules do not import each other.
class ServedModel(Protocol):
    id: str
    adapter: str | None          # the adapter's name in the PEFT model; None: the base
    tokenizer: Any


class Engine(Protocol):
    device: Any                  # torch.device
    eos_ids: set[int]
    pad_token_id: int
    tokenizer_lock: threading.Lock

    def release(self, served: ServedModel) -> None:
        """A request of `served` has ended (an unloaded adapter leaves memory after its last one)."""

    def disarm(self) -> None:
        """Take the per-row adapter hooks off (at the end of a batch)."""

    def new_cache(self) -> Any:
        """An empty KV cache for a new batch."""

    def forward(self, ids, mask, positions, cache, adapters: list[str | None]):
        """One forward pass of a batch, each row through its own adapter (a name, or None for the base); returns
        the last position's logits and extends `cache`."""

log = logging.getLogger("payload.serve")  # the server's one logger name, as its operators know it from the log

RETRY_AFTER_S = 1
_END = object()  # the last item of a generation's event queue


class GenerationError(RuntimeError):
    """The model failed while generating (an error of ours, logged with its traceback)."""


class Generation:
    """One request's generation. Iterate it for text pieces (they arrive while the scheduler decodes); afterwards
    `finish_reason`, `prompt_tokens` and `completion_tokens` are set. Closing the iteration early (or `cancel()`)
    takes the row out of its batch at the next step."""

    def __init__(self, engine: Engine, served: ServedModel, prompt_ids: list[int], max_tokens: int,
                 params: SamplingParams):
        self.engine = engine
        self.served = served
        self.prompt_ids = prompt_ids
        self.max_tokens = max_tokens
        self.params = params
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.submitted = time.monotonic()
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._released = False
        self._waker = None  # (event loop, asyncio.Event) of an async reader, woken on each event

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def release(self) -> None:
        """Tell the engine this request no longer needs its adapter (it may then be unloaded); once."""
        if not self._released:
            self._released = True
            self.engine.release(self.served)

    # Called from the scheduler thread.
    def _put(self, item) -> None:
        self._events.put(item)
        waker = self._waker
        if waker is not None:
            loop, event = waker
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop is closed: its reader is gone
                self.cancel()

    def _send(self, text: str) -> None:
        if text:
            self._put(text)

    def _finish(self, reason: str | None) -> None:
        self.finish_reason = reason
        self.release()
        self._put(_END)

    def _fail(self, error: BaseException) -> None:
        self.release()
        self._put(error)

    async def text_chunks(self) -> AsyncIterator[str]:
        """For a reader on an event loop (a streamed response): the text that arrived since the last chunk, joined,
        without a thread hop per token; a slow client gets fewer, longer chunks instead of falling behind."""
        import asyncio

        event = asyncio.Event()
        self._waker = (asyncio.get_running_loop(), event)
        try:
            while True:
                event.clear()
                pieces, ended = [], False
                while True:
                    try:
                        item = self._events.get_nowait()
                    except queue.Empty:
                        break
                    if item is _END:
                        ended = True
                        break
                    if isinstance(item, BaseException):
                        raise GenerationError(f"generation failed: {item!r}") from item
                    pieces.append(item)
                if pieces:
                    yield "".join(pieces)
                if ended:
                    break
                if not pieces:
                    await event.wait()
        finally:
            self.cancel()  # the client went away (or the stream ended): the row leaves its batch
        self._log_done()

    def __iter__(self) -> Iterator[str]:
        try:
            while True:
                item = self._events.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise GenerationError(f"generation failed: {item!r}") from item
                yield item
        finally:
            self.cancel()  # if the reader went away (client disconnected), the row leaves its batch
        self._log_done()

    def _log_done(self) -> None:
        seconds = time.monotonic() - self.submitted
        log.info("generated model=%s prompt_tokens=%d completion_tokens=%d seconds=%.2f tokens_per_s=%.1f finish=%s",
                 self.served.id, self.prompt_tokens, self.completion_tokens, seconds,
                 self.completion_tokens / seconds if seconds else 0.0, self.finish_reason)


class _Row:
    """A generation inside a running batch: its sampler, its text decoder and its stop scanner."""

    def __init__(self, gen: Generation, device, eos_ids: set[int]):
        import torch  # heavy: see the module docstring
        from transformers import TemperatureLogitsWarper, TextStreamer, TopPLogitsWarper

        self.gen = gen
        self.eos_ids = set() if gen.params.ignore_eos else eos_ids
        params = gen.params
        self.greedy = params.temperature == 0
        self.warpers = [] if self.greedy else [TemperatureLogitsWarper(params.temperature)]
        if not self.greedy and params.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(params.top_p))
        # A generator of its own per row: a seeded request samples the same tokens alone or in any batch.
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        self.scanner = StopScanner(params.stop)
        self.hit_stop = False
        self.last_token: int | None = None
        row = self

        class _Decoder(TextStreamer):
            # transformers' streamer decides when decoded text is safe to hand on (whole words, whole characters).
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                row._text(text)

        self.decoder = _Decoder(gen.served.tokenizer, skip_special_tokens=True)

    def _text(self, text: str) -> None:
        if self.hit_stop:
            return
        safe, self.hit_stop = self.scanner.feed(text)
        self.gen._send(safe)

    def pick(self, logits):
        """The next token from this row's last logits (1-D)."""
        import torch  # heavy: see the module docstring

        if self.greedy:
            return int(logits.argmax())
        scores = logits[None].float()
        for warp in self.warpers:
            scores = warp(None, scores)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def add(self, token: int, tokenizer_lock: threading.Lock) -> bool:
        """Take the row's next token; True when the row is done."""
        import torch  # heavy: see the module docstring

        self.gen.completion_tokens += 1
        self.last_token = token
        with tokenizer_lock:
            self.decoder.put(torch.tensor([token]))
        if self.hit_stop:
            return True
        return token in self.eos_ids or self.gen.completion_tokens >= self.gen.max_tokens

    def finish(self, tokenizer_lock: threading.Lock) -> None:
        if not self.hit_stop:
            with tokenizer_lock:
                self.decoder.end()
        if not self.hit_stop:
            tail, self.hit_stop = self.scanner.flush()
            self.gen._send(tail)
        ran_out = self.gen.completion_tokens >= self.gen.max_tokens and self.last_token not in self.eos_ids
        self.gen._finish("length" if ran_out and not self.hit_stop else "stop")


class Scheduler:
    """The thread that runs every forward pass of the model, batching the waiting requests."""

    def __init__(self, engine: Engine, *, max_batch: int = 16, max_queue: int = 64, batch_window_s: float = 0.005):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batch_window_s = batch_window_s
        self.waiting: queue.Queue[Generation] = queue.Queue(maxsize=max_queue)
        self.batches = 0  # how many batches ran, the largest, and requests that joined a running one (for tests)
        self.largest_batch = 0
        self.joined = 0
        self.idle = threading.Event()  # set while no batch runs (tests wait for it)
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    def submit(self, gen: Generation) -> None:
        try:
            self.waiting.put_nowait(gen)
        except queue.Full:
            gen.release()
            raise APIError(429, f"the server is busy: {self.max_queue} requests are already waiting for the model; "
                                f"retry in {RETRY_AFTER_S} s", type="rate_limit_exceeded", code="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None

    def _collect(self) -> list[Generation]:
        self.idle.set()
        batch = [self.waiting.get()]
        self.idle.clear()
        deadline = time.monotonic() + self.batch_window_s
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                batch.append(self.waiting.get(timeout=left) if left > 0 else self.waiting.get_nowait())
            except queue.Empty:
                break
        live = []
        for gen in batch:
            if gen.cancelled:  # its client left while it waited
                gen._finish(None)
            else:
                live.append(gen)
        return live

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            if not batch:
                continue
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(batch))
            try:
                self._run(batch)
            except BaseException as e:  # handed to each reader, which raises it in its request's thread
                for gen in batch:
                    if not gen._released:
                        gen._fail(e)
            finally:
                self.engine.disarm()

    def _run(self, batch: list[Generation]) -> None:
        import torch  # heavy: see the module docstring

        engine = self.engine
        with torch.inference_mode():
            running, logits = self._prefill(batch)
            while True:
                running.select(self._advance(running, logits))
                # Continuous batching: requests that came while this batch ran join it at a step's end, rather
                # than waiting for its longest row. Only for plain KV caches (sliding windows are not merged).
                room = self.max_batch - len(running.rows)
                if room > 0 and not self.waiting.empty() and running.mergeable():
                    joining = self._take_waiting(room)
                    if joining:
                        newcomers, first = self._prefill(joining)
                        newcomers.select(self._advance(newcomers, first))
                        running.extend(newcomers)
                        self.joined += len(joining)
                        self.largest_batch = max(self.largest_batch, len(running.rows))
                if not running.rows:
                    return
                step = torch.tensor([[row.last_token] for row in running.rows], device=engine.device)
                running.mask = torch.cat([running.mask, running.mask.new_ones((len(running.rows), 1))], dim=-1)
                running.positions = running.positions[:, -1:] + 1
                logits = engine.forward(step, running.mask, running.positions, running.cache, running.adapters)

    def _take_waiting(self, most: int) -> list[Generation]:
        taken = []
        while len(taken) < most:
            try:
                gen = self.waiting.get_nowait()
            except queue.Empty:
                break
            if gen.cancelled:
                gen._finish(None)
            else:
                taken.append(gen)
        return taken

    def _prefill(self, batch: list[Generation]) -> tuple[_Batch, Any]:
        """Run the prompts of `batch` through the model together; the rows and their last logits."""
        import torch  # heavy: see the module docstring

        engine = self.engine
        device = engine.device
        longest = max(len(g.prompt_ids) for g in batch)
        pad = engine.pad_token_id
        # Left padding: every row's last token sits in the last column, so one step appends one column for all.
        ids = torch.tensor([[pad] * (longest - len(g.prompt_ids)) + g.prompt_ids for g in batch], device=device)
        mask = torch.tensor([[0] * (longest - len(g.prompt_ids)) + [1] * len(g.prompt_ids) for g in batch],
                            device=device)
        # Position ids count real tokens only, so a padded row sees the same positions as when it runs alone.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        running = _Batch([_Row(g, device, engine.eos_ids) for g in batch], engine.new_cache(), mask, positions,
                         [g.served.adapter for g in batch])
        return running, engine.forward(ids, mask, positions, running.cache, running.adapters)

    def _advance(self, running: _Batch, logits) -> list[int]:
        """Give each row its next token; finish the rows that are done. The indices of the rows that go on."""
        lock = self.engine.tokenizer_lock
        keep = []
        for i, row in enumerate(running.rows):
            if row.gen.cancelled:
                log.info("generation stopped early after %d tokens: the client went away", row.gen.completion_tokens)
                row.gen._finish(None)
                continue
            if row.add(row.pick(logits[i]), lock):
                row.finish(lock)  # this row's client gets its last chunk now, not when the batch ends
                continue
            keep.append(i)
        return keep


class _Batch:
    """Rows decoding together: row i of the KV cache, the attention mask and the positions is `rows[i]`."""

    def __init__(self, rows: list[_Row], cache, mask, positions, adapters: list[str | None]):
        self.rows, self.cache, self.mask, self.positions, self.adapters = rows, cache, mask, positions, adapters

    def select(self, keep: list[int]) -> None:
        """Keep only these rows (the others finished): their cache rows too, so later steps cost less."""
        import torch  # heavy: see the module docstring

        if len(keep) == len(self.rows):
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        if keep:
            self.cache.batch_select_indices(index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        self.rows = [self.rows[i] for i in keep]
        self.adapters = [self.adapters[i] for i in keep]
        if keep:
            self._trim()

    def _trim(self) -> None:
        """Drop the leading columns no remaining row attends to (the padding and history of rows that left): under
        steady load a batch never empties, and its cache would otherwise grow by a column every step for ever."""
        if not self.mergeable():
            return
        first = int(self.mask.any(dim=0).int().argmax())
        if first == 0:
            return
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, first:, :], layer.values[:, :, first:, :]
        self.mask = self.mask[:, first:]

    def mergeable(self) -> bool:
        from transformers.cache_utils import DynamicLayer  # heavy

        layers = getattr(self.cache, "layers", None)
        return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)

    def extend(self, other: _Batch) -> None:
        """Append `other`'s rows. The shorter history is left-padded (masked out) so both line up at the right."""
        import torch  # heavy: see the module docstring
        from torch.nn.functional import pad

        if not other.rows:
            return
        if not self.rows:
            self.rows, self.cache, self.mask, self.positions, self.adapters = \
                other.rows, other.cache, other.mask, other.positions, other.adapters
            return
        mine, theirs = self.mask.shape[1], other.mask.shape[1]
        width = max(mine, theirs)
        for layer, new in zip(self.cache.layers, other.cache.layers):
            # keys and values are (batch, heads, length, head_dim): pad the length on the left.
            layer.keys = torch.cat([pad(layer.keys, (0, 0, width - mine, 0)),
                                    pad(new.keys, (0, 0, width - theirs, 0))])
            layer.values = torch.cat([pad(layer.values, (0, 0, width - mine, 0)),
                                      pad(new.values, (0, 0, width - theirs, 0))])
        self.mask = torch.cat([pad(self.mask, (width - mine, 0)), pad(other.mask, (width - theirs, 0))])
        self.positions = torch.cat([self.positions[:, -1:], other.positions[:, -1:]])
        self.rows += other.rows
        self.adapters += other.adapters


