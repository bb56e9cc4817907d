"""Fixtures for the jobs tests: a workspace per test, settings pointing at the session's Redis, and real RQ worker
processes (`python -m jobs.worker`) that a test can start, SIGKILL and replace. Nothing is left running afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import jobs.core.settings as jobs_settings
from jobs.core import store
from jobs.core.domain import Run, RunEvent, RunState
from jobs.core.settings import JobSettings
from jobs.runs.progress import move
from tests.conftest import make_workspace, wait_for  # noqa: F401  (wait_for: for the tests here)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
FAST = {"save_steps": 2, "eval_generations": 0}


def session_members(sid: int) -> list[int]:
    """Live processes of a worker's session `sid`: the worker, its scheduler and its job processes (which change
    group, not session). All are forks of `python -m jobs.worker`, which also tells them from a reused pid."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2:].split()
        if fields[0] not in ("Z", "X") and fields[3] == str(sid) and b"jobs.worker" in cmdline:
            out.append(int(entry.name))
    return out


def trainer_groups(workspace: Path) -> list[int]:
    """Process groups of every training launch in the workspace (the launcher's pid is its group id)."""
    groups = []
    for pid_file in workspace.glob("runs/*/attempt-*.pid"):
        groups.append(int(pid_file.read_text().split()[0]))
    return groups


@pytest.fixture
def workspace(tmp_path, tiny_model, example_dataset) -> Path:
    ws = make_workspace(tmp_path / "ws", tiny_model, example_dataset)
    yield ws
    # Never leave a trainer behind, whatever the test did; and never touch a process that merely got a reused pid:
    # only members of a launch's group that work in this workspace.
    from jobs.core.procs import group_members

    for pgid in trainer_groups(ws):
        for pid in group_members(pgid):
            try:
                if Path(os.readlink(f"/proc/{pid}/cwd")).is_relative_to(ws):
                    os.kill(pid, signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass


@pytest.fixture
def fake_trainer(monkeypatch):
    """Let trainers started from this process (and its workers) import tests/jobs/fake_train.py."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("FAKE_STEP_S", "0.05")


@pytest.fixture
def settings(redis_url, workspace):
    """Settings for the fake trainer; tests of the real trainer replace train_module."""

    s = JobSettings(redis_url=redis_url, workspace=workspace, max_running=2, monitor_interval_s=0.5,
                    python=sys.executable, train_module="fake_train", train_overrides=FAST)
    jobs_settings.configure(s)  # for tasks called in this process
    yield s
    jobs_settings.configure(None)


def settings_env(settings: JobSettings) -> dict[str, str]:
    import json

    return {
        "REDIS_URL": settings.redis_url,
        "TUNEOPS_BACKEND": settings.backend,
        "TUNEOPS_WORKSPACE": str(settings.workspace),
        "TUNEOPS_MAX_RUNNING": str(settings.max_running),
        "TUNEOPS_DEFAULT_MODEL": settings.default_model,
        "TUNEOPS_MONITOR_INTERVAL": str(settings.monitor_interval_s),
        "TUNEOPS_PYTHON": settings.python,
        "TUNEOPS_TRAIN_MODULE": settings.train_module,
        "TUNEOPS_TRAIN_OVERRIDES": json.dumps(dict(settings.train_overrides)),
    }


class Workers:
    """Real `python -m jobs.worker` processes, each in a session of its own so that a test can kill one outright."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen] = []

    def start(self, settings: JobSettings, **env: str) -> subprocess.Popen:
        full_env = {**os.environ, **settings_env(settings), **env}
        log = open(self.tmp_path / f"worker-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "jobs.worker"], cwd=ROOT, env=full_env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL the worker and everything of its session (its scheduler, a job in flight), as a crash would."""
        for pid in session_members(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(10)
        wait_for(lambda: not session_members(proc.pid), 10, "the killed worker's processes to go")

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
            for pid in session_members(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if proc.poll() is None:
                proc.wait(10)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.tmp_path.glob("worker-*.log")))


@pytest.fixture
def workers(tmp_path):
    w = Workers(tmp_path)
    yield w
    w.stop_all()


def events_of(settings: JobSettings, run_id: str) -> list[RunEvent]:
    return store.run_events(store.connect(settings), run_id)


def kinds(events: list[RunEvent]) -> list[str]:
    return [e.kind if e.kind != "state" else f"state:{e.data['state']}" for e in events]


def running(settings, run: Run, **changes) -> Run:
    """The run moved to preparing with `changes` set, and on to running when they give it an execution."""
    conn = store.connect(settings)

    def step(r):
        events = [move(r, RunState.PREPARING)]
        for key, value in changes.items():
            setattr(r, key, value)
        if r.execution_id:
            events.append(move(r, RunState.RUNNING))
        return events

    return store.update_run(conn, run.id, step)[0]
