"""The workers' counters in Redis (jobs.core.metrics), counted where runs change state and where Azure calls fail,
and the JSON log lines (jobs.core.logs)."""

from __future__ import annotations

import io
import json
import logging

import pytest
from azure.core.exceptions import HttpResponseError, ServiceRequestError

from jobs.backends.aca.errors import azure_call
from jobs.core import logs, metrics, store
from jobs.core.domain import Run, RunEvent, RunState
from jobs.core.errors import BackendError
from jobs.runs.progress import move


def commit(conn, run: Run, *dsts: RunState, backend: str = "aca") -> Run:
    """Save `run`, then move it through `dsts`, one update_run each, counting as the tasks do."""
    run.backend = backend
    store.create_run(conn, run, lambda position: [])
    for dst in dsts:
        metrics.count_run_changes(conn, store.update_run(conn, run.id, lambda r, dst=dst: [move(r, dst)]))
    return store.load_run(conn, run.id)


def test_runs_started_finished_failed_and_gpu_seconds_per_backend(settings):
    conn = store.connect(settings)
    ok = commit(conn, Run("ft-0001", "U1", "C1", "m", "d"), RunState.PREPARING, RunState.RUNNING,
                RunState.SUCCEEDED)
    commit(conn, Run("ft-0002", "U1", "C1", "m", "d"), RunState.PREPARING, RunState.RUNNING, RunState.FAILED)
    commit(conn, Run("ft-0003", "U1", "C1", "m", "d"), RunState.CANCELLED, backend="local")
    # nothing counted for a step that changed nothing, or for events that are not state changes
    metrics.count_run_changes(conn, None)
    metrics.count_run_changes(conn, (ok, [RunEvent(ok.id, "progress", {"step": 1})]))

    counts = metrics.read_counters(conn)
    assert counts["runs_started"] == {("aca",): 2}
    assert counts["runs_finished"] == {("aca", "succeeded"): 1, ("aca", "failed"): 1, ("local", "cancelled"): 1}
    assert counts["runs_failed"] == {("aca",): 1}
    assert 0 <= counts["gpu_seconds"][("aca",)] < 5
    assert not conn.hgetall(metrics.RUNNING_SINCE)  # each GPU clock stopped at the run's end


def test_gpu_seconds_count_each_attempt_once(settings):
    conn = store.connect(settings)
    run = commit(conn, Run("ft-0001", "U1", "C1", "m", "d"), RunState.PREPARING, RunState.RUNNING)
    conn.hset(metrics.RUNNING_SINCE, run.id, repr(run.started_at - 100))  # the first attempt ran 100 s
    metrics.count_run_changes(conn, store.update_run(conn, run.id, lambda r: [move(r, RunState.TIMED_OUT)]))
    # resumed: a second attempt of about 0 s; the first attempt's time is not counted again
    for dst in (RunState.QUEUED, RunState.PREPARING, RunState.RUNNING, RunState.SUCCEEDED):
        metrics.count_run_changes(conn, store.update_run(conn, run.id, lambda r, dst=dst: [move(r, dst)]))
    counts = metrics.read_counters(conn)
    assert 100 <= counts["gpu_seconds"][("aca",)] < 105
    assert counts["runs_started"] == {("aca",): 2}
    assert counts["runs_finished"] == {("aca", "timed_out"): 1, ("aca", "succeeded"): 1}


def test_azure_errors_are_counted_by_code(settings):
    err = HttpResponseError(message="quota")
    err.error_code = "ManagedEnvironmentGpuQuota"
    for exc in (err, err, ServiceRequestError("timed out")):
        with pytest.raises(BackendError), azure_call("start the job"):
            raise exc
    counts = metrics.read_counters(store.connect(settings))["azure_errors"]
    assert counts == {("ManagedEnvironmentGpuQuota",): 2, ("ServiceRequestError",): 1}


def test_counting_never_fails_a_task(settings):
    import redis

    dead = redis.Redis(port=1, socket_connect_timeout=0.2)
    run = Run("ft-0001", "U1", "C1", "m", "d", state=RunState.RUNNING)
    metrics.count_run_changes(dead, (run, [RunEvent(run.id, "state", {"state": "running", "previous": "preparing"})]))
    metrics.incr(dead, "runs_failed", ("local",))


def json_lines(*records: tuple[str, dict]) -> list[dict]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("tests.jsonlog")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for message, extra in records:
            logger.warning(message, extra=extra)
    finally:
        logger.removeHandler(handler)
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_log_lines_carry_the_run_and_request_ids():
    token = logs.run_id_var.set("ft-0042")
    try:
        [in_task] = json_lines(("tick", {}))
    finally:
        logs.run_id_var.reset(token)
    token = logs.request_id_var.set("1700000000-abcd")
    try:
        [named, plain] = json_lines(("ft-0007: could not start", {}), ("no run here", {}))
    finally:
        logs.request_id_var.reset(token)
    assert in_task["run_id"] == "ft-0042" and in_task["message"] == "tick" and in_task["level"] == "WARNING"
    assert named["run_id"] == "ft-0007" and named["request_id"] == "1700000000-abcd"
    assert "run_id" not in plain and plain["logger"] == "tests.jsonlog"


def test_log_format_setting():
    assert logs.log_format({}) == "text"
    assert logs.log_format({"TUNEOPS_LOG_FORMAT": " JSON "}) == "json"
    with pytest.raises(ValueError, match="TUNEOPS_LOG_FORMAT='xml'.*'text' or 'json'"):
        logs.log_format({"TUNEOPS_LOG_FORMAT": "xml"})


def test_gpu_seconds_count_every_gpu_of_a_run_on_several(settings):
    conn = store.connect(settings)
    run = commit(conn, Run("ft-0001", "U1", "C1", "m", "d", estimate={"gpus": 4}), RunState.PREPARING,
                 RunState.RUNNING)
    conn.hset(metrics.RUNNING_SINCE, run.id, repr(run.started_at - 100))  # 100 s on 4 GPUs (torchrun, NC96-A100)
    metrics.count_run_changes(conn, store.update_run(conn, run.id, lambda r: [move(r, RunState.SUCCEEDED)]))
    assert 400 <= metrics.read_counters(conn)["gpu_seconds"][("aca",)] < 420
