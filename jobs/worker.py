"""The tuneops RQ worker: runs the jobs tasks, with RQ's scheduler for the monitor ticks' `enqueue_in`.

`python -m jobs.worker [--burst]` (the CLI's `tuneops worker` calls `run_worker`). On start it puts runs that a dead
worker left behind back on track before taking jobs.
"""

from __future__ import annotations

import argparse
import logging
import sys

import redis
from rq import Worker
from rq.scheduler import RQScheduler

from jobs import reconcile
from jobs.core import logs, queue
from jobs.core.settings import JobSettings, SettingsError, configure, redact_url

log = logging.getLogger(__name__)

# RQ's default is ten minutes; a scheduler that died must be replaced sooner than that for ticks to go on.
MAINTENANCE_INTERVAL_S = 30
# RQ's scheduler lock lives interval + 60 s and is renewed each interval (1 s).
SCHEDULER_LOCK_TTL_S = 61
STALE_AFTER_S = 15


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
    """RQ's worker, which also replaces a dead scheduler of another worker during its maintenance."""

    def run_maintenance_tasks(self):
        try:
            break_stale_scheduler_lock(self.connection)
        except redis.RedisError:
            log.exception("could not check the scheduler lock")
        super().run_maintenance_tasks()

    def perform_job(self, job, *args, **kwargs):
        # Every log line of a task about a run carries its id (TUNEOPS_LOG_FORMAT=json).
        first = job.args[0] if job.args else ""
        token = logs.run_id_var.set(first if isinstance(first, str) and logs.RUN_ID.fullmatch(first) else "")
        try:
            return super().perform_job(job, *args, **kwargs)
        finally:
            logs.run_id_var.reset(token)


def run_worker(settings: JobSettings, burst: bool = False) -> None:
    """Run an RQ worker with the scheduler on the tuneops queue until stopped (or, with burst, until it is empty)."""
    if not logging.getLogger().handlers:
        logs.setup_logging(logging.INFO)
    configure(settings)
    conn = queue.rq_connection(settings)
    break_stale_scheduler_lock(conn)
    # Runs a dead worker left behind are put back on track before this one takes jobs; the chain repeats it.
    reconcile.reconcile_once(settings)
    reconcile.ensure_reconcile(settings)
    worker = TuneopsWorker([queue.get_queue(settings)], connection=conn, maintenance_interval=MAINTENANCE_INTERVAL_S)
    worker.work(burst=burst, with_scheduler=True, logging_level="INFO")


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
        run_worker(settings, burst=args.burst)
    except redis.ConnectionError as e:
        print(f"cannot reach Redis at {redact_url(settings.redis_url)}: {e}; start redis-server or set REDIS_URL", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
