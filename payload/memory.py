"""Gradient checkpointing only where memory needs it, decided from a measured step.

Checkpointing recomputes every layer's forward in the backward pass: about a third more compute for activations that
are not kept. With `gradient_checkpointing: "auto"` (the default) the trainer first runs one forward and backward pass
of its heaviest micro-batch (the longest rows) without checkpointing, measures the process's peak memory during it
(CUDA's max allocated on a GPU; the resident set's high-water mark on the CPU, reset just before through
/proc/self/clear_refs), adds the optimizer's state still to come (AdamW: two fp32 values per trainable weight), and
turns checkpointing on only when that would pass `HEADROOM` of the memory the process may use. A step that runs out
of memory while being measured turns it on too. The measured step changes nothing: gradients are dropped and the
random generators are put back, so a run trains exactly as it would with the decision written in its config.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HEADROOM = 0.8              # a measured step may reach this share of the memory limit; the rest is for fragmentation,
                            # evaluation batches and what the measured micro-batch did not show
LIMIT_ENV = "TUNEOPS_MEMORY_LIMIT_MB"   # the memory a run may use, when it is less than the device's (a shared GPU)
MB = 2**20


@dataclass(frozen=True)
class Decision:
    on: bool
    setting: str                # "auto", or "config" when the config says true or false
    reason: str
    step_peak_mb: float | None = None
    limit_mb: float | None = None

    def as_event(self) -> dict[str, Any]:
        return {"on": self.on, "setting": self.setting, "reason": self.reason,
                "step_peak_mb": None if self.step_peak_mb is None else round(self.step_peak_mb, 1),
                "limit_mb": None if self.limit_mb is None else round(self.limit_mb, 1)}


def _meminfo_kb(text: str, key: str) -> int | None:
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


def _cgroup_limit_bytes() -> int | None:
    """The container's memory limit (cgroup v2, else v1); None when there is none."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < 2**60:        # v1 writes a huge number for "no limit", v2 writes "max"
            return int(raw)
    return None


def _rss_mb() -> float:
    return (_status_kb("VmRSS") or 0) / 1024


def _status_kb(key: str) -> int | None:
    try:
        return _meminfo_kb(Path("/proc/self/status").read_text(), key)
    except OSError:
        return None


def limit_mb(device: str, gpu: int = 0) -> float:
    """The memory this process may use: `TUNEOPS_MEMORY_LIMIT_MB` when set and lower; on a GPU the device's memory;
    on the CPU what it holds now plus what the machine (or its container) still has available."""
    configured = float(os.environ.get(LIMIT_ENV) or 0) or None
    if device == "cuda":
        import torch

        available = torch.cuda.mem_get_info(gpu)[1] / MB
    else:
        try:
            meminfo = Path("/proc/meminfo").read_text()
        except OSError:
            meminfo = ""
        free_kb = _meminfo_kb(meminfo, "MemAvailable") or _meminfo_kb(meminfo, "MemTotal") or 0
        available = _rss_mb() + free_kb / 1024
        cgroup = _cgroup_limit_bytes()
        if cgroup:
            available = min(available, cgroup / MB)
    return min(available, configured) if configured else available


class PeakMeter:
    """The process's peak memory from `reset()` on: CUDA's max allocated, or the resident set's high-water mark
    (which `ru_maxrss` follows too)."""

    def __init__(self, device: str, gpu: int = 0):
        self.device, self.gpu = device, gpu
        self.kind = "cuda_max_allocated" if device == "cuda" else "process_max_rss"

    def reset(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.gpu)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")     # Linux: reset VmHWM to the current RSS
        except OSError:
            pass                                           # then the peak is the process's whole life's: larger

    def peak_mb(self) -> float:
        if self.device == "cuda":
            import torch

            return torch.cuda.max_memory_allocated(self.gpu) / MB
        kb = _status_kb("VmHWM")
        if kb is None:
            import resource

            kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 1024


def heaviest_batch(items: list[dict], micro_batch: int, collator) -> dict:
    """The micro-batch of the longest items: the most activations any step of the run will have."""
    longest = sorted(items, key=lambda it: len(it["input_ids"]), reverse=True)[:max(micro_batch, 1)]
    return collator(longest)


def optimizer_state_mb(model) -> float:
    """AdamW's two fp32 moments per trainable weight, allocated at the first optimizer step."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad) * 2 * 4 / MB


def is_oom(err: BaseException) -> bool:
    """Whether `err` is running out of memory: torch's CUDA error, Python's, or an allocator's message on the CPU."""
    try:
        import torch  # heavy, and may be missing or broken: then the message alone decides

        if isinstance(err, torch.OutOfMemoryError):
            return True
    except ImportError:
        pass
    text = str(err)
    return isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and (
        "out of memory" in text.lower() or "can't allocate memory" in text))


def measure_step(model, batch: dict, device: str, autocast, gpu: int = 0) -> float | None:
    """The peak memory (MB) of one forward and backward pass of `batch` through `model`, leaving no gradient and the
    random generators as they were; None when the step ran out of memory."""
    import torch

    meter = PeakMeter(device, gpu)
    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    was_training = model.training
    model.train()
    with torch.random.fork_rng(devices=[gpu] if device == "cuda" else []):
        meter.reset()
        try:
            with autocast:
                out = model(**batch, use_cache=False)
            out.loss.backward()
            peak = meter.peak_mb()
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            peak = None
        finally:
            out = None
            model.zero_grad(set_to_none=True)
            model.train(was_training)
            if device == "cuda":
                torch.cuda.empty_cache()
    return peak


def decide(setting: bool | str, model, batch_of, device: str, autocast, gpu: int = 0) -> Decision:
    """Whether to train with gradient checkpointing. `setting` is the config's (True, False or "auto");
    `batch_of()` gives the heaviest micro-batch, measured only when the setting is "auto"."""
    if setting is True or setting is False:
        return Decision(on=bool(setting), setting="config",
                        reason=f"gradient_checkpointing is {str(setting).lower()} in the config")
    limit = limit_mb(device, gpu)
    peak = measure_step(model, batch_of(), device, autocast, gpu)
    if peak is None:
        return Decision(on=True, setting="auto", reason="the heaviest micro-batch ran out of memory without it",
                        limit_mb=limit)
    projected = peak + optimizer_state_mb(model)
    on = projected > HEADROOM * limit
    reason = (f"a step of the heaviest micro-batch without it peaks at {projected:,.0f} MB with the optimizer's "
              f"state, {'over' if on else 'within'} {HEADROOM:.0%} of {limit:,.0f} MB")
    return Decision(on=on, setting="auto", reason=reason, step_peak_mb=projected, limit_mb=limit)
