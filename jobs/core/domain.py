"""The domain: a fine-tuning Run, its one state machine, and the RunEvent facts the bot renders.

Pure: no Redis, no Slack, no Azure. `jobs.core.store` persists these; `bot` renders them.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from jobs.core import cost

RUN_ID_RE = re.compile(r"^ft-\d{4,}$")


class RunState(StrEnum):
    QUEUED = "queued"
    PREPARING = "preparing"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES

    @property
    def active(self) -> bool:
        """Holds (or is about to hold) a GPU slot."""
        return self in (RunState.PREPARING, RunState.RUNNING)


TERMINAL_STATES = frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED, RunState.TIMED_OUT})

# The one place that says which moves are legal. A resume takes a finished-but-resumable run back to preparing
# (a new execution is started), which then goes to running as usual; jobs/ sends a resumed run back to queued first,
# so that it waits for a GPU slot like any other run.
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.QUEUED: frozenset({RunState.PREPARING, RunState.CANCELLED, RunState.FAILED}),
    RunState.PREPARING: frozenset({RunState.RUNNING, RunState.FAILED, RunState.CANCELLED, RunState.SUCCEEDED,
                                   RunState.TIMED_OUT}),
    RunState.RUNNING: frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED, RunState.TIMED_OUT}),
    RunState.SUCCEEDED: frozenset(),
    RunState.CANCELLED: frozenset({RunState.PREPARING, RunState.QUEUED}),
    RunState.FAILED: frozenset({RunState.PREPARING, RunState.QUEUED}),
    RunState.TIMED_OUT: frozenset({RunState.PREPARING, RunState.QUEUED}),
}


class IllegalTransition(ValueError):
    def __init__(self, run_id: str, src: RunState, dst: RunState):
        super().__init__(f"{run_id}: cannot go from {src} to {dst}")
        self.src, self.dst = src, dst


def check_transition(run_id: str, src: RunState, dst: RunState) -> None:
    if dst not in TRANSITIONS[src]:
        raise IllegalTransition(run_id, src, dst)


@dataclass
class Run:
    id: str
    requester: str
    channel: str
    model: str
    dataset: str
    params: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    # What the run trains on, whatever happens to the file later: its sha256 when queued, and where it came from
    # (a link to the message it was attached to, for a dataset fetched from chat; "" for a file put in the workspace).
    dataset_sha256: str = ""
    dataset_source: str = ""
    state: RunState = RunState.QUEUED
    backend: str = "local"
    execution_id: str = ""
    pid: int = 0                 # local backend: the launcher of the current attempt, which leads its process group
    event_cursor: int = 0
    log_cursor: int = 0
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    eta_s: float | None = None
    last_checkpoint_step: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    adapter_path: str = ""
    error: str = ""
    error_hint: dict[str, str] = field(default_factory=dict)  # the command that helps (jobs.core.errors.Hint data)
    cancelled_by: str = ""
    attempts: int = 0
    auto_resumes: int = 0
    # The card's links: the current execution's portal links (ACA) and the trainer's own ("wandb": its W&B run).
    links: dict[str, str] = field(default_factory=dict)
    deployments: list[dict[str, Any]] = field(default_factory=list)  # deploy requests, decisions (jobs.deploys.approval)
    # Cost (jobs.core.cost): the estimate made before it was queued, the [start, end] of each attempt's running time,
    # what it cost once it ended, whether it was told it ran past its estimate, and the budget approval it needed.
    estimate: dict[str, Any] = field(default_factory=dict)
    gpu_periods: list[list[float | None]] = field(default_factory=list)
    actual: dict[str, Any] = field(default_factory=dict)
    overrun_warned: bool = False
    budget_approval: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = str(self.state)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Run:
        known = {f for f in cls.__dataclass_fields__}
        data = {k: v for k, v in d.items() if k in known}
        data["state"] = RunState(data.get("state", RunState.QUEUED))
        return cls(**data)

    def transition(self, dst: RunState, now: float | None = None) -> None:
        """Move to `dst` or raise IllegalTransition. Keeps the timestamps that belong to the states."""
        check_transition(self.id, self.state, dst)
        now = time.time() if now is None else now
        self.state = dst
        self.updated_at = now
        if dst is RunState.PREPARING:
            self.attempts += 1
            self.finished_at = None
            self.error = ""
        elif dst is RunState.RUNNING:
            self.started_at = now if self.started_at is None else self.started_at
            self.gpu_periods.append([now, None])
        elif dst is RunState.QUEUED:
            self.finished_at = None
        elif dst.terminal:
            self.finished_at = now
            for period in self.gpu_periods:
                period[1] = now if period[1] is None else period[1]
            if self.gpu_periods:  # a run that never ran (cancelled in line, say) spent nothing to report
                self.actual = cost.actual(self.estimate, self.gpu_periods)

    @property
    def held(self) -> bool:
        """Waiting for an approver's click on its budget approval before it may join the line."""
        return self.budget_approval.get("state") == "pending"

    def running_s(self, now: float | None = None) -> float:
        """GPU time so far: every attempt's running time, the current one up to `now`."""
        return cost.gpu_seconds(self.gpu_periods, time.time() if now is None else now)

    @property
    def display_name(self) -> str:
        return f"{self.id} ({self.name})" if self.name else self.id


# Run events: the facts jobs/ appends for the bot to render. `kind` names the fact; the rest is data.
EVENT_KINDS = (
    "queued",        # position (0 and held: the budget it is over, while it waits for an approver)
    "state",         # state, previous
    "progress",      # step, total_steps, loss, eta_s, epoch, tokens_per_s
    "eval",          # step, eval_loss
    "checkpoint",    # step
    "log",           # lines (list[str])
    "started",       # execution_id, links
    "succeeded",     # metrics, adapter
    "failed",        # error, hint (Hint data), log_tail (list[str])
    "cancelling",    # by: a cancel was asked for; a worker stops the execution
    "cancelled",     # by
    "resumed",       # by, checkpoint_step, auto (and done, allowed when auto): back in line
    "timed_out",     # checkpoint_step
    "notice",        # text: anything else worth a thread line (plain words, no chat markup)
    "approval",      # approval (id), state: a deploy request was made or decided (jobs.deploys.approval)
    "deploy",        # approval (id), state, url, api_url, endpoint, error: a deploy's progress (jobs.deploys.deploy)
    "overrun",       # running_s, estimate_s: the run went past twice its estimated time (told once a run)
)


@dataclass
class RunEvent:
    run_id: str
    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)

    def __post_init__(self):
        if self.kind not in EVENT_KINDS:
            raise ValueError(f"unknown run event kind {self.kind!r}")


@dataclass
class Op:
    """A backend operation that runs on a worker (provisioning, a secret reference, a deploy), with its own id
    (pv-0001); its progress is RunEvents whose run_id is the op id (jobs.backends.aca.ops runs them)."""

    id: str
    kind: str                 # finetune | inference | secret | deploy | smoke
    requester: str
    channel: str
    state: str = "queued"     # queued | running | succeeded | failed
    target: str = ""          # secret: the env var name; deploy: the run id
    created_at: float = 0.0
    finished_at: float = 0.0
    result: str = ""
    endpoint: str = ""        # deploy: where the app answers, once it does

    @classmethod
    def from_hash(cls, op_id: str, h: dict[str, str]) -> Op:
        return cls(id=op_id, kind=h.get("kind", ""), requester=h.get("requester", ""), channel=h.get("channel", ""),
                   state=h.get("state", ""), target=h.get("target", ""),
                   created_at=float(h.get("created_at") or 0), finished_at=float(h.get("finished_at") or 0),
                   result=h.get("result", ""), endpoint=h.get("endpoint", ""))
