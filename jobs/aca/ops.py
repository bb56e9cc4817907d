"""Azure operations as RQ jobs: provisioning (`/finetune provision finetune|inference`), the job's reference to a
Key Vault secret after `/finetune secret set`, and deploying an adapter to the inference app.

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
from dataclasses import dataclass
from typing import Any

from jobs import store
from jobs.aca.clients import AzureClients, get_clients
from jobs.aca.config import load_aca_config
from jobs.domain import RunEvent
from jobs.executor import BackendError

log = logging.getLogger(__name__)

OP_SEQ = f"{store.PREFIX}:op_seq"
OP_KEY = store.PREFIX + ":op:{}"
OP_LOCK = store.PREFIX + ":lock:azure:{}"       # one per Azure resource
OP_ID_RE = re.compile(r"^pv-\d{4,}$")
KINDS = ("finetune", "inference")
OP_TIMEOUT_S = 1800
LOCK_TTL_S = 1800
LOCK_WAIT_S = 1500


@dataclass
class Op:
    id: str
    kind: str                 # finetune | inference | secret | deploy
    requester: str
    channel: str
    state: str = "queued"     # queued | running | succeeded | failed
    target: str = ""          # secret: the env var name; deploy: the run id
    thread_ts: str = ""
    created_at: float = 0.0
    finished_at: float = 0.0
    result: str = ""

    @classmethod
    def from_hash(cls, op_id: str, h: dict[str, str]) -> Op:
        return cls(id=op_id, kind=h.get("kind", ""), requester=h.get("requester", ""), channel=h.get("channel", ""),
                   state=h.get("state", ""), target=h.get("target", ""), thread_ts=h.get("thread_ts", ""),
                   created_at=float(h.get("created_at") or 0), finished_at=float(h.get("finished_at") or 0),
                   result=h.get("result", ""))


def clients_for(settings) -> AzureClients:
    return get_clients(load_aca_config(workspace=getattr(settings, "workspace", None)))


def get_op(conn, op_id: str) -> Op | None:
    h = conn.hgetall(OP_KEY.format(op_id))
    return Op.from_hash(op_id, h) if h else None


def set_op_thread(settings, op_id: str, thread_ts: str) -> None:
    """The bot records the thread it posted the ack in, so that it can render the op's events there."""
    store.connect(settings).hset(OP_KEY.format(op_id), "thread_ts", thread_ts)


def _new_op(settings, kind: str, requester: str, channel: str, target: str = "") -> str:
    conn = store.connect(settings)
    op_id = f"pv-{conn.incr(OP_SEQ):04d}"
    with conn.pipeline() as pipe:
        pipe.hset(OP_KEY.format(op_id), mapping={"kind": kind, "requester": requester, "channel": channel,
                                                 "state": "queued", "target": target, "created_at": time.time()})
        store.append_event(pipe, RunEvent(op_id, "notice", {"text": _queued_text(kind, target), "op": kind}))
        pipe.execute()
    return op_id


def _queued_text(kind: str, target: str) -> str:
    return {"finetune": "Provisioning the fine-tuning job: queued.",
            "inference": "Provisioning the inference app: queued.",
            "secret": f"Adding {target} to the job's secret references: queued.",
            "deploy": f"Deploying the adapter of {target}: queued."}[kind]


def _enqueue(settings, func, op_id: str):
    from jobs.tasks import get_queue

    return get_queue(settings).enqueue(func, op_id, job_id=f"azure-{op_id}", job_timeout=OP_TIMEOUT_S,
                                       result_ttl=3600, failure_ttl=7 * 24 * 3600)


def enqueue_provision(settings, kind: str, requester: str, channel: str) -> str:
    """Queue `/finetune provision KIND`; returns the op id (pv-0001) whose events report the steps and result."""
    if kind not in KINDS:
        raise BackendError(f"Unknown provision target {kind!r}: use `/finetune provision finetune` (the training job) "
                           f"or `/finetune provision inference` (the inference app).")
    op_id = _new_op(settings, kind, requester, channel)
    _enqueue(settings, provision_task, op_id)
    return op_id


def enqueue_secret_reference(settings, env_name: str, requester: str, channel: str) -> str:
    """After `set_secret` wrote the value, queue the job's reference update; only the secret's name is passed."""
    from jobs.aca.resources import InvalidSecretName, secret_name

    try:
        secret_name(env_name)
    except InvalidSecretName as e:
        raise BackendError(str(e)) from None
    op_id = _new_op(settings, "secret", requester, channel, target=env_name)
    _enqueue(settings, provision_task, op_id)
    return op_id


def enqueue_deploy(settings, run_id: str, requester: str, channel: str) -> str:
    """Queue deploying a finished run's adapter to the inference app (after an approver's click)."""
    op_id = _new_op(settings, "deploy", requester, channel, target=run_id)
    _enqueue(settings, provision_task, op_id)
    return op_id


def _lock_name(kind: str, clients: AzureClients) -> str:
    cfg = clients.cfg
    if kind in ("finetune", "secret"):
        return OP_LOCK.format(f"job:{cfg.job_name}")
    return OP_LOCK.format(f"app:{cfg.app_name}")


def _settings():
    from jobs.tasks import current_settings

    return current_settings()


def provision_task(op_id: str, clients: AzureClients | None = None) -> str:
    """The RQ job for every op kind: take the resource's lock, do the op, report each step and the result."""
    settings = _settings()
    conn = store.connect(settings)
    op = get_op(conn, op_id)
    if op is None or op.state in ("succeeded", "failed"):
        return "nothing to do"

    def emit(kind: str, **data: Any) -> None:
        store.append_event(conn, RunEvent(op_id, kind, data))

    def notice(text: str) -> None:
        emit("notice", text=text)

    def fail(message: str) -> str:
        _finish(conn, op_id, "failed", message)
        emit("failed", error=message, log_tail=[])
        return "failed"

    # Ours, not the user's: the worker log has the trace, the thread a short message (never a queued op left hanging).
    ours = f"{op_id} failed because of an error in tuneops; the worker log has the details."
    try:
        clients = clients or clients_for(settings)
        lock = conn.lock(_lock_name(op.kind, clients), timeout=LOCK_TTL_S, blocking_timeout=LOCK_WAIT_S)
        if not lock.acquire(blocking=False):
            notice("waiting for another provisioning of the same resource to finish")
            if not lock.acquire():
                raise BackendError("Another provisioning of the same resource has been running for too long; "
                                   "try again later.", transient=True)
    except BackendError as e:
        return fail(str(e))
    except Exception:
        log.exception("%s (%s) could not begin", op_id, op.kind)
        return fail(ours)
    try:
        conn.hset(OP_KEY.format(op_id), "state", "running")
        result = _run(op, clients, settings, notice)
    except BackendError as e:
        log.warning("%s (%s) failed: %s", op_id, op.kind, e)
        return fail(str(e))
    except Exception:
        log.exception("%s (%s) failed unexpectedly", op_id, op.kind)
        return fail(ours)
    finally:
        try:
            lock.release()
        except Exception:
            log.warning("%s: the Azure lock had expired", op_id)
    text = result.summary()
    _finish(conn, op_id, "succeeded", text)
    links = {}
    if op.kind in ("finetune", "secret"):
        links = {"job": f"https://portal.azure.com/#resource{clients.cfg.job_id}/overview"}
    emit("succeeded", text=text, changes=result.changes, created=result.created, endpoint=result.endpoint,
         links=links, metrics={}, adapter="")
    return "succeeded"


def _finish(conn, op_id: str, state: str, text: str) -> None:
    conn.hset(OP_KEY.format(op_id), mapping={"state": state, "result": text, "finished_at": time.time()})


def _run(op: Op, clients: AzureClients, settings, notice: Callable[[str], None]):
    from jobs.aca import provision

    if op.kind == "finetune":
        return provision.provision_finetune(clients, notice)
    if op.kind == "inference":
        return provision.provision_inference(clients, notice)
    if op.kind == "secret":
        return provision.ensure_secret_reference(clients, op.target, notice)
    if op.kind == "deploy":
        run = store.load_run(store.connect(settings), op.target)
        if run is None or not run.adapter_path:
            raise BackendError(f"{op.target} has no adapter to deploy: only a run that succeeded can be deployed.")
        return provision.deploy_adapter(clients, run.model, run.adapter_path, notice)
    raise BackendError(f"unknown operation {op.kind!r}")
