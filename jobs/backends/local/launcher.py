"""Runs one attempt of a run's trainer and records its pid and exit status in the run folder.

`python -m jobs.backends.local.launcher --dir runs/ft-0001 --attempt 1 [--timeout S] -- python -m payload.train --config ...`
Only a parent can wait for a process; writing the exit status to a file lets any worker, on any host that sees the
folder, know how the trainer ended. The local executor starts it in a session of its own, with stdout to the log.
The trainer's output passes through the launcher, which masks the known secret values of its environment, so no
secret reaches the log file that the logs command and the thread's excerpts are read from.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import BinaryIO

from jobs.backends.local.timer import timeout_file, wait_with_limit
from jobs.core.files import write_atomic
from jobs.core.masking import environment_secrets, mask
from jobs.core.procs import start_time


def pid_file(run_dir: Path, attempt: int) -> Path:
    return run_dir / f"attempt-{attempt}.pid"


def exit_file(run_dir: Path, attempt: int) -> Path:
    return run_dir / f"attempt-{attempt}.exit"


def write_pid(run_dir: Path, attempt: int, pid: int) -> None:
    write_atomic(pid_file(run_dir, attempt), f"{pid} {start_time(pid)}\n")


def read_pid(run_dir: Path, attempt: int) -> tuple[int, str] | None:
    try:
        parts = pid_file(run_dir, attempt).read_text(encoding="utf-8").split()
        return int(parts[0]), (parts[1] if len(parts) > 1 else "")
    except (FileNotFoundError, ValueError, IndexError):
        return None


def read_exit(run_dir: Path, attempt: int) -> int | None:
    try:
        return int(exit_file(run_dir, attempt).read_text(encoding="utf-8").strip())
    except (FileNotFoundError, ValueError):
        return None


def pump_masked(src: BinaryIO, dst: BinaryIO, secrets: tuple[str, ...]) -> None:
    """Copy the trainer's output line by line, masking known secret values, until it closes its end."""
    for raw in iter(src.readline, b""):
        if secrets:
            raw = mask(raw.decode("utf-8", "surrogateescape"), secrets).encode("utf-8", "surrogateescape")
        dst.write(raw)
        dst.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.backends.local.launcher", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, type=Path, help="the run folder")
    parser.add_argument("--attempt", required=True, type=int)
    parser.add_argument("--timeout", type=float, default=0.0,
                        help="seconds the trainer may run; then it is stopped and the attempt marked timed out")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- followed by the trainer's command line")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the trainer's command after --")

    write_pid(args.dir, args.attempt, os.getpid())
    # A stop signals the whole process group, trainer included: the launcher outlives the trainer to record how it
    # ended instead of dying first.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)
    try:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except OSError as e:
        print(f"[tuneops] cannot start the trainer {command[0]!r}: {e.strerror}", flush=True)
        write_atomic(exit_file(args.dir, args.attempt), "127\n")
        return 127
    pump = threading.Thread(target=pump_masked, args=(child.stdout, sys.stdout.buffer, environment_secrets()),
                            daemon=True)
    pump.start()
    code = wait_with_limit(child, args.timeout or None, timeout_file(args.dir, args.attempt))
    # What the trainer wrote last must be in the log before the exit status says it is over. A grandchild that
    # still holds the pipe open must not keep the launcher waiting.
    pump.join(timeout=10)
    write_atomic(exit_file(args.dir, args.attempt), f"{code}\n")
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
