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
    first = inference.serve_adapter(local, runs[0], endpoints.new_entry(runs[0].id, "", "dp-0001", "U0ASK"))
    second = inference.serve_adapter(local, runs[1], endpoints.new_entry(runs[1].id, "", "dp-0002", "U0ASK"))
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
            inference.serve_adapter(local, misfit, endpoints.new_entry(misfit.id, "", "dp-0003", "U0ASK"))
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
        # What each model served, as the server recorded it on its way out (a request refused with 404 is not).
        assert endpoints.served_here(ws, "model-cache/tiny") == {runs[0].id: 2, runs[1].id: 2, "tiny": 1}
    finally:
        server = inference.endpoint(local, "model-cache/tiny")
        if server is not None:
            inference.stop_server(server)


def test_undeploy_takes_one_run_down_and_says_who_may(local):
    import jobs.core.settings as jobs_settings
    from jobs.core.errors import RunRejected
    from jobs.deploys import approval, deploy

    jobs_settings.configure(local)  # the deploy task reads the current settings, as on a worker
    ws = local.workspace
    runs = [succeeded_run(local) for _ in range(2)]
    requests = []
    for i, run in enumerate(runs, 1):
        build_tiny_adapter(ws / "model-cache" / "tiny", ws / run.adapter_path, seed=i)
        req = approval.request_deploy(local, run.id, "U0ALICE", "C0TRAIN")
        approval.decide(local, req.id, "U0BOSS", True, frozenset({"U0BOSS"}))
        assert deploy.deploy_approved(req.id) == "deployed"
        requests.append(approval.get_approval(local, req.id))
    server = inference.endpoint(local, "model-cache/tiny")
    try:
        assert {r.url for r in requests} == {server.url}
        approvers, admins = frozenset({"U0BOSS"}), frozenset({"U0ADMIN"})
        with pytest.raises(RunRejected, match=r"only approvers, admins or whoever asked for its deploy \(dp-0001\)"):
            deploy.undeploy(local, runs[0].id, "U0MALLORY", approvers, admins)
        with pytest.raises(RunRejected, match="there is no run ft-0099"):
            deploy.undeploy(local, "ft-0099", "U0BOSS", approvers, admins)

        taken, stopped = deploy.undeploy(local, runs[0].id, "U0ALICE", approvers, admins)  # who asked for it
        assert taken.id == requests[0].id and not stopped
        assert approval.get_approval(local, taken.id).state is approval.ApprovalState.UNDEPLOYED
        with pytest.raises(openai.NotFoundError):
            answer(server, runs[0].id)
        assert answer(server, runs[1].id)
        with pytest.raises(RunRejected, match=f"{runs[0].id} is not deployed"):
            deploy.undeploy(local, runs[0].id, "U0BOSS", approvers, admins)

        _, stopped = deploy.undeploy(local, runs[1].id, "U0ADMIN", approvers, admins)
        assert stopped and not server.alive()
    finally:
        if server.alive():
            inference.stop_server(server)
