"""Training speed of plain padded QLoRA batches against packed ones: `python -m payload.bench [--model PATH]`.

Prints tokens/s, padding waste and peak memory per variant, each measured in its own process with the HF Trainer:
`baseline` (no packing, fp32 compute, gradient checkpointing), `packed` (the trainer's defaults: packing, bf16 on a
GPU, gradient checkpointing) and `packed-no-gc`. Without --model it builds the tiny model (the CPU case).
`--demo` instead times the demo-sized run end to end, as `python -m payload.train` does it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULT_PREFIX = "BENCH_RESULT "

VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {"packing": False, "compute_dtype": "fp32", "gradient_checkpointing": True},
    "packed": {"packing": True, "compute_dtype": "auto", "gradient_checkpointing": True},
    "packed-no-gc": {"packing": True, "compute_dtype": "auto", "gradient_checkpointing": False},
}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One variant, in this process: train `warmup + steps` optimizer steps and time the last `steps`."""
    import torch
    from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from payload import data
    from payload.config import TrainConfig
    from payload.runtime import cpu_budget, pick_threads
    from payload.train import add_lora, load_model, make_collator, pick_attention, pick_compute_dtype

    variant = VARIANTS[spec["variant"]]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    micro_batch = spec["micro_batch_size"]
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    records = data.read_records(spec["data"]).records
    if records and records[0].format == "messages":
        data.ensure_chat_template(tokenizer)
    examples = [e for e in data.tokenize_records(records, tokenizer, spec["max_seq_length"]) if e.trainable_tokens]
    longest = max(len(e.input_ids) for e in examples)
    # Same token budget per micro-batch: `pack_rows` packs hold what the baseline's fullest padded micro-batch
    # holds, so activation memory is comparable and the gain is what packing and the compute dtype bring. More,
    # shorter rows cost less attention with SDPA's dense block-diagonal mask, and a little padding at row ends.
    rows = spec.get("pack_rows", 1)
    capacity = max(longest, micro_batch * longest // rows)
    if variant["packing"]:
        items, batch_size = data.build_packs(examples, capacity), rows
    else:
        items, batch_size = data.single_examples(examples), micro_batch

    cfg = TrainConfig(base_model=spec["model"], dataset=spec["data"], output_dir=spec["out"],
                      lora_r=spec["lora_r"], lora_alpha=spec["lora_r"], lora_dropout=0.0,
                      packing=variant["packing"], compute_dtype=variant["compute_dtype"],
                      gradient_checkpointing=variant["gradient_checkpointing"], micro_batch_size=batch_size,
                      gradient_accumulation_steps=1, max_seq_length=max(capacity, 16))
    dtype_name, dtype = pick_compute_dtype(cfg, device)
    attention = pick_attention(device)
    collate = make_collator(cfg, attention, tokenizer.pad_token_id)
    model = add_lora(cfg, load_model(cfg, spec["model"], True, device, dtype, attention))
    _, n_params = model.get_nb_trainable_parameters()
    torch.set_num_threads(pick_threads(n_params, cpu_budget(), spec.get("threads", 0)))

    seen = {"tokens": 0, "positions": 0}

    def counting_collator(features):
        batch = collate(features)
        seen["tokens"] += sum(len(f["input_ids"]) for f in features)
        seen["positions"] += batch["input_ids"].numel()
        return batch

    marks: list[tuple[float, int, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            marks.append((time.perf_counter(), seen["tokens"], seen["positions"]))

    steps = spec["warmup"] + spec["steps"]
    args = TrainingArguments(
        output_dir=spec["out"], per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=1e-4, max_grad_norm=0.3, save_strategy="no", logging_steps=10**6,
        report_to="none", disable_tqdm=True, remove_unused_columns=False, label_names=["labels"],
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        bf16=dtype_name == "bf16", use_cpu=device == "cpu", seed=0, dataloader_num_workers=0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(model=model, args=args, train_dataset=items, data_collator=counting_collator,
                      callbacks=[Clock()])
    trainer.train()

    (t0, tok0, pos0), (t1, tok1, pos1) = marks[spec["warmup"] - 1], marks[-1]
    if device == "cuda":
        peak_mb, peak_kind = torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    else:
        import resource

        peak_mb, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"
    return {
        "variant": spec["variant"], "device": device, "device_name": torch.cuda.get_device_name() if device == "cuda"
        else f"cpu x{torch.get_num_threads()} threads", "compute_dtype": dtype_name, "attention": attention,
        "collator": type(collate).__name__, "gradient_checkpointing": cfg.gradient_checkpointing,
        "micro_batch": batch_size, "pack_capacity": capacity if variant["packing"] else None,
        "pack_rows": rows if variant["packing"] else None,
        "timed_steps": spec["steps"], "seconds": round(t1 - t0, 3),
        "tokens_per_s": round((tok1 - tok0) / (t1 - t0), 1),
        "padding_waste": round(1 - (tok1 - tok0) / max(pos1 - pos0, 1), 4),
        "peak_memory_mb": round(peak_mb, 1), "peak_memory_kind": peak_kind,
        "pack_fill": round(data.pack_fill(examples, capacity), 4) if variant["packing"] else None,
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


def format_table(results: list[dict[str, Any]]) -> str:
    base = next((r for r in results if r["variant"] == "baseline"), None)
    head = f"{'variant':<14}{'tokens/s':>12}{'speed-up':>10}{'padding':>9}{'peak MB':>10}  settings"
    lines = [head, "-" * len(head)]
    for r in results:
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        settings = (f"{r['compute_dtype']}, {r['attention']}, {r['collator']}, micro-batch {r['micro_batch']}"
                    + (f" x pack {r['pack_capacity']} ({r['pack_fill']:.0%} full)" if r["pack_capacity"] else "")
                    + (", grad ckpt" if r["gradient_checkpointing"] else ""))
        lines.append(f"{r['variant']:<14}{r['tokens_per_s']:>12,.0f}{speed:>10}{r['padding_waste']:>9.1%}"
                     f"{r['peak_memory_mb']:>10,.0f}  {settings}")
    return "\n".join(lines)


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m payload.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="local model folder (default: build the tiny model)")
    ap.add_argument("--data", help="JSONL dataset (default: the shipped example chats)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=30, help="timed optimizer steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--micro-batch-size", type=int, default=8, help="the baseline's micro-batch (examples)")
    ap.add_argument("--pack-rows", type=int, default=2, help="packs per packed micro-batch (same token budget)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per variant, interleaved; the fastest counts")
    ap.add_argument("--max-seq-length", type=int, default=1024)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: the trainer's choice)")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--demo", action="store_true", help="time the demo-sized training run end to end instead")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        import logging
        import warnings

        warnings.filterwarnings("ignore")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        logging.disable(logging.WARNING)
        print(RESULT_PREFIX + json.dumps(measure(json.loads(args.child))), flush=True)
        return 0

    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        print(f"error: unknown variant(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    if min(args.steps, args.warmup, args.repeats, args.pack_rows, args.micro_batch_size) < 1:
        print("error: --steps, --warmup, --repeats, --pack-rows and --micro-batch-size must be at least 1",
              file=sys.stderr)
        return 2
    from payload.tinymodel import example_dataset_path

    data_path = str(Path(args.data or example_dataset_path()).resolve())
    with tempfile.TemporaryDirectory(prefix="tuneops-bench-") as tmp:
        if args.demo:
            return demo(data_path, Path(tmp))
        if args.model:
            model = str(Path(args.model).resolve())
            if not (Path(model) / "config.json").is_file():
                print(f"error: --model '{args.model}': not a model folder (no config.json)", file=sys.stderr)
                return 2
        else:
            from payload.tinymodel import build_tiny_model

            model = str(build_tiny_model(Path(tmp) / "tiny", [data_path]))
        print(f"model {model}\ndata {data_path}\n{args.steps} timed steps after {args.warmup} warm-up steps, "
              f"best of {args.repeats}; baseline micro-batch {args.micro_batch_size}", flush=True)
        best: dict[str, dict[str, Any]] = {}
        # Interleaved repeats, fastest run kept: on a shared machine the slow runs measure the neighbours.
        for _ in range(args.repeats):
            for name in names:
                spec = {"variant": name, "model": model, "data": data_path, "out": str(Path(tmp) / name),
                        "steps": args.steps, "warmup": args.warmup, "micro_batch_size": args.micro_batch_size,
                        "max_seq_length": args.max_seq_length, "lora_r": args.lora_r, "threads": args.threads,
                        "pack_rows": args.pack_rows}
                try:
                    r = run_variant(spec)
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    print(f"error: {e}", file=sys.stderr)
                    return 1
                if name not in best or r["tokens_per_s"] > best[name]["tokens_per_s"]:
                    best[name] = r
        results = [best[n] for n in names]
        device = results[0]["device_name"]
        print(f"device {device}\n" + format_table(results))
        base = next((r for r in results if r["variant"] == "baseline"), None)
        packed = next((r for r in results if r["variant"] == "packed"), None)
        if base and packed:
            print(f"packed vs baseline: {packed['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s, padding waste "
                  f"{packed['padding_waste']:.1%} vs {base['padding_waste']:.1%}, peak memory "
                  f"{packed['peak_memory_mb']:,.0f} vs {base['peak_memory_mb']:,.0f} MB")
        if args.json:
            Path(args.json).write_text(json.dumps({"model": model, "data": data_path, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
