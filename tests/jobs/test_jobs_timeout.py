"""The local backend's run time limit through real RQ workers: an attempt past TUNEOPS_RUN_TIMEOUT_S is stopped by
its launcher and ends timed_out with its last checkpoint; TUNEOPS_AUTO_RESUME puts it back in line by itself, and
the resumed attempt goes on from that checkpoint."""

from __future__ import annotations

import dataclasses

import pytest

import jobs.core.settings as jobs_settings
from jobs.core.domain import RunState
from jobs.runs import service
from tests.jobs.conftest import ROOT, events_of, kinds, wait_for

pytestmark = pytest.mark.timeout(180)


def test_a_run_past_its_limit_times_out_at_its_checkpoint_and_resumes_by_itself(settings, workers, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    settings = dataclasses.replace(settings, train_module="tests.standins.story_train", run_timeout_s=3.0,
                                   auto_resume=1)
    jobs_settings.configure(settings)
    # The first attempt stalls after the checkpoint of step 4; the resumed one finishes.
    workers.start(settings, TUNEOPS_RUN_TIMEOUT_S="3", TUNEOPS_AUTO_RESUME="1", STORY_HANG_AFTER="4")
    run = service.submit_run(settings, requester="U0ALICE", channel="C0TRAIN", dataset="datasets/train.jsonl",
                             max_steps=8)
    done = wait_for(lambda: (r := service.get_run(settings, run.id)).state.terminal and r.attempts >= 2 and r, 120,
                    "the run to end after its automatic resume")
    assert done.state is RunState.SUCCEEDED, (done.state, done.error, workers.logs()[-2000:])
    assert done.attempts == 2 and done.auto_resumes == 1
    events = events_of(settings, run.id)
    story = kinds(events)
    assert story.index("timed_out") < story.index("state:queued", story.index("timed_out")) < story.index("succeeded")
    [timed_out] = [e for e in events if e.kind == "timed_out"]
    assert timed_out.data["checkpoint_step"] == 4
    resumed = [e.data for e in events if e.kind == "resumed"]
    assert resumed == [{"by": "", "checkpoint_step": 4, "auto": True, "done": 1, "allowed": 1}], resumed
    log = (settings.workspace / "runs" / run.id / "train.log").read_text()
    assert "the run time limit of 3s is reached" in log and "resuming after step 4" in log
    assert (settings.workspace / "runs" / run.id / "attempt-1.timeout").exists()
    assert not (settings.workspace / "runs" / run.id / "attempt-2.timeout").exists()
