"""The reconcile pass: after a crash (a worker, the bot, Redis), put every run and deploy back on track. A chain of
RQ jobs, one pass every RECONCILE_EVERY_S; the worker starts it. The top of jobs/: it wires runs and deploys together,
and nothing imports it.

When Redis came back empty (or behind), the pass first finds the runs again from the snapshots in their run folders
(`jobs.core.snapshots`) and says so in each affected run's thread; the rest of the pass then follows them as usual.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

from jobs.backends import get_backend
from jobs.backends.protocol import ExecStatus
from jobs.core import queue, snapshots, store
from jobs.core.domain import Run, RunEvent, RunState
from jobs.core.errors import BackendError, Hint
from jobs.core.settings import JobSettings, current_settings
from jobs.deploys import approval
from jobs.deploys.deploy import recover_deploys, restore_approvals
from jobs.runs import transitions
from jobs.runs.progress import move

log = logging.getLogger(__name__)

RECONCILE_EVERY_S = 15.0
# A preparing run with no execution for this long lost its start task (a worker died): start it again.
START_STALE_S = 20.0

LOST_STORE = "tuneops lost its store (Redis came back empty) and found this run again from its run folder"
FOUND_QUEUED = f"{LOST_STORE}: it is back in line, in its old place."
FOUND_ACTIVE = f"{LOST_STORE}: it is followed here as before."
FOUND_STARTING = f"{LOST_STORE}: it was being started, and is started (once) now."
FOUND_ENDED = f"{LOST_STORE}: it ended while tuneops could not see it; how it ended follows."
LOST_EXECUTION = ("tuneops lost its store (Redis came back empty) and then could not find this run's execution "
                  "again: it may have run to its end unseen. Its run folder keeps its checkpoints; resume it to go on "
                  "from the newest one, or submit it again")


def recover_lost_runs(settings: JobSettings) -> dict[str, list[str]]:
    """If Redis lost what it held (its mark is gone, or the run counter is behind the run folders), put back every
    run whose record is missing from the snapshot in its run folder, and tell each unfinished one's thread. A run
    that was in line goes back in line; one that was starting or running is followed again (its execution decides
    how it ends); one whose execution its backend no longer knows ends as failed, saying what to do. Finished runs
    come back as they were, silently. Returns the ids found again ("found") and the ones it lost track of ("lost")."""
    conn = store.connect(settings)
    workspace = Path(settings.workspace)
    unmarked = store.mark_store(conn)
    highest = snapshots.highest_seq(workspace)
    if not highest or not (unmarked or int(conn.get(store.RUN_SEQ) or 0) < highest):
        return {}
    done: dict[str, list[str]] = {"found": [], "lost": [], "restored": [], "no snapshot": []}
    put_back: list[Run] = []
    for run_id, snap in snapshots.read_all(workspace):
        if store.load_run(conn, run_id) is not None:
            continue
        if snap is None:
            done["no snapshot"].append(run_id)
            continue
        run, events, verdict = _found_again(settings, snap.run)
        if store.restore_run(conn, run, snap.thread, events):
            done[verdict].append(run_id)
            put_back.append(run)
    store.raise_run_seq(conn, highest)
    done.update(restore_approvals(settings, put_back))
    if done["no snapshot"]:
        log.warning("run folders without a readable snapshot, so with no thread to tell: %s", done["no snapshot"])
    told = {k: v for k, v in done.items() if v and k != "no snapshot"}
    if told:
        log.warning("Redis had lost tuneops's runs; put back from their run folders: %s", told)
    return done


def _found_again(settings: JobSettings, run: Run) -> tuple[Run, list[RunEvent], str]:
    """The run as it goes back into the store, the events that tell its thread, and "found", "lost" or "restored"."""
    if run.state.terminal:
        return run, [], "restored"
    if run.state is RunState.QUEUED:
        return run, [RunEvent(run.id, "notice", {"text": FOUND_QUEUED, "found_again": True})], "found"
    if not run.execution_id:
        # The start task (or its record) was lost: reconcile starts it again, and a start already made is found by
        # its backend (the local one claims each attempt once), so nothing runs twice.
        return run, [RunEvent(run.id, "notice", {"text": FOUND_STARTING, "found_again": True})], "found"
    try:
        status = get_backend(settings).status(run).status
    except BackendError as e:
        log.warning("%s: its backend does not answer (%s); following it again anyway", run.id, e)
        status = None
    if status is not ExecStatus.UNKNOWN:
        text = FOUND_ENDED if status is not None and status.finished else FOUND_ACTIVE
        return run, [RunEvent(run.id, "notice", {"text": text, "found_again": True})], "found"
    hint = Hint(f"resume {run.id}", "goes on from its newest checkpoint")
    run.error, run.error_hint = LOST_EXECUTION, hint.as_data()
    return run, [move(run, RunState.FAILED),
                 RunEvent(run.id, "failed", {"error": LOST_EXECUTION, "hint": hint.as_data(), "log_tail": []})], "lost"


def reconcile_once(settings: JobSettings) -> dict[str, list[str]]:
    """Put every run back on track after a crash: runs Redis lost are found again from their run folders, a lost
    start is started again, a lost monitor chain is restarted, a lost cancel is asked for again, and free slots are
    filled."""
    conn = store.connect(settings)
    done: dict[str, list[str]] = {"started": [], "monitored": [], "cancelled": []}
    done.update(recover_lost_runs(settings))
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
    done["asked"] = ask_for_lost_budget_approvals(settings, now)
    if any(done.values()):
        log.info("reconcile: %s", done)
    return done


def ask_for_lost_budget_approvals(settings: JobSettings, now: float) -> list[str]:
    """A run held for its budget whose approval was never asked for (the bot stopped between queueing it and asking):
    ask now, so that its card reaches an approver."""
    conn = store.connect(settings)
    asked = []
    for run in store.load_runs(conn, sorted(store.held_ids(conn))):
        if run.held and not run.budget_approval.get("id") and now - run.created_at > START_STALE_S:
            if approval.request_budget_approval(settings, run.id) is not None:
                asked.append(run.id)
    return asked


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
