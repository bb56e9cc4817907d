"""The executor protocol: how jobs/ starts, watches and stops a run's training, whatever runs it.

Two backends implement it: `jobs.local.LocalExecutor` (a child process on the workspace folder, the embedded
default) and `jobs.aca.AcaExecutor` (an Azure Container Apps job execution on an Azure Files share).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from jobs.domain import Run


class ExecStatus(StrEnum):
    """What the backend says about one execution, before it is mapped onto the run state machine."""

    PENDING = "pending"        # accepted, not yet running (ACA: Processing)
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"
    TIMED_OUT = "timed_out"
    UNKNOWN = "unknown"

    @property
    def finished(self) -> bool:
        return self in (ExecStatus.SUCCEEDED, ExecStatus.FAILED, ExecStatus.STOPPED, ExecStatus.TIMED_OUT)


@dataclass
class ExecutionInfo:
    status: ExecStatus
    detail: str = ""                     # the backend's own words, e.g. "exit code 1" or "Degraded"
    exit_code: int | None = None


@dataclass
class EventBatch:
    events: list[dict[str, Any]] = field(default_factory=list)   # payload progress events (payload.events)
    log_lines: list[str] = field(default_factory=list)           # plain log lines
    event_cursor: int = 0                                         # where to read from next time
    log_cursor: int = 0


class BackendError(Exception):
    """A failure a person can act on; its message says what to do. `transient` ones are worth retrying."""

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class Executor(Protocol):
    name: str

    def start(self, run: Run, config: dict[str, Any]) -> str:
        """Write the run's config, start training, return the execution id. Must not start twice for the same
        run attempt: if an execution for `run.id`/`run.attempts` already exists, return its id."""

    def status(self, run: Run) -> ExecutionInfo: ...

    def read(self, run: Run, event_cursor: int, log_cursor: int) -> EventBatch:
        """Progress events and log lines written since the cursors."""

    def tail_logs(self, run: Run, lines: int = 20) -> list[str]: ...

    def stop(self, run: Run) -> None:
        """Stop the execution; no process or replica of it may be left."""

    def outputs(self, run: Run) -> dict[str, Any]:
        """metrics.json of the finished run (or {}) and where its adapter is."""

    def links(self, run: Run) -> dict[str, str]:
        """Portal links for the thread; {} for the local backend."""
