"""Azure operations as RQ jobs: provisioning (the training job or the inference app), a smoke check of the whole
chain before the first GPU minute (jobs.backends.aca.smoke), the job's reference to a Key Vault secret after a secret
was set, and deploying an adapter to the inference app.

Each operation gets an id like `pv-0001` and a small record in Redis; the bot acks at once and renders the
operation's RunEvents (kinds "notice", "succeeded", "failed", run_id = the op id) from the same stream as runs'
events. Two operations on the same Azure resource are serialized by a Redis lock, never interleaved. Job arguments
are ids only: a secret's value never passes through here.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from jobs.backends.aca import endpoints as aca_endpoints
from jobs.backends.aca import provision, quota, smoke
from jobs.backends.aca.clients import AzureClients, get_clients
from jobs.backends.aca.config import load_aca_config
from jobs.backends.aca.executor import AcaExecutor
from jobs.backends.aca.resources import InvalidSecretName, secret_name
from jobs.core import endpoints as core_endpoints
from jobs.core import queue, store
from jobs.core.domain import Op, RunEvent
from jobs.core.errors import BackendError, Hint
from jobs.core.settings import current_settings

log = logging.getLogger(__name__)

OP_TASK = "jobs.backends.aca.ops.run_op"      # the one RQ task that runs every kind of op
OP_ID_RE = re.compile(r"^pv-\d{4,}$")
KINDS = ("finetune", "inference", "smoke")
CHECK_TARGET = "check"      # `provision check`: the smoke check
OP_TIMEOUT_S = 1800
LOCK_TTL_S = 1800
LOCK_WAIT_S = 1500


def clients_for(settings) -> AzureClients:
    return get_clients(load_aca_config(workspace=getattr(settings, "workspace", None)))


def provision_targets(target: str | None, has_app: bool) -> tuple[list[str], str]:
    """What to provision for `provision [target]`, and a note on what is left out (no app configured); `check` is
    the smoke check; pure."""
    if target == CHECK_TARGET:
        return ["smoke"], ""
    if target is not None:
        return [target], ""
    if has_app:
        return ["finetune", "inference"], ""
    return ["finetune"], ("The inference app is left out: infra/inference.config.json has no ACA_APP_NAME (add it "
                          "to provision the app too).")


def _new_op(settings, kind: str, requester: str, channel: str, target: str = "") -> str:
    conn = store.connect(settings)
    op_id = f"pv-{conn.incr(store.OP_SEQ):04d}"
    with conn.pipeline() as pipe:
        pipe.hset(store.OP_KEY.format(op_id), mapping={"kind": kind, "requester": requester, "channel": channel,
                                                 "state": "queued", "target": target, "created_at": time.time()})
        store.append_event(pipe, RunEvent(op_id, "notice", {"text": _queued_text(kind, target), "op": kind}))
        pipe.execute()
    return op_id


def _queued_text(kind: str, target: str) -> str:
    return {"finetune": "Provisioning the fine-tuning job: queued.",
            "inference": "Provisioning the inference app: queued.",
            "smoke": "Smoke check (one short CPU execution of the job's twin): queued.",
            "secret": f"Adding {target} to the job's secret references: queued.",
            "deploy": f"Deploying the adapter of {target}: queued."}[kind]


def _enqueue(settings, op_id: str):
    return queue.enqueue(settings, OP_TASK, op_id, job_id=f"azure-{op_id}", timeout=OP_TIMEOUT_S)


def enqueue_provision(settings, kind: str, requester: str, channel: str) -> str:
    """Queue provisioning KIND (finetune | inference) or the smoke check (smoke); returns the op id (pv-0001) whose
    events report the steps and the result."""
    if kind not in KINDS:
        raise BackendError(f"Unknown provision target {kind!r}: provision either the training job (finetune) or the "
                           "inference app (inference), or check the set-up (check)",
                           hint=Hint("provision finetune", "provisions the training job"))
    op_id = _new_op(settings, kind, requester, channel)
    _enqueue(settings, op_id)
    return op_id


def enqueue_secret_reference(settings, env_name: str, requester: str, channel: str) -> str:
    """After `set_secret` wrote the value, queue the job's reference update; only the secret's name is passed."""
    try:
        secret_name(env_name)
    except InvalidSecretName as e:
        raise BackendError(str(e)) from None
    op_id = _new_op(settings, "secret", requester, channel, target=env_name)
    _enqueue(settings, op_id)
    return op_id


def enqueue_deploy_op(settings, run_id: str, requester: str, channel: str) -> str:
    """Queue deploying a finished run's adapter to the inference app (after an approver's click)."""
    op_id = _new_op(settings, "deploy", requester, channel, target=run_id)
    _enqueue(settings, op_id)
    return op_id


def lock_name(kind: str, clients: AzureClients) -> str:
    """The Redis lock that serializes ops of `kind` on the same Azure resource (the CLI's smoke check takes it too)."""
    cfg = clients.cfg
    if kind in ("finetune", "secret"):
        return store.azure_lock("job", cfg.job_name)
    if kind == "smoke":
        return store.azure_lock("job", smoke.smoke_job_name(cfg.job_name))
    return store.azure_lock("app", cfg.app_name)


def run_op(op_id: str, clients: AzureClients | None = None) -> str:
    """The RQ job for every op kind: take the resource's lock, do the op, report each step and the result."""
    settings = current_settings()
    conn = store.connect(settings)
    op = store.load_op(conn, op_id)
    if op is None or op.state in ("succeeded", "failed"):
        return "nothing to do"

    def emit(kind: str, **data: Any) -> None:
        store.append_event(conn, RunEvent(op_id, kind, data))

    def notice(text: str) -> None:
        emit("notice", text=text)

    def fail(message: str, hint: Hint | None = None) -> str:
        _finish(conn, op_id, "failed", message)
        emit("failed", error=message, hint=hint.as_data() if hint else {}, log_tail=[])
        return "failed"

    # Ours, not the user's: the worker log has the trace, the thread a short message (never a queued op left hanging).
    ours = f"{op_id} failed because of an error in tuneops; the worker log has the details."
    try:
        clients = clients or clients_for(settings)
        lock = conn.lock(lock_name(op.kind, clients), timeout=LOCK_TTL_S, blocking_timeout=LOCK_WAIT_S)
        if not lock.acquire(blocking=False):
            notice("waiting for another provisioning of the same resource to finish")
            if not lock.acquire():
                raise BackendError("Another provisioning of the same resource has been running for too long; "
                                   "try again later.", transient=True)
    except BackendError as e:
        return fail(e.reason, e.hint)
    except Exception:
        log.exception("%s (%s) could not begin", op_id, op.kind)
        return fail(ours)
    try:
        conn.hset(store.OP_KEY.format(op_id), "state", "running")
        done = _run(op, clients, settings, notice, emit)
    except BackendError as e:
        log.warning("%s (%s) failed: %s", op_id, op.kind, e)
        return fail(e.reason, e.hint)
    except Exception:
        log.exception("%s (%s) failed unexpectedly", op_id, op.kind)
        return fail(ours)
    finally:
        try:
            lock.release()
        except Exception:
            log.warning("%s: the Azure lock had expired", op_id)
    _finish(conn, op_id, "succeeded", done.text, endpoint=done.endpoint)
    emit("succeeded", text=done.text, changes=done.changes, created=done.created, endpoint=done.endpoint,
         links=done.links, metrics={}, adapter="")
    return "succeeded"


@dataclass
class _Done:
    """How an op that worked ends: its one line and what the thread's last message shows."""

    text: str
    links: dict[str, str] = field(default_factory=dict)
    changes: list[str] = field(default_factory=list)
    created: bool = False
    endpoint: str = ""


def _finish(conn, op_id: str, state: str, text: str, endpoint: str = "") -> None:
    conn.hset(store.OP_KEY.format(op_id), mapping={"state": state, "result": text, "finished_at": time.time(),
                                                   "endpoint": endpoint})


def _run(op: Op, clients: AzureClients, settings, notice: Callable[[str], None], emit: Callable[..., None]) -> _Done:
    if op.kind == "smoke":
        return _smoke(clients, settings, emit)
    if op.kind == "finetune":
        report_gpu_quota(clients, emit)
        result = provision.provision_finetune(clients, notice)
    elif op.kind == "inference":
        result = provision.provision_inference(clients, notice)
    elif op.kind == "secret":
        result = provision.ensure_secret_reference(clients, op.target, notice)
        if clients.cfg.app_name:        # the apps of other base models (deploys made them) reference it too
            updated = aca_endpoints.ensure_secret_on_derived_apps(clients, op.target, notice)
            if updated:
                result.notes.append(f"The inference app{'s' if len(updated) > 1 else ''} of other base models "
                                    f"({', '.join(updated)}) now reference{'' if len(updated) > 1 else 's'} "
                                    f"{op.target}.")
    elif op.kind == "deploy":
        conn = store.connect(settings)
        run = store.load_run(conn, op.target)
        if run is None or not run.adapter_path:
            raise BackendError(f"{op.target} has no adapter to deploy: only a run that succeeded can be deployed.")
        request = next((d.get("id", "") for d in reversed(run.deployments) if d.get("state") == "deploying"), "")
        entry = core_endpoints.new_entry(run.id, run.name, request, op.requester)
        result = aca_endpoints.serve_adapter(clients, conn, run, entry, notice).result
    else:
        raise BackendError(f"unknown operation {op.kind!r}")
    links = {}
    if op.kind in ("finetune", "secret"):
        links = {"job": f"https://portal.azure.com/#resource{clients.cfg.job_id}/overview"}
    return _Done(result.summary(), links, result.changes, result.created, result.endpoint or "")


def report_gpu_quota(clients: AzureClients, emit: Callable[..., None]) -> None:
    """Say, before anything is created, whether runs will get a GPU. A quota of 0 does not stop provisioning (the
    job can exist before the quota is granted); the line says that runs will not start until then."""
    try:
        q = quota.read_gpu_quota(clients, job=provision.get_job(clients))
        emit("notice", text=q.line(), step="GPU quota", status="ok" if q.state in ("ok", "not_gpu") else "warn")
    except BackendError as e:
        emit("notice", text=f"GPU quota: could not read it. {e.reason}", step="GPU quota", status="warn")


def _smoke(clients: AzureClients, settings, emit: Callable[..., None]) -> _Done:
    """The smoke check, each step a notice with its status and links; a failed check fails the op with its verdict."""
    def report(step) -> None:
        emit("notice", text=step.text, step=step.name, status=step.status, links=step.links,
             hint=step.hint.as_data() if step.hint else {})

    executor = AcaExecutor(settings, clients=clients)
    result = smoke.run_smoke(clients, report, sync=executor.sync)
    if not result.passed:
        raise BackendError(result.verdict, hint=result.hint)
    return _Done(result.verdict, result.links)
