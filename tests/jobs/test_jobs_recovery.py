"""Recovery after a crash, piece by piece: freeing a dead scheduler's lock, telling a pending job from a lost one,
and the reconcile pass that restarts lost starts, monitor chains and cancels."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
from rq import Queue
from rq.registry import ScheduledJobRegistry
from rq.scheduler import RQScheduler

from jobs import reconcile
from jobs.core import queue, store
from jobs.core.domain import RunState
from jobs.runs import service, tasks, transitions
from jobs.worker import SCHEDULER_LOCK_TTL_S, break_stale_scheduler_lock
from tests.jobs.conftest import running


@pytest.fixture
def rq_conn(settings):
    return queue.rq_connection(settings)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def hold_scheduler_lock(rq_conn, name: str, *, pid: int | None, ttl: int = SCHEDULER_LOCK_TTL_S) -> str:
    key = RQScheduler.get_locking_key(queue.QUEUE_NAME)
    rq_conn.set(key, name, ex=ttl)
    if pid is not None:
        rq_conn.hset(f"rq:scheduler:{name}", mapping={"hostname": socket.gethostname(), "pid": pid})
    return key


def test_the_lock_of_a_dead_scheduler_on_this_host_is_freed(rq_conn):
    key = hold_scheduler_lock(rq_conn, "gone", pid=dead_pid())
    assert break_stale_scheduler_lock(rq_conn) is True
    assert rq_conn.get(key) is None


def test_the_lock_of_a_live_scheduler_is_kept(rq_conn):
    key = hold_scheduler_lock(rq_conn, "alive", pid=os.getpid())
    assert break_stale_scheduler_lock(rq_conn) is False
    assert rq_conn.get(key) == b"alive"


def test_a_lock_just_taken_by_a_scheduler_still_starting_is_kept(rq_conn):
    key = hold_scheduler_lock(rq_conn, "starting", pid=None)  # no record of its own yet
    assert break_stale_scheduler_lock(rq_conn) is False
    assert rq_conn.get(key) == b"starting"


def test_a_lock_nobody_renews_is_freed_wherever_its_holder_ran(rq_conn):
    key = hold_scheduler_lock(rq_conn, "elsewhere", pid=None, ttl=20)
    assert break_stale_scheduler_lock(rq_conn) is True
    assert rq_conn.get(key) is None


def test_job_pending(settings, rq_conn):
    assert queue.job_pending(settings, None) is False
    assert queue.job_pending(settings, "no-such-job") is False
    queued = transitions.enqueue_admit(settings)
    assert queue.job_pending(settings, queued.id) is True
    later = queue.enqueue(settings, queue.ADMIT_RUNS, delay_s=60)
    assert queue.job_pending(settings, later.id) is True
    # Scheduled long ago and still not run: no scheduler is doing its work.
    ScheduledJobRegistry(queue.QUEUE_NAME, connection=rq_conn).schedule(later, datetime.now(UTC) - timedelta(minutes=2))
    assert queue.job_pending(settings, later.id) is False


def running_run(settings, **changes):
    run = service.submit_run(settings, requester="U1", channel="C1", dataset="datasets/train.jsonl")
    return running(settings, run, **changes)


def jobs_of(settings, rq_conn) -> list[tuple[str, tuple]]:
    return [(job.func_name.rsplit(".", 1)[1], job.args) for job in Queue(queue.QUEUE_NAME, connection=rq_conn).jobs]


def test_reconcile_restarts_a_lost_monitor_chain_once(settings, rq_conn):
    run = running_run(settings, execution_id="ft-0001/attempt-1")
    Queue(queue.QUEUE_NAME, connection=rq_conn).empty()
    done = reconcile.reconcile_once(settings)
    assert done["monitored"] == [run.id]
    token = store.connect(settings).get(store.TICK_KEY.format(run.id))
    assert jobs_of(settings, rq_conn) == [("monitor_run", (run.id, token))]
    # The restarted chain is pending now: a second pass leaves it alone.
    assert reconcile.reconcile_once(settings)["monitored"] == []


def test_reconcile_restarts_a_lost_start_only_after_a_while(settings, rq_conn):
    run = running_run(settings)  # admitted (preparing), no execution: its start task was lost
    Queue(queue.QUEUE_NAME, connection=rq_conn).empty()
    assert reconcile.reconcile_once(settings)["started"] == []  # it may still be on its way
    conn = store.connect(settings)
    # As if time had passed: update_run stamps updated_at, so the aged record is written directly.
    aged = store.load_run(conn, run.id)
    aged.updated_at = time.time() - reconcile.START_STALE_S - 1
    with conn.pipeline() as pipe:
        store.write_run(pipe, aged)
        pipe.execute()
    assert reconcile.reconcile_once(settings)["started"] == [run.id]
    assert ("start_run", (run.id,)) in jobs_of(settings, rq_conn)


def test_reconcile_asks_again_for_a_lost_cancel_and_fills_free_slots(settings, rq_conn):
    run = running_run(settings, execution_id="ft-0001/attempt-1", cancelled_by="U2")
    queued = service.submit_run(settings, requester="U1", channel="C1", dataset="datasets/train.jsonl")
    Queue(queue.QUEUE_NAME, connection=rq_conn).empty()
    done = reconcile.reconcile_once(settings)
    assert done["cancelled"] == [run.id]
    names = [name for name, _ in jobs_of(settings, rq_conn)]
    assert "stop_run" in names and "admit_runs" in names  # one slot of two is free for the queued run
    assert service.get_run(settings, queued.id).state is RunState.QUEUED


def test_a_superseded_tick_does_nothing(settings):
    run = running_run(settings, execution_id="ft-0001/attempt-1")
    current = transitions.schedule_tick(settings, run.id, 60)
    before = store.run_events(store.connect(settings), run.id)
    assert tasks.monitor_run(run.id, "monitor-ft-0001-old") == "superseded"
    assert store.run_events(store.connect(settings), run.id) == before
    assert store.connect(settings).get(store.TICK_KEY.format(run.id)) == current


@pytest.mark.usefixtures("fake_trainer")
def test_a_retried_start_never_starts_a_second_trainer(settings, monkeypatch):
    """The first start died after launching the trainer and before recording it; the retry finds the launch."""
    from jobs.backends.local.executor import LocalExecutor
    from jobs.core.runconfig import build_train_config

    monkeypatch.setenv("FAKE_STEP_S", "0.2")
    run = running_run(settings)
    config = build_train_config(run.id, run.model, run.dataset, run.params, settings.train_overrides)
    LocalExecutor(settings).start(run, config.model_dump())  # the lost first start
    assert tasks.start_run(run.id) == "ft-0001/attempt-1"
    assert tasks.start_run(run.id) == "already started"
    stored = service.get_run(settings, run.id)
    assert stored.execution_id == "ft-0001/attempt-1"
    pid_file = settings.workspace / "runs" / run.id / "attempt-1.pid"
    assert stored.pid == int(pid_file.read_text().split()[0]) > 0
    log = (settings.workspace / "runs" / run.id / "train.log").read_text()
    assert log.count("[tuneops] attempt 1:") == 1
    assert [e.kind for e in store.run_events(store.connect(settings), run.id)].count("started") == 1
    LocalExecutor(settings).stop(stored)


def test_concurrent_admissions_never_admit_more_than_max_running(settings):
    import threading

    ids = [service.submit_run(settings, requester="U1", channel="C1", dataset="datasets/train.jsonl").id
           for _ in range(8)]
    barrier = threading.Barrier(6)

    def admit():
        barrier.wait()
        tasks.admit_runs()

    threads = [threading.Thread(target=admit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    states = [service.get_run(settings, i).state for i in ids]
    assert states == [RunState.PREPARING] * 2 + [RunState.QUEUED] * 6  # oldest first
    assert [service.queue_position(settings, i) for i in ids[2:]] == [1, 2, 3, 4, 5, 6]
