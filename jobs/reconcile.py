"""The reconcile pass: after a crash (a worker, the bot, Redis), put every run and deploy back on track. A chain of
RQ jobs, one pass every RECONCILE_EVERY_S; the worker starts it. The top of jobs/: it wires runs and deploys together,
and nothing imports it.
"""

from __future__ import annotations

import logging
import time
import uuid

from jobs.core import queue, store
from jobs.core.domain import RunState
from jobs.core.settings import JobSettings, current_settings
from jobs.deploys.deploy import recover_deploys
from jobs.runs import transitions

log = logging.getLogger(__name__)

RECONCILE_EVERY_S = 15.0
# A preparing run with no execution for this long lost its start task (a worker died): start it again.
START_STALE_S = 20.0


def reconcile_once(settings: JobSettings) -> dict[str, list[str]]:
    """Put every run that holds a slot back on track after a crash: a lost start is started again, a lost monitor chain
    is restarted, a lost cancel is asked for again, and free slots are filled."""
    conn = store.connect(settings)
    done: dict[str, list[str]] = {"started": [], "monitored": [], "cancelled": []}
    now = time.time()
    active = store.load_runs(conn, sorted(store.active_ids(conn)))
    for run in active:
        if not run.execution_id:
            if run.state is RunState.PREPARING and now - run.updated_at > START_STALE_S:
                transitions.enqueue_start(settings, run.id)
                done["started"].append(run.id)
            continue
        if not queue.job_pending(settings, conn.get(store.TICK_KEY.format(run.id))):
            transitions.schedule_tick(settings, run.id, 0)
            done["monitored"].append(run.id)
        if run.cancelled_by and transitions.enqueue_stop(settings, run.id) is not None:
            done["cancelled"].append(run.id)
    if store.queued_ids(conn) and len(active) < settings.max_running:
        transitions.enqueue_admit(settings)
    done.update(recover_deploys(settings))
    if any(done.values()):
        log.info("reconcile: %s", done)
    return done


def reconcile(chain: str | None = None) -> str:
    """A reconcile pass, then the next one in RECONCILE_EVERY_S (only the current chain goes on)."""
    settings = current_settings()
    conn = store.connect(settings)
    if chain is not None and conn.get(store.RECONCILE_KEY) != chain:
        return "superseded"
    reconcile_once(settings)
    if chain is not None:
        schedule_reconcile(settings, RECONCILE_EVERY_S)
    return "ok"


def schedule_reconcile(settings: JobSettings, delay_s: float) -> str:
    token = f"reconcile-{uuid.uuid4().hex[:12]}"
    store.connect(settings).set(store.RECONCILE_KEY, token)
    queue.enqueue(settings, queue.RECONCILE, token, delay_s=delay_s, job_id=token)
    return token


def ensure_reconcile(settings: JobSettings) -> str | None:
    """Start the reconcile chain now unless a live one is pending; returns the new chain's id, if any."""
    if queue.job_pending(settings, store.connect(settings).get(store.RECONCILE_KEY)):
        return None
    return schedule_reconcile(settings, 0)
