"""Redis going away under running runs: killed and restarted on its AOF (the workers wait and go on), and coming back
empty (the runs are found again from the snapshots in their run folders, and their threads are told)."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time

import pytest
import redis

from jobs import reconcile
from jobs.core import snapshots, store
from jobs.core.domain import RunState
from jobs.runs import service
from jobs.runs.progress import move
from tests.conftest import dead_port, restart_redis_server, start_redis_server
from tests.jobs.conftest import events_of, kinds, running, wait_for

ENDED = ("succeeded", "failed", "cancelled", "timed_out")
CARD_TS = "1700000000.000100"


def submit(settings, **kw):
    return service.submit_run(settings, requester="U1", channel="C1", dataset="datasets/train.jsonl", **kw)


def ended(settings, run_id):
    run = service.get_run(settings, run_id)
    return run if run is not None and run.state.terminal else None


def has_event(settings, run_id, kind):
    return any(e.kind == kind for e in events_of(settings, run_id))


def one_launch(settings, run_id):
    run_dir = settings.workspace / "runs" / run_id
    assert (run_dir / "train.log").read_text().count("[tuneops] attempt") == 1
    assert sorted(p.name for p in run_dir.glob("attempt-*")) == ["attempt-1.claim", "attempt-1.exit", "attempt-1.pid"]


def story_ends_once(events):
    k = kinds(events)
    assert sum(x in ENDED for x in k) == 1, k
    assert k.count("state:succeeded") == 1 and k.count("started") == 1, k


# The clients -----------------------------------------------------------------------------------------------------------

def test_the_shared_clients_wait_with_backoff_and_log_an_outage_once(caplog, monkeypatch):
    monkeypatch.setattr(store, "_outage", store._Outage())
    monkeypatch.setattr(store, "_patience_s", store.DEFAULT_PATIENCE_S)
    store.set_patience(0.8)  # a worker's patience, shortened
    client = store._shared(f"redis://127.0.0.1:{dead_port()}/0", True)
    kwargs = client.connection_pool.connection_kwargs
    assert 1.0 < kwargs["socket_timeout"] < 3.0  # over bot.stream's 1 s blocking read, under Slack's 3 s
    assert kwargs["socket_connect_timeout"] < 3.0
    caplog.set_level(logging.WARNING, logger=store.__name__)
    for _ in range(3):
        started = time.monotonic()
        with pytest.raises(redis.ConnectionError):
            client.get("x")
        assert 0.7 < time.monotonic() - started < 3
    assert len(caplog.records) == 1 and "Redis is not answering" in caplog.records[0].getMessage()


# Killed and restarted on its AOF ---------------------------------------------------------------------------------------

@pytest.mark.usefixtures("fake_trainer")
def test_a_run_goes_on_when_redis_is_killed_and_restarted_on_its_aof(settings, workers, tmp_path):
    exe = shutil.which("redis-server")
    aof = tmp_path / "aof"
    aof.mkdir()
    durable = ("--appendonly", "yes", "--appendfsync", "always")
    server, port = start_redis_server(exe, aof, *durable)
    try:
        settings = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{port}/0")
        worker = workers.start(settings, FAKE_STEP_S="0.2")
        run = submit(settings, max_steps=30)
        wait_for(lambda: has_event(settings, run.id, "progress"), 60, "progress")
        server.kill()
        server.wait(10)
        time.sleep(2.5)  # the worker, its scheduler and the job in flight meet the outage
        server = restart_redis_server(exe, aof, port, *durable)

        done = wait_for(lambda: ended(settings, run.id), 90, "the run to end", interval=0.3)
        assert done.state is RunState.SUCCEEDED, (done.error, workers.logs())
        assert worker.poll() is None, workers.logs()
        assert done.attempts == 1
        one_launch(settings, run.id)
        story_ends_once(events_of(settings, run.id))
        logs = workers.logs()
        assert "Redis is not answering" in logs and "Redis answers again" in logs
        # One line as the outage starts in each process that met it (the worker, its scheduler, a job), not one a try.
        assert 1 <= logs.count("Redis is not answering") <= 3, logs
        assert "quitting" not in logs and "Traceback" not in logs, logs
    finally:
        workers.stop_all()  # before its Redis goes: a worker would wait for it
        server.kill()
        server.wait(10)


# Back empty ------------------------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("fake_trainer")
def test_a_running_run_is_found_again_when_redis_comes_back_empty(settings, workers):
    worker = workers.start(settings, FAKE_STEP_S="0.2")
    run = submit(settings, max_steps=40)
    conn = store.connect(settings)
    conn.set(store.THREAD_KEY.format(run.id), CARD_TS)  # where the bot posted the run's card
    wait_for(lambda: has_event(settings, run.id, "checkpoint"), 60, "a checkpoint")
    assert snapshots.read(settings.workspace, run.id).thread == CARD_TS

    conn.flushall()
    done = wait_for(lambda: ended(settings, run.id), 90, "the run to be found again and end", interval=0.3)
    assert done.state is RunState.SUCCEEDED, (done.error, workers.logs())
    assert done.attempts == 1 and done.channel == "C1" and done.requester == "U1"
    one_launch(settings, run.id)
    events = events_of(settings, run.id)  # what the stream holds since Redis came back
    notices = [e.data["text"] for e in events if e.kind == "notice"]
    assert notices in ([reconcile.FOUND_ACTIVE], [reconcile.FOUND_ENDED])  # ENDED on a machine slow to notice
    assert kinds(events)[-2:] == ["state:succeeded", "succeeded"]
    assert conn.get(store.THREAD_KEY.format(run.id)) == CARD_TS  # the bot tells it in the same thread
    assert worker.poll() is None, workers.logs()
    # A run submitted afterwards does not take the id (and the folder) of the one Redis forgot.
    assert submit(settings, max_steps=2).id == "ft-0002"


def test_reconcile_finds_every_run_again_and_says_so_where_it_should(settings):
    done_run = submit(settings)
    store.update_run(store.connect(settings), done_run.id,
                     lambda r: [move(r, RunState.PREPARING), move(r, RunState.FAILED)])
    lost = running(settings, submit(settings), execution_id="ft-0002/attempt-1")  # no such execution on disk
    starting = running(settings, submit(settings))
    waiting = submit(settings)
    conn = store.connect(settings)
    conn.flushall()

    done = reconcile.reconcile_once(settings)
    assert done["restored"] == [done_run.id] and done["lost"] == [lost.id]
    assert done["found"] == [starting.id, waiting.id]
    assert service.get_run(settings, done_run.id).state is RunState.FAILED
    assert events_of(settings, done_run.id) == []  # a finished story is not told again

    failed = service.get_run(settings, lost.id)
    assert failed.state is RunState.FAILED and failed.error == reconcile.LOST_EXECUTION
    assert kinds(events_of(settings, lost.id)) == ["state:failed", "failed"]
    assert events_of(settings, lost.id)[-1].data["hint"]["command"] == f"resume {lost.id}"
    assert service.get_run(settings, starting.id).state is RunState.PREPARING
    assert [e.data["text"] for e in events_of(settings, starting.id)] == [reconcile.FOUND_STARTING]
    assert service.get_run(settings, waiting.id).state is RunState.QUEUED
    assert service.queue_position(settings, waiting.id) == 1
    assert [e.data["text"] for e in events_of(settings, waiting.id)] == [reconcile.FOUND_QUEUED]
    assert store.new_run_id(conn) == "ft-0005"
    # Found once: the next pass leaves everything as it is.
    assert reconcile.reconcile_once(settings).get("found", []) == []


def test_a_run_id_never_names_an_existing_run_folder(settings):
    conn = store.connect(settings)
    (settings.workspace / "runs" / "ft-0007").mkdir(parents=True)
    (settings.workspace / "runs" / "ft-0001").mkdir()
    assert store.new_run_id(conn) == "ft-0008"


def test_the_thread_key_is_the_bots(settings):
    from bot.threads import KEY, RUN_CARD

    assert store.THREAD_KEY.format("ft-0001") == KEY.format(kind=RUN_CARD, id="ft-0001")


def test_deploy_requests_come_back_with_their_runs(settings):
    from jobs.deploys import approval, deploy
    from jobs.deploys.approval import ApprovalState
    from tests.jobs.test_jobs_approval import succeeded_run

    conn = store.connect(settings)
    waiting, deploying, live = (succeeded_run(settings) for _ in range(3))
    requests = [approval.request_deploy(settings, run.id, "U0ALICE", "C0TRAIN") for run in (waiting, deploying, live)]

    def to(*states):
        def step(a, run):
            for state in states:
                a.move(state)
            return []
        return step

    approval.update_approval(conn, requests[1].id, to(ApprovalState.APPROVED, ApprovalState.DEPLOYING))
    approval.update_approval(conn, requests[2].id, to(ApprovalState.APPROVED, ApprovalState.DEPLOYING,
                                                       ApprovalState.DEPLOYED))
    conn.flushall()

    done = reconcile.reconcile_once(settings)
    assert done["requests put back"] == [r.id for r in requests] and done["deploys lost"] == [requests[1].id]
    # The pending request's card works again: it can be decided, by someone else than its requester.
    assert approval.get_approval(settings, requests[0].id).state is ApprovalState.PENDING
    decided = approval.decide(settings, requests[0].id, "U0BOSS", True, frozenset({"U0BOSS"}))
    assert decided.state is ApprovalState.APPROVED
    # The deploy under way lost its progress: it ends failed, saying what to check, in its thread.
    lost = approval.get_approval(settings, requests[1].id)
    assert lost.state is ApprovalState.FAILED and lost.error == deploy.LOST_WITH_STORE
    assert events_of(settings, deploying.id)[-1].data["state"] == "failed"
    assert approval.get_approval(settings, requests[2].id).state is ApprovalState.DEPLOYED
    # New requests never reuse an id.
    again = approval.request_deploy(settings, deploying.id, "U0ALICE", "C0TRAIN")
    assert again.id == "dp-0004"
