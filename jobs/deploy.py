"""Deploying an approved request (jobs.approval): the RQ task that serves a run's adapter, with the local backend
through `jobs.serving` (payload.serve on this machine), with the ACA backend through the Azure deploy operation
(`jobs.aca.api.enqueue_deploy`), which it follows until the operation ends.

Progress and the result are "deploy" RunEvents in the run's thread, and are kept in the request and the run record.
The task runs once per request: approved -> deploying is a transaction, so a second copy of the job does nothing.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from datetime import timedelta
from typing import Any

from jobs import serving, store
from jobs.approval import Approval, ApprovalState, get_approval, update_approval
from jobs.domain import Run, RunEvent
from jobs.executor import BackendError
from jobs.settings import JobSettings

log = logging.getLogger(__name__)

DEPLOY_TIMEOUT_S = int(serving.HEALTH_TIMEOUT_S + 300)
FOLLOW_EVERY_S = 5.0
# The Azure operation's own limit is 30 minutes; after this long without its result the deploy is reported failed.
FOLLOW_LIMIT_S = 3600.0
_ENDPOINT = re.compile(r"Endpoint:\s*(https?://\S+)")


def describe_target(settings: JobSettings) -> str:
    """Where a deploy goes, in words for the approval card."""
    if settings.backend == "aca":
        try:
            from jobs.aca.config import load_aca_config

            cfg = load_aca_config(workspace=settings.workspace)
        except BackendError as e:
            return f"the ACA inference app (its config cannot be read: {e})"
        name = cfg.app_name or "(ACA_APP_NAME not set)"
        return f"the ACA inference app {name}" + (f" at {cfg.app_endpoint}" if cfg.app_endpoint else "")
    host = serving.public_host(settings.serve_host)
    where = f"at {host}:{settings.serve_port}" if settings.serve_port else f"on {host} (a free port)"
    return f"the local inference server (payload.serve) {where}, replacing the one running now"


def deploy_event(approval: Approval, **extra: Any) -> RunEvent:
    data = {"approval": approval.id, "state": str(approval.state), "url": approval.url, "api_url": approval.api_url,
            "error": approval.error, "op": approval.op_id, "target": approval.target, **extra}
    return RunEvent(approval.run_id, "deploy", data)


def enqueue_deploy(settings: JobSettings, approval_id: str) -> None:
    from jobs.tasks import FAILURE_TTL_S, RESULT_TTL_S, get_queue

    get_queue(settings).enqueue(deploy_approved, approval_id, job_id=f"deploy-{approval_id}",
                                job_timeout=DEPLOY_TIMEOUT_S, result_ttl=RESULT_TTL_S, failure_ttl=FAILURE_TTL_S)


def _schedule_follow(settings: JobSettings, approval_id: str) -> None:
    from jobs.tasks import FAILURE_TTL_S, RESULT_TTL_S, get_queue

    get_queue(settings).enqueue_in(timedelta(seconds=FOLLOW_EVERY_S), follow_aca_deploy, approval_id,
                                   job_id=f"follow-{approval_id}-{uuid.uuid4().hex[:8]}",
                                   result_ttl=RESULT_TTL_S, failure_ttl=FAILURE_TTL_S)


def _finish(settings: JobSettings, approval_id: str, *, url: str = "", api_url: str = "", error: str = "",
            **extra: Any) -> Approval | None:
    def step(approval: Approval, run: Run) -> list[RunEvent] | None:
        if approval.state is not ApprovalState.DEPLOYING:
            return None
        approval.move(ApprovalState.FAILED if error else ApprovalState.DEPLOYED)
        approval.url, approval.api_url, approval.error = url, api_url, error
        return [deploy_event(approval, **extra)]

    changed = update_approval(store.connect(settings), approval_id, step)
    return changed[0] if changed else None


# An approved request whose deploy task has not begun for this long lost it (its worker died): enqueue it again.
APPROVED_STALE_S = 30.0
LOST_DEPLOY = ("the worker running the deploy stopped before it finished; nothing was changed for certain. Ask again "
               "with `/finetune deploy {run}`")


def recover_deploys(settings: JobSettings) -> dict[str, list[str]]:
    """Part of the reconcile pass: an approved deploy whose task was lost runs again; a local deploy whose worker
    died mid-way is failed with a reason, so no request waits in "deploying" for ever. An ACA deploy that has its
    operation is left to the operation's own follow chain."""
    from jobs.approval import APPROVAL_KEY
    from jobs.tasks import job_pending

    conn = store.connect(settings)
    done: dict[str, list[str]] = {"redeployed": [], "failed": []}
    for key in conn.scan_iter(APPROVAL_KEY.format("dp-*"), count=200):
        approval = get_approval(settings, key.rsplit(":", 1)[-1])
        if approval is None or job_pending(settings, f"deploy-{approval.id}"):
            continue
        if approval.state is ApprovalState.APPROVED and time.time() - (approval.decided_at or 0) > APPROVED_STALE_S:
            enqueue_deploy(settings, approval.id)
            done["redeployed"].append(approval.id)
        elif approval.state is ApprovalState.DEPLOYING and not approval.op_id:
            if _finish(settings, approval.id, error=LOST_DEPLOY.format(run=approval.run_id)) is not None:
                done["failed"].append(approval.id)
    return done


def deploy_approved(approval_id: str) -> str:
    """The RQ task enqueued by the approving click."""
    from jobs.tasks import current_settings

    settings = current_settings()

    def begin(approval: Approval, run: Run) -> list[RunEvent] | None:
        if approval.state is not ApprovalState.APPROVED:
            return None
        approval.move(ApprovalState.DEPLOYING)
        return [deploy_event(approval)]

    changed = update_approval(store.connect(settings), approval_id, begin)
    if changed is None:
        return "nothing to do"
    approval, run, _ = changed
    try:
        if settings.backend == "aca":
            return _deploy_aca(settings, approval, run)
        return _deploy_local(settings, approval, run)
    except Exception:  # ours, not the user's: the worker log has the trace, the thread a short reason
        log.exception("%s: the deploy of %s failed unexpectedly", approval_id, run.id)
        _finish(settings, approval_id, error="an error in tuneops stopped the deploy; the worker log has the details")
        return "failed"


def _deploy_local(settings: JobSettings, approval: Approval, run: Run) -> str:
    try:
        server, replaced = serving.replace_server(settings, run, approval.id)
    except serving.ServeError as e:
        _finish(settings, approval.id, error=str(e))
        return "failed"
    extra = {"replaced": replaced.run_id} if replaced is not None else {}
    _finish(settings, approval.id, url=server.url, api_url=server.api_url, **extra)
    return "deployed"


def _deploy_aca(settings: JobSettings, approval: Approval, run: Run) -> str:
    from jobs.aca import api

    try:
        op_id = api.enqueue_deploy(settings, run.id, approval.requested_by, approval.channel)
    except BackendError as e:
        _finish(settings, approval.id, error=str(e))
        return "failed"

    def record(a: Approval, r: Run) -> list[RunEvent] | None:
        a.op_id = op_id
        return [deploy_event(a)]

    update_approval(store.connect(settings), approval.id, record)
    _schedule_follow(settings, approval.id)
    return op_id


def follow_aca_deploy(approval_id: str) -> str:
    """Look at the Azure deploy operation once; record its result, or look again in FOLLOW_EVERY_S."""
    from jobs.aca import api
    from jobs.tasks import current_settings

    settings = current_settings()
    approval = get_approval(settings, approval_id)
    if approval is None:
        return "gone"
    if approval.state is not ApprovalState.DEPLOYING or not approval.op_id:
        return "nothing to do"
    op = api.get_op(settings, approval.op_id)
    if op is not None and op.state == "succeeded":
        found = _ENDPOINT.search(op.result or "")
        url = found.group(1).rstrip(".") if found else describe_endpoint(settings)
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


def describe_endpoint(settings: JobSettings) -> str:
    try:
        from jobs.aca.config import load_aca_config

        return load_aca_config(workspace=settings.workspace).app_endpoint
    except BackendError:
        return ""
