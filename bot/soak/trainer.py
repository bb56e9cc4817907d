"""The soak's fast stand-in for payload.train (`TUNEOPS_TRAIN_MODULE=bot.soak.trainer`): the same run config, events,
complete-marked checkpoints (payload.checkpoints), adapter, metrics.json, resume from the newest complete checkpoint
and exit codes (0 done, 1 failed, 143 stopped by SIGTERM), in a fraction of a second per step.

It also keeps its own record of every start in `<output>/trainer-starts.jsonl`, which is how the soak tells whether a
run was executed twice (see `bot.soak.report`): one line when it starts (its pid, the attempt tuneops started it as,
the step it resumed from, whether another trainer of the same run held the run's lock at that moment, whether the run
had already finished), and one line when it ends.
Knobs from the environment: SOAK_STEP_S (seconds a step, default 0.1), SOAK_LINES (log lines a step, default 1),
SOAK_FAIL_AT (step that ends in a traceback and exit 1).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import sys
import time
from pathlib import Path

from payload.checkpoints import mark_complete, newest_complete
from payload.config import load_config
from payload.events import EventWriter

STARTS_FILE = "trainer-starts.jsonl"
LOCK_FILE = ".trainer.lock"


def log_line(run_id: str, attempt: int, step: int, n: int) -> str:
    """One ordinary log line; unique per run, attempt, step and line, so that the soak can find lost and repeated
    lines in the thread."""
    return f"soak {run_id} a{attempt} step {step} line {n}"


def own_attempt(out: Path) -> int:
    """The attempt tuneops started this trainer as: the `attempt-N.pid` file that names our launcher (our parent)."""
    parent = os.getppid()
    for p in out.glob("attempt-*.pid"):
        try:
            if int(p.read_text().split()[0]) == parent:
                return int(p.name.split("-")[1].split(".")[0])
        except (OSError, ValueError, IndexError):
            continue
    return 0


def record(out: Path, **fields) -> None:
    with open(out / STARTS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps({"ts": round(time.time(), 3), "pid": os.getpid(), **fields}) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    cfg = load_config(ap.parse_args().config)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    step_s = float(os.environ.get("SOAK_STEP_S", "0.1"))
    lines = int(os.environ.get("SOAK_LINES", "1"))
    fail_at = int(os.environ.get("SOAK_FAIL_AT", "0"))
    total = cfg.max_steps if cfg.max_steps > 0 else 10
    ckpt_dir = out / "checkpoints"
    best, _ = newest_complete(ckpt_dir)
    done = best.step if best else 0
    attempt = own_attempt(out)

    # Held for the whole life of this process: a second trainer of the same run finds it taken.
    lock = open(out / LOCK_FILE, "a+")  # noqa: SIM115 (held until the process ends)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        concurrent = False
    except BlockingIOError:
        concurrent = True
    record(out, event="start", attempt=attempt, resumed_from=done, concurrent=concurrent,
           after_done=(out / "metrics.json").exists())

    def stop(signum, _frame):
        print(f"stopped by signal {signum} after the checkpoint of step {newest_complete(ckpt_dir)[0]}", flush=True)
        record(out, event="end", rc=143)
        sys.exit(143)

    signal.signal(signal.SIGTERM, stop)
    print(f"soak trainer: {total} steps, resuming after step {done}", flush=True)
    events = EventWriter(out)
    events.emit("start", total_steps=total, resumed_from_step=done)
    losses = []
    for step in range(done + 1, total + 1):
        time.sleep(step_s)
        if step == fail_at:
            print("Traceback (most recent call last):\n  File \"trainer.py\", line 1, in step\n"
                  f"RuntimeError: the soak trainer fails at step {step}", file=sys.stderr, flush=True)
            events.emit("error", message=f"RuntimeError: the soak trainer fails at step {step}")
            record(out, event="end", rc=1)
            return 1
        loss = 4.0 / (1 + 0.1 * step)
        losses.append([step, round(loss, 4)])
        events.emit("step", step=step, total_steps=total, epoch=step / total, loss=loss, lr=cfg.learning_rate,
                    tokens_per_s=1000.0, eta_s=(total - step) * step_s)
        for n in range(lines):
            print(log_line(cfg.run_id, attempt, step, n), flush=True)
        if step % cfg.save_steps == 0 or step == total:
            path = ckpt_dir / f"checkpoint-{step}"
            path.mkdir(parents=True, exist_ok=True)
            (path / "adapter_model.safetensors").write_bytes(b"\0" * 64)
            mark_complete(path, step)
            events.emit("checkpoint", step=step, path=str(path))
    (out / "adapter").mkdir(exist_ok=True)
    (out / "adapter" / "adapter_config.json").write_text("{}")
    metrics = {"run_id": cfg.run_id, "steps": total, "total_steps": total, "first_loss": 4.0 / 1.1,
               "last_loss": losses[-1][1] if losses else None, "loss_history": losses,
               "tokens_per_s": 1000.0, "duration_s": total * step_s}
    (out / "metrics.json").write_text(json.dumps(metrics))
    events.emit("done", adapter=str(out / "adapter"), metrics={k: metrics[k] for k in ("steps", "last_loss")})
    record(out, event="end", rc=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
