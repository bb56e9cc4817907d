"""The inference engine: checks the base model and adapter given on the command line, loads them, and generates text
for chat messages, one request at a time on the one loaded model.

torch, transformers, peft and safetensors are imported inside the functions that use them: a wrong path must be a
one-line error before seconds go into importing them, and torch only after `torch_problem()` has said it works.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from payload.runtime import torch_problem
from payload.serving.openai_schema import APIError

log = logging.getLogger("payload.serve")  # the server's one logger name, as its operators know it from the log

DEFAULT_MAX_TOKENS = 512


# ---------------------------------------------------------------------------------------------------------------------
# Startup checks: a wrong path is a one-line message and exit code 2, never a traceback.

class StartupError(Exception):
    """What is wrong with the model or adapter given on the command line, and what to do, in one line."""


def check_base(base: Path) -> None:
    if not base.is_dir():
        raise StartupError(f"base model folder not found: {base} (give --base the folder that holds config.json)")
    if not (base / "config.json").is_file():
        raise StartupError(f"no config.json in {base}: --base must be a model folder saved by transformers")


def check_adapter(adapter: Path) -> dict[str, Any]:
    """Return the adapter's parsed adapter_config.json."""
    if not adapter.is_dir():
        raise StartupError(f"adapter folder not found: {adapter} (a finished run writes it to <run folder>/adapter; "
                           "use --base-only to serve the base model alone)")
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise StartupError(f"adapter_config.json not found in {adapter}: give --adapter the folder a finished run "
                           "wrote (<run folder>/adapter), or --base-only to serve the base model alone")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise StartupError(f"{config_file} cannot be read as JSON ({e}); the adapter folder is damaged, "
                           "copy it again from the run folder") from None
    if not isinstance(config, dict):
        raise StartupError(f"{config_file} is not a JSON object; the adapter folder is damaged")
    return config


LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


def adapter_mismatch(adapter_shapes: dict[str, tuple[int, ...]],
                     base_linears: dict[str, tuple[int, int]]) -> str | None:
    """Say why LoRA weights (key -> shape) do not fit a base's linear layers (name -> (in, out)); None when they do.

    lora_A is (r, in_features) and lora_B is (out_features, r) of the layer they adapt.
    """
    for key in sorted(adapter_shapes):
        m = LORA_KEY.match(key)
        if m is None:
            continue
        module, part = m["module"], m["part"]
        if module not in base_linears:
            return f"the adapter changes layer {module}, which the base model does not have"
        in_features, out_features = base_linears[module]
        shape = adapter_shapes[key]
        got, expected = (shape[1], in_features) if part == "A" else (shape[0], out_features)
        side = "inputs" if part == "A" else "outputs"
        if got != expected:
            return f"layer {module} has {expected} {side} in the base model but {got} in the adapter"
    return None


def default_model_id(base: Path, adapter: Path | None) -> str:
    """The id clients see: the run id for `<run folder>/adapter`, else the adapter's or the base's folder name."""
    if adapter is None:
        return base.resolve().name
    adapter = adapter.resolve()
    return adapter.parent.name if adapter.name == "adapter" else adapter.name


# ---------------------------------------------------------------------------------------------------------------------
# The engine: one loaded model, generation serialized by a lock, text streamed from a background thread.

class StopScanner:
    """Finds stop sequences in text that arrives in pieces, holding back a tail that may be the start of one."""

    def __init__(self, stops: list[str] | tuple[str, ...]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Return (text that is safe to send, whether a stop sequence was met)."""
        self.pending += piece
        return self._scan(final=False)

    def flush(self) -> tuple[str, bool]:
        """At the end of the text: what is left to send, and whether it held a stop sequence after all."""
        return self._scan(final=True)

    def _scan(self, final: bool) -> tuple[str, bool]:
        # The stop that starts first in the whole text wins. A stop found in what is pending may still lose to a
        # longer one that starts earlier and is not complete yet (stops "|" and "<|<", pending "<|"): until the text
        # says, everything from that earlier start is held back.
        text = self.pending
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        first = min(hits) if hits else len(text)
        if not final:
            for i in range(first):
                if any(len(s) > len(text) - i and s.startswith(text[i:]) for s in self.stops):
                    out, self.pending = text[:i], text[i:]
                    return out, False
        self.pending = ""
        return text[:first], bool(hits)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: as many as DEFAULT_MAX_TOKENS and the context allow
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


class GenerationError(RuntimeError):
    """The model failed while generating (an error of ours, logged with its traceback)."""


class Generation:
    """One generation, run in a background thread once iterated. Iterate it for text pieces; afterwards
    `finish_reason`, `prompt_tokens` and `completion_tokens` are set. Closing the iteration early stops the model."""

    def __init__(self, engine: Engine, prompt_ids: list[int], max_tokens: int, params: SamplingParams):
        from transformers import TextIteratorStreamer  # heavy: see the module docstring

        self.engine = engine
        self.prompt_ids = prompt_ids
        self.max_tokens = max_tokens
        self.params = params
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._last_token: int | None = None
        self._error: BaseException | None = None
        self._cancelled = threading.Event()
        self._hit_stop = False
        self._stopped_early = False
        self._streamer = TextIteratorStreamer(engine.tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._thread = threading.Thread(target=self._run, name="generate", daemon=True)

    def cancel(self) -> None:
        self._cancelled.set()

    def _should_stop(self, input_ids, scores, **kwargs):
        """generate()'s stopping criterion: stop as soon as the request is cancelled."""
        import torch  # heavy: see the module docstring

        stop = self._cancelled.is_set()
        self._stopped_early |= stop
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    def _run(self) -> None:
        import torch  # heavy: see the module docstring

        ended = False
        try:
            with self.engine.lock:
                if self._cancelled.is_set():
                    return
                ids = torch.tensor([self.prompt_ids], device=self.engine.model.device)
                kwargs: dict[str, Any] = {"max_new_tokens": self.max_tokens, "do_sample": self.params.temperature > 0}
                if kwargs["do_sample"]:
                    kwargs.update(temperature=self.params.temperature, top_p=self.params.top_p)
                    if self.params.seed is not None:
                        torch.manual_seed(self.params.seed)
                out = self.engine.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), streamer=self._streamer,
                    stopping_criteria=[self._should_stop], pad_token_id=self.engine.pad_token_id, **kwargs)
                ended = True  # generate() ends the streamer itself
                self.completion_tokens = out.shape[1] - ids.shape[1]
                self._last_token = int(out[0, -1]) if self.completion_tokens else None
            if self._stopped_early and not self._hit_stop:
                log.info("generation stopped early after %d tokens: the client went away", self.completion_tokens)
        except BaseException as e:  # handed to the reader, which raises it in the request's thread
            self._error = e
        finally:
            if not ended:
                self._streamer.end()

    def __iter__(self) -> Iterator[str]:
        started = time.monotonic()
        self._thread.start()
        scanner = StopScanner(self.params.stop)
        hit_stop = False
        try:
            for piece in self._streamer:
                text, hit_stop = scanner.feed(piece)
                if text:
                    yield text
                if hit_stop:
                    self._hit_stop = True
                    self.cancel()
                    break
            if not hit_stop:
                tail, hit_stop = scanner.flush()
                if tail:
                    yield tail
                self._hit_stop = self._hit_stop or hit_stop
        finally:
            self.cancel()  # if the reader went away (client disconnected), free the model for the next request
        self._thread.join()
        if self._error is not None:
            raise GenerationError(f"generation failed: {self._error!r}") from self._error
        ran_out = self.completion_tokens >= self.max_tokens and self._last_token not in self.engine.eos_ids
        self.finish_reason = "length" if ran_out and not hit_stop else "stop"
        seconds = time.monotonic() - started
        log.info("generated model=%s prompt_tokens=%d completion_tokens=%d seconds=%.2f tokens_per_s=%.1f finish=%s",
                 self.engine.model_id, self.prompt_tokens, self.completion_tokens, seconds,
                 self.completion_tokens / seconds if seconds else 0.0, self.finish_reason)


class Engine:
    """A loaded model and tokenizer. One model is shared by all requests, so generation holds `lock`."""

    def __init__(self, model, tokenizer, model_id: str, *, description: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.description = description or model_id
        self.created = int(time.time())
        self.lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()  # fast tokenizers are not safe to call from two threads at once
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or tokenizer.model_max_length)
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt's token ids: the chat template with the assistant's turn opened."""
        from jinja2 import TemplateError  # comes with transformers' chat templates, not a dependency of ours

        with self._tokenizer_lock:
            try:
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except TemplateError as e:
                raise APIError(400, f"the model's chat template refused these messages: {e}",
                               param="messages") from None
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, messages: list[dict[str, str]], params: SamplingParams) -> Generation:
        prompt_ids = self.encode(messages)
        room = self.max_context - len(prompt_ids)
        if params.max_tokens is None and room < 1 or params.max_tokens is not None and params.max_tokens > room:
            asked = params.max_tokens or 1
            raise APIError(400, f"this model's maximum context length is {self.max_context} tokens, but "
                                f"{len(prompt_ids)} are in the messages and {asked} more were asked for; shorten the "
                                "messages or lower max_tokens", param="messages", code="context_length_exceeded")
        max_tokens = params.max_tokens or min(DEFAULT_MAX_TOKENS, room)
        return Generation(self, prompt_ids, max_tokens, params)


def load_engine(base: Path, adapter: Path | None, *, load_in_4bit: bool | None = None,
                model_name: str | None = None) -> Engine:
    """Load the base (4-bit NF4 on GPU; fp32 on CPU unless `load_in_4bit`) and apply the adapter, if any."""
    check_base(base)
    adapter_config = check_adapter(adapter) if adapter is not None else None
    problem = torch_problem()
    if problem:
        raise StartupError(problem)

    import torch  # heavy, and only now that torch_problem() said it works
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    on_gpu = torch.cuda.is_available()
    four_bit = on_gpu if load_in_4bit is None else load_in_4bit
    # bf16 compute on GPU (fp16 is unstable with NF4); CPUs have no fast bf16 matmul, so fp32 there.
    compute = torch.bfloat16 if on_gpu else torch.float32
    kwargs: dict[str, Any] = {"device_map": {"": 0 if on_gpu else "cpu"}}
    if four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute)
    else:
        kwargs["dtype"] = compute
    from safetensors import SafetensorError  # comes with transformers, imported with it

    try:
        model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    # RuntimeError: out of GPU memory; SafetensorError: a weights file cut short or damaged
    except (OSError, ValueError, KeyError, ImportError, RuntimeError, SafetensorError) as e:
        raise StartupError(f"cannot load the base model from {base}: {_first_line(e)}") from None

    tokenizer_dir = adapter if adapter is not None and (adapter / "tokenizer_config.json").is_file() else base
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as e:
        raise StartupError(f"cannot load the tokenizer from {tokenizer_dir}: {_first_line(e)}") from None
    if not tokenizer.chat_template:
        raise StartupError(f"the tokenizer in {tokenizer_dir} has no chat template; serve an instruct/chat model "
                           "or an adapter whose folder holds the tokenizer it was trained with")

    description = f"{base.name}, {'4-bit NF4' if four_bit else str(compute).removeprefix('torch.')}, " \
                  f"{'cuda' if on_gpu else 'cpu'}"
    if adapter is not None:
        _check_adapter_fits(adapter, adapter_config, base, model)
        from peft import PeftModel  # heavy: only when there is an adapter

        try:
            model = PeftModel.from_pretrained(model, adapter)
        except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
            raise StartupError(f"cannot apply the adapter in {adapter} to {base}: {_first_line(e)}") from None
        description += f", adapter {adapter}"
    model.eval()
    return Engine(model, tokenizer, model_name or default_model_id(base, adapter), description=description)


def _check_adapter_fits(adapter: Path, adapter_config: dict[str, Any], base: Path, model) -> None:
    """Refuse an adapter trained for another base before peft fails on it with a long shape dump."""
    trained_on = adapter_config.get("base_model_name_or_path") or "unknown"
    # Same shapes do not prove the same weights (two 7B Llamas look alike), so a different name is worth a warning.
    if trained_on != "unknown" and Path(trained_on).name != base.resolve().name:
        log.warning("the adapter names %r as its base but is served on %s; check its answers", trained_on, base)
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        return  # an older .bin adapter: peft's own load is the check
    from safetensors import SafetensorError, safe_open  # comes with transformers, imported with it

    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (OSError, SafetensorError) as e:
        raise StartupError(f"{weights} cannot be read ({_first_line(e)}); the adapter folder is damaged, copy it again "
                           "from the run folder") from None
    linears = {name: (m.in_features, m.out_features) for name, m in model.named_modules()
               if isinstance(getattr(m, "in_features", None), int) and isinstance(getattr(m, "out_features", None), int)}
    problem = adapter_mismatch(shapes, linears)
    if problem:
        raise StartupError(f"the adapter in {adapter} was trained for a different base model ({problem}); "
                           f"adapter_config.json names {trained_on!r} as its base: serve it with that base")


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
