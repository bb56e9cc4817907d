"""Deploying an approved request (jobs.deploys.approval): the RQ task that has the backend serve a run's adapter. A
backend serves it at once (the local inference server) or starts an operation of its own (the ACA deploy op), which
this follows until it ends.

Progress and the result are "deploy" RunEvents in the run's thread, and are kept in the request and the run record.
The task runs once per request: approved -> deploying is a transaction, so a second copy of the job does nothing.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from jobs.backends import get_backend
from jobs.core import queue, store
from jobs.core.domain import Run, RunEvent
from jobs.core.errors import BackendError, Hint, RunRejected
from jobs.core.settings import JobSettings, current_settings
from jobs.deploys.approval import (
    DEPLOY_KIND,
    RUN_KIND,
    Approval,
    ApprovalState,
    approval_key,
    enqueue_deploy,
    get_approval,
    schedule_expiry,
    update_approval,
)

log = logging.getLogger(__name__)

FOLLOW_EVERY_S = 5.0
# The Azure operation's own limit is 30 minutes; after this long without its result the deploy is reported failed.
FOLLOW_LIMIT_S = 3600.0


def deploy_event(approval: Approval, **extra: Any) -> RunEvent:
    data = {"approval": approval.id, "state": str(approval.state), "url": approval.url, "api_url": approval.api_url,
            "error": approval.error, "hint": approval.error_hint, "op": approval.op_id, "target": approval.target,
            **extra}
    return RunEvent(approval.run_id, "deploy", data)


def _schedule_follow(settings: JobSettings, approval_id: str) -> None:
    queue.enqueue(settings, queue.FOLLOW_BACKEND_DEPLOY, approval_id, delay_s=FOLLOW_EVERY_S,
                  job_id=f"follow-{approval_id}-{uuid.uuid4().hex[:8]}")


def _finish(settings: JobSettings, approval_id: str, *, url: str = "", api_url: str = "", error: str = "",
            hint: Hint | None = None, **extra: Any) -> Approval | None:
    def step(approval: Approval, run: Run) -> list[RunEvent] | None:
        if approval.state is not ApprovalState.DEPLOYING:
            return None
        approval.move(ApprovalState.FAILED if error else ApprovalState.DEPLOYED)
        approval.url, approval.api_url, approval.error = url, api_url, error
        approval.error_hint = hint.as_data() if hint else {}
        return [deploy_event(approval, **extra)]

    changed = update_approval(store.connect(settings), approval_id, step)
    return changed[0] if changed else None


# An approved request whose deploy task has not begun for this long lost it (its worker died): enqueue it again.
APPROVED_STALE_S = 30.0
LOST_DEPLOY = "the worker running the deploy stopped before it finished; nothing was changed for certain"


def recover_deploys(settings: JobSettings) -> dict[str, list[str]]:
    """Part of the reconcile pass: an approved deploy whose task was lost runs again; a deploy served at once whose
    worker died mid-way is failed with a reason, so no request waits in "deploying" for ever. A deploy that has its
    backend operation is left to the operation's own follow chain."""
    conn = store.connect(settings)
    done: dict[str, list[str]] = {"redeployed": [], "failed": []}
    for key in conn.scan_iter(store.APPROVAL_KEY.format("dp-*"), count=200):
        approval = get_approval(settings, key.rsplit(":", 1)[-1])
        if approval is None or approval.kind != DEPLOY_KIND or queue.job_pending(settings, f"deploy-{approval.id}"):
            continue  # a run's budget approval deploys nothing
        if approval.state is ApprovalState.APPROVED and time.time() - (approval.decided_at or 0) > APPROVED_STALE_S:
            enqueue_deploy(settings, approval.id)
            done["redeployed"].append(approval.id)
        elif approval.state is ApprovalState.DEPLOYING and not approval.op_id:
            if _finish(settings, approval.id, error=LOST_DEPLOY,
                       hint=Hint(f"deploy {approval.run_id}", "asks again")) is not None:
                done["failed"].append(approval.id)
    return done


LOST_WITH_STORE = ("tuneops lost its store (Redis came back empty) while this deploy was under way, and with it the "
                   "deploy's progress: whether the endpoint took the adapter is unknown. Try the endpoint; if it does "
                   "not answer with this run's model, ask for the deploy again")


def restore_approvals(settings: JobSettings, runs: list[Run]) -> dict[str, list[str]]:
    """Part of putting runs back after Redis came back empty (jobs.reconcile): the deploy requests their records keep
    (Run.deployments) go back into the store, so that their cards' buttons work again. A pending one still lapses at
    its time; an approved one whose deploy had not begun is deployed by recover_deploys; one that was deploying lost
    its progress with the store, so it ends failed, saying what to check. Returns the ids put back and failed."""
    conn = store.connect(settings)
    done: dict[str, list[str]] = {"requests put back": [], "deploys lost": []}
    highest = 0
    for run in runs:
        budget = [{**run.budget_approval, "kind": RUN_KIND}] if run.budget_approval.get("id") else []
        for entry in [*run.deployments, *budget]:
            approval_id = str(entry.get("id", ""))
            seq = approval_id.removeprefix("dp-")
            if not seq.isdigit():
                continue
            highest = max(highest, int(seq))
            approval = Approval.from_dict({"target": "", **entry, "run_id": run.id, "channel": run.channel,
                                           "backend": settings.backend})
            if not conn.set(approval_key(approval.id), json.dumps(approval.to_dict()), nx=True):
                continue  # already there: someone put it back first
            done["requests put back"].append(approval.id)
            if approval.state is ApprovalState.PENDING:
                schedule_expiry(settings, approval.id, approval.expires_at - time.time())
            elif approval.state is ApprovalState.DEPLOYING and _finish(
                    settings, approval.id, error=LOST_WITH_STORE,
                    hint=Hint(f"deploy {run.id}", "asks again")) is not None:
                done["deploys lost"].append(approval.id)
    if highest:
        store.raise_counter(conn, store.APPROVAL_SEQ, highest)
    return {k: v for k, v in done.items() if v}


def deploy_approved(approval_id: str) -> str:
    """The RQ task enqueued by the approving click."""
    settings = current_settings()

    def begin(approval: Approval, run: Run) -> list[RunEvent] | None:
        if approval.state is not ApprovalState.APPROVED or approval.kind != DEPLOY_KIND:
            return None
        approval.move(ApprovalState.DEPLOYING)
        return [deploy_event(approval)]

    changed = update_approval(store.connect(settings), approval_id, begin)
    if changed is None:
        return "nothing to do"
    approval, run, _ = changed
    try:
        started = get_backend(settings).deploy(run, approval.id, approval.requested_by)
    except BackendError as e:
        _finish(settings, approval.id, error=e.reason, hint=e.hint)
        return "failed"
    except Exception:  # ours, not the user's: the worker log has the trace, the thread a short reason
        log.exception("%s: the deploy of %s failed unexpectedly", approval_id, run.id)
        _finish(settings, approval_id, error="an error in tuneops stopped the deploy; the worker log has the details")
        return "failed"
    if not started.op_id:
        extra = {"replaced": started.replaced} if started.replaced else {}
        _finish(settings, approval.id, url=started.url, api_url=started.api_url, **extra)
        return "deployed"

    def record(a: Approval, r: Run) -> list[RunEvent] | None:
        a.op_id = started.op_id
        return [deploy_event(a)]

    update_approval(store.connect(settings), approval.id, record)
    _schedule_follow(settings, approval.id)
    return started.op_id


def _configured_endpoint(settings: JobSettings) -> str:
    try:
        return get_backend(settings).deploy_endpoint()
    except BackendError:
        return ""


def follow_backend_deploy(approval_id: str) -> str:
    """Look at the backend's deploy operation once; record its result, or look again in FOLLOW_EVERY_S."""
    settings = current_settings()
    approval = get_approval(settings, approval_id)
    if approval is None:
        return "gone"
    if approval.state is not ApprovalState.DEPLOYING or not approval.op_id:
        return "nothing to do"
    op = store.load_op(store.connect(settings), approval.op_id)
    if op is not None and op.state == "succeeded":
        url = (op.endpoint or _configured_endpoint(settings)).rstrip("/")
        _finish(settings, approval_id, url=url, api_url=f"{url}/v1" if url else "")
        return "deployed"
    if op is not None and op.state == "failed":
        _finish(settings, approval_id, error=op.result or f"{approval.op_id} failed")
        return "failed"
    started = approval.decided_at or approval.created_at
    if time.time() - started > FOLLOW_LIMIT_S:
        _finish(settings, approval_id, error=f"{approval.op_id} gave no result within "
                                             f"{FOLLOW_LIMIT_S / 60:.0f} minutes; see its thread")
        return "failed"
    _schedule_follow(settings, approval_id)
    return "following"


# Taking a deploy down ------------------------------------------------------------------------------------------------

def live_requests(run: Run) -> list[str]:
    """The run's deploy requests that are deployed and not taken down, oldest first (the last is the one serving)."""
    return [d["id"] for d in run.deployments if d.get("state") == ApprovalState.DEPLOYED]


def undeploy(settings: JobSettings, run_id: str, user: str, approvers: frozenset[str],
             admins: frozenset[str]) -> tuple[Approval, bool]:
    """Take a run's adapter off its endpoint: approvers and admins may, and so may whoever asked for that deploy.
    Returns the request that was serving and whether the endpoint stopped (nothing left on it). RunRejected says
    why not (no such run, not deployed, not allowed); BackendError when the endpoint could not be changed."""
    conn = store.connect(settings)
    run = store.load_run(conn, run_id)
    if run is None:
        raise RunRejected(f"there is no run {run_id}", hint=Hint("deployments", "lists what is deployed"))
    live = live_requests(run)
    if not live:
        raise RunRejected(f"{run.id} is not deployed", hint=Hint("deployments", "lists what is deployed"))
    serving = get_approval(settings, live[-1])
    if serving is None:
        raise RunRejected(f"the deploy request {live[-1]} of {run.id} is gone from the store; ask an admin to take "
                          "its adapter off the endpoint")
    if user not in approvers and user not in admins and user != serving.requested_by:
        raise RunRejected(f"only approvers, admins or whoever asked for its deploy ({serving.id}) may take {run.id} "
                          "off its endpoint")
    stopped = get_backend(settings).undeploy(run)
    now = time.time()

    def take_down(approval: Approval, r: Run) -> list[RunEvent] | None:
        if approval.state is not ApprovalState.DEPLOYED:
            return None
        approval.move(ApprovalState.UNDEPLOYED, now)
        approval.undeployed_by, approval.undeployed_at = user, now
        return [deploy_event(approval, by=user, stopped=stopped)] if approval.id == serving.id else []

    for approval_id in live:  # earlier deploys of the same run were served again by the last one: all come down
        update_approval(conn, approval_id, take_down)
    return serving, stopped


# What is live ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Deployment:
    """One adapter live on an endpoint, for the list of deployments."""
    run_id: str
    run_name: str
    base: str
    endpoint: str            # the UI; the OpenAI-compatible API is endpoint + /v1
    since: float | None
    approved_by: str
    requested_by: str
    request_id: str
    requests: int | None     # None: the backend could not say


def deployments(settings: JobSettings) -> list[Deployment]:
    """Every run whose adapter is live, newest deploy first, each with the requests its endpoint served for it (read
    from the servers' records: no endpoint is woken to ask)."""
    conn = store.connect(settings)
    live: dict[str, Approval] = {}
    for key in conn.scan_iter(approval_key("*"), count=500):
        raw = conn.get(key)
        approval = Approval.from_dict(json.loads(raw)) if raw else None
        if approval is not None and approval.state is ApprovalState.DEPLOYED:
            held = live.get(approval.run_id)  # a run deployed again: its last request is the one serving
            if held is None or (approval.finished_at or 0) > (held.finished_at or 0):
                live[approval.run_id] = approval
    backend = get_backend(settings)
    served: dict[str, dict[str, int] | None] = {}
    rows = []
    for approval in live.values():
        run = store.load_run(conn, approval.run_id)
        if run is None:
            continue
        if run.model not in served:
            try:
                served[run.model] = backend.requests_served(run.model)
            except BackendError as e:
                log.warning("requests served on the endpoint of %s: %s", run.model, e.reason)
                served[run.model] = None
        counts = served[run.model]
        rows.append(Deployment(run.id, run.name, run.model, approval.url, approval.finished_at, approval.decided_by,
                               approval.requested_by, approval.id,
                               None if counts is None else counts.get(run.id, 0)))
    return sorted(rows, key=lambda d: -(d.since or 0))
