"""The local backend's endpoint per base model: two runs deployed at once answer through one server with their own
outputs, a misfit adapter is refused with the server's reason, undeploying one leaves the other answering, and the
last one out stops the server. The real payload.serve in a process, spoken to with the official openai client."""

from __future__ import annotations

import sys

import openai
import pytest

from jobs.backends.local import inference
from jobs.core import endpoints
from jobs.core.settings import JobSettings
from payload.tinymodel import build_tiny_adapter, build_tiny_model
from tests.jobs.test_jobs_approval import succeeded_run

QUESTION = [{"role": "user", "content": "Is the gateway healthy after the deploy?"}]


def answer(server: inference.Endpoint, model: str) -> str:
    client = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=60)
    reply = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=12, temperature=0)
    return reply.choices[0].message.content


@pytest.fixture
def local(settings) -> JobSettings:
    from dataclasses import replace

    return replace(settings, python=sys.executable, serve_host="127.0.0.1", serve_port=0)


def test_two_runs_share_one_endpoint_and_undeploy_one_at_a_time(local, tmp_path):
    ws = local.workspace
    runs = [succeeded_run(local) for _ in range(2)]
    for i, run in enumerate(runs, 1):
        build_tiny_adapter(ws / "model-cache" / "tiny", ws / run.adapter_path, seed=i)
    first = inference.serve_adapter(local, runs[0], {"approval": "dp-0001", "approved_by": "U0BOSS"})
    second = inference.serve_adapter(local, runs[1], {"approval": "dp-0002", "approved_by": "U0BOSS"})
    try:
        assert (first.pid, first.url) == (second.pid, second.url)  # one server for the base, not one per run
        outputs = {run.id: answer(second, run.id) for run in runs}
        base = answer(second, "tiny")
        assert len({*outputs.values(), base}) == 3, (outputs, base)

        # An adapter trained for another base is refused with the server's reason; the others keep answering.
        other = build_tiny_model(tmp_path / "other-base", hidden_size=32, layers=2)
        misfit = succeeded_run(local)
        build_tiny_adapter(other, ws / misfit.adapter_path, seed=9)
        with pytest.raises(inference.ServeError, match=f"refused the adapter of {misfit.id}: .*different base model"):
            inference.serve_adapter(local, misfit, {"approval": "dp-0003"})
        assert [e["name"] for e in endpoints.read_entries(ws, "model-cache/tiny")] == [r.id for r in runs]
        assert answer(second, runs[0].id) == outputs[runs[0].id]

        removed, stopped = inference.unserve_adapter(local, runs[0])
        assert removed["approval"] == "dp-0001" and not stopped
        with pytest.raises(openai.NotFoundError):
            answer(second, runs[0].id)
        assert answer(second, runs[1].id) == outputs[runs[1].id]

        removed, stopped = inference.unserve_adapter(local, runs[1])
        assert removed["run"] == runs[1].id and stopped
        assert inference.endpoint(local, "model-cache/tiny") is None and not second.alive()
        assert inference.unserve_adapter(local, runs[1]) == (None, False)
    finally:
        server = inference.endpoint(local, "model-cache/tiny")
        if server is not None:
            inference.stop_server(server)
