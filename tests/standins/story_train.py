"""A stand-in for payload.train that tells a run's story on cue, for the tests of the run thread (log excerpts,
failures, timeouts and resumes, secrets in logs), where real training would only cost time.

`TUNEOPS_TRAIN_MODULE=tests.standins.story_train` (with the repository on PYTHONPATH). It reads the same run config,
writes the same events, checkpoints (complete-marked), adapter and metrics.json (losses, eval against the base model,
generations) and resumes from its newest checkpoint. Cues come from the environment:
STORY_STEP_S (seconds a step), STORY_LINES (ordinary log lines a step), STORY_SAY (lines printed at the start,
separated by "|"), STORY_FAIL_AT (step that ends in a traceback and exit 1), STORY_HANG_AFTER (on a fresh start, the
step after which it hangs until stopped, as a run that outlives its time limit; a resumed one does not hang).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from payload.config import load_config
from payload.events import EventWriter


def newest_checkpoint(ckpt_dir: Path) -> int:
    return max((int(p.name.split("-")[1]) for p in ckpt_dir.glob("checkpoint-*") if (p / "complete").exists()),
               default=0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    cfg = load_config(ap.parse_args().config)
    out = Path(cfg.output_dir)
    events = EventWriter(out)
    step_s = float(os.environ.get("STORY_STEP_S", "0.05"))
    lines = int(os.environ.get("STORY_LINES", "1"))
    fail_at = int(os.environ.get("STORY_FAIL_AT", "0"))
    hang_after = int(os.environ.get("STORY_HANG_AFTER", "0"))
    total = cfg.max_steps if cfg.max_steps > 0 else 10
    ckpt_dir = out / "checkpoints"
    done = newest_checkpoint(ckpt_dir)

    def stop(signum, _frame):
        print(f"stopped by signal {signum} after the checkpoint of step {newest_checkpoint(ckpt_dir)}", flush=True)
        sys.exit(143)

    signal.signal(signal.SIGTERM, stop)
    for said in filter(None, os.environ.get("STORY_SAY", "").split("|")):
        print(said, flush=True)
    print(f"story trainer: {total} steps, resuming after step {done}", flush=True)
    events.emit("start", total_steps=total, resumed_from_step=done)
    losses = []
    for step in range(done + 1, total + 1):
        time.sleep(step_s)
        if step == fail_at:
            print("Traceback (most recent call last):\n  File \"story_train.py\", line 1, in step\n"
                  f"RuntimeError: the story fails at step {step}", file=sys.stderr, flush=True)
            events.emit("error", message=f"RuntimeError: the story fails at step {step}")
            return 1
        loss = 4.0 / (1 + 0.1 * step)
        losses.append([step, round(loss, 4)])
        events.emit("step", step=step, total_steps=total, epoch=step / total, loss=loss, lr=cfg.learning_rate,
                    tokens_per_s=1000.0, eta_s=(total - step) * step_s)
        for n in range(lines):
            print(f"step {step} line {n}: loss {loss:.4f}", flush=True)
        if step % cfg.save_steps == 0 or step == total:
            path = ckpt_dir / f"checkpoint-{step}"
            path.mkdir(parents=True, exist_ok=True)
            (path / "complete").write_text("ok")
            events.emit("checkpoint", step=step, path=str(path))
        if hang_after and not done and step == hang_after:
            print(f"step {step}: waiting for a very slow data loader", flush=True)
            while True:
                time.sleep(1)
    (out / "adapter").mkdir(exist_ok=True)
    (out / "adapter" / "adapter_config.json").write_text("{}")
    metrics = {
        "run_id": cfg.run_id, "steps": total, "total_steps": total, "first_loss": 4.0 / 1.1,
        "last_loss": losses[-1][1] if losses else None, "loss_history": losses,
        "eval_history": [[total, 2.5]], "eval_loss": 2.5, "base_eval_loss": 3.9, "eval_examples": 8,
        "generations": [{"line": 3, "prompt": "What is QLoRA?", "reference": "A way to fine-tune",
                         "base": "QLoRA QLoRA QLoRA", "fine_tuned": "A way to fine-tune a 4-bit model"}],
        "tokens_per_s": 1000.0, "tokens_per_s_median": 1000.0, "duration_s": total * step_s,
    }
    (out / "metrics.json").write_text(json.dumps(metrics))
    events.emit("done", adapter=str(out / "adapter"), metrics={k: metrics[k] for k in ("steps", "last_loss")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
