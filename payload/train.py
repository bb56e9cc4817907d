"""QLoRA fine-tuning of one run: `python -m payload.train --config run.json`.

Reads the run config and the dataset, checks the data before any model is loaded, trains a LoRA adapter on a
4-bit NF4 base with the transformers Trainer, resumes by itself from the newest complete checkpoint, and writes
`<output_dir>/adapter/`, `metrics.json` and the progress events (stdout and `events.jsonl`).
Under `torchrun --nproc_per_node N -m payload.train ...` it trains on N GPUs with DDP; rank 0 writes the run folder.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from payload import checkpoints as ckpts
from payload import data, distributed, loss, memory
from payload.config import ConfigError, TrainConfig, load_config
from payload.events import PREFIX, EventWriter, encode, make_event
from payload.modelpath import ModelNotFound, hub_failure, resolve_model
from payload.runtime import cpu_budget, env_threads, pick_threads, torch_problem

# torch, transformers, peft and bitsandbytes are imported inside the functions that use them ("heavy" below): a bad
# config or dataset is reported before seconds go into importing them.

log = logging.getLogger("payload.train")

CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
METRICS_FILE = "metrics.json"
ERROR_LOG = "error.log"
OOM_HINT = "out of memory: lower micro_batch_size or max_seq_length (or turn gradient_checkpointing on) and resume"

# Under torchrun the Trainer (its DDP model, and so the gloo process group) is kept here until the process leaves
# with os._exit: freeing the group can deadlock (its worker thread waits for the GIL that the thread freeing it
# holds; seen here with torch 2.13 when run() returned on rank 1).
_KEPT_UNTIL_EXIT: list = []


class TrainError(Exception):
    """A failure the run's owner can fix; its message is the one line shown to them."""


class Interrupted(Exception):
    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class PeerDied(Exception):
    """Another rank's process exited mid-run; `writes` when this rank is the lowest one alive, which then writes
    the error event (rank 0, unless it is the one that died)."""

    def __init__(self, message: str, writes: bool):
        super().__init__(message)
        self.writes = writes


class NoEvents:
    """The event writer of ranks other than 0: rank 0 tells the story for all of them."""

    def emit(self, type_: str, **fields: Any) -> dict[str, Any]:
        return make_event(type_, **fields)


# ---------------------------------------------------------------------------------------------------------------
# Small pure helpers
# ---------------------------------------------------------------------------------------------------------------

def plan_steps(n_items: int, micro_batch_size: int, grad_accum: int, num_epochs: float, max_steps: int,
               world_size: int = 1) -> int:
    """Optimizer steps the run will take, computed as the Trainer does (batches are not dropped; with several ranks
    each gets every world_size-th batch, the last ones topped up from the start)."""
    batches = math.ceil(math.ceil(n_items / micro_batch_size) / world_size)
    per_epoch = max(batches // grad_accum + int(batches % grad_accum > 0), 1)
    return max_steps if max_steps > 0 else math.ceil(num_epochs * per_epoch)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# Stop on SIGTERM at a step boundary, with a checkpoint
# ---------------------------------------------------------------------------------------------------------------

class StopSignal:
    """SIGTERM (ACA stop or replica timeout) or SIGINT: inside the training loop the Trainer finishes the step and
    saves a checkpoint; anywhere else the run stops at once. SIGKILL needs no handling: checkpoints are atomic."""

    def __init__(self):
        self.signum: int | None = None
        self.in_training = False
        self.phase = "before training"
        self.quiet = False      # set once the run is ending for another reason that its error event must say

    def install(self) -> None:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum
        if not self.in_training and not self.quiet:
            raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} {self.phase}; "
                                      "start the run again to continue")


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------

def read_dataset(cfg: TrainConfig) -> data.ReadResult:
    """Read and check the dataset; the first problem (and how many more there are) is the error."""
    result = data.read_records(cfg.dataset)
    if result.errors:
        more = f" (and {len(result.errors) - 1} more; run `python -m payload.validate {cfg.dataset}`)" \
            if len(result.errors) > 1 else ""
        raise TrainError(result.errors[0] + more)
    return result


@dataclass(frozen=True)
class PreparedData:
    """The checked records split, tokenized and packed: what the Trainer trains and evaluates on, and the figures
    that go into the start event and metrics.json."""

    format: str | None                              # the dataset's format: messages, prompt_completion or text
    train_records: list[data.Record]
    eval_records: list[data.Record]
    train_examples: list[data.TokenizedExample]     # only those with an answer token within max_seq_length
    eval_examples: list[data.TokenizedExample]
    train_items: list[dict[str, list[int]]]         # the Trainer's rows: packs, or one example each
    eval_items: list[dict[str, list[int]]]
    truncated: int                                  # examples cut at max_seq_length, kept or not
    tokens_per_epoch: int
    trainable_tokens_per_epoch: int
    padding_waste: float
    pack_fill: float | None                         # None without packing


def prepare_data(cfg: TrainConfig, result: data.ReadResult, tokenizer, flatten: bool = False) -> PreparedData:
    """Split, tokenize and pack checked records. Raises TrainError when nothing trainable is left.
    `flatten`: packs of a micro-batch go into one row (varlen attention), else one row per pack."""
    if result.format == "messages" and data.ensure_chat_template(tokenizer):
        log.warning("the tokenizer has no chat template; using a plain '### role:' template")
    train_recs, eval_recs = data.split_records(result.records, cfg.eval_split, cfg.seed)
    train_ex = data.tokenize_records(train_recs, tokenizer, cfg.max_seq_length)
    eval_ex = data.tokenize_records(eval_recs, tokenizer, cfg.max_seq_length)
    truncated = sum(e.truncated for e in train_ex + eval_ex)
    empty = [e for e in train_ex + eval_ex if e.trainable_tokens == 0]
    if truncated:
        log.warning("%d examples are longer than max_seq_length (%d tokens) and are cut; %d of them lose every "
                    "answer token and are left out", truncated, cfg.max_seq_length, len(empty))
    train_ex = [e for e in train_ex if e.trainable_tokens > 0]
    eval_ex = [e for e in eval_ex if e.trainable_tokens > 0]
    if not train_ex:
        raise TrainError(f"{cfg.dataset}: no example has an answer token within max_seq_length "
                         f"({cfg.max_seq_length}); raise max_seq_length")
    if cfg.packing:
        train_items = data.build_packs(train_ex, cfg.max_seq_length)
        eval_items = data.build_packs(eval_ex, cfg.max_seq_length)
    else:
        train_items, eval_items = data.single_examples(train_ex), data.single_examples(eval_ex)
    batches = [[len(x["input_ids"]) for x in train_items[i:i + cfg.micro_batch_size]]
               for i in range(0, len(train_items), cfg.micro_batch_size)]
    return PreparedData(
        format=result.format, train_records=train_recs, eval_records=eval_recs,
        train_examples=train_ex, eval_examples=eval_ex, train_items=train_items, eval_items=eval_items,
        truncated=truncated,
        tokens_per_epoch=sum(len(e.input_ids) for e in train_ex),
        trainable_tokens_per_epoch=sum(e.trainable_tokens for e in train_ex),
        # Flattened packs compute no padding at all; rows of packs pad to the longest pack of their micro-batch.
        padding_waste=data.padding_waste(batches, padded=not (cfg.packing and flatten)),
        pack_fill=data.pack_fill(train_ex, cfg.max_seq_length) if cfg.packing else None,
    )


def load_tokenizer(model_ref: str, local: bool, base_model: str):
    from transformers import AutoTokenizer  # heavy

    try:
        tok = AutoTokenizer.from_pretrained(model_ref, token=None if local else os.environ.get("HF_TOKEN") or None)
    except Exception as e:  # noqa: BLE001 - every loader failure becomes one line naming the model
        if not local:
            raise TrainError(str(hub_failure(base_model, e))) from None
        raise TrainError(f"base_model '{base_model}': cannot load its tokenizer: {str(e).splitlines()[0][:200]}") \
            from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def pick_compute_dtype(cfg: TrainConfig, device: str):
    import torch  # heavy

    name = cfg.compute_dtype
    if name == "auto":
        name = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp16" and device != "cuda":
        raise TrainError("compute_dtype 'fp16' needs a GPU; use 'auto' or 'fp32' on a CPU")
    return name, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def pick_attention(device: str) -> str:
    """Flash attention's varlen kernels when installed on a GPU; on the CPU, SDPA on each example of a pack on its own
    (payload/attention.py): either way a pack costs the sum of its examples' squares, not the square of its length.
    A GPU without flash_attn keeps SDPA's block-diagonal mask (per-example attention is measured on the CPU only)."""
    if device == "cuda":
        return "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else "sdpa"
    from payload import attention  # imports transformers: heavy

    return attention.register()


def make_collator(cfg: TrainConfig, attention: str, pad_token_id: int | None):
    # Padding is never a target and never attended to, so any id serves when a tokenizer has neither pad nor eos.
    pad_token_id = 0 if pad_token_id is None else pad_token_id
    if not cfg.packing:
        return data.PaddedCollator(pad_token_id)
    if attention == "flash_attention_2":
        return data.PaddingFreeCollator()
    return data.PackedRowsCollator(pad_token_id)


def load_model(cfg: TrainConfig, model_ref: str, local: bool, device: str, dtype, attention: str = "sdpa",
               gpu: int = 0):
    """The base model (4-bit NF4 with double quantization unless turned off), ready for k-bit training, whole on
    `gpu` (each DDP rank loads its own copy on its own GPU)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # heavy

    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": {"": gpu} if device == "cuda" else "cpu",
                              "attn_implementation": attention}
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
    if not local:
        kwargs["token"] = os.environ.get("HF_TOKEN") or None
    try:
        model = AutoModelForCausalLM.from_pretrained(model_ref, **kwargs)
    except Exception as e:  # noqa: BLE001
        if memory.is_oom(e):
            raise
        if not local:
            raise TrainError(str(hub_failure(cfg.base_model, e))) from None
        raise TrainError(f"base_model '{cfg.base_model}': cannot load the model: {str(e).splitlines()[0][:200]}") \
            from None
    # Packed batches need use_cache=False: with a cache transformers does not build the block-diagonal mask.
    model.config.use_cache = False
    return model


def add_lora(cfg: TrainConfig, model):
    """The LoRA adapter on the base, with the chunked loss where the model type allows it (payload.loss).
    Gradient checkpointing is turned on here only when the config says true; "auto" decides later, measured."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training  # heavy

    gc_kwargs = {"use_reentrant": False}
    checkpointing = cfg.gradient_checkpointing is True
    if cfg.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs=gc_kwargs)
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        model.enable_input_require_grads()
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules, bias="none", task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:
        raise TrainError(f"bad value for 'target_modules': {str(e).splitlines()[0][:200]}") from None
    loss.install(model)
    return model


def decide_checkpointing(cfg: TrainConfig, model, items: list[dict], collator, device: str, dtype_name: str,
                         gpu: int = 0) -> memory.Decision:
    """Gradient checkpointing as the config says, or, for "auto", from a measured step of the heaviest micro-batch."""
    decision = memory.decide(cfg.gradient_checkpointing, model,
                             lambda: memory.heaviest_batch(items, cfg.micro_batch_size, collator),
                             device, _autocast(device, dtype_name), gpu)
    log.info("gradient checkpointing %s: %s", "on" if decision.on else "off", decision.reason)
    return decision


def quantization_summary(model, cfg: TrainConfig, dtype_name: str) -> dict[str, Any]:
    """What the model really runs: the 4-bit layers found in it, their quantization type and compute dtype."""
    summary: dict[str, Any] = {"load_in_4bit": cfg.load_in_4bit, "compute_dtype": dtype_name}
    if not cfg.load_in_4bit:
        return summary
    import bitsandbytes as bnb  # heavy

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    states = [getattr(m.weight, "quant_state", None) for m in layers]
    summary.update({
        "linear4bit_layers": len(layers),
        "quant_types": sorted({s.quant_type for s in states if s is not None}),
        "double_quant": bool(states) and all(s is not None and s.nested for s in states),
        "weight_storage": sorted({str(m.weight.dtype).replace("torch.", "") for m in layers}),
        "layer_compute_dtype": sorted({str(m.compute_dtype).replace("torch.", "") for m in layers
                                       if getattr(m, "compute_dtype", None) is not None}),
        "bitsandbytes": bnb.__version__,
    })
    return summary


def make_callback(cfg: TrainConfig, events: EventWriter | NoEvents, stop: StopSignal, total_steps: int,
                  ranks: distributed.Ranks | None = None, device: str = "cpu", evaluate=None):
    """`evaluate`: with several ranks, rank 0 computes the held-out loss itself at each save (see `run`)."""
    from transformers import TrainerCallback  # heavy; the callback class below derives from it

    ranks = ranks or distributed.Ranks()

    ckpt_root = Path(cfg.output_dir) / CHECKPOINTS_DIR

    class ProgressCallback(TrainerCallback):
        """Progress events, checkpoint markers and rotation, and stopping on SIGTERM."""

        def __init__(self):
            self.t0 = time.monotonic()
            self.step0 = 0
            self.tokens0 = 0
            self.losses: list[tuple[int, float]] = []
            self.evals: list[tuple[int, float]] = []
            # tokens/s of each logging interval: their median is the run's throughput for cost estimates (warm-up,
            # evals and checkpoint saves between two logs do not drag it the way they drag the mean)
            self.rates: list[float] = []
            self.last_log: tuple[float, int] = (0.0, 0)
            self.stopped = False

        def on_train_begin(self, args, state, control, **kw):
            self.t0, self.step0, self.tokens0 = time.monotonic(), state.global_step, state.num_input_tokens_seen
            self.last_log = (self.t0, self.tokens0)
            if state.max_steps != total_steps:
                log.warning("the Trainer plans %d steps, %d were announced", state.max_steps, total_steps)

        def on_step_end(self, args, state, control, **kw):
            stopping = stop.signum is not None
            if ranks.multi:
                # Every rank stops after the same step, or the others would wait for it in the next one.
                stopping = distributed.any_rank(stopping, device)
            if stopping:
                self.stopped = True
                control.should_save = True
                control.should_training_stop = True
            if state.global_step >= state.max_steps:
                control.should_save = True   # the last step always leaves a checkpoint: a restart need not retrain
            if control.should_save:
                target = ckpt_root / f"{ckpts.PREFIX}{state.global_step}"
                # A leftover of an interrupted save at this step is useless and must not mix with the new files.
                if ranks.main and ckpts.discard_incomplete(target):
                    log.warning("removed the incomplete %s before saving over it", target.name)
                if evaluate is not None and ranks.main:
                    self.on_evaluate(args, state, control, metrics={"eval_loss": evaluate()})
                if ranks.multi:
                    distributed.barrier()    # no rank writes its files into the folder before it is cleared

        def on_save(self, args, state, control, **kw):
            if ranks.multi:
                distributed.barrier()        # every rank's files (its RNG state) are there before the marker lists them
            if not ranks.main:
                return
            path = ckpt_root / f"{ckpts.PREFIX}{state.global_step}"
            ckpts.mark_complete(path, state.global_step)
            # Rotation is routine (the checkpoint event says what was saved): it stays out of the run's log excerpts.
            for old in ckpts.rotate(ckpt_root, cfg.save_total_limit):
                log.debug("removed old checkpoint %s", old.name)
            events.emit("checkpoint", step=state.global_step, path=str(path))

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "loss" not in logs:
                return
            now = time.monotonic()
            elapsed = max(now - self.t0, 1e-9)
            done = max(state.global_step - self.step0, 1)
            since, tokens_then = self.last_log
            if now > since and state.num_input_tokens_seen > tokens_then:
                self.rates.append((state.num_input_tokens_seen - tokens_then) / (now - since))
            self.last_log = (now, state.num_input_tokens_seen)
            loss = float(logs["loss"])
            self.losses.append((state.global_step, loss))
            events.emit(
                "step", step=state.global_step, total_steps=state.max_steps, epoch=round(state.epoch or 0.0, 4),
                loss=round(loss, 5), lr=float(logs.get("learning_rate", 0.0)),
                tokens_per_s=round((state.num_input_tokens_seen - self.tokens0) / elapsed, 1),
                eta_s=round(elapsed / done * (state.max_steps - state.global_step), 1),
            )

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            if metrics and metrics.get("eval_loss") is not None:
                self.evals.append((state.global_step, float(metrics["eval_loss"])))
                events.emit("eval", step=state.global_step, eval_loss=round(float(metrics["eval_loss"]), 5))

    return ProgressCallback()


def eval_loss(model, items: list[dict], collator, batch_size: int, device: str) -> float | None:
    """Token-weighted mean loss over the answer tokens of `items` (None when there are none)."""
    import torch  # heavy

    total = 0.0
    count = 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            batch = {k: v.to(device) for k, v in collator(items[i:i + batch_size]).items()}
            n = int((batch["labels"][..., 1:] != data.IGNORE_INDEX).sum())
            if n == 0:
                continue
            out = model(**batch, use_cache=False)
            total += float(out.loss) * n
            count += n
    return total / count if count else None


def generate(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, device: str) -> str:
    import torch  # heavy

    ids = torch.tensor([prompt_ids], device=device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True).strip()


def final_evaluation(cfg: TrainConfig, model, tokenizer, prepared: PreparedData, collator, device: str,
                     dtype_name: str = "fp32") -> dict[str, Any]:
    """Eval loss of the base model against the fine-tuned one on the held-out split, and both generations for a
    few held-out prompts: the evidence an approver looks at before a deploy."""
    items = prepared.eval_items
    result: dict[str, Any] = {"eval_examples": len(prepared.eval_examples)}
    if not items:
        return result
    with _autocast(device, dtype_name):
        return _evaluate(cfg, model, tokenizer, prepared, collator, device, result)


def _autocast(device: str, dtype_name: str):
    """The same mixed precision the Trainer trains under (it autocasts when bf16/fp16 is on)."""
    import torch  # heavy

    if device == "cuda" and dtype_name in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if dtype_name == "bf16" else torch.float16)
    return contextlib.nullcontext()


def _evaluate(cfg, model, tokenizer, prepared, collator, device, result):
    items = prepared.eval_items
    result["eval_loss"] = eval_loss(model, items, collator, cfg.micro_batch_size, device)
    with model.disable_adapter():
        result["base_eval_loss"] = eval_loss(model, items, collator, cfg.micro_batch_size, device)
    generations = []
    for rec in prepared.eval_records[: cfg.eval_generations]:
        prompt_ids, reference = data.prompt_for_generation(rec, tokenizer)
        prompt_ids = prompt_ids[-(cfg.max_seq_length - 1):]
        entry = {"line": rec.line, "prompt": tokenizer.decode(prompt_ids, skip_special_tokens=True),
                 "reference": reference}
        entry["fine_tuned"] = generate(model, tokenizer, prompt_ids, cfg.max_new_tokens, device)
        with model.disable_adapter():
            entry["base"] = generate(model, tokenizer, prompt_ids, cfg.max_new_tokens, device)
        generations.append(entry)
    result["generations"] = generations
    return result


def save_adapter(model, tokenizer, out_dir: Path) -> Path:
    """Write the adapter and tokenizer next to their final place, then swap them in, so that a reader never sees
    a half-written adapter."""
    final = out_dir / ADAPTER_DIR
    tmp = out_dir / (ADAPTER_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (tmp / name).is_file():
            raise TrainError(f"no adapter was written: {name} is missing in {tmp}")
    old = out_dir / (ADAPTER_DIR + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _wandb_enabled(cfg: TrainConfig) -> bool:
    if not (cfg.report_to_wandb and os.environ.get("WANDB_API_KEY")):
        return False
    if importlib.util.find_spec("wandb") is None:
        log.warning("WANDB_API_KEY is set but the wandb package is not installed; not reporting to W&B")
        return False
    return True


def start_wandb(cfg: TrainConfig):
    """The run's W&B run, or None when W&B is off or would not start (the training goes on without it).
    Started here rather than by the Trainer's WandbCallback (which adopts a run already started) so that project,
    entity, name, the run config and the local folder (`<output_dir>/wandb`) come from the run config."""
    if not _wandb_enabled(cfg):
        return None
    import wandb  # heavy and optional: the payload's container may not have it

    try:
        return wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity or None, name=cfg.run_id or None,
                          dir=cfg.output_dir, config={"tuneops": cfg.model_dump()})
    except Exception as e:  # noqa: BLE001 - W&B is a report of the run, never a reason to fail it
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        log.warning("W&B did not start (%s); training without it", first)
        return None


def _peer_died(ranks: distributed.Ranks, step: int, ckpt_root: Path) -> PeerDied | None:
    """When another rank has exited: the error that says which and what to resume from, else None."""
    # A failed collective is the usual first sign; the peer's process may show as gone a moment later.
    dead = distributed.dead_peers(ranks, wait_s=3.0)
    if not dead:
        return None
    newest, _ = ckpts.newest_complete(ckpt_root)
    alive = [r for r in range(ranks.world_size) if r not in dead]
    return PeerDied(distributed.peer_death_message(dead, ranks, step, newest.step if newest else None),
                    writes=bool(alive) and ranks.rank == min(alive))


def run(cfg: TrainConfig, events: EventWriter | NoEvents, stop: StopSignal,
        ranks: distributed.Ranks | None = None) -> dict[str, Any]:
    """Train one run end to end; returns the metrics also written to metrics.json (by rank 0; {} on the others)."""
    ranks = ranks or distributed.Ranks()
    t_start = time.monotonic()
    out_dir = Path(cfg.output_dir)
    ckpt_root = out_dir / CHECKPOINTS_DIR

    # 1. Data and tokenizer, before any model is loaded.
    records = read_dataset(cfg)
    try:
        model_ref, local = resolve_model(cfg.base_model)
    except ModelNotFound as e:
        raise TrainError(str(e)) from None
    import torch  # heavy, and only once the data and the model's path are known to be good

    problem = torch_problem()
    if problem:
        raise TrainError(problem)
    configured_threads = cfg.num_threads or env_threads()
    torch.set_num_threads(configured_threads or cpu_budget())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype_name, dtype = pick_compute_dtype(cfg, device)
    tokenizer = load_tokenizer(model_ref, local, cfg.base_model)
    attention = pick_attention(device)
    prepared = prepare_data(cfg, records, tokenizer, flatten=attention == "flash_attention_2")
    total_steps = plan_steps(len(prepared.train_items), cfg.micro_batch_size, cfg.gradient_accumulation_steps,
                             cfg.num_epochs, cfg.max_steps, ranks.world_size)

    # 2. Where to resume from: the newest complete checkpoint; incomplete newer ones are skipped, not deleted.
    resume, skipped = ckpts.newest_complete(ckpt_root)
    for c in skipped:
        log.warning("skipping %s: %s", c.path.name, c.reason)
    resumed_from = resume.step if resume else 0
    if resume:
        log.info("resuming from %s", resume.path.name)

    # 3. Model: 4-bit base + LoRA adapter.
    from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed  # heavy

    set_seed(cfg.seed)
    model = load_model(cfg, model_ref, local, device, dtype, attention, gpu=ranks.local_rank)
    peak_meter = memory.PeakMeter(device, ranks.local_rank)
    # The peak of training, from the loaded base on (loading's transients are not training); with "auto" the measured
    # step resets it again and it counts from there: adding LoRA before it allocates little.
    peak_meter.reset()
    model = add_lora(cfg, model)
    quant = quantization_summary(model, cfg, dtype_name)
    if cfg.load_in_4bit and not quant.get("linear4bit_layers"):
        raise TrainError("4-bit loading was asked for but the model has no 4-bit layers; set load_in_4bit false")
    trainable, total_params = model.get_nb_trainable_parameters()
    threads = pick_threads(total_params, cpu_budget(), configured_threads)
    torch.set_num_threads(threads)
    collator = make_collator(cfg, attention, tokenizer.pad_token_id)
    checkpointing = decide_checkpointing(cfg, model, prepared.train_items, collator, device, dtype_name,
                                         ranks.local_rank)

    # 4. Train (under torchrun: once every rank has its model, so that slow loading counts against no timeout).
    if ranks.multi:
        distributed.init(ranks, device)
        if distributed.any_rank(checkpointing.on, device) and not checkpointing.on:
            checkpointing = dataclasses.replace(checkpointing, on=True,
                                                reason=checkpointing.reason + "; another rank needs it")
    events.emit("start", total_steps=total_steps, run_id=cfg.run_id, base_model=cfg.base_model, device=device,
                examples=len(prepared.train_records) + len(prepared.eval_records),
                train_examples=len(prepared.train_examples), eval_examples=len(prepared.eval_examples),
                sequences=len(prepared.train_items), tokens_per_epoch=prepared.tokens_per_epoch,
                resumed_from_step=resumed_from, resumed_from=str(resume.path) if resume else None,
                skipped_checkpoints=[f"{c.path.name}: {c.reason}" for c in skipped], world_size=ranks.world_size,
                gradient_checkpointing=checkpointing.as_event(), chunked_loss=loss.installed(model))
    wandb_run = start_wandb(cfg) if ranks.main else None
    if wandb_run is not None and not wandb_run.offline and wandb_run.url:
        events.emit("link", name="wandb", url=wandb_run.url)
    # With several ranks the Trainer's evaluation is wrong on a held-out set that does not split evenly (transformers
    # 5.24 divides each batch by the answer tokens of the topped-up one, then drops the top-up: 3.8 for a true 4.6,
    # measured), so rank 0 evaluates alone, token-weighted as the final evaluation, at the same steps.
    has_eval = bool(prepared.eval_items) and not ranks.multi

    def evaluate_alone() -> float | None:
        with _autocast(device, dtype_name):
            loss = eval_loss(model, prepared.eval_items, collator, cfg.micro_batch_size, device)
        model.train()
        return loss

    args = TrainingArguments(
        output_dir=str(ckpt_root),
        per_device_train_batch_size=cfg.micro_batch_size,
        per_device_eval_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,             # a float below 1 is a ratio of the total steps
        max_grad_norm=cfg.max_grad_norm,
        gradient_checkpointing=checkpointing.on,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing.on else None,
        bf16=dtype_name == "bf16",
        fp16=dtype_name == "fp16",
        use_cpu=device == "cpu",
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=None,                     # rotation is ours: it must never drop the last complete one
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.save_steps if has_eval else None,
        prediction_loss_only=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=["wandb"] if wandb_run is not None else "none",
        run_name=cfg.run_id or None,
        disable_tqdm=True,
        remove_unused_columns=False,
        label_names=["labels"],
        include_num_input_tokens_seen="all",
        dataloader_num_workers=0,
        # Every LoRA weight takes part in every step: DDP need not search the graph for unused ones.
        ddp_find_unused_parameters=False if ranks.multi else None,
        ddp_timeout=distributed.PROCESS_GROUP_TIMEOUT_S,
    )
    callback = make_callback(cfg, events, stop, total_steps, ranks, device,
                             evaluate=evaluate_alone if ranks.multi and prepared.eval_items else None)
    trainer = Trainer(model=model, args=args, train_dataset=prepared.train_items,
                      eval_dataset=prepared.eval_items if has_eval else None,
                      data_collator=collator, callbacks=[callback])
    trainer.remove_callback(PrinterCallback)       # our events are the log; its dict lines would repeat them
    if ranks.multi:
        _KEPT_UNTIL_EXIT.append(trainer)
    stop.in_training = True
    try:
        output = trainer.train(resume_from_checkpoint=str(resume.path) if resume else None)
    except Exception:
        # A dead peer shows here as a failed collective (or torchrun's SIGTERM turns into one): say which died.
        died = _peer_died(ranks, trainer.state.global_step, ckpt_root) if ranks.multi else None
        if died is not None:
            stop.quiet = True   # torchrun's SIGTERM to the survivors must not cut short the error event
            raise died from None
        raise
    finally:
        stop.in_training = False
        stop.phase = "after training, before the adapter and metrics were written"
    if callback.stopped:
        signum = stop.signum or signal.SIGTERM      # the signal may have reached another rank only
        name = signal.Signals(signum).name
        raise Interrupted(signum, f"stopped by {name} at step {trainer.state.global_step} "
                                  f"(checkpoint-{trainer.state.global_step} saved); start the run again to resume")
    if not ranks.main:
        return {}
    train_runtime = float(output.metrics.get("train_runtime", 0.0))
    tokens_this_run = trainer.state.num_input_tokens_seen - callback.tokens0

    # 5. Adapter, evaluation, metrics.
    adapter = save_adapter(model, tokenizer, out_dir)
    evaluation = final_evaluation(cfg, model, tokenizer, prepared, collator, device, dtype_name)
    if evaluation.get("eval_loss") is not None:
        events.emit("eval", step=trainer.state.global_step, eval_loss=round(evaluation["eval_loss"], 5),
                    base_eval_loss=round(evaluation["base_eval_loss"], 5), final=True)
    peak, peak_kind = peak_meter.peak_mb(), peak_meter.kind
    metrics = {
        "run_id": cfg.run_id,
        "base_model": cfg.base_model,
        "device": device,
        "world_size": ranks.world_size,
        "torch_threads": threads if device == "cpu" else None,
        "quantization": quant,
        "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                 "target_modules": cfg.target_modules, "trainable_params": trainable, "total_params": total_params},
        "steps": trainer.state.global_step,
        "total_steps": total_steps,
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "resumed_from_step": resumed_from,
        "train_loss": output.training_loss if tokens_this_run else None,
        "first_loss": callback.losses[0][1] if callback.losses else None,
        "last_loss": callback.losses[-1][1] if callback.losses else None,
        "loss_history": callback.losses,
        "eval_history": callback.evals,
        "eval_loss": evaluation.get("eval_loss"),
        "base_eval_loss": evaluation.get("base_eval_loss"),
        "eval_examples": evaluation["eval_examples"],
        "generations": evaluation.get("generations", []),
        "train_examples": len(prepared.train_examples),
        "truncated_examples": prepared.truncated,
        "tokens_per_epoch": prepared.tokens_per_epoch,
        "trainable_tokens_per_epoch": prepared.trainable_tokens_per_epoch,
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "tokens_this_run": tokens_this_run,
        "train_runtime_s": round(train_runtime, 3),
        "tokens_per_s": round(tokens_this_run / train_runtime, 1) if train_runtime > 0 else None,
        "tokens_per_s_median": round(statistics.median(callback.rates), 1) if callback.rates else None,
        "duration_s": round(time.monotonic() - t_start, 3),
        "peak_memory_mb": round(peak, 1),
        "peak_memory_kind": peak_kind,
        "packing": cfg.packing,
        "attention": attention,
        "gradient_checkpointing": checkpointing.as_event(),
        # what the model really ran with: a decoder layer's flag, set by the Trainer when the decision says on
        "gradient_checkpointing_applied": any(getattr(m, "gradient_checkpointing", False) is True
                                              for m in model.modules()),
        "chunked_loss": loss.installed(model),
        "collator": type(collator).__name__,
        "padding_waste": round(prepared.padding_waste, 4),
        "pack_fill": None if prepared.pack_fill is None else round(prepared.pack_fill, 4),
        "adapter": str(adapter),
    }
    _write_json_atomic(out_dir / METRICS_FILE, metrics)
    if wandb_run is not None:
        # The held-out comparison happens after the Trainer is done, so it goes to W&B here; finishing now (not at
        # exit) leaves the W&B run complete before the done event says the run is.
        wandb_run.summary.update({f"final/{k}": metrics[k] for k in ("eval_loss", "base_eval_loss", "tokens_per_s")
                                  if metrics[k] is not None})
        wandb_run.finish()
    events.emit("done", adapter=str(adapter), metrics={k: metrics[k] for k in (
        "steps", "train_loss", "first_loss", "last_loss", "eval_loss", "base_eval_loss", "tokens_per_s",
        "tokens_per_s_median",
        "duration_s", "peak_memory_mb", "padding_waste")})
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------

def _fallback_output_dir(config_path: str) -> str | None:
    """The output_dir of a config that failed validation, when it can still be read, so the error event lands
    where the watcher looks."""
    try:
        text = Path(config_path).read_text(encoding="utf-8")
        if Path(config_path).suffix in (".yaml", ".yml"):
            import yaml  # optional: only YAML configs need PyYAML

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception:  # noqa: BLE001 - unreadable in any way: there is no output_dir to use
        return None
    out = raw.get("output_dir") if isinstance(raw, dict) else None
    return out if isinstance(out, str) and out.strip() else None


def _fail(message: str, events: EventWriter | None, code: int = 1, rank: int = 0) -> int:
    one_line = " ".join(message.split())
    if rank:
        # Not rank 0: rank 0 writes the event; this rank's line goes only to the log (which rank said it, too).
        if events is not None:
            events.emit("error", message=one_line)
        print(f"error (rank {rank}): {one_line}", file=sys.stderr, flush=True)
        return code
    if events is not None:
        try:
            events.emit("error", message=one_line)
        except OSError:
            print(PREFIX + encode(make_event("error", message=one_line)), flush=True)
    else:
        print(PREFIX + encode(make_event("error", message=one_line)), flush=True)
    print(f"error: {one_line}", file=sys.stderr, flush=True)
    return code


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)   # library deprecation notes, not run problems
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for name in ("transformers", "peft", "accelerate", "bitsandbytes", "httpx", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m payload.train", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="run config (JSON or YAML)")
    args = ap.parse_args(argv)
    _quiet_libraries()
    stop = StopSignal()
    stop.install()

    ranks = distributed.from_env()
    events: EventWriter | None = None
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        out = _fallback_output_dir(args.config) if ranks.main else None
        try:
            events = EventWriter(out) if out else None
        except OSError:
            events = None
        return _fail(str(e), events, rank=ranks.rank)
    if ranks.main:
        try:
            events = EventWriter(cfg.output_dir)
        except OSError as e:
            return _fail(f"output_dir '{cfg.output_dir}': cannot write there: {e.strerror}", None)

    try:
        import transformers  # heavy, and only once the config is known to be good

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        run(cfg, events or NoEvents(), stop, ranks)
        return 0
    except TrainError as e:
        return _fail(str(e), events, rank=ranks.rank)
    except PeerDied as e:
        if e.writes and events is None:
            with contextlib.suppress(OSError):
                events = EventWriter(cfg.output_dir)
        return _fail(str(e), events if e.writes else None, rank=ranks.rank)
    except Interrupted as e:
        message = str(e)
        if ranks.multi and e.signum == signal.SIGTERM and "before training" in message:
            message += " (torchrun stops every rank when one fails: the log says which)"
        return _fail(message, events, 128 + e.signum, rank=ranks.rank)
    except BaseException as e:  # noqa: BLE001 - the boundary: one line for people, the traceback in a file
        if isinstance(e, KeyboardInterrupt):
            return _fail("interrupted", events, 130, rank=ranks.rank)
        if isinstance(e, SystemExit):
            raise
        if memory.is_oom(e):
            return _fail(OOM_HINT, events, rank=ranks.rank)
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        if not ranks.main:                      # only rank 0 writes into the run folder
            traceback.print_exc()
            return _fail(f"internal error: {type(e).__name__}: {first}", None, rank=ranks.rank)
        path = Path(cfg.output_dir) / ERROR_LOG
        try:
            path.write_text(traceback.format_exc(), encoding="utf-8")
        except OSError:
            traceback.print_exc()
        return _fail(f"internal error: {type(e).__name__}: {first} (details in {path})", events)


if __name__ == "__main__":
    code = main()
    if distributed.from_env().multi:
        # Everything is written and flushed; skipping the interpreter's teardown skips the deadlock (see above).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)
