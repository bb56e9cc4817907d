"""The whole GPU check in one command, sized for a short loan of a GPU machine: `python -m payload.gpucheck`.

Runs, each as its own process with a time limit: the trainer's GPU path (4-bit NF4, bf16, flash attention when
installed) through `python -m payload.train`; the inference server on the trained adapter, asked through the openai
client; and `python -m payload.bench` against TRL. Nothing is downloaded: without --model it builds a random
Llama of about 0.7B parameters (hidden 2048, 16 layers) and synthetic chats. `--dry-run` (and any machine without
CUDA) runs the same steps on the CPU at tiny size, in well under a minute, so that CI proves the script works.
Writes `summary.json` and each step's log under --out; exits 0 only when every step passed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from payload.bench import write_synthetic_data


@dataclass(frozen=True)
class Plan:
    """Sizes of one check: the GPU's (minutes) or the dry run's (seconds)."""

    gpu: bool
    hidden: int
    layers: int
    heads: int
    chats: int
    words: tuple[int, int]
    train_steps: int
    micro_batch: int
    bench_variants: tuple[str, ...]
    bench_steps: int
    bench_warmup: int
    bench_repeats: int
    max_tokens: int
    timeouts: dict[str, int]     # seconds per step run as a process; building the model takes about a minute


def make_plan(gpu: bool, trl_installed: bool) -> Plan:
    """What to run: on a GPU the benchmark's questions at a 0.5-1.5B size; on the CPU the same steps, tiny."""
    peer = ("trl",) if trl_installed else ()
    if gpu:
        # TRL's best on a GPU may be without checkpointing (memory to spare): both are measured, the faster counts.
        return Plan(gpu=True, hidden=2048, layers=16, heads=16, chats=320, words=(20, 400), train_steps=30,
                    micro_batch=4, bench_variants=("baseline", "baseline-bf16", "packed-ga") + peer
                    + (("trl-no-gc",) if peer else ()), bench_steps=10,
                    bench_warmup=3, bench_repeats=2, max_tokens=64,
                    timeouts={"train": 120, "serve": 90, "bench": 330})
    return Plan(gpu=False, hidden=64, layers=2, heads=4, chats=16, words=(10, 40), train_steps=2, micro_batch=2,
                bench_variants=("packed-ga",) + peer, bench_steps=1, bench_warmup=1, bench_repeats=1, max_tokens=8,
                timeouts={"train": 120, "serve": 120, "bench": 240})


def train_config(plan: Plan, model: str, data: str, out: str) -> dict[str, Any]:
    """The run config of the training step: the payload's defaults (4-bit, auto dtype, packing, gradient
    checkpointing) at a size that takes a minute or two."""
    return {"run_id": "gpucheck", "base_model": model, "dataset": data, "output_dir": out,
            "max_steps": plan.train_steps, "micro_batch_size": plan.micro_batch, "gradient_accumulation_steps": 1,
            "lora_r": 16, "lora_alpha": 16, "lora_dropout": 0.0, "learning_rate": 2e-4,
            "max_seq_length": 1024, "save_steps": plan.train_steps, "eval_split": 0.1, "eval_generations": 1,
            "max_new_tokens": 16, "report_to_wandb": False}


def train_problems(plan: Plan, metrics: dict[str, Any], flash_installed: bool) -> list[str]:
    """What the training run's metrics.json says that a GPU (or dry) run should not have."""
    problems = []
    quant = metrics.get("quantization", {})
    want_device = "cuda" if plan.gpu else "cpu"
    if metrics.get("device") != want_device:
        problems.append(f"trained on {metrics.get('device')}, not {want_device}")
    if quant.get("quant_types") != ["nf4"] or not quant.get("double_quant"):
        problems.append(f"quantization is not NF4 with double quant: {quant}")
    if plan.gpu and quant.get("compute_dtype") != "bf16":
        problems.append(f"compute dtype {quant.get('compute_dtype')}, not bf16")
    if plan.gpu and flash_installed and metrics.get("attention") != "flash_attention_2":
        problems.append(f"flash_attn is installed but the attention was {metrics.get('attention')}")
    if not metrics.get("steps") or metrics.get("last_loss") is None:
        problems.append("no training step was recorded")
    return problems


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    """The environment of the steps' processes: this payload first on the path, whatever the working directory
    (`-P` keeps the working directory off it), so that the check runs the code it ships with."""
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


class Steps:
    """Runs the steps one after another, each with its log file and its verdict, and keeps the record."""

    def __init__(self, out: Path):
        self.out = out
        self.record: list[dict[str, Any]] = []

    def run(self, name: str, fn, *args) -> Any:
        t0 = time.monotonic()
        print(f"[{name}] ...", flush=True)
        try:
            value, details = fn(*args)
            ok, error = True, None
        except Exception as e:  # noqa: BLE001 - a failed step is reported and the next one still runs
            value, details, ok, error = None, {}, False, " ".join(str(e).split())[:500] or type(e).__name__
        seconds = round(time.monotonic() - t0, 1)
        self.record.append({"step": name, "ok": ok, "seconds": seconds, "error": error, **details})
        print(f"[{name}] {'ok' if ok else 'FAILED'} in {seconds:.1f} s" + (f": {error}" if error else ""),
              flush=True)
        return value

    def command(self, name: str, cmd: list[str], timeout: int, **kw) -> None:
        """Run a step's command with its log; past the time limit its whole process group goes (the benchmark's
        variants run in processes of their own)."""
        log = self.out / f"{name}.log"
        with log.open("w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, env=child_env(),
                                    start_new_session=True, **kw)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise RuntimeError(f"took longer than {timeout} s (log: {log})") from None
        if code != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"exit {code}: {' | '.join(tail)} (log: {log})")


def environment() -> tuple[dict[str, Any], dict[str, Any]]:
    import importlib.util

    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "bf16_supported": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
            "flash_attn": importlib.util.find_spec("flash_attn") is not None,
            "trl": importlib.util.find_spec("trl") is not None}
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except Exception as e:  # noqa: BLE001 - reported, and the training step will fail with the detail
        info["bitsandbytes"] = f"unusable: {e}"
    return info, {"environment": info}


def build_model(plan: Plan, out: Path, data: Path) -> tuple[str, dict[str, Any]]:
    """A random Llama of the plan's size and the tokenizer of the data, saved in bf16 on a GPU (half the load)."""
    import torch

    from payload.tinymodel import build_tiny_model

    folder = build_tiny_model(out / "model", [data], hidden_size=plan.hidden, layers=plan.layers, heads=plan.heads)
    if plan.gpu:
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).save_pretrained(folder)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(folder)
    params = cfg.num_hidden_layers * (4 * cfg.hidden_size**2 + 3 * cfg.hidden_size * cfg.intermediate_size) \
        + 2 * cfg.vocab_size * cfg.hidden_size
    return str(folder), {"model": str(folder), "parameters": params}


def train(steps: Steps, plan: Plan, model: str, data: Path, flash: bool) -> tuple[Path, dict[str, Any]]:
    run_dir = steps.out / "run"
    (steps.out / "run.json").write_text(json.dumps(train_config(plan, model, str(data), str(run_dir))))
    steps.command("train", [sys.executable, "-P", "-m", "payload.train", "--config", str(steps.out / "run.json")],
                  plan.timeouts["train"], cwd=steps.out)
    m = json.loads((run_dir / "metrics.json").read_text())
    details = {k: m.get(k) for k in ("device", "steps", "first_loss", "last_loss", "eval_loss", "base_eval_loss",
                                     "tokens_per_s", "peak_memory_mb", "peak_memory_kind", "attention", "collator",
                                     "padding_waste", "quantization")}
    problems = train_problems(plan, m, flash)
    if problems:
        raise RuntimeError("; ".join(problems))
    return run_dir / "adapter", details


def serve(steps: Steps, plan: Plan, model: str, adapter: Path) -> tuple[None, dict[str, Any]]:
    """Start the server on the adapter and ask it, plain and streamed, through the official openai client."""
    import httpx
    from openai import OpenAI

    port = free_port()
    log_path = steps.out / "serve.log"
    cmd = [sys.executable, "-P", "-m", "payload.serve", "--base", model, "--adapter", str(adapter),
           "--model-name", "gpucheck", "--host", "127.0.0.1", "--port", str(port), "--no-ui"]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=child_env())
    try:
        deadline = time.monotonic() + plan.timeouts["serve"]
        while True:
            if proc.poll() is not None:
                tail = " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-3:])
                raise RuntimeError(f"the server exited ({proc.returncode}): {tail}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer /healthz within {plan.timeouts['serve']} s")
            time.sleep(0.5)
        started = next((line.split("serving ", 1)[1] for line in log_path.read_text().splitlines()
                        if "payload.serve: serving " in line), "")
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60)
        models = [m.id for m in client.models.list().data]
        messages = [{"role": "user", "content": "how do i stop the inference safely ?"}]
        t0 = time.monotonic()
        answer = client.chat.completions.create(model="gpucheck", messages=messages, max_tokens=plan.max_tokens,
                                                temperature=0, extra_body={"ignore_eos": True})
        plain_s = time.monotonic() - t0
        chunks = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="gpucheck", messages=messages, max_tokens=plan.max_tokens, temperature=0, stream=True,
            extra_body={"ignore_eos": True}) if c.choices]
        if "gpucheck" not in models:
            raise RuntimeError(f"/v1/models lists {models}, not the adapter")
        if answer.usage.completion_tokens != plan.max_tokens or "".join(chunks) != answer.choices[0].message.content:
            raise RuntimeError("the plain and streamed answers differ, or the answer is short: "
                               f"{answer.usage.completion_tokens} tokens")
        return None, {"server": started, "models": models, "completion_tokens": answer.usage.completion_tokens,
                      "tokens_per_s_one_request": round(plan.max_tokens / plain_s, 1),
                      "cuda_4bit": "4-bit NF4" in started}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bench(steps: Steps, plan: Plan, model: str, data: Path) -> tuple[None, dict[str, Any]]:
    out = steps.out / "bench.json"
    steps.command("bench", [sys.executable, "-m", "payload.bench", "--model", model, "--data", str(data),
                            "--variants", ",".join(plan.bench_variants), "--steps", str(plan.bench_steps),
                            "--warmup", str(plan.bench_warmup), "--repeats", str(plan.bench_repeats),
                            "--json", str(out)], plan.timeouts["bench"])
    results = json.loads(out.read_text())["results"]
    text = (steps.out / "bench.log").read_text()
    print(text[text.find("\ndevice ") + 1:].rstrip(), flush=True)     # the bench's table and comparisons
    keep = ("tokens_per_s", "tokens_per_s_min", "peak_memory_mb", "peak_memory_kind", "final_loss", "padding_waste",
            "compute_dtype", "attention", "collator", "micro_batch", "grad_accum")
    return None, {"bench": {r["variant"]: {k: r.get(k) for k in keep} for r in results}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m payload.gpucheck", description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="the same steps on the CPU, tiny (also without CUDA)")
    ap.add_argument("--model", help="a local model folder instead of the built random one")
    ap.add_argument("--out", default="gpucheck-out", help="where the logs and summary.json go")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import importlib.util

    import torch

    gpu = torch.cuda.is_available() and not args.dry_run
    if not gpu and not args.dry_run:
        print("no CUDA device: running the dry run (CPU, tiny) instead", flush=True)
    plan = make_plan(gpu, importlib.util.find_spec("trl") is not None)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps = Steps(out)
    t0 = time.monotonic()
    env = steps.run("environment", environment)
    data = write_synthetic_data(out / "chats.jsonl", plan.chats, *plan.words)
    model = str(Path(args.model).resolve()) if args.model else steps.run("model", build_model, plan, out, data)
    if model:
        adapter = steps.run("train", train, steps, plan, model, data, bool(env and env["flash_attn"]))
        if adapter:
            steps.run("serve", serve, steps, plan, model, adapter)
        steps.run("bench", bench, steps, plan, model, data)
    ok = all(s["ok"] for s in steps.record)
    summary = {"ok": ok, "gpu": gpu, "seconds": round(time.monotonic() - t0, 1), "plan": asdict(plan),
               "steps": steps.record}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"{'all steps passed' if ok else 'FAILED'} in {summary['seconds']:.0f} s "
          f"({'GPU' if gpu else 'dry run on the CPU'}); summary in {out / 'summary.json'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
