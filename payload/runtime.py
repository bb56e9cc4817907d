"""What the trainer and the server both need to know about the machine: whether transformers can use the installed
torch at all, and how many CPU threads torch should use.

transformers 5 disables a torch older than it supports with one log line; every model class then fails with a message
that does not say why. The trainer and the server ask first and say it in one line.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def torch_problem() -> str | None:
    """None when transformers can use the installed torch; else what is wrong and what to do, in one line."""
    import torch
    import transformers
    from transformers.utils import is_torch_available

    if is_torch_available():
        return None
    return (f"transformers {transformers.__version__} cannot use torch {torch.__version__}, which is older than it "
            "supports: use an image with torch 2.6 or later (IMAGE in infra/finetuning.config.json, e.g. the payload "
            "image built from the Dockerfile), or upgrade torch")


def cpu_budget() -> int:
    """Cores this process may really use: its CPU affinity, capped by a cgroup CPU quota (containers)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def env_threads() -> int:
    """The thread count OMP_NUM_THREADS asks for; 0 when it is unset or not a number."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() else 0


def pick_threads(n_params: int, budget: int, configured: int = 0) -> int:
    """CPU threads for torch. Matrices of a small model are too small for intra-op parallelism to pay, and spinning
    OpenMP threads collapse (5x slower, measured on 2 shared cores) when other processes share the cores."""
    if configured:
        return configured
    if n_params < 100_000_000:
        return 1
    return budget
