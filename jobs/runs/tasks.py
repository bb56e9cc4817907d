"""The RQ tasks that move runs along: admit, start, monitor, stop (a cancelled run's execution) (jobs.reconcile puts them back on track).

Tasks take a run id and nothing big; the state lives in the store. Each reads the record, checks the state it expects,
does one step and records the result in one transaction, so running a task twice, or again after a crash, is harmless.
Monitor ticks form a chain: each schedules the next with `enqueue_in`; the chain's current job id is kept in Redis and a
tick that is not the current one does nothing, so a chain restarted by `reconcile` never runs twice alongside the old.
"""

from __future__ import annotations

import logging
import time

import redis

from jobs.backends import get_backend
from jobs.backends.protocol import ExecStatus, ExecutionInfo
from jobs.core import metrics, queue, store
from jobs.core.domain import Run, RunEvent, RunState
from jobs.core.errors import BackendError
from jobs.core.masking import environment_secrets, mask, mask_lines
from jobs.core.runconfig import build_train_config
from jobs.core.settings import JobSettings, current_settings
from jobs.runs import transitions
from jobs.runs.progress import apply_progress, finish, move, overrun

log = logging.getLogger(__name__)

# The start lock lapses this long after its holder stops renewing it (a worker that died mid-start); while a start
# goes on, however long its backend takes (see jobs.backends.START_TIMEOUT_S), it is renewed every third of it.
START_LOCK_TTL_S = 120.0


# Admission -----------------------------------------------------------------------------------------------------------

def admit_runs() -> list[str]:
    """Start queued runs, oldest first, while fewer than max_running hold a GPU slot; report moved queue positions.
    The lock keeps two workers from admitting at once (and so from admitting too many)."""
    settings = current_settings()
    conn = store.connect(settings)
    lock = conn.lock(store.ADMIT_LOCK, timeout=30, blocking_timeout=10)
    if not lock.acquire():
        log.info("another worker is admitting runs; leaving it to them")
        return []
    admitted: list[str] = []
    try:
        while len(store.active_ids(conn)) < settings.max_running:
            queued = store.queued_ids(conn)
            if not queued:
                break
            run_id = queued[0]

            def step(run: Run) -> list[RunEvent] | None:
                if run.state is not RunState.QUEUED or run.held:
                    return None
                event = move(run, RunState.PREPARING)
                run.execution_id, run.pid = "", 0  # a new attempt gets a new execution
                return [event]

            try:
                changed = store.update_run(conn, run_id, step)
            except store.RunGone:
                changed = None
            if changed is None:
                conn.zrem(store.QUEUED, run_id)  # an index entry without a queued record: drop it
                continue
            admitted.append(run_id)
            transitions.enqueue_start(settings, run_id)
        store.report_positions(conn)
    finally:
        try:
            lock.release()
        except redis.exceptions.LockError:
            log.warning("the admission lock expired while admitting")
    if admitted:
        log.info("admitted %s", ", ".join(admitted))
    return admitted


# Start -----------------------------------------------------------------------------------------------------------------

def _fail(conn: redis.Redis, run_id: str, attempt: int, error: str, hint: dict[str, str] | None = None) -> None:
    def step(run: Run) -> list[RunEvent] | None:
        if run.state.terminal or run.attempts != attempt:
            return None
        run.error, run.error_hint = error, dict(hint or {})
        return [move(run, RunState.FAILED),
                RunEvent(run.id, "failed", {"error": error, "hint": dict(hint or {}), "log_tail": []})]

    metrics.count_run_changes(conn, store.update_run(conn, run_id, step))


def start_run(run_id: str) -> str:
    """Start the execution of an admitted (preparing) run, once per attempt, and begin monitoring it."""
    settings = current_settings()
    conn = store.connect(settings)
    # Renewed while the backend starts (an ACA start can sync for many minutes): a second start_run, enqueued by
    # reconcile meanwhile, must find it held and not start a second execution of the same attempt.
    lock = conn.lock(store.START_LOCK.format(run_id), timeout=START_LOCK_TTL_S, blocking_timeout=0, thread_local=False)
    if not lock.acquire():
        return "busy"  # another worker is starting or stopping it
    try:
        run = store.load_run(conn, run_id)
        if run is None or run.state is not RunState.PREPARING:
            return "not preparing"
        if run.execution_id:
            if not queue.job_pending(settings, conn.get(store.TICK_KEY.format(run_id))):
                transitions.schedule_tick(settings, run_id, 0)
            return "already started"
        if run.cancelled_by:
            return "cancel requested"
        try:
            executor = get_backend(settings)
            config = build_train_config(run.id, run.model, run.dataset, run.params, settings.train_overrides)
            with queue.renewed(lock, START_LOCK_TTL_S / 3):
                execution_id = executor.start(run, config.model_dump())
            links = executor.links(run)
        except BackendError as e:
            if e.transient:
                raise
            log.warning("%s: could not start: %s", run_id, e)
            _fail(conn, run_id, run.attempts, e.reason, e.hint_data())
            transitions.enqueue_admit(settings)
            return "failed"
        except ValueError as e:  # the stored params do not make a valid run config
            log.warning("%s: invalid run config: %s", run_id, e)
            _fail(conn, run_id, run.attempts, f"the run's settings are not valid: {e}")
            transitions.enqueue_admit(settings)
            return "failed"

        def step(r: Run) -> list[RunEvent] | None:
            if r.state is not RunState.PREPARING or r.attempts != run.attempts or r.execution_id:
                return None
            r.execution_id = execution_id
            r.backend = executor.name
            r.links = dict(links)
            r.pid = run.pid  # set by backends that run a local process
            return [RunEvent(r.id, "started", {"execution_id": execution_id, "links": links})]

        store.update_run(conn, run_id, step)
        transitions.schedule_tick(settings, run_id, 0)
        return execution_id
    finally:
        try:
            lock.release()
        except redis.exceptions.LockError:
            pass


# Monitor ---------------------------------------------------------------------------------------------------------------

def advance(settings: JobSettings, run_id: str) -> tuple[Run | None, ExecutionInfo | None]:
    """One look at the execution: record new progress and logs, move the state on, end the run if it ended.
    Returns the run afterwards and what the backend said."""
    conn = store.connect(settings)
    executor = get_backend(settings)
    secrets = environment_secrets()
    seen: dict[str, ExecutionInfo] = {}

    def step(run: Run) -> list[RunEvent] | None:
        seen.clear()
        if not run.state.active or not run.execution_id:
            return None
        # Status first, then events: whatever the trainer wrote before it ended is read in the same tick.
        info = executor.status(run)
        seen["info"] = info
        batch = executor.read(run, run.event_cursor, run.log_cursor)
        batch.log_lines = mask_lines(batch.log_lines, secrets)
        for ev in batch.events:
            if ev["type"] == "error":
                ev["message"] = mask(str(ev.get("message", "")), secrets)
        events: list[RunEvent] = []
        if run.state is RunState.PREPARING and (info.status is ExecStatus.RUNNING or info.status.finished
                                                or batch.events):
            events.append(move(run, RunState.RUNNING))
        events += apply_progress(run, batch.events, batch.log_lines)
        moved = (batch.event_cursor, batch.log_cursor) != (run.event_cursor, run.log_cursor)
        run.event_cursor, run.log_cursor = batch.event_cursor, batch.log_cursor
        if info.status.finished:
            events += finish(run, info, lambda: executor.outputs(run),
                             lambda n: mask_lines(executor.tail_logs(run, n), secrets))
        else:
            events += overrun(run, time.time())
        return events if events or moved else None

    try:
        changed = store.update_run(conn, run_id, step)
    except store.RunGone:
        return None, None
    metrics.count_run_changes(conn, changed)
    run = changed[0] if changed else store.load_run(conn, run_id)
    return run, seen.get("info")


def monitor_run(run_id: str, tick: str | None = None) -> str:
    """One monitor tick; schedules the next one until the run ends, then lets the next queued run in."""
    settings = current_settings()
    conn = store.connect(settings)
    tick_key = store.TICK_KEY.format(run_id)
    if tick is not None and conn.get(tick_key) != tick:
        return "superseded"
    try:
        run, info = advance(settings, run_id)
    except BackendError as e:
        if not e.transient:
            raise
        log.warning("%s: backend not answering, trying again next tick: %s", run_id, e)
        transitions.schedule_tick(settings, run_id, settings.monitor_interval_s)
        return "retry"
    if run is None:
        return "gone"
    if run.state.active:
        if run.cancelled_by and info is not None and not info.status.finished:
            transitions.enqueue_stop(settings, run_id)  # the cancel task was lost (its worker died): ask again
        transitions.schedule_tick(settings, run_id, settings.monitor_interval_s)
        return str(run.state)
    if tick is not None:
        # Compare-and-delete: only the current chain ends itself.
        with conn.pipeline() as pipe:
            try:
                pipe.watch(tick_key)
                if pipe.get(tick_key) == tick:
                    pipe.multi()
                    pipe.delete(tick_key)
                    pipe.execute()
            except redis.WatchError:
                pass
    if run.state is RunState.TIMED_OUT:
        # TUNEOPS_AUTO_RESUME: back in line before the next run is admitted
        transitions.maybe_auto_resume(settings, run_id)
    admit_runs()
    return str(run.state)


# Cancel ----------------------------------------------------------------------------------------------------------------

def stop_run(run_id: str) -> str:
    """Stop a run's execution (no process or replica left) and record it as cancelled by whoever asked."""
    settings = current_settings()
    conn = store.connect(settings)
    try:
        run = store.load_run(conn, run_id)
        if run is None or run.state.terminal:
            return "nothing to cancel"
        if run.state is RunState.QUEUED:
            transitions.cancel_queued(conn, run_id, run.cancelled_by)
            admit_runs()
            return "cancelled"
        # The start lock: a start under way finishes (or sees the cancel) before the stop looks for its process.
        lock = conn.lock(store.START_LOCK.format(run_id), timeout=120, blocking_timeout=60)
        if not lock.acquire():
            raise BackendError(f"{run_id}: could not get hold of the run to stop it", transient=True)
        try:
            run = store.load_run(conn, run_id)
            if run is None or run.state.terminal:
                return "nothing to cancel"
            get_backend(settings).stop(run)
            run, _ = advance(settings, run_id)  # records the last progress and ends the run as cancelled
            if run is not None and run.state.active:
                # Never started (no execution) or the backend does not report the stop yet: end it here.
                def step(r: Run) -> list[RunEvent] | None:
                    if not r.state.active:
                        return None
                    r.cancelled_by = r.cancelled_by or "unknown"
                    return [move(r, RunState.CANCELLED), RunEvent(r.id, "cancelled", {"by": r.cancelled_by})]

                metrics.count_run_changes(conn, store.update_run(conn, run_id, step))
        finally:
            try:
                lock.release()
            except redis.exceptions.LockError:
                pass
    finally:
        conn.delete(store.CANCELLING.format(run_id))
    admit_runs()
    return "cancelled"
