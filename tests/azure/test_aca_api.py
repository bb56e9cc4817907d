"""The aca backend as the bot and the deploys see it (jobs.backends.get_backend), with the clients the process would
make from the environment."""

from __future__ import annotations

from bot.threads import OP_ROOT, Threads
from jobs.backends import get_backend
from jobs.backends.aca.backend import AcaBackend
from jobs.core import store
from jobs.core.domain import Run
from jobs.core.errors import Hint
from tests.azure.conftest import run_worker_burst


def test_the_secret_modal_path_and_listing(aca, settings):
    backend = get_backend(settings)
    assert isinstance(backend, AcaBackend)
    info = backend.set_secret("WANDB_API_KEY", "wandb-value-123")
    assert info.vault_name == "wandb-api-key"
    assert [s.env_name for s in backend.list_secrets()] == ["WANDB_API_KEY"]
    op_id = backend.enqueue_secret_reference("WANDB_API_KEY", "U1", "C1")
    Threads(settings).set(OP_ROOT, op_id, "123.456")  # the bot's record of the op's thread, not the op's
    run_worker_burst(settings)
    op = store.load_op(store.connect(settings), op_id)
    assert op.state == "succeeded" and op.kind == "secret" and op.target == "WANDB_API_KEY"
    assert Threads(settings).get(OP_ROOT, op_id) == "123.456" and "ts" not in vars(op)
    env = aca.standin.jobs["tuneops-ft"]["properties"]["template"]["containers"][0]["env"]
    assert {"name": "WANDB_API_KEY", "secretRef": "wandb-api-key"} in env


def test_provision_logs_and_links(aca, settings):
    backend = get_backend(settings)
    op_id = backend.enqueue_provision("inference", "U1", "C1")
    run_worker_burst(settings)
    assert store.load_op(store.connect(settings), op_id).state == "succeeded" and "tuneops-infer" in aca.standin.apps
    run = Run(id="ft-0001", requester="U1", channel="C1", model="m", dataset="d", execution_id="tuneops-ft-x1")
    aca.standin.add_log_rows("tuneops-ft", "tuneops-ft-x1", ["epoch 1", "epoch 2"])
    assert backend.run_logs(run, 1, None).lines == ["epoch 2"]
    assert set(backend.links(run)) == {"job", "execution", "logs"}


def test_doctor_says_what_is_missing(aca, settings):
    checks = {c.what: (c.ok, c.detail, c.hint) for c in get_backend(settings).doctor()}
    assert checks["ACA job"] == (False, "the ACA job tuneops-ft does not exist", Hint("provision finetune"))
    assert checks["Azure Files share"] == (True, "tuneopsshare", None) and checks["Key Vault"][0]
    get_backend(settings).enqueue_provision("finetune", "U1", "C1")
    run_worker_burst(settings)
    assert {c.what: c.ok for c in get_backend(settings).doctor()}["ACA job"] is True
