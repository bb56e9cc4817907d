"""Training speed of tuneops' trainer against plain padded QLoRA and against TRL's SFTTrainer:
`python -m payload.bench [--model PATH] [--data FILE]`.

Every variant runs in its own process, the variants take turns (`--repeats` rounds), and each prints the min and
median of its real (non-pad) tokens/s, its peak memory and its final loss. tuneops' variants use the HF Trainer the way
`payload.train` does, chunked loss included: `baseline` (no packing, fp32 compute, gradient checkpointing),
`baseline-bf16` (the same in bf16, on a GPU only: packing and dtype measured apart), `packed-ga` (the trainer's
defaults: one pack a micro-batch, gradient accumulation over the step's packs, which is TRL's layout too, and gradient
checkpointing "auto", decided from a measured step), `packed-ga-gc` (the same with checkpointing forced on) and
`packed` (the step's packs in one micro-batch, checkpointing "auto").
The peer, `trl` and `trl-no-gc`, is TRL's SFTTrainer in its best configuration for the hardware
(`payload.bench_peer`), on the same base, data, tokens, LoRA and compute dtype.
Without --model it builds the tiny model; without --data it writes 320 synthetic chats of 20-400 words.
`--demo` instead times the demo-sized run end to end, as `python -m payload.train` does it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

RESULT_PREFIX = "BENCH_RESULT "
LOSS_WINDOW = 5              # the final loss is the mean of the last steps' losses: one step's loss is noisy

VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {"trainer": "tuneops", "packing": False, "compute_dtype": "fp32", "gradient_checkpointing": True},
    "baseline-bf16": {"trainer": "tuneops", "packing": False, "compute_dtype": "bf16", "gradient_checkpointing": True,
                      "gpu_only": True},
    "packed": {"trainer": "tuneops", "packing": True, "compute_dtype": "auto", "gradient_checkpointing": "auto"},
    # The trainer's defaults (micro_batch_size 1): one pack a micro-batch, the step's packs by gradient accumulation,
    # which is TRL's layout on the CPU too
    "packed-ga": {"trainer": "tuneops", "packing": True, "compute_dtype": "auto", "gradient_checkpointing": "auto",
                  "one_pack_per_micro_batch": True},
    "packed-ga-gc": {"trainer": "tuneops", "packing": True, "compute_dtype": "auto", "gradient_checkpointing": True,
                     "one_pack_per_micro_batch": True},
    "trl": {"trainer": "trl", "packing": True, "compute_dtype": "auto", "gradient_checkpointing": True},
    "trl-no-gc": {"trainer": "trl", "packing": True, "compute_dtype": "auto", "gradient_checkpointing": False},
}
GOAL = 1.5                   # tokens/s against TRL's best configuration, at no more peak memory


# ---------------------------------------------------------------------------------------------------------------
# Pure parts: the synthetic data, the default variants, the summary of the rounds, the table
# ---------------------------------------------------------------------------------------------------------------

def synthetic_chats(n: int, min_words: int, max_words: int, words: list[str], seed: int = 0) -> list[dict]:
    """`n` one-turn chats of `min_words`-`max_words` words (a quarter of them the question), drawn from `words`:
    the long and uneven examples that make packing and attention cost matter, with a vocabulary the tiny model has."""
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        total = rng.randint(min_words, max_words)
        asked = max(1, total // 4)
        chats.append({"messages": [
            {"role": "user", "content": " ".join(rng.choice(words) for _ in range(asked))},
            {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(max(1, total - asked)))},
        ]})
    return chats


def default_variants(gpu: bool, trl_installed: bool) -> list[str]:
    """Every variant the hardware runs: bf16 padding only on a GPU, the peer only when TRL is installed."""
    return [name for name, v in VARIANTS.items()
            if (gpu or not v.get("gpu_only")) and (trl_installed or v["trainer"] != "trl")]


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's rounds: its settings (from the first round) with min/median/max tokens/s, the median peak
    memory and final loss."""
    speeds = [r["tokens_per_s"] for r in runs]
    losses = [r["final_loss"] for r in runs if r.get("final_loss") is not None]
    return {**runs[0], "rounds": len(runs), "tokens_per_s": statistics.median(speeds),
            "tokens_per_s_min": min(speeds), "tokens_per_s_max": max(speeds),
            "peak_memory_mb": statistics.median(r["peak_memory_mb"] for r in runs),
            "final_loss": statistics.median(losses) if losses else None,
            "all_tokens_per_s": speeds}


def _ratio(r: dict[str, Any], ref: dict[str, Any] | None) -> str:
    return f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"


def describe(r: dict[str, Any]) -> str:
    """A variant's settings in one line: what makes its figures what they are."""
    rows = (f"micro-batch {r['micro_batch']} x grad accum {r['grad_accum']}" if r["grad_accum"] > 1
            else f"micro-batch {r['micro_batch']}")
    return (f"{r['trainer']}: {r['compute_dtype']}, {r['attention']}, {r['collator']}, {rows}"
            + (f" x pack {r['pack_capacity']} ({r['pack_fill']:.0%} full)" if r["pack_capacity"] else "")
            + (", grad ckpt" if r["gradient_checkpointing"] else ", no grad ckpt")
            + (" (auto)" if r.get("checkpointing_setting") == "auto" else "")
            + (", chunked loss" if r.get("chunked_loss") else "")
            + (f", LoRA weights {r['lora_dtype']}" if r.get("lora_dtype") else ""))


def trl_best(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The peer's best configuration here: the fastest of its variants in this invocation."""
    peers = [r for r in results if r["trainer"] == "trl"]
    return max(peers, key=lambda r: r["tokens_per_s"]) if peers else None


def format_table(results: list[dict[str, Any]]) -> str:
    """Medians of the rounds, with the slowest round beside them; speed-ups are ratios of medians, against the
    baseline and against TRL's best configuration."""
    base = next((r for r in results if r["variant"] == "baseline"), None)
    peer = trl_best(results)
    head = (f"{'variant':<15}{'tok/s med':>11}{'tok/s min':>11}{'vs base':>9}{'vs trl':>8}{'padding':>9}"
            f"{'peak MB':>9}{'final loss':>12}  settings")
    lines = [head, "-" * len(head)]
    for r in results:
        loss = f"{r['final_loss']:.4f}" if r.get("final_loss") is not None else "-"
        lines.append(f"{r['variant']:<15}{r['tokens_per_s']:>11,.0f}{r['tokens_per_s_min']:>11,.0f}"
                     f"{_ratio(r, base):>9}{_ratio(r, peer):>8}{r['padding_waste']:>9.1%}{r['peak_memory_mb']:>9,.0f}"
                     f"{loss:>12}  {describe(r)}")
    return "\n".join(lines)


def comparisons(results: list[dict[str, Any]]) -> list[str]:
    """The lines that answer the benchmark's questions: packing against padding, tuneops' defaults against TRL's
    best configuration (the goal), and like for like with checkpointing on both sides."""
    by = {r["variant"]: r for r in results}
    lines = []

    def line(a: str, b: str, label: str | None = None) -> None:
        if a in by and b in by:
            x, y = by[a], by[b]
            lines.append(f"{label or a + ' vs ' + b}: {x['tokens_per_s'] / y['tokens_per_s']:.2f}x tokens/s (median; "
                         f"slowest rounds {x['tokens_per_s_min'] / y['tokens_per_s_min']:.2f}x), padding waste "
                         f"{x['padding_waste']:.1%} vs {y['padding_waste']:.1%}, peak memory "
                         f"{x['peak_memory_mb']:,.0f} vs {y['peak_memory_mb']:,.0f} MB "
                         f"({x['peak_memory_mb'] / y['peak_memory_mb']:.2f}x)")

    line("packed", "baseline")
    line("packed-ga", "baseline")
    line("baseline-bf16", "baseline")
    best = trl_best(results)
    if best is not None:
        line("packed-ga", best["variant"], f"packed-ga (the trainer's defaults) vs {best['variant']} (TRL's best here)")
        line("packed", best["variant"])
        if best["variant"] != "trl":
            line("packed-ga-gc", "trl", "packed-ga-gc vs trl (checkpointing on both sides)")
        if "packed-ga" in by:
            x = by["packed-ga"]
            speed, mem = x["tokens_per_s"] / best["tokens_per_s"], x["peak_memory_mb"] / best["peak_memory_mb"]
            met = speed >= GOAL and mem <= 1.0
            lines.append(f"goal >= {GOAL}x TRL's best at no more peak memory: {'met' if met else 'missed'} "
                         f"({speed:.2f}x tokens/s at {mem:.2f}x the memory)")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# One variant, in a child process
# ---------------------------------------------------------------------------------------------------------------

def load_examples(spec: dict[str, Any]):
    """The tokenizer and the trainable examples: what both trainers get, token for token."""
    from transformers import AutoTokenizer

    from payload import data

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    records = data.read_records(spec["data"]).records
    if records and records[0].format == "messages":
        data.ensure_chat_template(tokenizer)
    examples = [e for e in data.tokenize_records(records, tokenizer, spec["max_seq_length"]) if e.trainable_tokens]
    return tokenizer, examples


def pack_capacity(spec: dict[str, Any], longest: int) -> int:
    """Same token budget per optimizer step as the baseline's fullest padded micro-batch: `pack_rows` packs hold
    what it holds, so activation memory is comparable and the gain is what packing and the compute dtype bring."""
    return max(longest, spec["micro_batch_size"] * longest // spec.get("pack_rows", 1))


class Meter:
    """What a timed run records, whichever trainer runs it: real tokens and computed positions of the micro-batches
    the model has run, the clock at each optimizer step's end, and each step's loss."""

    def __init__(self, device: str):
        self.device = device
        self.tokens = 0
        self.positions = 0
        self.collated: deque[tuple[int, int]] = deque()
        self.marks: list[tuple[float, int, int]] = []
        self.losses: list[float] = []

    def wrap(self, collate):
        """The collator, noting each batch's real tokens and positions. The data loader collates ahead of the
        training step, so they count only once the model runs the batch (`attach`)."""
        def counting(features):
            batch = collate(features)
            self.collated.append((sum(len(f["input_ids"]) for f in features), batch["input_ids"].numel()))
            return batch
        return counting

    def attach(self, model) -> None:
        def consume(module, args):
            if module.training and self.collated:
                tokens, positions = self.collated.popleft()
                self.tokens += tokens
                self.positions += positions
        model.register_forward_pre_hook(consume)

    def callback(self):
        import torch
        from transformers import TrainerCallback

        meter = self

        class Clock(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if meter.device == "cuda":
                    torch.cuda.synchronize()
                meter.marks.append((time.perf_counter(), meter.tokens, meter.positions))

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    meter.losses.append(float(logs["loss"]))

        return Clock()

    def result(self, warmup: int, steps: int) -> dict[str, Any]:
        (t0, tok0, pos0), (t1, tok1, pos1) = self.marks[warmup - 1], self.marks[-1]
        tail = self.losses[-LOSS_WINDOW:]
        return {"timed_steps": steps, "seconds": round(t1 - t0, 3),
                "tokens_per_s": round((tok1 - tok0) / (t1 - t0), 1),
                "padding_waste": round(1 - (tok1 - tok0) / max(pos1 - pos0, 1), 4),
                "final_loss": round(sum(tail) / len(tail), 5) if tail else None,
                "first_loss": round(self.losses[0], 5) if self.losses else None}


def training_args(spec: dict[str, Any], device: str, dtype_name: str, gradient_checkpointing: bool,
                  micro_batch: int, grad_accum: int) -> dict[str, Any]:
    """The TrainingArguments both trainers share: steps, optimizer, clipping, dtype, logging every step."""
    return dict(output_dir=spec["out"], per_device_train_batch_size=micro_batch,
                gradient_accumulation_steps=grad_accum, max_steps=spec["warmup"] + spec["steps"],
                learning_rate=1e-4, max_grad_norm=0.3, lr_scheduler_type="constant", warmup_steps=0,
                save_strategy="no", logging_steps=1, report_to="none", disable_tqdm=True,
                gradient_checkpointing=gradient_checkpointing, bf16=dtype_name == "bf16", use_cpu=device == "cpu",
                seed=0, dataloader_num_workers=0)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One variant, in this process: train `warmup + steps` optimizer steps and time the last `steps`."""
    import torch

    from payload import data, loss, memory
    from payload.config import TrainConfig
    from payload.runtime import cpu_budget, pick_threads
    from payload.train import (
        add_lora,
        decide_checkpointing,
        load_model,
        make_collator,
        pick_attention,
        pick_compute_dtype,
    )

    variant = VARIANTS[spec["variant"]]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer, examples = load_examples(spec)
    longest = max(len(e.input_ids) for e in examples)
    rows = spec.get("pack_rows", 1)
    capacity = pack_capacity(spec, longest)
    packing = variant["packing"]
    grad_accum = rows if variant.get("one_pack_per_micro_batch") else 1
    cfg = TrainConfig(base_model=spec["model"], dataset=spec["data"], output_dir=spec["out"],
                      lora_r=spec["lora_r"], lora_alpha=spec["lora_r"], lora_dropout=0.0,
                      packing=packing, compute_dtype=variant["compute_dtype"],
                      gradient_checkpointing=variant["gradient_checkpointing"],
                      micro_batch_size=(rows // grad_accum) if packing else spec["micro_batch_size"],
                      gradient_accumulation_steps=grad_accum, max_seq_length=max(capacity, 16))
    dtype_name, dtype = pick_compute_dtype(cfg, device)
    attention = pick_attention(device)
    if variant["trainer"] == "trl" and attention != "flash_attention_2":
        attention = "sdpa"              # TRL's own choice: tuneops' per-example attention is none of the peer's
    meter = Meter(device)
    base = load_model(cfg, spec["model"], True, device, dtype, attention)
    peak = memory.PeakMeter(device)
    # Both trainers' peak from the loaded base on (LoRA, data, training); a measured step ("auto") resets the
    # high-water mark again, so tuneops' then counts from that step, which adding LoRA before it stays far below.
    peak.reset()
    checkpointing = memory.Decision(on=bool(cfg.gradient_checkpointing), setting="config", reason="the variant's")
    if variant["trainer"] == "trl":
        from payload.bench_peer import trl_trainer

        def shared_args(micro_batch: int, accumulate: int) -> dict[str, Any]:
            return training_args(spec, device, dtype_name, cfg.gradient_checkpointing, micro_batch, accumulate)

        trainer, settings = trl_trainer(shared_args, cfg, base, tokenizer, examples, meter, dtype_name, attention)
    else:
        from transformers import Trainer, TrainingArguments

        model = add_lora(cfg, base)
        collate = make_collator(cfg, attention, tokenizer.pad_token_id)
        items = data.build_packs(examples, capacity) if packing else data.single_examples(examples)
        checkpointing = decide_checkpointing(cfg, model, items, collate, device, dtype_name)
        args = TrainingArguments(
            **training_args(spec, device, dtype_name, checkpointing.on, cfg.micro_batch_size, grad_accum),
            gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing.on else None,
            remove_unused_columns=False, label_names=["labels"])
        trainer = Trainer(model=model, args=args, train_dataset=items, data_collator=meter.wrap(collate),
                          callbacks=[meter.callback()])
        settings = {"collator": type(collate).__name__, "micro_batch": cfg.micro_batch_size,
                    "grad_accum": grad_accum, "lora_dtype": None, "chunked_loss": loss.installed(model)}
    meter.attach(trainer.model)
    _, n_params = trainer.model.get_nb_trainable_parameters()
    torch.set_num_threads(pick_threads(n_params, cpu_budget(), spec.get("threads", 0)))
    trainer.train()
    peak_mb, peak_kind = peak.peak_mb(), peak.kind
    return {
        "variant": spec["variant"], "trainer": variant["trainer"], "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "compute_dtype": dtype_name, "attention": attention, "gradient_checkpointing": checkpointing.on,
        "checkpointing_setting": checkpointing.setting, "checkpointing_reason": checkpointing.reason,
        **settings, **meter.result(spec["warmup"], spec["steps"]),
        "pack_capacity": capacity if packing else None,
        "pack_fill": round(data.pack_fill(examples, capacity), 4) if packing else None,
        "peak_memory_mb": round(peak_mb, 1), "peak_memory_kind": peak_kind,
        "examples": len(examples), "longest_example": longest,
    }


def run_variant(spec: dict[str, Any]) -> dict[str, Any]:
    """Each variant in a fresh process, so that its peak memory is its own."""
    cmd = [sys.executable, "-m", "payload.bench", "--child", json.dumps(spec)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=spec.get("timeout", 1800))
    for line in res.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"variant {spec['variant']} failed (exit {res.returncode}): {tail}")


def demo(data_path: str, tmp: Path) -> int:
    """The demo run (tiny model, shipped examples, DEMO_OVERRIDES) through the real CLI, timed from the outside."""
    from payload.config import DEMO_OVERRIDES
    from payload.tinymodel import build_tiny_model

    model = build_tiny_model(tmp / "tiny", [data_path])
    cfg = {**DEMO_OVERRIDES, "run_id": "demo", "base_model": str(model), "dataset": data_path, "output_dir": "run"}
    (tmp / "run.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "payload.train", "--config", "run.json"], cwd=tmp,
                         capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        print(f"error: the demo run failed: {(res.stderr.strip().splitlines() or ['no output'])[-1]}",
              file=sys.stderr)
        return 1
    m = json.loads((tmp / "run" / "metrics.json").read_text())
    print(f"demo run: {m['steps']} steps in {wall:.1f} s wall ({m['train_runtime_s']:.1f} s training, "
          f"{m['tokens_per_s']:,.0f} tokens/s, {m['torch_threads']} torch thread(s), {m['device']})")
    print(f"  train loss {m['first_loss']:.3f} -> {m['last_loss']:.3f}; held-out loss base {m['base_eval_loss']:.3f} "
          f"-> fine-tuned {m['eval_loss']:.3f}; padding waste {m['padding_waste']:.1%}; "
          f"peak memory {m['peak_memory_mb']:,.0f} MB")
    return 0


def write_synthetic_data(path: Path, n: int, min_words: int, max_words: int) -> Path:
    """The benchmark's default data: synthetic chats over the shipped chats' words (so the tiny model knows them)."""
    from payload.tinymodel import WORD_RE, _texts, example_dataset_path

    words = sorted({w for text in _texts(example_dataset_path()) for w in WORD_RE.findall(text.lower())
                    if w.isalnum()})
    chats = synthetic_chats(n, min_words, max_words, words)
    path.write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")
    return path


def _child(spec_json: str) -> int:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.disable(logging.WARNING)
    print(RESULT_PREFIX + json.dumps(measure(json.loads(spec_json))), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m payload.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="local model folder (default: build the tiny model)")
    ap.add_argument("--hidden", type=int, default=256, help="the built tiny model's hidden size")
    ap.add_argument("--layers", type=int, default=4, help="the built tiny model's layers")
    ap.add_argument("--data", help="JSONL dataset (default: --synthetic chats over the shipped chats' words)")
    ap.add_argument("--synthetic", type=int, default=320, help="how many synthetic chats without --data")
    ap.add_argument("--words", default="20-400", help="the synthetic chats' length range, in words")
    ap.add_argument("--variants", help="comma-separated, from: " + ", ".join(VARIANTS)
                    + " (default: all the hardware runs; trl* when TRL is installed: pip install '.[bench]')")
    ap.add_argument("--steps", type=int, default=30, help="timed optimizer steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--micro-batch-size", type=int, default=8, help="the baseline's micro-batch (examples)")
    ap.add_argument("--pack-rows", type=int, default=2, help="packs per optimizer step (same token budget)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; the variants take turns in each")
    ap.add_argument("--max-seq-length", type=int, default=1024)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: the trainer's choice)")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--demo", action="store_true", help="time the demo-sized training run end to end instead")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        return _child(args.child)

    trl_installed = importlib.util.find_spec("trl") is not None
    if args.variants:
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
    else:
        import torch

        names = default_variants(torch.cuda.is_available(), trl_installed)
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        print(f"error: unknown variant(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    if not trl_installed and any(VARIANTS[n]["trainer"] == "trl" for n in names):
        print("error: the trl variants need TRL: pip install '.[bench]'", file=sys.stderr)
        return 2
    if min(args.steps, args.warmup, args.repeats, args.pack_rows, args.micro_batch_size) < 1:
        print("error: --steps, --warmup, --repeats, --pack-rows and --micro-batch-size must be at least 1",
              file=sys.stderr)
        return 2
    try:
        lo, hi = (int(x) for x in args.words.split("-"))
        assert 1 <= lo <= hi
    except (ValueError, AssertionError):
        print(f"error: --words '{args.words}': expected MIN-MAX, e.g. 20-400", file=sys.stderr)
        return 2
    if not args.variants and not trl_installed:
        print("note: TRL is not installed (pip install '.[bench]'): measuring without the peer", flush=True)

    with tempfile.TemporaryDirectory(prefix="tuneops-bench-") as tmp:
        if args.demo:
            from payload.tinymodel import example_dataset_path

            return demo(str(Path(args.data or example_dataset_path()).resolve()), Path(tmp))
        if args.data:
            data_path = str(Path(args.data).resolve())
        else:
            data_path = str(write_synthetic_data(Path(tmp) / "synthetic.jsonl", args.synthetic, lo, hi))
        if args.model:
            model = str(Path(args.model).resolve())
            if not (Path(model) / "config.json").is_file():
                print(f"error: --model '{args.model}': not a model folder (no config.json)", file=sys.stderr)
                return 2
        else:
            from payload.tinymodel import build_tiny_model

            model = str(build_tiny_model(Path(tmp) / "tiny", [data_path], hidden_size=args.hidden,
                                         layers=args.layers))
        print(f"model {model}\ndata {data_path}\n{args.steps} timed steps after {args.warmup} warm-up steps, "
              f"{args.repeats} rounds taking turns; baseline micro-batch {args.micro_batch_size}, "
              f"{args.pack_rows} packs a step", flush=True)
        runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        # Rounds taking turns, each variant in its own process: on a shared machine, a slow stretch hits all alike.
        for _ in range(args.repeats):
            for name in names:
                spec = {"variant": name, "model": model, "data": data_path, "out": str(Path(tmp) / name),
                        "steps": args.steps, "warmup": args.warmup, "micro_batch_size": args.micro_batch_size,
                        "max_seq_length": args.max_seq_length, "lora_r": args.lora_r, "threads": args.threads,
                        "pack_rows": args.pack_rows}
                try:
                    runs[name].append(run_variant(spec))
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    print(f"error: {e}", file=sys.stderr)
                    return 1
        results = [summarize(runs[n]) for n in names]
        print(f"device {results[0]['device_name']}; tokens/s count real (non-pad) tokens; final loss: mean of the "
              f"last {LOSS_WINDOW} steps; peak memory: {results[0]['peak_memory_kind']}\n" + format_table(results))
        for line in comparisons(results):
            print(line)
        if args.json:
            Path(args.json).write_text(json.dumps({"model": model, "data": data_path, "results": results,
                                                   "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
