"""Runs end to end through real RQ worker processes (with the scheduler) and the local backend: the real trainer on
the tiny model once, the fake trainer where only timing matters (cancel, the GPU limit, a worker killed mid-run)."""

from __future__ import annotations

import dataclasses
import re
import time

import pytest

from jobs.core import store
from jobs.core.domain import RunState
from jobs.core.errors import RunRejected
from jobs.core.procs import group_alive
from jobs.runs import service
from payload.config import DEMO_OVERRIDES
from payload.events import read_events
from tests.jobs.conftest import events_of, kinds, trainer_groups, wait_for


def submit(settings, **kw):
    kw.setdefault("dataset", "datasets/train.jsonl")
    return service.submit_run(settings, requester="U1", channel="C1", **kw)


def state_of(settings, run_id):
    return service.get_run(settings, run_id).state


def ended(settings, run_id):
    run = service.get_run(settings, run_id)
    return run if run.state.terminal else None


def no_trainer_left(settings) -> bool:
    return not any(group_alive(pgid) for pgid in trainer_groups(settings.workspace))


def check_progress_events(events, total: int, save_steps: int):
    steps = [e.data["step"] for e in events if e.kind == "progress"]
    assert steps == sorted(set(steps)), steps  # strictly increasing: no step reported twice
    assert steps[-1] == total
    assert [e.data["step"] for e in events if e.kind == "checkpoint"] == list(range(save_steps, total + 1,
                                                                                    save_steps))


def test_a_run_of_the_real_trainer_succeeds_with_its_story_in_order(settings, workers):
    settings = dataclasses.replace(settings, train_module="payload.train",
                                   train_overrides={**DEMO_OVERRIDES, "save_steps": 2, "eval_generations": 0})
    run = submit(settings, max_steps=4)
    workers.start(settings)
    done = wait_for(lambda: ended(settings, run.id), 240, "the run to end", interval=0.5)
    events = events_of(settings, run.id)
    assert done.state is RunState.SUCCEEDED, (done.error, [e.data for e in events if e.kind == "failed"],
                                              workers.logs())

    story = [k for k in kinds(events) if k not in ("progress", "eval", "checkpoint", "log")]
    assert story == ["queued", "state:preparing", "started", "state:running", "state:succeeded", "succeeded"]
    assert events[1].data == {"state": "preparing", "previous": "queued"}
    assert events[2].data == {"execution_id": f"{run.id}/attempt-1", "links": {}}
    check_progress_events(events, total=4, save_steps=2)
    assert [e.data["step"] for e in events if e.kind == "eval"][:2] == [2, 4]
    succeeded = events[-1].data
    assert succeeded["adapter"] == "runs/ft-0001/adapter"
    assert (settings.workspace / succeeded["adapter"] / "adapter_config.json").is_file()
    assert succeeded["metrics"]["steps"] == 4 and "train_loss" in succeeded["metrics"]

    assert (done.step, done.total_steps, done.attempts, done.adapter_path) == (4, 4, 1, "runs/ft-0001/adapter")
    assert done.loss is not None and done.finished_at >= done.started_at
    assert done.event_cursor == (settings.workspace / "runs/ft-0001/events.jsonl").stat().st_size
    assert no_trainer_left(settings)
    assert store.active_ids(store.connect(settings)) == set()


@pytest.mark.usefixtures("fake_trainer")
def test_cancel_mid_run_ends_cancelled_and_leaves_no_process(settings, workers):
    workers.start(settings, FAKE_STEP_S="0.3")
    run = submit(settings, max_steps=500)
    wait_for(lambda: any(e.kind == "progress" for e in events_of(settings, run.id)), 60, "progress")
    pgid = trainer_groups(settings.workspace)[0]
    assert group_alive(pgid)

    asked = service.cancel_run(settings, run.id, by="U2")
    assert asked.cancelled_by == "U2" and not asked.state.terminal
    done = wait_for(lambda: ended(settings, run.id), 60, "the run to end", interval=0.2)
    assert done.state is RunState.CANCELLED and done.cancelled_by == "U2"
    assert not group_alive(pgid)
    events = events_of(settings, run.id)
    assert kinds(events)[-2:] == ["state:cancelled", "cancelled"]
    assert events[-1].data == {"by": "U2"}
    assert sum(k == "cancelled" for k in kinds(events)) == 1
    assert any(e.kind == "cancelling" and e.data == {"by": "U2"} for e in events)
    with pytest.raises(RunRejected, match="nothing to cancel"):
        service.cancel_run(settings, run.id, by="U2")


@pytest.mark.usefixtures("fake_trainer")
def test_a_third_run_waits_while_two_run(settings, workers):
    conn = store.connect(settings)
    a = submit(settings, max_steps=12)
    b = submit(settings, max_steps=12)
    c = submit(settings, max_steps=2)
    workers.start(settings, FAKE_STEP_S="0.25")
    wait_for(lambda: state_of(settings, a.id) is RunState.RUNNING and state_of(settings, b.id) is RunState.RUNNING,
             60, "two runs running")
    assert state_of(settings, c.id) is RunState.QUEUED and service.queue_position(settings, c.id) == 1
    deadline = time.monotonic() + 120
    while not all(ended(settings, r.id) for r in (a, b, c)):
        assert len(store.active_ids(conn)) <= 2
        assert time.monotonic() < deadline, "the three runs did not end in time"
        time.sleep(0.05)
    assert all(state_of(settings, r.id) is RunState.SUCCEEDED for r in (a, b, c))

    # C's card learnt that it moved up the line, and it started only after A or B had ended.
    assert [e.data["position"] for e in events_of(settings, c.id) if e.kind == "queued"] == [3, 1]
    stream = [(e.run_id, k) for e, k in zip(events_of(settings, None), kinds(events_of(settings, None)))]
    c_admitted = stream.index((c.id, "state:preparing"))
    first_end = min(stream.index((a.id, "succeeded")), stream.index((b.id, "succeeded")))
    assert first_end < c_admitted
    assert no_trainer_left(settings)


@pytest.mark.usefixtures("fake_trainer")
def test_a_worker_killed_mid_run_is_replaced_and_the_run_finishes_once(settings, workers):
    total, save_steps = 24, 2
    first = workers.start(settings, FAKE_STEP_S="0.3")
    run = submit(settings, max_steps=total)
    wait_for(lambda: [e for e in events_of(settings, run.id) if e.kind == "checkpoint"], 60, "a checkpoint")
    assert state_of(settings, run.id) is RunState.RUNNING
    workers.kill(first)
    (pgid,) = trainer_groups(settings.workspace)
    assert group_alive(pgid), "the trainer does not depend on the worker"

    workers.start(settings, FAKE_STEP_S="0.3")
    done = wait_for(lambda: ended(settings, run.id), 120, "the run to end", interval=0.5)
    assert done.state is RunState.SUCCEEDED, workers.logs()

    events = events_of(settings, run.id)
    story = [k for k in kinds(events) if k not in ("progress", "checkpoint", "log")]
    assert story == ["queued", "state:preparing", "started", "state:running", "state:succeeded", "succeeded"]
    check_progress_events(events, total, save_steps)
    # Every log line of the trainer reached the stream once, in order.
    logged = [line for e in events if e.kind == "log" for line in e.data["lines"]]
    step_lines = [line for line in logged if line.startswith("step ")]
    assert step_lines == [f"step {n} loss {5.0 / n:.3f}" for n in range(1, total + 1)]
    # One training process only: one launch, one attempt, one start of training.
    run_dir = settings.workspace / "runs" / run.id
    assert (run_dir / "train.log").read_text().count("[tuneops] attempt") == 1
    assert sorted(p.name for p in run_dir.glob("attempt-*")) == ["attempt-1.claim", "attempt-1.exit",
                                                                 "attempt-1.pid"]
    payload_events, _ = read_events(run_dir / "events.jsonl")
    assert sum(e["type"] == "start" for e in payload_events) == 1
    assert done.attempts == 1
    assert done.pid == pgid  # the record names the one launcher, as the pid file does
    assert no_trainer_left(settings)


@pytest.mark.usefixtures("fake_trainer")
def test_a_failed_run_reports_its_error_and_log_tail_and_resumes_from_its_checkpoint(settings, workers):
    token = "hf_notForRedisOrSlack0123456789"
    workers.start(settings, FAKE_STEP_S="0.1", FAKE_FAIL_AT="5", FAKE_LEAK="1", HF_TOKEN=token)
    run = submit(settings, max_steps=6)
    done = wait_for(lambda: ended(settings, run.id), 60, "the run to end", interval=0.2)
    assert done.state is RunState.FAILED
    failed = events_of(settings, run.id)[-1]
    assert failed.kind == "failed"
    assert failed.data["error"] == "fake failure at step 5 with token *** (the trainer exited with code 1)"
    assert failed.data["log_tail"][-2:] == ["Traceback (most recent call last):",
                                            "RuntimeError: fake failure with token ***"]
    assert len(failed.data["log_tail"]) <= 20
    # The trainer wrote the token into its own events file; the launcher kept it out of the log file, and nothing
    # of it reached Redis.
    conn = store.connect(settings)
    run_dir = settings.workspace / "runs" / run.id
    assert token in (run_dir / "events.jsonl").read_text()
    assert token not in (run_dir / "train.log").read_text()
    assert not any(token in str(fields) for _, fields in conn.xrange(store.EVENT_STREAM))
    assert token not in conn.get(store.run_key(run.id))

    # Resumed (with the fault gone, as after a fix): attempt 2 goes on after the checkpoint of step 4.
    workers.stop_all()
    workers.start(settings, FAKE_STEP_S="0.1")
    service.resume_run(settings, run.id, by="U3")
    done = wait_for(lambda: ended(settings, run.id), 60, "the resumed run to end", interval=0.2)
    assert done.state is RunState.SUCCEEDED and done.attempts == 2 and done.error == ""
    log = (settings.workspace / "runs" / run.id / "train.log").read_text()
    assert re.search(r"resuming after step 4\b", log)
    assert kinds(events_of(settings, run.id))[-2:] == ["state:succeeded", "succeeded"]
