"""The tuneops RQ worker: runs the jobs tasks, with RQ's scheduler for the monitor ticks' `enqueue_in`.

`python -m jobs.worker [--burst]` (the CLI's `tuneops worker` calls `run_worker`). On start it puts runs that a dead
worker left behind back on track before taking jobs.

A Redis outage does not stop it: every Redis command of a worker process (the worker, its scheduler, the process a
job runs in) waits through an outage of up to REDIS_PATIENCE_S with backoff and goes on where it was (see
`jobs.core.store`), logging once when the outage starts and once when it ends. A Redis that comes back empty is
noticed within STORE_CHECK_S, and the runs are found again from their run folders (`jobs.reconcile`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import redis
from rq import Worker
from rq.scheduler import RQScheduler

from jobs import reconcile
from jobs.core import logs, queue, store
from jobs.core.settings import JobSettings, SettingsError, configure, redact_url

log = logging.getLogger(__name__)

# RQ's default is ten minutes; a scheduler that died must be replaced sooner than that for ticks to go on.
MAINTENANCE_INTERVAL_S = 30
# RQ's scheduler lock lives interval + 60 s and is renewed each interval (1 s).
SCHEDULER_LOCK_TTL_S = 61
STALE_AFTER_S = 15
# How long a worker's Redis commands wait for Redis to come back. Longer than a restart or a failover takes; a step
# under way (a run's start, a monitor tick) then completes instead of failing half way.
REDIS_PATIENCE_S = 300.0
# How often an idle worker comes round its loop (RQ's blocking dequeue would wait minutes): it checks then that
# Redis still holds tuneops's data.
STORE_CHECK_S = 5


def break_stale_scheduler_lock(conn: redis.Redis, queue_name: str = queue.QUEUE_NAME) -> bool:
    """Free the queue's scheduler lock when the scheduler holding it is dead.

    RQ's lock outlives a killed scheduler by a minute, and no `enqueue_in` job runs meanwhile; a new worker would sit
    idle while runs wait for their next monitor tick. Returns True when a lock was freed.
    """
    key = RQScheduler.get_locking_key(queue_name)
    with conn.pipeline() as pipe:
        try:
            pipe.watch(key)
            holder = pipe.get(key)
            if holder is None or not _scheduler_gone(pipe, key, holder.decode()):
                pipe.unwatch()
                return False
            pipe.multi()
            pipe.delete(key)
            pipe.execute()
        except redis.WatchError:
            return False
    log.warning("freed the scheduler lock of queue %s: its scheduler (%s) is gone", queue_name, holder.decode())
    return True


def _scheduler_gone(conn, lock_key: str, name: str) -> bool:
    # A live scheduler renews its lock every second to a full TTL: one not renewed for a while has no live holder,
    # wherever that ran. On this host a dead pid tells at once. (A scheduler that has only just taken the lock has
    # not written its own record yet: that alone means nothing.)
    ttl = conn.ttl(lock_key)
    if ttl is not None and 0 <= ttl < SCHEDULER_LOCK_TTL_S - STALE_AFTER_S:
        return True
    info = conn.hgetall(f"rq:scheduler:{name}")
    return bool(info) and queue.process_gone(conn, f"rq:scheduler:{name}")


class TuneopsWorker(Worker):
    """RQ's worker, which also replaces a dead scheduler of another worker and restarts a lost reconcile chain
    during its maintenance, and notices a Redis that came back empty."""

    def __init__(self, *args, settings: JobSettings, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = settings
        self._main_pid = os.getpid()
        self._store_checked = time.monotonic()

    @property
    def dequeue_timeout(self) -> int:
        return min(super().dequeue_timeout, STORE_CHECK_S)

    def run_maintenance_tasks(self):
        try:
            break_stale_scheduler_lock(self.connection)
            reconcile.ensure_reconcile(self.settings)  # Redis may have lost the chain
        except redis.RedisError:
            log.exception("could not check the scheduler lock and the reconcile chain")
        super().run_maintenance_tasks()

    def heartbeat(self, timeout=None, pipeline=None):
        super().heartbeat(timeout, pipeline)
        if pipeline is None and os.getpid() == self._main_pid:
            self.check_store()

    def check_store(self) -> None:
        """When Redis lost tuneops's data (its mark is gone: restarted empty, flushed), find the runs again now."""
        now = time.monotonic()
        if now - self._store_checked < STORE_CHECK_S:
            return
        self._store_checked = now
        try:
            if store.connect(self.settings).exists(store.STORE_MARKER):
                return
            log.warning("Redis no longer holds tuneops's data: finding the runs again from their run folders")
            reconcile.reconcile_once(self.settings)
            reconcile.ensure_reconcile(self.settings)
        except Exception:  # the worker goes on; the reconcile chain tries again
            log.exception("could not recover from the loss of Redis's data")

    def perform_job(self, job, *args, **kwargs):
        # Every log line of a task about a run carries its id (TUNEOPS_LOG_FORMAT=json).
        first = job.args[0] if job.args else ""
        token = logs.run_id_var.set(first if isinstance(first, str) and logs.RUN_ID.fullmatch(first) else "")
        try:
            return super().perform_job(job, *args, **kwargs)
        finally:
            logs.run_id_var.reset(token)


def run_worker(settings: JobSettings, burst: bool = False) -> bool:
    """Run an RQ worker with the scheduler on the tuneops queue until stopped (or, with burst, until it is empty).
    False when it ended on an error of its own (RQ logged it) rather than as asked."""
    if not logging.getLogger().handlers:
        logs.setup_logging(logging.INFO)
    configure(settings)
    store.set_patience(REDIS_PATIENCE_S)
    conn = queue.rq_connection(settings)
    break_stale_scheduler_lock(conn)
    # Runs a dead worker left behind are put back on track before this one takes jobs; the chain repeats it.
    reconcile.reconcile_once(settings)
    reconcile.ensure_reconcile(settings)
    worker = TuneopsWorker([queue.get_queue(settings)], connection=conn, maintenance_interval=MAINTENANCE_INTERVAL_S,
                           settings=settings)
    worker.work(burst=burst, with_scheduler=True, logging_level="INFO")
    # RQ's loop also ends, quietly, on an error it does not handle (e.g. Redis gone for longer than the patience).
    return burst or worker._shutdown_requested_date is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--burst", action="store_true", help="quit when the queue is empty")
    args = parser.parse_args(argv)
    try:
        settings = JobSettings.from_env()
    except SettingsError as e:
        print(e, file=sys.stderr)
        return 2
    try:
        if not run_worker(settings, burst=args.burst):
            print("the worker stopped on an error (see the log above); start it again", file=sys.stderr)
            return 1
    except redis.ConnectionError as e:
        print(f"cannot reach Redis at {redact_url(settings.redis_url)}: {e}; start redis-server or set REDIS_URL", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
