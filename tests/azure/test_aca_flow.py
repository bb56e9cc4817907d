"""A run through the whole jobs side on the ACA backend: submit, a real worker process (RQ, scheduler, forked job
processes) admits, syncs, starts the ACA job on the stand-in, follows progress on the share, and records the result."""

from __future__ import annotations

import os
import sys

import pytest

from jobs.backends.aca.provision import provision_finetune
from jobs.backends.aca.standin import ExecutionPlan, simulated_trainer
from jobs.core import store
from jobs.core.domain import RunState
from jobs.runs import service
from tests.azure import standin_worker
from tests.azure.conftest import wait_for


@pytest.fixture
def worker(settings, aca, tmp_path):
    env = {**os.environ, **aca.env, "REDIS_URL": settings.redis_url, "TUNEOPS_BACKEND": "aca",
           "TUNEOPS_WORKSPACE": str(settings.workspace), "TUNEOPS_MONITOR_INTERVAL": "0.2",
           "TUNEOPS_PYTHON": sys.executable, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    log = tmp_path / "worker.log"
    proc = standin_worker.start(env, log)
    yield proc, log
    standin_worker.stop(proc)


def test_a_run_through_the_worker_on_the_aca_backend(aca, settings, worker):
    provision_finetune(aca.clients)
    aca.standin.plan_execution(ExecutionPlan(program=simulated_trainer(steps=4, step_delay=0.1)))
    run = service.submit_run(settings, requester="U1", channel="C1", model="model-cache/tiny",
                             dataset="datasets/train.jsonl", max_steps=4)
    conn = store.connect(settings)
    proc, log = worker
    done = wait_for(lambda: (r := store.load_run(conn, run.id)) and r.state.terminal and r, 90,
                    f"{run.id} to finish", interval=0.2)
    assert done.state is RunState.SUCCEEDED, log.read_text()[-3000:]
    assert done.backend == "aca" and done.execution_id.startswith("tuneops-ft-")
    assert done.adapter_path == f"runs/{run.id}/adapter"
    # the estimate priced the job's GPU profile; the actual prices its GPU time the same way
    assert run.estimate["profile"] == "Consumption-GPU-NC24-A100" and run.estimate["usd"] > 0
    assert done.actual["gpu_s"] > 0 and done.actual["usd"] == pytest.approx(
        done.actual["gpu_s"] / 3600 * run.estimate["usd_per_gpu_hour"], abs=1e-3)
    events = store.run_events(conn, run.id)
    kinds = [e.kind for e in events]
    assert "started" in kinds and "progress" in kinds and "succeeded" in kinds
    assert kinds.index("started") < kinds.index("progress") < kinds.index("succeeded")
    started = next(e for e in events if e.kind == "started")
    assert started.data["execution_id"] == done.execution_id
    assert set(started.data["links"]) == {"job", "execution", "logs"}
    # One execution for the run, and the share holds its outputs.
    assert list(aca.standin.executions["tuneops-ft"]) == [done.execution_id]
    share = aca.standin.share_dir("tuneopsshare")
    assert (share / "runs" / run.id / "adapter" / "adapter_config.json").is_file()
    assert proc.poll() is None, "the worker died"
