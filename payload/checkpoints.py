"""Checkpoints that count only when complete: a marker written last, and the newest complete one to resume from.

A job killed mid-save (replica timeout, SIGKILL) leaves a checkpoint folder without its marker, or with files cut
short; such a folder is skipped, never fatal, and never deleted while no newer complete checkpoint exists.
Torch-free, so the jobs side can look at a run folder too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

MARKER = "tuneops-complete.json"
PREFIX = "checkpoint-"
_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    complete: bool
    reason: str = ""          # why it does not count, when it does not


def checkpoint_step(path: str | Path) -> int | None:
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass                  # some network file systems refuse fsync on directories or read-only fds
    finally:
        os.close(fd)


def mark_complete(ckpt_dir: str | Path, step: int) -> Path:
    """Flush the checkpoint's files to disk, then write the marker (atomically) listing each file and its size."""
    d = Path(ckpt_dir)
    files = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and p.name != MARKER and not p.name.startswith(MARKER):
            _fsync(p)
            files[p.relative_to(d).as_posix()] = p.stat().st_size
    if not files:
        raise ValueError(f"{d}: no files to mark as a complete checkpoint")
    tmp = d / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"step": step, "files": files}, indent=1), encoding="utf-8")
    _fsync(tmp)
    os.replace(tmp, d / MARKER)
    _fsync(d)
    return d / MARKER


def check_complete(ckpt_dir: str | Path) -> tuple[bool, str]:
    """(True, "") when the marker exists and every file it lists is there with its recorded size."""
    d = Path(ckpt_dir)
    marker = d / MARKER
    if not marker.is_file():
        return False, "no completion marker (the save was interrupted)"
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
        files = info["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False, "unreadable completion marker"
    for name, size in files.items():
        p = d / name
        if not p.is_file():
            return False, f"{name} is missing"
        if p.stat().st_size != size:
            return False, f"{name} has {p.stat().st_size} bytes, {size} were written"
    return True, ""


def scan(checkpoints_dir: str | Path) -> list[Checkpoint]:
    """Every `checkpoint-N` folder, oldest first, with whether it is complete."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        step = checkpoint_step(p)
        if step is None or not p.is_dir():
            continue
        ok, reason = check_complete(p)
        found.append(Checkpoint(step, p, ok, reason))
    return sorted(found, key=lambda c: c.step)


def newest_complete(checkpoints_dir: str | Path) -> tuple[Checkpoint | None, list[Checkpoint]]:
    """The newest complete checkpoint (or None) and the incomplete ones newer than it, which are skipped."""
    all_ = scan(checkpoints_dir)
    complete = [c for c in all_ if c.complete]
    best = complete[-1] if complete else None
    skipped = [c for c in all_ if not c.complete and (best is None or c.step > best.step)]
    return best, skipped


def rotate(checkpoints_dir: str | Path, keep: int) -> list[Path]:
    """Keep the `keep` newest complete checkpoints; delete older complete ones and incomplete ones older than the
    newest complete one. Incomplete ones newer than every complete one stay (deleting them gains nothing safe)."""
    if keep < 1:
        raise ValueError("keep must be at least 1")
    all_ = scan(checkpoints_dir)
    complete = [c for c in all_ if c.complete]
    if not complete:
        return []
    kept = {c.step for c in complete[-keep:]}
    newest = complete[-1].step
    removed = []
    for c in all_:
        if c.step in kept or c.step > newest:
            continue
        shutil.rmtree(c.path, ignore_errors=True)
        removed.append(c.path)
    return removed


def discard_incomplete(ckpt_dir: str | Path) -> bool:
    """Remove a folder about to be saved over when it is an incomplete leftover, so that no stale file from the
    interrupted save lands in the new checkpoint. Never touches a complete one."""
    d = Path(ckpt_dir)
    if d.is_dir() and not check_complete(d)[0]:
        shutil.rmtree(d, ignore_errors=True)
        return True
    return False
