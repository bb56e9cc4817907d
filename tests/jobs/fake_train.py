"""A stand-in for payload.train in the executor-level tests (cancel, kill, queueing), where training itself is beside
the point: it reads the same run config, writes the same events, checkpoints, adapter and metrics, resumes from its
newest checkpoint, and exits the same way, in a fraction of the time. Behaviour knobs come from the environment:
FAKE_STEP_S (seconds per step), FAKE_FAIL_AT (step at which it fails), FAKE_IGNORE_TERM (ignore SIGTERM),
FAKE_LEAK (print HF_TOKEN's value when failing, as a careless traceback might)."""

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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    cfg = load_config(ap.parse_args().config)
    out = Path(cfg.output_dir)
    events = EventWriter(out)
    step_s = float(os.environ.get("FAKE_STEP_S", "0.05"))
    fail_at = int(os.environ.get("FAKE_FAIL_AT", "0"))
    if os.environ.get("FAKE_IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    total = cfg.max_steps if cfg.max_steps > 0 else 10
    ckpt_dir = out / "checkpoints"
    done = max((int(p.name.split("-")[1]) for p in ckpt_dir.glob("checkpoint-*") if (p / "done").exists()),
                  default=0)
    print(f"fake trainer: {total} steps, resuming after step {done}", flush=True)
    events.emit("start", total_steps=total, resumed_from=done)
    for step in range(done + 1, total + 1):
        time.sleep(step_s)
        if step == fail_at:
            leak = f" with token {os.environ.get('HF_TOKEN')}" if os.environ.get("FAKE_LEAK") else ""
            print(f"Traceback (most recent call last):\nRuntimeError: fake failure{leak}", file=sys.stderr, flush=True)
            events.emit("error", message=f"fake failure at step {step}{leak}")
            return 1
        loss = 5.0 / step
        events.emit("step", step=step, total_steps=total, epoch=step / total, loss=loss, lr=cfg.learning_rate,
                    tokens_per_s=100.0, eta_s=(total - step) * step_s)
        print(f"step {step} loss {loss:.3f}", flush=True)
        if step % cfg.save_steps == 0:
            path = ckpt_dir / f"checkpoint-{step}"
            path.mkdir(parents=True, exist_ok=True)
            (path / "done").write_text("ok")
            events.emit("checkpoint", step=step, path=str(path))
    (out / "adapter").mkdir(exist_ok=True)
    (out / "adapter" / "adapter_config.json").write_text("{}")
    metrics = {"steps": total, "last_loss": 5.0 / total}
    (out / "metrics.json").write_text(json.dumps(metrics))
    events.emit("done", adapter=str(out / "adapter"), metrics=metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
