"""`/finetune logs RUN [--tail N] [--grep TEXT]` on the ACA backend: Log Analytics first, train.log as the fallback."""

from __future__ import annotations

import pytest

from jobs.backends.aca import share as sharefs
from jobs.backends.aca.logs import run_logs
from jobs.backends.aca.standin import Fault
from jobs.core.domain import Run
from jobs.core.errors import BackendError


def a_run(execution_id="tuneops-ft-abc1234"):
    return Run(id="ft-0001", requester="U1", channel="C1", model="m", dataset="d", execution_id=execution_id)


@pytest.mark.parametrize("schema", ["custom", "monitor"])
def test_logs_come_from_log_analytics_filtered_by_execution_tail_and_grep(aca, schema):
    aca.standin.log_schema = schema
    aca.standin.add_log_rows("tuneops-ft", "tuneops-ft-abc1234", [f"step {i} loss {1 / i:.2f}" for i in range(1, 9)]
                             + ['TUNEOPS_EVENT {"type":"step"}', "Warning: low disk"])
    aca.standin.add_log_rows("tuneops-ft", "tuneops-ft-other99", ["step 99 from another run"])
    got = run_logs(aca.clients, a_run(), tail=3)
    assert got.source == "Log Analytics"
    assert got.lines == ["step 7 loss 0.14", "step 8 loss 0.12", "Warning: low disk"]
    grep = run_logs(aca.clients, a_run(), tail=50, grep="STEP 1")
    assert grep.lines == ["step 1 loss 1.00"]


def test_while_log_analytics_lags_the_share_answers(aca):
    sharefs.write_bytes(aca.clients.share, "runs/ft-0001/train.log",
                        b"loading\nTUNEOPS_EVENT {\"type\":\"start\",\"ts\":1,\"total_steps\":2}\nstep 1\nstep 2\n")
    got = run_logs(aca.clients, a_run(), tail=2)
    assert got.source == "train.log on the share" and got.lines == ["step 1", "step 2"]
    assert "lags" in got.note
    assert run_logs(aca.clients, a_run(), grep="load").lines == ["loading"]
    no_ws = run_logs(aca.reload(LOG_ANALYTICS_WORKSPACE_ID=None).clients, a_run(), tail=5)
    assert no_ws.lines == ["loading", "step 1", "step 2"] and "LOG_ANALYTICS_WORKSPACE_ID" in no_ws.note


def test_bad_requests_and_unstarted_runs(aca):
    with pytest.raises(BackendError, match="--tail must be a whole number from 1 to 1000"):
        run_logs(aca.clients, a_run(), tail=0)
    with pytest.raises(BackendError, match="--grep takes one line"):
        run_logs(aca.clients, a_run(), grep="a\nb")
    assert "has not started" in run_logs(aca.clients, a_run(execution_id="")).note


def test_a_log_analytics_outage_is_retried_then_reported(aca):
    aca.standin.add_log_rows("tuneops-ft", "tuneops-ft-abc1234", ["hello"])
    flaky = aca.standin.inject(Fault("logs", path=r"/query$", status=503, retry_after=0.1))
    assert run_logs(aca.clients, a_run()).lines == ["hello"] and flaky.hits == 1
    aca.standin.inject(Fault("logs", path=r"/query$", status=503, times=20))
    with pytest.raises(BackendError, match="busy or failing.*Try again"):
        run_logs(aca.clients, a_run())
