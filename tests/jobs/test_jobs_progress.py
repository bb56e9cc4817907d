"""What a monitor tick makes of the trainer's events and the execution's end: pure, no I/O."""

from __future__ import annotations

from jobs.backends.protocol import ExecStatus, ExecutionInfo
from jobs.core.domain import Run, RunState
from jobs.runs.progress import LOG_EVENT_LINES, apply_progress, finish
from payload.events import make_event


def running_run() -> Run:
    run = Run(id="ft-0007", requester="U1", channel="C1", model="m", dataset="d")
    run.transition(RunState.PREPARING)
    run.transition(RunState.RUNNING)
    return run


def step(n: int, total: int = 6, loss: float = 1.0):
    return make_event("step", step=n, total_steps=total, epoch=n / total, loss=loss, lr=1e-4, tokens_per_s=50.0,
                      eta_s=float(total - n))


def test_steps_of_one_tick_become_one_progress_event_with_the_latest():
    run = running_run()
    events = apply_progress(run, [make_event("start", total_steps=6), step(1, loss=3.0), step(2, loss=2.0)], [])
    assert [e.kind for e in events] == ["progress"]
    assert events[0].data == {"step": 2, "total_steps": 6, "loss": 2.0, "eta_s": 4.0, "epoch": 2 / 6,
                              "tokens_per_s": 50.0}
    assert (run.step, run.total_steps, run.loss, run.eta_s) == (2, 6, 2.0, 4.0)


def test_evals_and_checkpoints_each_reported_after_the_progress_that_led_to_them():
    run = running_run()
    events = apply_progress(run, [
        step(1), step(2),
        make_event("eval", step=2, eval_loss=0.9),
        make_event("checkpoint", step=2, path="runs/ft-0007/checkpoints/checkpoint-2"),
        step(3),
    ], [])
    assert [(e.kind, e.data.get("step")) for e in events] == [
        ("progress", 2), ("eval", 2), ("checkpoint", 2), ("progress", 3)]
    assert run.last_checkpoint_step == 2 and run.metrics["eval_loss"] == 0.9


def test_done_and_error_go_into_the_record_without_an_event():
    run = running_run()
    events = apply_progress(run, [make_event("done", adapter="runs/ft-0007/adapter", metrics={"train_loss": 0.5}),
                                  make_event("error", message="out of memory")], [])
    assert events == []
    assert run.adapter_path == "runs/ft-0007/adapter" and run.metrics["train_loss"] == 0.5
    assert run.error == "out of memory"


def test_a_link_from_the_trainer_joins_the_cards_links_and_has_the_card_redrawn():
    run = running_run()
    run.links = {"job": "https://portal.azure.com/#job"}
    url = "https://wandb.ai/my-team/tuneops/runs/abc123xy"
    events = apply_progress(run, [make_event("link", name="wandb", url=url)], [])
    assert run.links == {"job": "https://portal.azure.com/#job", "wandb": url}
    assert [e.kind for e in events] == ["progress"]
    for bad in ("javascript:alert(1)", "https://x/<!channel>", "https://x/a|b", "https://x/a b", None, 3):
        assert apply_progress(run, [make_event("link", name="other", url=bad)], []) == []
    assert "other" not in run.links


def test_log_lines_become_one_capped_log_event():
    run = running_run()
    lines = [f"line {i}" for i in range(LOG_EVENT_LINES + 5)]
    (event,) = apply_progress(run, [], lines)
    assert event.kind == "log"
    assert event.data["lines"] == lines[-LOG_EVENT_LINES:] and event.data["skipped"] == 5
    assert apply_progress(run, [], []) == []


def outputs():
    return {"metrics": {"train_loss": 0.4}, "adapter": "runs/ft-0007/adapter"}


def tail(n):
    return [f"log {i}" for i in range(n)]


def test_finish_succeeded():
    run = running_run()
    events = finish(run, ExecutionInfo(ExecStatus.SUCCEEDED, "exit code 0", 0), outputs, tail)
    assert run.state is RunState.SUCCEEDED
    assert [e.kind for e in events] == ["state", "succeeded"]
    assert events[0].data == {"state": "succeeded", "previous": "running"}
    assert events[1].data == {"metrics": {"train_loss": 0.4}, "adapter": "runs/ft-0007/adapter"}


def test_finish_failed_carries_the_error_and_the_last_20_log_lines():
    run = running_run()
    run.error = "CUDA out of memory"
    events = finish(run, ExecutionInfo(ExecStatus.FAILED, "the trainer exited with code 1", 1), outputs, tail)
    assert run.state is RunState.FAILED
    assert events[1].kind == "failed"
    assert events[1].data["error"] == "CUDA out of memory (the trainer exited with code 1)"
    assert events[1].data["log_tail"] == tail(20)


def test_a_stop_that_was_asked_for_is_a_cancellation():
    for status in (ExecStatus.STOPPED, ExecStatus.FAILED):
        run = running_run()
        run.cancelled_by = "U9"
        events = finish(run, ExecutionInfo(status), outputs, tail)
        assert run.state is RunState.CANCELLED
        assert [(e.kind, e.data.get("by")) for e in events] == [("state", None), ("cancelled", "U9")]


def test_a_stop_nobody_asked_for_is_a_failure():
    run = running_run()
    events = finish(run, ExecutionInfo(ExecStatus.STOPPED, "stopped"), outputs, tail)
    assert run.state is RunState.FAILED and events[1].data["error"] == "stopped"


def test_a_run_that_finished_before_the_cancel_reached_it_succeeded():
    run = running_run()
    run.cancelled_by = "U9"
    finish(run, ExecutionInfo(ExecStatus.SUCCEEDED, "exit code 0", 0), outputs, tail)
    assert run.state is RunState.SUCCEEDED


def test_timed_out_reports_the_checkpoint_to_resume_from():
    run = running_run()
    run.last_checkpoint_step = 40
    events = finish(run, ExecutionInfo(ExecStatus.TIMED_OUT, "replica timeout"), outputs, tail)
    assert run.state is RunState.TIMED_OUT and events[1].data == {"checkpoint_step": 40}
