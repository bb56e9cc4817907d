"""The state changes that the service (a person's request) and the tasks (a worker's step) share: cancelling a run
still in line, putting a finished run back in line (a person's resume, or the automatic resume after a timeout), and
asking a worker to admit or cancel. Each is one store transaction whose events are facts, not words.
"""

from __future__ import annotations

import logging
import uuid

import redis

from jobs.backends import start_timeout_s
from jobs.core import metrics, queue, store
from jobs.core.domain import Run, RunEvent, RunState
from jobs.core.errors import Hint, RunRejected
from jobs.core.settings import JobSettings
from jobs.runs.progress import move

log = logging.getLogger(__name__)

RESUMABLE = (RunState.FAILED, RunState.TIMED_OUT, RunState.CANCELLED)


def can_resume(run: Run) -> bool:
    """The one rule for resuming: the service enforces it, the bot shows a Resume button by it. A run whose budget
    approval was rejected or expired never ran, and a resume would slip past the approval: it is started anew."""
    return run.state in RESUMABLE and run.budget_approval.get("state") not in ("rejected", "expired")


def enqueue_admit(settings: JobSettings):
    return queue.enqueue(settings, queue.ADMIT_RUNS)


def enqueue_start(settings: JobSettings, run_id: str):
    return queue.enqueue(settings, queue.START_RUN, run_id, timeout=start_timeout_s(settings))


def schedule_tick(settings: JobSettings, run_id: str, delay_s: float) -> str:
    """Make a new tick the run's current one (any older chain stops at its next tick) and schedule it."""
    token = f"monitor-{run_id}-{uuid.uuid4().hex[:12]}"
    store.connect(settings).set(store.TICK_KEY.format(run_id), token)
    queue.enqueue(settings, queue.MONITOR_RUN, run_id, token, delay_s=delay_s, job_id=token)
    return token


def enqueue_stop(settings: JobSettings, run_id: str):
    """Ask a worker to stop a cancelled run's execution, unless that was asked in the last minute."""
    conn = store.connect(settings)
    if not conn.set(store.CANCELLING.format(run_id), "1", nx=True, ex=60):
        return None
    return queue.enqueue(settings, queue.STOP_RUN, run_id)


def cancel_queued(conn: redis.Redis, run_id: str, by: str) -> Run | None:
    """Cancel a run that is still waiting in line; None when it is not queued (any more)."""
    def step(run: Run) -> list[RunEvent] | None:
        if run.state is not RunState.QUEUED:
            return None
        run.cancelled_by = run.cancelled_by or by
        return [move(run, RunState.CANCELLED), RunEvent(run.id, "cancelled", {"by": run.cancelled_by})]

    changed = store.update_run(conn, run_id, step)
    metrics.count_run_changes(conn, changed)
    return changed[0] if changed else None


def resume(settings: JobSettings, run: Run, by: str, *, auto_resume_limit: int | None = None) -> Run:
    """Put a failed, timed-out or cancelled run back in line; its trainer goes on from its newest complete
    checkpoint. With `auto_resume_limit` it is jobs/ resuming a timed-out run by itself (TUNEOPS_AUTO_RESUME), which
    it does only while the run has automatic resumes left. Reports a "resumed" event (by, checkpoint_step, auto)."""
    conn = store.connect(settings)

    def step(r: Run) -> list[RunEvent] | None:
        if not can_resume(r):
            return None
        if auto_resume_limit is not None and (r.state is not RunState.TIMED_OUT
                                              or r.auto_resumes >= auto_resume_limit):
            return None
        checkpoint = r.last_checkpoint_step
        event = move(r, RunState.QUEUED)
        r.cancelled_by = ""
        r.error = ""
        r.error_hint = {}
        r.execution_id, r.pid = "", 0
        data = {"by": by, "checkpoint_step": checkpoint, "auto": auto_resume_limit is not None}
        if auto_resume_limit is not None:
            r.auto_resumes += 1
            data.update(done=r.auto_resumes, allowed=auto_resume_limit)
        return [event, RunEvent(r.id, "resumed", data)]

    changed = store.update_run(conn, run.id, step)
    if changed is None:
        current = store.load_run(conn, run.id) or run
        if current.state in RESUMABLE:
            raise RunRejected(f"{run.id} never ran: its budget approval was {current.budget_approval.get('state')}. "
                              "Start it again as a new run to ask for an approval anew",
                              hint=Hint("run", "starts a new run"))
        raise RunRejected(f"{run.id} is {current.state}: only a failed, timed-out or cancelled run can be resumed")
    store.report_positions(conn)  # its "queued" event, with its place in line
    enqueue_admit(settings)
    return changed[0]


def maybe_auto_resume(settings: JobSettings, run_id: str) -> bool:
    """After a run ended: resume it when it timed out and has automatic resumes left. True when it was resumed."""
    if settings.auto_resume <= 0:
        return False
    run = store.load_run(store.connect(settings), run_id)
    if run is None or run.state is not RunState.TIMED_OUT or run.auto_resumes >= settings.auto_resume:
        return False
    try:
        resume(settings, run, by="", auto_resume_limit=settings.auto_resume)
    except RunRejected as e:  # resumed or changed meanwhile (a person clicked Resume first)
        log.info("%s: no automatic resume: %s", run_id, e)
        return False
    return True
