"""The RQ queue: its connection, enqueueing a task by its dotted name with the TTLs every tuneops job has, whether a
job is still going to run, and locks that outlive a long step.

Tasks are named, not imported: a module that enqueues never imports the module that runs the task, so the layers stay
one-way (runs and deploys enqueue each other's tasks, backends enqueue their own ops).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import ScheduledJobRegistry

from jobs.core import store
from jobs.core.procs import pid_alive
from jobs.core.settings import JobSettings

log = logging.getLogger(__name__)

QUEUE_NAME = "tuneops"
JOB_TIMEOUT_S = 180
RESULT_TTL_S = 60
FAILURE_TTL_S = 7 * 24 * 3600
# A job that is "started" for longer than this was abandoned by a dead worker: ticks and starts take seconds.
STARTED_STALE_S = 90.0
# A scheduled job this late means no scheduler is running for the queue.
SCHEDULED_LATE_S = 30.0

# The tasks, by the dotted names RQ imports them by in the worker.
ADMIT_RUNS = "jobs.runs.tasks.admit_runs"
START_RUN = "jobs.runs.tasks.start_run"
MONITOR_RUN = "jobs.runs.tasks.monitor_run"
STOP_RUN = "jobs.runs.tasks.stop_run"
RECONCILE = "jobs.reconcile.reconcile"
DEPLOY_APPROVED = "jobs.deploys.deploy.deploy_approved"
FOLLOW_BACKEND_DEPLOY = "jobs.deploys.deploy.follow_backend_deploy"
EXPIRE_APPROVAL = "jobs.deploys.approval.expire_approval"
# A backend's own operations are named by the backend (e.g. jobs.backends.aca.ops.OP_TASK).
TASKS = (ADMIT_RUNS, START_RUN, MONITOR_RUN, STOP_RUN, RECONCILE, DEPLOY_APPROVED, FOLLOW_BACKEND_DEPLOY,
         EXPIRE_APPROVAL)

def rq_connection(settings: JobSettings) -> redis.Redis:
    """RQ stores pickled jobs, so it needs a client that returns bytes (store.connect's returns str)."""
    return store.connect_bytes(settings)


def get_queue(settings: JobSettings) -> Queue:
    return Queue(QUEUE_NAME, connection=rq_connection(settings))


def enqueue(settings: JobSettings, task: str, *args: Any, delay_s: float = 0.0, job_id: str | None = None,
            timeout: int = JOB_TIMEOUT_S) -> Job:
    """Enqueue the task named `task` (one of TASKS), now or in `delay_s` (RQ's scheduler runs it then)."""
    options: dict[str, Any] = dict(job_id=job_id, job_timeout=timeout, result_ttl=RESULT_TTL_S,
                                   failure_ttl=FAILURE_TTL_S)
    queue = get_queue(settings)
    if delay_s > 0:
        return queue.enqueue_in(timedelta(seconds=delay_s), task, *args, **options)
    return queue.enqueue(task, *args, **options)


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


def release(lock, what: str = "") -> None:
    """Release a lock that may have lapsed meanwhile (then someone else may hold it: leave it be)."""
    try:
        lock.release()
    except redis.exceptions.LockError:
        if what:
            log.warning("the %s lock expired while it was held", what)
