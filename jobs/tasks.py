"""The RQ tasks that move runs along (admit, start, monitor, cancel, reconcile) and the helpers that enqueue them.

Tasks take a run id and nothing big; the state lives in the store. Each reads the record, checks the state it expects,
does one step and records the result in one transaction, so running a task twice, or again after a crash, is harmless.
Monitor ticks form a chain: each schedules the next with `enqueue_in`; the chain's current job id is kept in Redis and a
tick that is not the current one does nothing, so a chain restarted by `reconcile` never runs twice alongside the old.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import ScheduledJobRegistry

from jobs import store
from jobs.backends import get_executor, start_timeout_s
from jobs.domain import Run, RunEvent, RunState
from jobs.executor import BackendError, ExecStatus, ExecutionInfo
from jobs.masking import environment_secrets, mask, mask_lines
from jobs.procs import pid_alive
from jobs.progress import apply_progress, finish, move
from jobs.runconfig import build_train_config
from jobs.settings import JobSettings

log = logging.getLogger(__name__)

QUEUE_NAME = "tuneops"
TICK_KEY = "tuneops:tick:{}"             # the job id of a run's current monitor tick
RECONCILE_KEY = "tuneops:reconcile"      # the job id of the current reconcile pass
ADMIT_LOCK = "tuneops:lock:admit"
START_LOCK = "tuneops:lock:start:{}"     # held while a run's execution is started or stopped
CANCELLING = "tuneops:cancelling:{}"     # a cancel task was enqueued recently
RECONCILE_EVERY_S = 15.0
# A preparing run with no execution for this long lost its start task (a worker died): start it again.
START_STALE_S = 20.0
# A job that is "started" for longer than this was abandoned by a dead worker: ticks and starts take seconds.
STARTED_STALE_S = 90.0
# A scheduled job this late means no scheduler is running for the queue.
SCHEDULED_LATE_S = 30.0
JOB_TIMEOUT_S = 180
# The start lock lapses this long after its holder stops renewing it (a worker that died mid-start); while a start
# goes on, however long its backend takes (see jobs.backends.START_TIMEOUT_S), it is renewed every third of it.
START_LOCK_TTL_S = 120.0
RESULT_TTL_S = 60
FAILURE_TTL_S = 7 * 24 * 3600

_settings: JobSettings | None = None
_rq_clients: dict[str, redis.Redis] = {}
_rq_lock = threading.Lock()


def configure(settings: JobSettings | None) -> None:
    """Set the settings tasks use in this process (the worker calls it; forked job processes inherit it)."""
    global _settings
    _settings = settings


def current_settings() -> JobSettings:
    global _settings
    if _settings is None:
        _settings = JobSettings.from_env()
    return _settings


def rq_connection(settings: JobSettings) -> redis.Redis:
    """RQ stores pickled jobs, so it needs a client that returns bytes (store.connect's returns str)."""
    with _rq_lock:
        client = _rq_clients.get(settings.redis_url)
        if client is None:
            client = redis.Redis.from_url(settings.redis_url)
            _rq_clients[settings.redis_url] = client
        return client


def get_queue(settings: JobSettings) -> Queue:
    return Queue(QUEUE_NAME, connection=rq_connection(settings))


def _enqueue(settings: JobSettings, func, *args: Any, delay_s: float = 0.0, job_id: str | None = None,
             timeout: int = JOB_TIMEOUT_S) -> Job:
    options: dict[str, Any] = dict(job_id=job_id, job_timeout=timeout, result_ttl=RESULT_TTL_S,
                                   failure_ttl=FAILURE_TTL_S)
    queue = get_queue(settings)
    if delay_s > 0:
        return queue.enqueue_in(timedelta(seconds=delay_s), func, *args, **options)
    return queue.enqueue(func, *args, **options)


def enqueue_admit(settings: JobSettings) -> Job:
    return _enqueue(settings, admit_runs)


def enqueue_start(settings: JobSettings, run_id: str) -> Job:
    return _enqueue(settings, start_run, run_id, timeout=start_timeout_s(settings))


def enqueue_cancel(settings: JobSettings, run_id: str) -> Job | None:
    """Enqueue a cancel task unless one was enqueued in the last minute."""
    conn = store.connect(settings)
    if not conn.set(CANCELLING.format(run_id), "1", nx=True, ex=60):
        return None
    return _enqueue(settings, cancel_run, run_id)


def schedule_tick(settings: JobSettings, run_id: str, delay_s: float) -> str:
    """Make a new tick the run's current one (any older chain stops at its next tick) and schedule it."""
    token = f"monitor-{run_id}-{uuid.uuid4().hex[:12]}"
    store.connect(settings).set(TICK_KEY.format(run_id), token)
    _enqueue(settings, monitor_run, run_id, token, delay_s=delay_s, job_id=token)
    return token


def job_pending(settings: JobSettings, job_id: str | None) -> bool:
    """Is this job going to run (queued, scheduled with a live scheduler) or running now (recently started)?"""
    if not job_id:
        return False
    conn = rq_connection(settings)
    try:
        job = Job.fetch(job_id, connection=conn)
        status = job.get_status()
    except NoSuchJobError:
        return False
    now = datetime.now(UTC)
    if status == JobStatus.QUEUED:
        return True
    if status == JobStatus.SCHEDULED:
        try:
            due = ScheduledJobRegistry(QUEUE_NAME, connection=conn).get_scheduled_time(job_id)
        except NoSuchJobError:
            return False
        return (now - _aware(due)).total_seconds() < SCHEDULED_LATE_S
    if status == JobStatus.STARTED:
        if job.worker_name and process_gone(conn, f"rq:worker:{job.worker_name}"):
            return False  # abandoned: its worker was killed
        started = job.started_at
        return started is not None and (now - _aware(started)).total_seconds() < STARTED_STALE_S
    return False


def process_gone(conn: redis.Redis, key: str) -> bool:
    """Is the RQ worker or scheduler registered under `key` (a hash with hostname and pid) known to be dead?
    Sure only for a process on this host, or one whose registration expired; otherwise assumed alive."""
    info = conn.hgetall(key)
    if not info:
        return True
    host = (info.get(b"hostname") or b"").decode()
    try:
        pid = int(info.get(b"pid") or 0)
    except ValueError:
        return False
    return host == socket.gethostname() and pid > 0 and not pid_alive(pid)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# Admission -----------------------------------------------------------------------------------------------------------

def admit_runs() -> list[str]:
    """Start queued runs, oldest first, while fewer than max_running hold a GPU slot; report moved queue positions.
    The lock keeps two workers from admitting at once (and so from admitting too many)."""
    settings = current_settings()
    conn = store.connect(settings)
    lock = conn.lock(ADMIT_LOCK, timeout=30, blocking_timeout=10)
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
                if run.state is not RunState.QUEUED:
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
            enqueue_start(settings, run_id)
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

def _fail(conn: redis.Redis, run_id: str, attempt: int, error: str) -> None:
    def step(run: Run) -> list[RunEvent] | None:
        if run.state.terminal or run.attempts != attempt:
            return None
        run.error = error
        return [move(run, RunState.FAILED), RunEvent(run.id, "failed", {"error": error, "log_tail": []})]

    store.update_run(conn, run_id, step)


@contextlib.contextmanager
def renewed(lock, every_s: float) -> Iterator[None]:
    """Keep `lock` from lapsing while the block runs (the lock must not be thread-local). A worker that dies stops
    renewing it, so the lock then lapses within its TTL and the run can be started again."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every_s):
            try:
                lock.reacquire()
            except redis.exceptions.LockError:
                log.warning("the lock %s was lost during a long step", lock.name)
                return
            except redis.exceptions.RedisError as e:  # Redis blinked: try at the next beat, within the TTL
                log.warning("could not renew the lock %s: %s", lock.name, e)

    beater = threading.Thread(target=beat, name="lock-renewal", daemon=True)
    beater.start()
    try:
        yield
    finally:
        done.set()
        beater.join(5)


def start_run(run_id: str) -> str:
    """Start the execution of an admitted (preparing) run, once per attempt, and begin monitoring it."""
    settings = current_settings()
    conn = store.connect(settings)
    # Renewed while the backend starts (an ACA start can sync for many minutes): a second start_run, enqueued by
    # reconcile meanwhile, must find it held and not start a second execution of the same attempt.
    lock = conn.lock(START_LOCK.format(run_id), timeout=START_LOCK_TTL_S, blocking_timeout=0, thread_local=False)
    if not lock.acquire():
        return "busy"  # another worker is starting or stopping it
    try:
        run = store.load_run(conn, run_id)
        if run is None or run.state is not RunState.PREPARING:
            return "not preparing"
        if run.execution_id:
            if not job_pending(settings, conn.get(TICK_KEY.format(run_id))):
                schedule_tick(settings, run_id, 0)
            return "already started"
        if run.cancelled_by:
            return "cancel requested"
        try:
            executor = get_executor(settings)
            config = build_train_config(run.id, run.model, run.dataset, run.params, settings.train_overrides)
            with renewed(lock, START_LOCK_TTL_S / 3):
                execution_id = executor.start(run, config.model_dump())
            links = executor.links(run)
        except BackendError as e:
            if e.transient:
                raise
            log.warning("%s: could not start: %s", run_id, e)
            _fail(conn, run_id, run.attempts, str(e))
            enqueue_admit(settings)
            return "failed"
        except ValueError as e:  # the stored params do not make a valid run config
            log.warning("%s: invalid run config: %s", run_id, e)
            _fail(conn, run_id, run.attempts, f"the run's settings are not valid: {e}")
            enqueue_admit(settings)
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
        schedule_tick(settings, run_id, 0)
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
    executor = get_executor(settings)
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
        return events if events or moved else None

    try:
        changed = store.update_run(conn, run_id, step)
    except store.RunGone:
        return None, None
    run = changed[0] if changed else store.load_run(conn, run_id)
    return run, seen.get("info")


def monitor_run(run_id: str, tick: str | None = None) -> str:
    """One monitor tick; schedules the next one until the run ends, then lets the next queued run in."""
    settings = current_settings()
    conn = store.connect(settings)
    tick_key = TICK_KEY.format(run_id)
    if tick is not None and conn.get(tick_key) != tick:
        return "superseded"
    try:
        run, info = advance(settings, run_id)
    except BackendError as e:
        if not e.transient:
            raise
        log.warning("%s: backend not answering, trying again next tick: %s", run_id, e)
        schedule_tick(settings, run_id, settings.monitor_interval_s)
        return "retry"
    if run is None:
        return "gone"
    if run.state.active:
        if run.cancelled_by and info is not None and not info.status.finished:
            enqueue_cancel(settings, run_id)  # the cancel task was lost (its worker died): ask again
        schedule_tick(settings, run_id, settings.monitor_interval_s)
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
        from jobs.timeouts import maybe_auto_resume

        maybe_auto_resume(settings, run_id)  # TUNEOPS_AUTO_RESUME: back in line before the next run is admitted
    admit_runs()
    return str(run.state)


# Cancel ----------------------------------------------------------------------------------------------------------------

def cancel_queued(conn: redis.Redis, run_id: str, by: str) -> Run | None:
    """Cancel a run that is still waiting in line; None when it is not queued (any more)."""
    def step(run: Run) -> list[RunEvent] | None:
        if run.state is not RunState.QUEUED:
            return None
        run.cancelled_by = run.cancelled_by or by
        return [move(run, RunState.CANCELLED), RunEvent(run.id, "cancelled", {"by": run.cancelled_by})]

    changed = store.update_run(conn, run_id, step)
    return changed[0] if changed else None


def cancel_run(run_id: str) -> str:
    """Stop a run's execution (no process or replica left) and record it as cancelled by whoever asked."""
    settings = current_settings()
    conn = store.connect(settings)
    try:
        run = store.load_run(conn, run_id)
        if run is None or run.state.terminal:
            return "nothing to cancel"
        if run.state is RunState.QUEUED:
            cancel_queued(conn, run_id, run.cancelled_by)
            admit_runs()
            return "cancelled"
        # The start lock: a start under way finishes (or sees the cancel) before the stop looks for its process.
        lock = conn.lock(START_LOCK.format(run_id), timeout=120, blocking_timeout=60)
        if not lock.acquire():
            raise BackendError(f"{run_id}: could not get hold of the run to stop it", transient=True)
        try:
            run = store.load_run(conn, run_id)
            if run is None or run.state.terminal:
                return "nothing to cancel"
            get_executor(settings).stop(run)
            run, _ = advance(settings, run_id)  # records the last progress and ends the run as cancelled
            if run is not None and run.state.active:
                # Never started (no execution) or the backend does not report the stop yet: end it here.
                def step(r: Run) -> list[RunEvent] | None:
                    if not r.state.active:
                        return None
                    r.cancelled_by = r.cancelled_by or "unknown"
                    return [move(r, RunState.CANCELLED), RunEvent(r.id, "cancelled", {"by": r.cancelled_by})]

                store.update_run(conn, run_id, step)
        finally:
            try:
                lock.release()
            except redis.exceptions.LockError:
                pass
    finally:
        conn.delete(CANCELLING.format(run_id))
    admit_runs()
    return "cancelled"


# Reconcile -------------------------------------------------------------------------------------------------------------

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
                enqueue_start(settings, run.id)
                done["started"].append(run.id)
            continue
        if not job_pending(settings, conn.get(TICK_KEY.format(run.id))):
            schedule_tick(settings, run.id, 0)
            done["monitored"].append(run.id)
        if run.cancelled_by and enqueue_cancel(settings, run.id) is not None:
            done["cancelled"].append(run.id)
    if store.queued_ids(conn) and len(active) < settings.max_running:
        enqueue_admit(settings)
    from jobs.deploy import recover_deploys  # deploy's tasks enqueue through this module

    done.update(recover_deploys(settings))
    if any(done.values()):
        log.info("reconcile: %s", done)
    return done


def reconcile(chain: str | None = None) -> str:
    """A reconcile pass, then the next one in RECONCILE_EVERY_S (only the current chain goes on)."""
    settings = current_settings()
    conn = store.connect(settings)
    if chain is not None and conn.get(RECONCILE_KEY) != chain:
        return "superseded"
    reconcile_once(settings)
    if chain is not None:
        schedule_reconcile(settings, RECONCILE_EVERY_S)
    return "ok"


def schedule_reconcile(settings: JobSettings, delay_s: float) -> str:
    token = f"reconcile-{uuid.uuid4().hex[:12]}"
    store.connect(settings).set(RECONCILE_KEY, token)
    _enqueue(settings, reconcile, token, delay_s=delay_s, job_id=token)
    return token


def ensure_reconcile(settings: JobSettings) -> str | None:
    """Start the reconcile chain now unless a live one is pending; returns the new chain's id, if any."""
    if job_pending(settings, store.connect(settings).get(RECONCILE_KEY)):
        return None
    return schedule_reconcile(settings, 0)
