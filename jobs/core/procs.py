"""Liveness of processes that this process did not start (so cannot wait for): by pid, start time and group.

Reads /proc where there is one (Linux): a zombie counts as ended, and a pid reused by another program is told apart
by its start time. Elsewhere it falls back to signal 0.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces and parentheses)."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    except OSError:
        return None
    return raw[raw.rfind(")") + 2:].split()


def start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" where /proc is missing or the pid is gone)."""
    fields = _stat_fields(pid)
    return fields[19] if fields else ""


def _reap(pid: int) -> None:
    # When the process is our own child (a test, or a worker that launched it) collect its exit so it is not a zombie.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def pid_alive(pid: int, started: str = "") -> bool:
    """True while `pid` runs (not a zombie) and, when `started` is given, is still the process started then."""
    if pid <= 0:
        return False
    _reap(pid)
    if PROC.is_dir():
        fields = _stat_fields(pid)
        if fields is None or fields[0] in ("Z", "X"):
            return False
        return not started or fields[19] == started
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group `pgid`."""
    if not PROC.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    members = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        fields = _stat_fields(pid)
        if fields and fields[0] not in ("Z", "X") and fields[2] == str(pgid):
            members.append(pid)
    return members


def group_alive(pgid: int) -> bool:
    _reap(pgid)
    return bool(group_members(pgid))
