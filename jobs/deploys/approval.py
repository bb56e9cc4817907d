"""Deploy requests and their four-eyes approval: who asked, who decided and when, expiry, and exactly one deploy.
The same approval holds back a run over budget (kind "run", see `request_budget_approval`): approved, it joins the line;
rejected or expired, it ends without having run.

A request (`dp-0001`) belongs to a succeeded run. Approving or rejecting is a transaction on the request and its run
record together (WATCH/MULTI), so two clicks at once decide once and only the winner enqueues the deploy. Each change
is also kept in the run record (`Run.deployments`) and reported as an "approval" RunEvent, which the bot renders as
the approval card in the run's thread. A request still pending after TUNEOPS_APPROVAL_TTL expires.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import redis

from jobs.backends import get_backend
from jobs.core import queue, store
from jobs.core.domain import Run, RunEvent, RunState
from jobs.core.durations import describe_duration
from jobs.core.errors import BackendError, Hint, RunRejected
from jobs.core.settings import JobSettings, current_settings

log = logging.getLogger(__name__)

APPROVAL_KEY = store.APPROVAL_KEY
APPROVAL_SEQ = store.APPROVAL_SEQ
APPROVAL_ID_RE = re.compile(r"^dp-\d{4,}$")
# How long one deploy task may take: a local deploy waits for the inference server to load and answer.
DEPLOY_TIMEOUT_S = 900
# What an approval is for: a deploy of a succeeded run, or letting a run over budget join the line.
DEPLOY_KIND = "deploy"
RUN_KIND = "run"
# An expiry job that runs this much early (clocks of two hosts) looks again later rather than expiring too soon.
EXPIRY_SLACK_S = 1.0


class ApprovalState(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"
    DEPLOYING = "deploying"
    DEPLOYED = "deployed"
    FAILED = "failed"
    UNDEPLOYED = "undeployed"      # taken off its endpoint (an undeploy), or served again by a later deploy

    @property
    def open(self) -> bool:
        """Waiting for a decision or for its deploy to finish: a second request for the run would be a duplicate."""
        return self in (ApprovalState.PENDING, ApprovalState.APPROVED, ApprovalState.DEPLOYING)


# The request's own small state machine: decided once, then (when approved) deployed once.
TRANSITIONS: dict[ApprovalState, frozenset[ApprovalState]] = {
    ApprovalState.PENDING: frozenset({ApprovalState.APPROVED, ApprovalState.REJECTED, ApprovalState.EXPIRED}),
    ApprovalState.APPROVED: frozenset({ApprovalState.DEPLOYING, ApprovalState.FAILED}),
    ApprovalState.DEPLOYING: frozenset({ApprovalState.DEPLOYED, ApprovalState.FAILED}),
    ApprovalState.REJECTED: frozenset(),
    ApprovalState.EXPIRED: frozenset(),
    ApprovalState.DEPLOYED: frozenset({ApprovalState.UNDEPLOYED}),
    ApprovalState.UNDEPLOYED: frozenset(),
    ApprovalState.FAILED: frozenset(),
}


@dataclass
class Approval:
    id: str
    run_id: str
    requested_by: str
    channel: str
    target: str                      # where the deploy goes, in words (jobs.deploys.deploy.describe_target)
    backend: str
    created_at: float
    expires_at: float
    state: ApprovalState = ApprovalState.PENDING
    decided_by: str = ""
    decided_at: float | None = None
    url: str = ""                    # the deployed UI
    api_url: str = ""                # the deployed OpenAI-compatible API (…/v1)
    op_id: str = ""                  # the Azure operation that deploys it (ACA backend)
    error: str = ""
    error_hint: dict[str, str] = field(default_factory=dict)  # the command that helps (Hint data)
    finished_at: float | None = None
    undeployed_by: str = ""
    undeployed_at: float | None = None
    kind: str = DEPLOY_KIND
    reason: str = ""                 # RUN_KIND: which budget the run is over (jobs.core.cost.RUN_BUDGET, ...)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = str(self.state)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Approval:
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in d.items() if k in known}
        data["state"] = ApprovalState(data.get("state", ApprovalState.PENDING))
        return cls(**data)

    def move(self, dst: ApprovalState, now: float | None = None) -> None:
        if dst not in TRANSITIONS[self.state]:
            raise ValueError(f"{self.id}: cannot go from {self.state} to {dst}")
        self.state = dst
        if dst in (ApprovalState.DEPLOYED, ApprovalState.FAILED, ApprovalState.REJECTED, ApprovalState.EXPIRED):
            self.finished_at = time.time() if now is None else now

    def record(self) -> dict[str, Any]:
        """What the run record keeps of the request (Run.deployments)."""
        keep = ("id", "requested_by", "created_at", "expires_at", "state", "decided_by", "decided_at", "target",
                "url", "api_url", "op_id", "error", "error_hint", "finished_at", "undeployed_by", "undeployed_at")
        if self.kind == RUN_KIND:
            keep = ("id", "kind", "requested_by", "created_at", "expires_at", "state", "decided_by", "decided_at",
                    "target", "reason", "finished_at")
        d = self.to_dict()
        return {k: d[k] for k in keep}


def approval_key(approval_id: str) -> str:
    return APPROVAL_KEY.format(approval_id)


def when(ts: float | None) -> str:
    """A moment for a message that any reader understands without Slack's markup: 2026-11-25 19:40 UTC."""
    if ts is None:
        return "—"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


# Pure checks ---------------------------------------------------------------------------------------------------------

# Why a decision is refused: who may decide, and when.
NOT_APPROVER = "not_approver"
EXPIRED = "expired"
DECIDED = "decided"
OWN_REQUEST = "own_request"


class DecisionRefused(RunRejected):
    """A refused approve/reject click, as facts (`why`, the request, the approvers) for the bot to put in words;
    str(e) is a plain fallback."""

    def __init__(self, why: str, approval: Approval, approvers: frozenset[str]):
        asks_again = why == EXPIRED and approval.kind == DEPLOY_KIND
        super().__init__(f"the decision on {approval.id} was refused ({why.replace('_', ' ')})",
                         hint=Hint(f"deploy {approval.run_id}", "asks again") if asks_again else None)
        self.why, self.approval, self.approvers = why, approval, approvers


def decision_refusal(approval: Approval, user: str, approve: bool, approvers: frozenset[str],
                     now: float) -> str | None:
    """Why `user` may not approve (or reject) this request now (one of NOT_APPROVER, EXPIRED, DECIDED,
    OWN_REQUEST); None when they may. Pure."""
    if user not in approvers:
        return NOT_APPROVER
    if approval.state is ApprovalState.EXPIRED or (approval.state is ApprovalState.PENDING
                                                    and now >= approval.expires_at):
        return EXPIRED
    if approval.state is not ApprovalState.PENDING:
        return DECIDED
    if approve and user == approval.requested_by:
        return OWN_REQUEST
    return None


# Storage -------------------------------------------------------------------------------------------------------------

def get_approval(settings: JobSettings, approval_id: str) -> Approval | None:
    if not APPROVAL_ID_RE.match(approval_id or ""):
        return None
    raw = store.connect(settings).get(approval_key(approval_id))
    return Approval.from_dict(json.loads(raw)) if raw else None


def pending_requests(settings: JobSettings) -> list[tuple[Approval, Run]]:
    """Deploy requests still waiting for a decision and not past their expiry, oldest first, each with its run (the
    Home tab's "waiting for you"; `decide` checks again when someone clicks)."""
    conn = store.connect(settings)
    now = time.time()
    waiting = []
    for key in conn.scan_iter(approval_key("*"), count=500):
        raw = conn.get(key)
        approval = Approval.from_dict(json.loads(raw)) if raw else None
        if approval is not None and approval.state is ApprovalState.PENDING and now < approval.expires_at:
            waiting.append(approval)
    runs = {run.id: run for run in store.load_runs(conn, {a.run_id for a in waiting})}
    return sorted(((a, runs[a.run_id]) for a in waiting if a.run_id in runs), key=lambda pair: pair[0].created_at)


Step = Callable[[Approval, Run], list[RunEvent] | None]


def update_approval(conn: redis.Redis, approval_id: str, step: Step,
                    retries: int = 20) -> tuple[Approval, Run, list[RunEvent]] | None:
    """Apply `step` to the request and its run in one transaction, as `store.update_run` does for runs: it mutates
    them and returns the events to append, or None to change nothing. The run record's copy of the request is
    refreshed from the request itself."""
    key = approval_key(approval_id)
    for _ in range(retries):
        with conn.pipeline() as pipe:
            try:
                pipe.watch(key)
                raw = pipe.get(key)
                if raw is None:
                    raise RunRejected(f"there is no deploy request {approval_id}",
                                      hint=Hint("deploy RUN", "makes one"))
                approval = Approval.from_dict(json.loads(raw))
                pipe.watch(store.run_key(approval.run_id))
                raw_run = pipe.get(store.run_key(approval.run_id))
                if raw_run is None:
                    raise RunRejected(f"the run {approval.run_id} of {approval_id} is gone")
                run = Run.from_dict(json.loads(raw_run))
                events = step(approval, run)
                if events is None:
                    pipe.unwatch()
                    return None
                _keep_in_run(run, approval)
                run.updated_at = time.time()
                pipe.multi()
                pipe.set(key, json.dumps(approval.to_dict()))
                store.write_run(pipe, run)  # the one writer of run records and their indexes
                for event in events:
                    store.append_event(pipe, event)
                pipe.execute()
                store.snapshot_run(conn, run)
                return approval, run, events
            except redis.WatchError:
                continue
    raise RuntimeError(f"{approval_id}: the request kept changing; gave up after {retries} attempts")


def _keep_in_run(run: Run, approval: Approval) -> None:
    entry = approval.record()
    if approval.kind == RUN_KIND:
        run.budget_approval = entry
        return
    for i, d in enumerate(run.deployments):
        if d.get("id") == approval.id:
            run.deployments[i] = entry
            return
    run.deployments.append(entry)


def approval_event(approval: Approval) -> RunEvent:
    return RunEvent(approval.run_id, "approval", {"approval": approval.id, "state": str(approval.state)})


def _end_held_run(approval: Approval, run: Run, by: str) -> list[RunEvent]:
    """A run over budget whose approval was rejected (cancelled by the approver) or expired (failed, saying so);
    nothing when the run is no longer waiting (cancelled by its requester meanwhile)."""
    if approval.kind != RUN_KIND or run.state is not RunState.QUEUED:
        return []
    previous = run.state
    if by:
        run.cancelled_by = by
        run.transition(RunState.CANCELLED)
        ended = RunEvent(run.id, "cancelled", {"by": by})
    else:
        run.error = (f"its budget approval {approval.id} expired with no decision after "
                     f"{describe_duration(approval.expires_at - approval.created_at)} (TUNEOPS_APPROVAL_TTL); "
                     "start the run again to ask anew")
        run.transition(RunState.FAILED)
        ended = RunEvent(run.id, "failed", {"error": run.error, "hint": run.error_hint, "log_tail": []})
    return [RunEvent(run.id, "state", {"state": str(run.state), "previous": str(previous)}), ended]


# What the bot calls --------------------------------------------------------------------------------------------------

def request_deploy(settings: JobSettings, run_id: str, requested_by: str, channel: str) -> Approval:
    """Ask for a deploy of a succeeded run: creates the request, whose card the bot posts in the run's thread, and
    schedules its expiry. A second request while one is open is refused, naming the open one."""
    conn = store.connect(settings)
    run = store.load_run(conn, run_id)
    if run is None:
        raise RunRejected(f"there is no run {run_id}", hint=Hint("list", "shows the runs"))
    if run.state is not RunState.SUCCEEDED or not run.adapter_path:
        resumable = run.state.terminal and run.state is not RunState.SUCCEEDED
        raise RunRejected(f"{run.id} is {run.state.value.replace('_', ' ')}: only a run that succeeded has an adapter "
                          "to deploy", hint=Hint(f"resume {run.id}", "continues it") if resumable else None)
    for entry in run.deployments:
        if ApprovalState(entry.get("state", "failed")).open and not _lapsed(entry):
            raise RunRejected(f"{run.id} already has a deploy request ({entry['id']}, {entry['state']}): its card is "
                              "in the run's thread")
    now = time.time()
    approval = Approval(id=f"dp-{conn.incr(APPROVAL_SEQ):04d}", run_id=run.id, requested_by=requested_by,
                        channel=run.channel or channel, target=_describe_target(settings), backend=settings.backend,
                        created_at=now, expires_at=now + settings.approval_ttl_s)
    key = approval_key(approval.id)

    def step(r: Run) -> list[RunEvent] | None:
        if any(ApprovalState(d.get("state", "failed")).open and not _lapsed(d) for d in r.deployments):
            return None  # another request got in first
        _keep_in_run(r, approval)
        return [approval_event(approval)]

    # The request is written before the run points at it, so that no reader finds a dangling id.
    conn.set(key, json.dumps(approval.to_dict()))
    if store.update_run(conn, run.id, step) is None:
        conn.delete(key)
        raise RunRejected(f"{run.id} already has a deploy request: its card is in the run's thread")
    schedule_expiry(settings, approval.id, settings.approval_ttl_s)
    return approval


def request_budget_approval(settings: JobSettings, run_id: str) -> Approval | None:
    """Ask for an approver's click on a run held for its budget (jobs.runs.service.submit_run holds it): creates the
    request, whose card the bot posts in the run's thread, and schedules its expiry. Idempotent: a run that has its
    request gets that one; a run not held gets None."""
    conn = store.connect(settings)
    run = store.load_run(conn, run_id)
    if run is None or not run.held:
        return None
    if run.budget_approval.get("id"):
        return get_approval(settings, run.budget_approval["id"])
    now = time.time()
    estimate = run.estimate.get("usd")
    target = (f"a run estimated at ${estimate:,.2f} on {run.estimate.get('profile', settings.backend)}"
              if estimate is not None else f"a run on {run.estimate.get('profile', settings.backend)}")
    approval = Approval(id=f"dp-{conn.incr(APPROVAL_SEQ):04d}", run_id=run.id, requested_by=run.requester,
                        channel=run.channel, target=target, backend=settings.backend, created_at=now,
                        expires_at=now + settings.approval_ttl_s, kind=RUN_KIND,
                        reason=str(run.budget_approval.get("reason", "")))
    key = approval_key(approval.id)

    def step(r: Run) -> list[RunEvent] | None:
        if not r.held or r.budget_approval.get("id"):
            return None  # decided, cancelled, or another request got in first
        _keep_in_run(r, approval)
        return [approval_event(approval)]

    conn.set(key, json.dumps(approval.to_dict()))  # written before the run points at it
    if store.update_run(conn, run.id, step) is None:
        conn.delete(key)
        current = store.load_run(conn, run.id)
        return get_approval(settings, current.budget_approval.get("id", "")) if current else None
    schedule_expiry(settings, approval.id, settings.approval_ttl_s)
    return approval


def _describe_target(settings: JobSettings) -> str:
    try:
        return get_backend(settings).describe_target()
    except BackendError as e:  # e.g. the Azure config cannot be read: the deploy will say so; the card says it now
        return f"the {settings.backend} backend's inference endpoint (its set-up cannot be read now: {e.reason})"


def _lapsed(entry: dict[str, Any]) -> bool:
    """A pending request past its expiry (its expiry job may not have run yet) no longer blocks a new one."""
    return entry.get("state") == ApprovalState.PENDING and time.time() >= float(entry.get("expires_at") or 0)


def decide(settings: JobSettings, approval_id: str, user: str, approve: bool,
           approvers: frozenset[str]) -> Approval:
    """Approve or reject a pending request, atomically; the winner of two concurrent approvals enqueues the one
    deploy. Raises RunRejected with the reason the person sees (not an approver, four eyes, decided, expired)."""
    conn = store.connect(settings)
    refusal: list[DecisionRefused] = []

    def step(approval: Approval, run: Run) -> list[RunEvent] | None:
        refusal.clear()
        now = time.time()
        why = decision_refusal(approval, user, approve, approvers, now)
        if why is not None:
            refusal.append(DecisionRefused(why, approval, approvers))
            if approval.state is ApprovalState.PENDING and now >= approval.expires_at:
                approval.move(ApprovalState.EXPIRED, now)  # found expired: record it, and the card says so
                return [approval_event(approval)] + _end_held_run(approval, run, "")
            return None
        approval.move(ApprovalState.APPROVED if approve else ApprovalState.REJECTED, now)
        approval.decided_by, approval.decided_at = user, now
        return [approval_event(approval)] + ([] if approve else _end_held_run(approval, run, user))

    if not APPROVAL_ID_RE.match(approval_id or ""):
        raise RunRejected(f"{approval_id!r} is not a deploy request id (they look like dp-0001)")
    changed = update_approval(conn, approval_id, step)
    if refusal:
        raise refusal[0]
    assert changed is not None
    approval = changed[0]
    if approval.state is ApprovalState.APPROVED and approval.kind == RUN_KIND:
        # In line now (the store indexes it once its approval is no longer pending): report places, admit.
        store.report_positions(conn)
        queue.enqueue(settings, queue.ADMIT_RUNS)
    elif approval.state is ApprovalState.APPROVED:
        enqueue_deploy(settings, approval.id)
    return approval


# Expiry (an RQ task) -------------------------------------------------------------------------------------------------

def enqueue_deploy(settings: JobSettings, approval_id: str) -> None:
    """Ask a worker to deploy an approved request (jobs.deploys.deploy.deploy_approved); once per request."""
    queue.enqueue(settings, queue.DEPLOY_APPROVED, approval_id, job_id=f"deploy-{approval_id}",
                  timeout=DEPLOY_TIMEOUT_S)


def schedule_expiry(settings: JobSettings, approval_id: str, delay_s: float) -> None:
    # At least a moment later: RQ's scheduler runs a job due now on its next pass.
    queue.enqueue(settings, queue.EXPIRE_APPROVAL, approval_id, delay_s=max(delay_s, 0.001),
                  job_id=f"expire-{approval_id}-{int(time.time() * 1000)}")


def expire_approval(approval_id: str) -> str:
    """Mark a request that is still pending at its expiry as expired (the card then says so)."""
    settings = current_settings()
    left: list[float] = []

    def step(approval: Approval, run: Run) -> list[RunEvent] | None:
        left.clear()
        if approval.state is not ApprovalState.PENDING:
            return None
        now = time.time()
        if now + EXPIRY_SLACK_S < approval.expires_at:
            left.append(approval.expires_at - now)
            return None
        approval.move(ApprovalState.EXPIRED, now)
        return [approval_event(approval)] + _end_held_run(approval, run, "")

    try:
        changed = update_approval(store.connect(settings), approval_id, step)
    except RunRejected as e:
        log.warning("%s: %s", approval_id, e)
        return "gone"
    if left:
        schedule_expiry(settings, approval_id, left[0])
        return "not yet"
    return "expired" if changed else "decided"
