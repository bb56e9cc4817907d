"""The local backend's run time limit (what ACA's replicaTimeout does for the Azure backend): the run ends as
timed_out with its last checkpoint (with TUNEOPS_AUTO_RESUME=N, jobs.runs.transitions resumes it up to N times).

The limit is enforced by the launcher (`jobs.backends.local.launcher --timeout S`), the trainer's parent, so that it holds whether or
not a worker is watching: at the limit it marks the attempt timed out, sends SIGTERM (the trainer saves a checkpoint
and exits), and SIGKILLs it after a grace period.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from pathlib import Path

from jobs.core.durations import describe_duration
from jobs.core.files import write_atomic

log = logging.getLogger(__name__)

# The trainer finishes its step and saves a checkpoint on SIGTERM; a large model's save can take a while.
TERM_GRACE_S = 120.0


def timeout_file(run_dir: Path, attempt: int) -> Path:
    """Written by the launcher when the attempt reached its time limit (holds the limit in seconds)."""
    return run_dir / f"attempt-{attempt}.timeout"


def timed_out_detail(limit_s: float) -> str:
    return (f"the attempt reached the run time limit of {describe_duration(limit_s)} (TUNEOPS_RUN_TIMEOUT_S) and "
            "was stopped")


def read_timeout(run_dir: Path, attempt: int) -> float | None:
    """The limit an attempt timed out at, or None when it did not time out."""
    try:
        return float(timeout_file(run_dir, attempt).read_text(encoding="utf-8").strip() or 0)
    except FileNotFoundError:
        return None
    except ValueError:
        return 0.0


def wait_with_limit(child: subprocess.Popen, limit_s: float | None, marker: Path,
                    grace_s: float = TERM_GRACE_S) -> int:
    """Wait for `child`; past `limit_s` write `marker`, SIGTERM it, and SIGKILL it after `grace_s`. Its exit code."""
    deadline = None if not limit_s else time.monotonic() + limit_s
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return child.wait(timeout=left)
        except InterruptedError:
            continue
        except subprocess.TimeoutExpired:
            break
    write_atomic(marker, f"{limit_s:g}\n")
    print(f"[tuneops] the run time limit of {describe_duration(limit_s)} is reached: stopping the trainer "
          "(it saves a checkpoint; a resume of the run continues from there)", flush=True)
    child.send_signal(signal.SIGTERM)
    try:
        return child.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        print(f"[tuneops] the trainer did not stop within {grace_s:.0f} s of SIGTERM: killing it", flush=True)
        child.kill()
        return child.wait()
