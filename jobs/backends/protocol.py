"""What a backend does, all of it: start, watch, stop and read the logs of a run's training (the Executor part),
deploy an adapter, portal links, doctor checks, secrets and provisioning operations (the rest of Backend).

`jobs.backends.get_backend` picks one from the settings; nothing else names a backend. Two implement it: `local` (the
trainer as a child process on the workspace folder, the embedded default) and `aca` (an Azure Container Apps job
execution on an Azure Files share). What a backend cannot do it refuses with a BackendError that says why.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from jobs.core.cost import GpuProfile
from jobs.core.domain import Run
from jobs.core.errors import Hint


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


@dataclass
class LogsAnswer:
    """The answer to a logs request: the lines, where they came from, and a note worth showing (e.g. ingestion lag)."""

    lines: list[str]
    source: str
    note: str = ""


@dataclass
class Check:
    """One line of `tuneops doctor`: what was checked, whether it is fine, and the detail or what to do."""

    what: str
    ok: bool
    detail: str
    hint: Hint | None = None      # the command that fixes it, when there is one


@dataclass
class SecretInfo:
    """A secret the backend keeps for runs, by name and date; its value is never read back."""

    env_name: str                 # HF_TOKEN
    vault_name: str               # hf-token
    updated_on: dt.datetime | None
    created_on: dt.datetime | None
    enabled: bool = True
    tagged: bool = False          # set through tuneops (carries the env-name tag)

    def describe(self) -> str:
        when = self.updated_on.strftime("%Y-%m-%d %H:%M UTC") if self.updated_on else "unknown date"
        return f"{self.env_name} (Key Vault: {self.vault_name}), updated {when}" + ("" if self.enabled else ", disabled")


@dataclass
class DeployStarted:
    """What a deploy did at once: served (url set), or handed to an operation of the backend (op_id) to follow."""

    url: str = ""
    api_url: str = ""
    replaced: str = ""            # the run whose adapter this deploy replaced, if any
    op_id: str = ""


@dataclass
class SmokeStep:
    """One step of a smoke check (`Backend.smoke_check`): what was checked, how it went, in words."""

    name: str                     # "share", "Key Vault references", "payload import", ...
    status: str                   # ok | warn | fail | info
    text: str
    links: dict[str, str] = field(default_factory=dict)   # portal links (the execution, its logs)
    hint: Hint | None = None      # the command that fixes a failed step, when there is one


@dataclass
class SmokeResult:
    """How a smoke check ended: passed or not, a one-line verdict, the steps, and where to look."""

    passed: bool
    verdict: str
    steps: list[SmokeStep] = field(default_factory=list)
    links: dict[str, str] = field(default_factory=dict)
    hint: Hint | None = None


# What a backend may offer beyond training and deploying; `jobs.backends.offers` says which.
SECRETS = "secrets"
PROVISION = "provision"


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


class Backend(Executor, Protocol):
    """Everything jobs/ and the bot ask of a backend, beyond running the trainer (Executor)."""

    def run_logs(self, run: Run, tail: int, grep: str | None) -> LogsAnswer:
        """The last `tail` log lines of the run (holding `grep`, case-insensitive, when given)."""

    def describe_target(self) -> str:
        """Where a deploy goes, in words for the approval card."""

    def gpu_profile(self) -> GpuProfile:
        """Where a run trains, for its cost: the profile (priced in jobs.core.cost.PRICES), its GPUs and GPU model.
        Quick and offline: it reads the configuration only."""

    def deploy(self, run: Run, approval_id: str, requester: str) -> DeployStarted:
        """Serve the run's adapter, or start an operation that will (DeployStarted.op_id, an Op record in the store,
        which jobs.deploys follows). Raises BackendError."""

    def deploy_endpoint(self) -> str:
        """Where deployed adapters answer when the operation did not say; "" when unknown."""

    def undeploy(self, run: Run) -> bool:
        """Take the run's adapter off its base model's endpoint; True when the endpoint stopped as nothing was left
        on it. Raises BackendError."""

    def inference_usage(self) -> tuple[GpuProfile, list[list[float]]]:
        """The inference endpoints' GPU profile and each server process's [started, last seen] so far, for the
        month's spend (read from the servers' records: no endpoint is woken). Raises BackendError."""

    def requests_served(self, model: str) -> dict[str, int]:
        """Requests served per model id (adapter name, or the base's id) by the base model's endpoint, over every
        server process it has had; {} when it has served none. Never wakes an endpoint. Raises BackendError."""

    def doctor(self) -> list[Check]:
        """Read-only, quick checks of the backend's set-up for `tuneops doctor`."""

    def check_secret_name(self, name: str) -> str:
        """The name the secret store gives env var `name`, or a BackendError saying why no secret can be set under
        it here (a bad name, no store configured)."""

    def check_secret(self, name: str, value: str) -> str:
        """The name the secret store gives `name`, or a BackendError saying what is wrong (never echoing value)."""

    def set_secret(self, name: str, value: str) -> SecretInfo:
        """Store a secret for runs; the value goes there and nowhere else."""

    def list_secrets(self) -> list[SecretInfo]: ...

    def enqueue_secret_reference(self, name: str, requester: str, channel: str) -> str:
        """Queue making runs (and the inference app) get the secret; returns the op id."""

    def provision_targets(self, target: str | None) -> tuple[list[str], str]:
        """What `provision [target]` provisions here (kinds for enqueue_provision), and a note on what is left out."""

    def enqueue_provision(self, kind: str, requester: str, channel: str) -> str:
        """Queue creating or updating the backend's resources (`finetune` or `inference`), or a smoke check
        (`smoke`); returns the op id."""

    def smoke_check(self, report: Callable[[SmokeStep], None], log_wait_s: float | None = None) -> SmokeResult:
        """Run one short, cheap execution that proves the chain a run needs (share, secrets, payload code, logs),
        reporting each step as it goes; synchronous (`tuneops doctor --smoke`). Raises BackendError when the backend
        has nothing to check."""
