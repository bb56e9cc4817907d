"""The local executor: a real launcher and trainer process (the fake trainer, which writes the payload's events)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from jobs.backends.local.executor import LOG_HEADER, LocalExecutor
from jobs.backends.protocol import ExecStatus
from jobs.core.domain import Run, RunState
from jobs.core.procs import pid_alive
from jobs.core.runconfig import build_train_config
from tests.conftest import wait_for

pytestmark = pytest.mark.usefixtures("fake_trainer")


def prepared_run(run_id: str = "ft-0001", **params) -> Run:
    run = Run(id=run_id, requester="U1", channel="C1", model="model-cache/tiny", dataset="datasets/train.jsonl",
              params=params)
    run.transition(RunState.PREPARING)
    return run


def start(ex: LocalExecutor, run: Run, settings) -> str:
    config = build_train_config(run.id, run.model, run.dataset, run.params, settings.train_overrides)
    return ex.start(run, config.model_dump())


def gone(pid: int) -> bool:
    """os.kill(pid, 0) fails, or the pid is a zombie nobody has collected yet (it runs nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return not pid_alive(pid)


def test_start_follow_and_succeed(settings):
    ex = LocalExecutor(settings)
    run = prepared_run(max_steps=4)
    execution_id = start(ex, run, settings)
    assert execution_id == "ft-0001/attempt-1"
    config = json.loads((settings.workspace / "runs/ft-0001/run.json").read_text())
    assert config["output_dir"] == "runs/ft-0001" and config["max_steps"] == 4 and config["save_steps"] == 2
    wait_for(lambda: ex.status(run).status.finished, 30, "the trainer to finish")
    info = ex.status(run)
    assert (info.status, info.exit_code) == (ExecStatus.SUCCEEDED, 0)

    batch = ex.read(run, 0, 0)
    assert [e["type"] for e in batch.events] == ["start", "step", "step", "checkpoint", "step", "step",
                                                 "checkpoint", "done"]
    assert batch.log_lines[0].startswith(f"{LOG_HEADER} attempt 1: -m fake_train --config runs/ft-0001/run.json")
    assert "step 4 loss 1.250" in batch.log_lines
    assert not any("TUNEOPS_EVENT" in line for line in batch.log_lines)  # events are not log lines
    again = ex.read(run, batch.event_cursor, batch.log_cursor)
    assert again.events == [] and again.log_lines == []  # cursors: nothing is read twice
    assert ex.outputs(run) == {"metrics": {"steps": 4, "last_loss": 1.25}, "adapter": "runs/ft-0001/adapter"}
    assert ex.links(run) == {}


def test_read_in_pieces_adds_up_to_the_whole(settings, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_S", "0.1")
    ex = LocalExecutor(settings)
    run = prepared_run(max_steps=8)
    start(ex, run, settings)
    events, lines, ec, lc = [], [], 0, 0
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, "the run did not finish in 120 s"
        finished = ex.status(run).status.finished
        batch = ex.read(run, ec, lc)
        events += batch.events
        lines += batch.log_lines
        ec, lc = batch.event_cursor, batch.log_cursor
        if finished:
            break
        time.sleep(0.05)  # a poll, not a spin: the trainer needs the CPU on a busy machine
    whole = ex.read(run, 0, 0)
    assert events == whole.events and lines == whole.log_lines
    assert [e["step"] for e in events if e["type"] == "step"] == list(range(1, 9))


def test_a_second_start_of_the_same_attempt_starts_nothing(settings):
    ex = LocalExecutor(settings)
    run = prepared_run(max_steps=2)
    first = start(ex, run, settings)
    second = start(ex, run, settings)
    assert first == second
    wait_for(lambda: ex.status(run).status.finished, 30, "the trainer to finish")
    log = (settings.workspace / "runs/ft-0001/train.log").read_text()
    assert log.count(f"{LOG_HEADER} attempt 1:") == 1
    assert sum(1 for e in ex.read(run, 0, 0).events if e["type"] == "start") == 1


def test_another_process_follows_the_execution(settings, monkeypatch):
    """A worker other than the one that started it sees it run and sees how it ended (it cannot wait for it)."""
    monkeypatch.setenv("FAKE_STEP_S", "0.3")
    ex = LocalExecutor(settings)
    run = prepared_run(max_steps=6)
    start(ex, run, settings)
    probe = textwrap.dedent(f"""
        import json, sys
        from jobs.core.domain import Run
        from jobs.backends.local.executor import LocalExecutor
        from jobs.core.settings import JobSettings
        run = Run.from_dict(json.loads(sys.argv[1]))
        print(LocalExecutor(JobSettings(workspace={str(settings.workspace)!r})).status(run).status)
    """)

    def status_elsewhere() -> str:
        out = subprocess.run([sys.executable, "-c", probe, json.dumps(run.to_dict())], capture_output=True,
                             text=True, check=True)
        return out.stdout.strip()

    assert status_elsewhere() == "running"
    wait_for(lambda: ex.status(run).status.finished, 30, "the trainer to finish")
    assert status_elsewhere() == "succeeded"


def test_a_failing_trainer_is_failed_with_its_log(settings, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL_AT", "3")
    ex = LocalExecutor(settings)
    run = prepared_run(max_steps=6)
    start(ex, run, settings)
    wait_for(lambda: ex.status(run).status.finished, 30, "the trainer to fail")
    info = ex.status(run)
    assert (info.status, info.exit_code, info.detail) == (ExecStatus.FAILED, 1, "the trainer exited with code 1")
    tail = ex.tail_logs(run, 3)
    assert tail == ["step 2 loss 2.500", "Traceback (most recent call last):", "RuntimeError: fake failure"]
    assert ex.outputs(run)["adapter"] == ""


def test_stop_ends_the_whole_process_group(settings, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_S", "0.5")
    ex = LocalExecutor(settings, grace_s=10)
    run, pgid = started_long_run(ex, settings)
    members = wait_for(lambda: [p for p in _group(pgid)] if len(_group(pgid)) == 2 else None, 10,
                       "launcher and trainer")
    ex.stop(run)
    assert all(gone(pid) for pid in members)
    info = ex.status(run)
    assert info.status is ExecStatus.STOPPED
    ex.stop(run)  # stopping again is harmless


def test_stop_kills_a_trainer_that_ignores_sigterm(settings, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_S", "0.5")
    monkeypatch.setenv("FAKE_IGNORE_TERM", "1")
    ex = LocalExecutor(settings, grace_s=1.0)
    run, pgid = started_long_run(ex, settings)
    members = _group(pgid)
    ex.stop(run)
    assert members and all(gone(pid) for pid in members)
    assert ex.status(run).status is ExecStatus.STOPPED


def test_a_trainer_killed_from_outside_is_failed(settings, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_S", "0.5")
    ex = LocalExecutor(settings)
    run = prepared_run(max_steps=100)
    start(ex, run, settings)
    wait_for(lambda: ex.status(run).status is ExecStatus.RUNNING, 10, "running")
    pgid = launch_group(settings)
    os.killpg(pgid, signal.SIGKILL)
    wait_for(lambda: ex.status(run).status.finished, 10, "the end to be seen")
    info = ex.status(run)
    assert info.status is ExecStatus.FAILED and "killed" in info.detail


def test_a_reused_pid_is_not_taken_for_the_trainer(settings):
    """The pid file names this very test process, but with another start time: it is not the trainer."""
    ex = LocalExecutor(settings)
    run = prepared_run()
    d = settings.workspace / "runs/ft-0001"
    d.mkdir(parents=True)
    (d / "attempt-1.claim").write_text("x")
    (d / "attempt-1.pid").write_text(f"{os.getpid()} 1\n")
    assert ex.status(run).status is ExecStatus.FAILED


def test_status_of_an_attempt_never_started(settings):
    ex = LocalExecutor(settings)
    run = prepared_run()
    assert ex.status(run).status is ExecStatus.UNKNOWN
    assert ex.tail_logs(run) == [] and ex.read(run, 0, 0).events == []
    ex.stop(run)  # nothing to stop


def test_the_trainer_does_not_get_the_bots_secrets(settings, monkeypatch):
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-not-for-the-trainer")
    monkeypatch.setenv("TUNEOPS_STORAGE_KEY", "c3RvcmFnZWtleQ==")
    monkeypatch.setenv("TUNEOPS_PROBE", "kept")
    monkeypatch.setenv("FAKE_STEP_S", "0.5")
    ex = LocalExecutor(settings)
    run, pgid = started_long_run(ex, settings)
    members = _group(pgid)
    assert len(members) == 2  # launcher and trainer
    for pid in members:
        environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        assert b"TUNEOPS_PROBE=kept" in environ
        assert not any(item.startswith((b"SLACK_", b"TUNEOPS_STORAGE_KEY")) for item in environ)
    ex.stop(run)


def test_a_secret_the_trainer_prints_never_reaches_the_log_file(settings, monkeypatch):
    canary = "hf_launcherCanary0123456789abcdefXYZ"
    monkeypatch.setenv("HF_TOKEN", canary)
    monkeypatch.setenv("FAKE_FAIL_AT", "2")
    monkeypatch.setenv("FAKE_LEAK", "1")
    ex = LocalExecutor(settings)
    run = prepared_run(max_steps=4)
    start(ex, run, settings)
    wait_for(lambda: ex.status(run).status.finished, 30, "the trainer to fail")
    log = (settings.workspace / "runs/ft-0001/train.log").read_text()
    assert "RuntimeError: fake failure with token ***" in log
    assert canary not in log


def launch_group(settings) -> int:
    """The process group of ft-0001's launch: the launcher's pid leads it."""
    return int((settings.workspace / "runs/ft-0001/attempt-1.pid").read_text().split()[0])


def started_long_run(ex: LocalExecutor, settings) -> tuple[Run, int]:
    """A 100-step fake run past its first event, and its launch's process group."""
    run = prepared_run(max_steps=100)
    start(ex, run, settings)
    wait_for(lambda: ex.read(run, 0, 0).events, 20, "the first event")
    return run, launch_group(settings)


def _group(pgid: int) -> list[int]:
    from jobs.core.procs import group_members

    return group_members(pgid)


def test_the_backend_is_picked_in_one_place(settings):
    import dataclasses

    from jobs.backends import get_backend
    from jobs.backends.local.backend import LocalBackend
    from jobs.core.errors import BackendError

    assert isinstance(get_backend(settings), LocalBackend) and isinstance(get_backend(settings), LocalExecutor)
    with pytest.raises(BackendError, match="set TUNEOPS_BACKEND to 'local' or 'aca'"):
        get_backend(dataclasses.replace(settings, backend="k8s"))
