"""The local backend: the payload's trainer as a process on this machine, working in the workspace folder.

Everything about an execution lives in its run folder (`runs/<id>/`), so a worker other than the one that started it
can follow it, stop it and learn how it ended: `attempt-N.claim` (this attempt was started, made with O_EXCL so it
happens once), `attempt-N.pid` (the launcher's pid and start time; it leads the process group), `attempt-N.exit`
(the trainer's exit status, written by `jobs.backends.local.launcher`), `attempt-N.stop` (a stop was asked for), `attempt-N.timeout`
(it reached TUNEOPS_RUN_TIMEOUT_S, see `jobs.backends.local.timer`), `train.log`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from jobs.backends.local import launcher as launch
from jobs.backends.local.timer import read_timeout, timed_out_detail
from jobs.backends.logtext import split_log
from jobs.backends.protocol import EventBatch, ExecStatus, ExecutionInfo
from jobs.core.domain import Run
from jobs.core.errors import BackendError
from jobs.core.procs import group_alive, pid_alive
from jobs.core.runconfig import CONFIG_NAME, run_dir
from jobs.core.settings import JobSettings
from payload.events import EVENTS_FILE, read_events

log = logging.getLogger(__name__)

LOG_NAME = "train.log"
LOG_HEADER = "[tuneops]"
# How long a claimed attempt may go without a pid file before it counts as never started.
LAUNCH_GRACE_S = 30.0
# One read returns at most this much log; the rest comes on the next tick, which keeps ticks short.
MAX_LOG_READ = 256 * 1024
# Variables of the bot's and the worker's own that the trainer has no use for: keep them out of its environment and
# its logs (TUNEOPS_STORAGE_KEY opens the whole Azure storage account).
_PRIVATE_ENV_PREFIXES = ("SLACK_", "TUNEOPS_STORAGE_KEY")


def clean_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith(_PRIVATE_ENV_PREFIXES)}


class LocalExecutor:
    """`start` also sets `run.pid` (the launcher's pid) for the caller to keep in the run record; the pid file on
    disk stays the reference, because the record may not have been saved when a worker died."""

    name = "local"

    def __init__(self, settings: JobSettings, grace_s: float = 10.0):
        self.workspace = Path(settings.workspace).resolve()
        self.python = settings.python
        self.train_module = settings.train_module
        self.run_timeout_s = settings.run_timeout_s
        self.grace_s = grace_s

    # Paths ---------------------------------------------------------------------------------------------------------

    def run_dir(self, run: Run) -> Path:
        return self.workspace / run_dir(run.id)

    def _file(self, run: Run, suffix: str) -> Path:
        return self.run_dir(run) / f"attempt-{run.attempts}.{suffix}"

    @staticmethod
    def execution_id(run: Run) -> str:
        return f"{run.id}/attempt-{run.attempts}"

    # Protocol ------------------------------------------------------------------------------------------------------

    def start(self, run: Run, config: dict[str, Any]) -> str:
        d = self.run_dir(run)
        try:
            d.mkdir(parents=True, exist_ok=True)
            launch.write_atomic(d / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
        except OSError as e:
            raise BackendError(f"cannot write the run folder {d}: {e.strerror}; check that TUNEOPS_WORKSPACE is "
                               "writable") from None
        try:
            # O_EXCL: of two starts of the same attempt (a retried task, two workers) exactly one gets here first.
            fd = os.open(self._file(run, "claim"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            log.info("%s: attempt %d was already started; not starting it again", run.id, run.attempts)
            pid = self._pid(run)
            run.pid = pid[0] if pid else 0
            return self.execution_id(run)
        os.write(fd, f"{os.getpid()} {time.time()}\n".encode())
        os.close(fd)

        rel = run_dir(run.id)
        # -P: the working directory (the workspace) must not shadow installed packages: a `datasets/` folder there
        # would otherwise be imported in place of the datasets library.
        trainer = [self.python, "-P", "-m", self.train_module, "--config", f"{rel}/{CONFIG_NAME}"]
        command = [self.python, "-P", "-m", "jobs.backends.local.launcher", "--dir", rel, "--attempt", str(run.attempts),
                   "--timeout", f"{self.run_timeout_s:g}", "--", *trainer]
        with open(d / LOG_NAME, "ab") as logf:
            logf.write(f"{LOG_HEADER} attempt {run.attempts}: {' '.join(trainer[2:])}\n".encode())
            logf.flush()
            try:
                proc = subprocess.Popen(
                    command, cwd=self.workspace, stdin=subprocess.DEVNULL, stdout=logf,
                    stderr=subprocess.STDOUT, start_new_session=True,
                    env=clean_env(dict(os.environ)),
                )
            except OSError as e:
                launch.write_atomic(self._file(run, "exit"), "127\n")
                raise BackendError(f"cannot start {self.python!r}: {e.strerror}; set TUNEOPS_PYTHON to an "
                                   "interpreter that has the payload installed") from None
        # The launcher writes the same file itself; writing it here too closes the gap before it gets that far.
        launch.write_pid(d, run.attempts, proc.pid)
        run.pid = proc.pid
        # Let go of the child without waiting on it: any worker may be the one that sees it end (status reaps it
        # when this process happens to be its parent). Marking it done keeps Popen from warning that it still runs.
        proc.returncode = 0
        return self.execution_id(run)

    def _pid(self, run: Run) -> tuple[int, str] | None:
        return launch.read_pid(self.run_dir(run), run.attempts)

    def _alive(self, run: Run) -> bool:
        pid = self._pid(run)
        return bool(pid) and pid_alive(*pid)

    def status(self, run: Run) -> ExecutionInfo:
        d = self.run_dir(run)
        stopped = self._file(run, "stop").exists()
        code = launch.read_exit(d, run.attempts)
        if code is None and self._pid(run) is not None:
            if self._alive(run):
                return ExecutionInfo(ExecStatus.RUNNING, f"pid {self._pid(run)[0]}")
            # It may have written its status and gone between the two looks.
            code = launch.read_exit(d, run.attempts)
            if code is None:
                if stopped:
                    return ExecutionInfo(ExecStatus.STOPPED, "stopped")
                return ExecutionInfo(ExecStatus.FAILED, "the training process ended without recording how: it was "
                                                        "killed, or could not start (see its log)")
        if code is None:
            claim = self._file(run, "claim")
            if not claim.exists():
                return ExecutionInfo(ExecStatus.UNKNOWN, "not started")
            if time.time() - claim.stat().st_mtime < LAUNCH_GRACE_S:
                return ExecutionInfo(ExecStatus.PENDING, "starting")
            return ExecutionInfo(ExecStatus.FAILED, "the training process never started")
        if stopped:
            return ExecutionInfo(ExecStatus.STOPPED, "stopped", code)
        if code == 0 and self._adapter_dir(run).is_dir():
            return ExecutionInfo(ExecStatus.SUCCEEDED, "exit code 0", 0)
        limit = read_timeout(d, run.attempts)
        if limit is not None:
            return ExecutionInfo(ExecStatus.TIMED_OUT, timed_out_detail(limit or self.run_timeout_s), code)
        if code == 0:
            return ExecutionInfo(ExecStatus.FAILED, "the trainer exited without saving an adapter", 0)
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return ExecutionInfo(ExecStatus.FAILED, f"the trainer was killed by {name}", code)
        return ExecutionInfo(ExecStatus.FAILED, f"the trainer exited with code {code}", code)

    def read(self, run: Run, event_cursor: int, log_cursor: int) -> EventBatch:
        d = self.run_dir(run)
        events, event_cursor = read_events(d / EVENTS_FILE, event_cursor)
        lines: list[str] = []
        path = d / LOG_NAME
        if path.exists():
            with path.open("rb") as f:
                f.seek(log_cursor)
                data = f.read(MAX_LOG_READ)
            end = data.rfind(b"\n")
            if end < 0 and len(data) == MAX_LOG_READ:
                end = len(data) - 1  # one giant line: take it as it is rather than stall
            if end >= 0:
                lines = split_log(data[: end + 1])
                log_cursor += end + 1
        return EventBatch(events=events, log_lines=lines, event_cursor=event_cursor, log_cursor=log_cursor)

    def tail_logs(self, run: Run, lines: int = 20) -> list[str]:
        path = self.run_dir(run) / LOG_NAME
        if not path.exists() or lines <= 0:
            return []
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            # Read back far enough for `lines` lines of a typical width, more when it is still short.
            span = max(8192, lines * 400)
            while True:
                f.seek(max(0, size - span))
                out = split_log(f.read())
                if len(out) > lines or span >= size:
                    break
                span *= 4
        if size > span and out:
            out = out[1:]  # the first line of the chunk may be cut
        return out[-lines:]

    def stop(self, run: Run) -> None:
        d = self.run_dir(run)
        if not self._file(run, "claim").exists():
            return  # never started: nothing to stop
        d.mkdir(parents=True, exist_ok=True)
        self._file(run, "stop").touch()
        deadline = time.time() + LAUNCH_GRACE_S
        while self._pid(run) is None and launch.read_exit(d, run.attempts) is None and time.time() < deadline:
            time.sleep(0.1)  # claimed but the pid is not written yet: the launch is under way
        pid = self._pid(run)
        if pid is None:
            return
        pgid = pid[0]
        # The launcher leads its own session, so its pid is the group id; a reused pid is told apart by start time.
        if not pid_alive(*pid) and not group_alive(pgid):
            return
        self._signal_group(pgid, signal.SIGTERM)
        if self._wait_group(pgid, self.grace_s):
            return
        log.warning("%s: the trainer ignored SIGTERM for %.0f s; killing it", run.id, self.grace_s)
        self._signal_group(pgid, signal.SIGKILL)
        if not self._wait_group(pgid, 10.0):
            raise BackendError(f"{run.id}: process group {pgid} survived SIGKILL", transient=True)

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass

    @staticmethod
    def _wait_group(pgid: int, timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not group_alive(pgid):
                return True
            time.sleep(0.05)
        return not group_alive(pgid)

    def _adapter_dir(self, run: Run) -> Path:
        return self.run_dir(run) / "adapter"

    def outputs(self, run: Run) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        try:
            loaded = json.loads((self.run_dir(run) / "metrics.json").read_text(encoding="utf-8"))
            if isinstance(loaded, dict):
                metrics = loaded
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            pass
        adapter = f"{run_dir(run.id)}/adapter" if self._adapter_dir(run).is_dir() else ""
        return {"metrics": metrics, "adapter": adapter}

    def links(self, run: Run) -> dict[str, str]:
        return {}
