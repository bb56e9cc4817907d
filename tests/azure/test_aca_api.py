"""The bot-facing functions of jobs.aca.api, with the clients the process would make from the environment."""

from __future__ import annotations

from jobs.aca import api
from jobs.domain import Run
from tests.azure.conftest import run_worker_burst


def test_the_secret_modal_path_and_listing(aca, settings):
    info = api.set_secret(settings, "WANDB_API_KEY", "wandb-value-123")
    assert info.vault_name == "wandb-api-key"
    assert [s.env_name for s in api.list_secrets(settings)] == ["WANDB_API_KEY"]
    op_id = api.enqueue_secret_reference(settings, "WANDB_API_KEY", "U1", "C1")
    api.set_op_thread(settings, op_id, "123.456")
    run_worker_burst(settings)
    op = api.get_op(settings, op_id)
    assert op.state == "succeeded" and op.kind == "secret" and op.target == "WANDB_API_KEY" and op.thread_ts == "123.456"
    env = aca.standin.jobs["tuneops-ft"]["properties"]["template"]["containers"][0]["env"]
    assert {"name": "WANDB_API_KEY", "secretRef": "wandb-api-key"} in env


def test_provision_logs_and_links(aca, settings):
    op_id = api.enqueue_provision(settings, "inference", "U1", "C1")
    run_worker_burst(settings)
    assert api.get_op(settings, op_id).state == "succeeded" and "tuneops-infer" in aca.standin.apps
    run = Run(id="ft-0001", requester="U1", channel="C1", model="m", dataset="d", execution_id="tuneops-ft-x1")
    aca.standin.add_log_rows("tuneops-ft", "tuneops-ft-x1", ["epoch 1", "epoch 2"])
    assert api.run_logs(settings, run, tail=1).lines == ["epoch 2"]
    assert set(api.portal_links(settings, run)) == {"job", "execution", "logs"}


def test_doctor_says_what_is_missing(aca, settings):
    checks = {what: (ok, detail) for what, ok, detail in api.doctor(settings)}
    assert checks["ACA job"] == (False, "the ACA job tuneops-ft does not exist: run `/finetune provision finetune`")
    assert checks["Azure Files share"] == (True, "tuneopsshare") and checks["Key Vault"][0]
    api.enqueue_provision(settings, "finetune", "U1", "C1")
    run_worker_burst(settings)
    assert dict((w, ok) for w, ok, _ in api.doctor(settings))["ACA job"] is True
