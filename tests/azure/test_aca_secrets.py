"""Secrets: a value set through the modal's path reaches Key Vault and the job's references, and nowhere else."""

from __future__ import annotations

import logging
import pickle
import time

import pytest
import redis

from jobs.backends.aca import ops
from jobs.backends.aca.errors import azure_call
from jobs.backends.aca.executor import AcaExecutor
from jobs.backends.aca.provision import provision_finetune
from jobs.backends.aca.secrets import list_secrets, set_secret
from jobs.backends.aca.standin import ExecutionPlan, Fault, simulated_trainer
from jobs.backends.aca.standin.vault import RECOVER
from jobs.core import store
from jobs.core.domain import Run
from jobs.core.errors import BackendError
from jobs.core.runconfig import build_train_config
from tests.azure.conftest import run_worker_burst, wait_for

VALUE = "hf_Secr3tValue-that-must-not-leak-0123456789"
OLD_VALUE = "hf_the-old-value-deleted-from-the-vault-0000"


def everything_in_redis(url: str) -> bytes:
    r = redis.Redis.from_url(url)
    out = []
    for key in r.scan_iter(count=1000):
        out.append(key)
        kind = r.type(key)
        if kind == b"string":
            out.append(r.get(key) or b"")
        elif kind == b"hash":
            out += [b"%s=%s" % kv for kv in r.hgetall(key).items()]
        elif kind == b"list":
            out += r.lrange(key, 0, -1)
        elif kind == b"set":
            out += list(r.smembers(key))
        elif kind == b"zset":
            out += [m for m, _ in r.zrange(key, 0, -1, withscores=True)]
        elif kind == b"stream":
            for _, fields in r.xrange(key):
                out += [b"%s=%s" % kv for kv in fields.items()]
    return b"\n".join(out)


def run_to_the_end(aca, settings) -> tuple[AcaExecutor, Run]:
    """One run through the executor, waited for: what its container saw and printed is then in the stand-in."""
    ex = AcaExecutor(settings, clients=aca.clients)
    run = Run(id="ft-0001", requester="U1", channel="C1", model="model-cache/tiny", dataset="datasets/train.jsonl",
              attempts=1)
    run.execution_id = ex.start(run, build_train_config(run.id, run.model, run.dataset, {}).model_dump())
    wait_for(lambda: ex.status(run).status.finished, 20, "the run to end")
    return ex, run


def test_a_secret_set_reaches_key_vault_and_the_jobs_references_and_nothing_else(aca, settings, caplog):
    caplog.set_level(logging.DEBUG)
    provision_finetune(aca.clients)
    # What the modal handler does: write the value to Key Vault directly, then queue the reference by name.
    info = set_secret(aca.clients, "HF_TOKEN", VALUE)
    assert info.vault_name == "hf-token" and info.env_name == "HF_TOKEN" and info.updated_on is not None
    assert aca.standin.vault["hf-token"][-1]["value"] == VALUE
    # The Key Vault client did the challenge handshake: a first request without a token got a 401.
    vault_requests = aca.standin.requests_to("vault")
    assert "Authorization" not in vault_requests[0].headers and "Authorization" in vault_requests[-1].headers

    op_id = ops.enqueue_secret_reference(settings, "HF_TOKEN", "U_ADMIN", "C1")
    run_worker_burst(settings)
    last = store.run_events(store.connect(settings), op_id)[-1]
    assert last.kind == "succeeded" and any("hf-token" in c for c in last.data["changes"])

    job = aca.standin.jobs["tuneops-ft"]
    secrets = job["properties"]["configuration"]["secrets"]
    assert secrets == [{"name": "hf-token", "keyVaultUrl": f"{aca.standin.vault_url}/secrets/hf-token",
                        "identity": aca.cfg.identity_id}]
    assert {"name": "HF_TOKEN", "secretRef": "hf-token"} in job["properties"]["template"]["containers"][0]["env"]

    # A run's container gets the value through the reference.
    ex, run = run_to_the_end(aca, settings)
    assert aca.standin.execution_env[run.execution_id]["HF_TOKEN"] == VALUE
    assert "HF_TOKEN set: yes" in ex.tail_logs(run, 20)

    # Nowhere else: Redis (records, streams, RQ jobs and their pickled arguments), logs, ARM requests.
    assert VALUE.encode() not in everything_in_redis(settings.redis_url)
    assert VALUE not in caplog.text
    for r in aca.standin.requests_to("arm"):
        assert VALUE.encode() not in r.body and VALUE not in str(r.query)
    job_ids = redis.Redis.from_url(settings.redis_url).keys("rq:job:*")
    assert job_ids and all(VALUE.encode() not in pickle.dumps(redis.Redis.from_url(settings.redis_url).hgetall(k))
                           for k in job_ids)


def test_list_shows_names_and_dates_never_values(aca):
    set_secret(aca.clients, "WANDB_API_KEY", VALUE)
    set_secret(aca.clients, "HF_TOKEN", "other-value")
    listed = list_secrets(aca.clients)
    assert [s.env_name for s in listed] == ["HF_TOKEN", "WANDB_API_KEY"]
    assert all(s.updated_on and s.tagged for s in listed)
    text = "\n".join(s.describe() for s in listed)
    assert "HF_TOKEN (Key Vault: hf-token), updated " in text
    assert VALUE not in text and "other-value" not in text and VALUE not in repr(listed)
    # Listing never asks Key Vault for a value.
    assert not aca.standin.requests_to("vault", "GET", r"/secrets/[^/]+$")


@pytest.mark.parametrize("name,value,expect", [
    ("hf token", "x", "not a valid secret name"),
    ("HF_TOKEN", "", "is empty"),
    ("HF_TOKEN", " padded ", "starts or ends with spaces"),
    ("HF_TOKEN", "x" * 30000, "longer than Key Vault allows"),
])
def test_bad_input_gets_a_clear_message_and_writes_nothing(aca, name, value, expect):
    with pytest.raises(BackendError, match=expect) as e:
        set_secret(aca.clients, name, value)
    assert value.strip() not in str(e.value) or not value.strip()
    assert aca.standin.vault == {}


def test_a_key_vault_that_refuses_says_which_role_is_missing(aca, caplog):
    aca.standin.inject(Fault("vault", path=r"/secrets/hf-token", method="PUT", status=403, code="Forbidden",
                             message="Caller is not authorized to perform action on resource."))
    with pytest.raises(BackendError, match="not allowed to.*infra/README.md") as e:
        set_secret(aca.clients, "HF_TOKEN", VALUE)
    assert VALUE not in str(e.value) and VALUE not in caplog.text


def test_a_reference_needs_the_vault_and_identity_configured(aca, settings):
    provision_finetune(aca.clients)
    a = aca.reload(IDENTITY_ID=None)
    op_id = ops.enqueue_secret_reference(settings, "HF_TOKEN", "U1", "C1")
    run_worker_burst(settings)
    last = store.run_events(store.connect(settings), op_id)[-1]
    assert last.kind == "failed" and "IDENTITY_ID" in last.data["error"]
    assert a.cfg.identity_id == ""
    with pytest.raises(BackendError, match="not a valid secret name"):
        ops.enqueue_secret_reference(settings, "bad name", "U1", "C1")


def test_provision_picks_up_the_vaults_secrets(aca):
    set_secret(aca.clients, "WANDB_API_KEY", VALUE)
    provision_finetune(aca.clients)
    env = aca.standin.jobs["tuneops-ft"]["properties"]["template"]["containers"][0]["env"]
    assert {"name": "WANDB_API_KEY", "secretRef": "wandb-api-key"} in env


def test_a_secret_the_container_prints_is_masked_before_it_leaves_the_executor(aca, settings):
    set_secret(aca.clients, "HF_TOKEN", VALUE)
    provision_finetune(aca.clients)
    aca.standin.plan_execution(ExecutionPlan(program=simulated_trainer(fail_at_step=3, leak_env="HF_TOKEN")))
    ex, run = run_to_the_end(aca, settings)
    assert VALUE in (aca.standin.share_dir("tuneopsshare") / "runs" / "ft-0001" / "train.log").read_text()
    batch = ex.read(run, 0, 0)
    assert "debug: HF_TOKEN=***" in batch.log_lines
    error = next(e for e in batch.events if e["type"] == "error")
    assert error["message"] == "CUDA out of memory (***)"
    assert "debug: HF_TOKEN=***" in ex.tail_logs(run, 20)
    from jobs.backends.aca.logs import run_logs

    answer = run_logs(aca.clients, run, tail=50)
    assert "debug: HF_TOKEN=***" in answer.lines and not any(VALUE in line for line in answer.lines)


def set_then_delete(aca) -> None:
    """HF_TOKEN written, then deleted as an admin would in the portal: soft-deleted, its name still taken."""
    set_secret(aca.clients, "HF_TOKEN", OLD_VALUE)
    aca.clients.secrets.begin_delete_secret("hf-token").wait()
    assert "hf-token" not in aca.standin.vault and "hf-token" in aca.standin.deleted_secrets


def test_setting_a_deleted_secrets_name_recovers_it_then_writes_the_new_value(aca, settings, caplog):
    caplog.set_level(logging.DEBUG)
    provision_finetune(aca.clients)
    set_then_delete(aca)
    # Key Vault takes a while: GETs answer 404 for a second, and PUTs 409 ObjectIsBeingRecovered a little longer.
    aca.standin.vault_recovery_s, aca.standin.vault_recovery_put_lag_s = 1.0, 1.5

    info = set_secret(aca.clients, "HF_TOKEN", VALUE)
    assert info.vault_name == "hf-token" and info.updated_on is not None
    versions = aca.standin.vault["hf-token"]
    assert [v["value"] for v in versions] == [OLD_VALUE, VALUE] and versions[-1]["tags"] == {"tuneops-env": "HF_TOKEN"}
    assert len(aca.standin.requests_to("vault", "POST", r"^/deletedsecrets/hf-token/recover$")) == 1
    assert len(aca.standin.requests_to("vault", "GET", r"^/secrets/hf-token/$")) >= 2   # the poller saw a 404 first
    assert len(aca.standin.requests_to("vault", "PUT", r"^/secrets/hf-token$")) >= 3    # deleted, recovering, written

    # The job's reference resolves the new value.
    ops.enqueue_secret_reference(settings, "HF_TOKEN", "U_ADMIN", "C1")
    run_worker_burst(settings)
    ex, run = run_to_the_end(aca, settings)
    assert aca.standin.execution_env[run.execution_id]["HF_TOKEN"] == VALUE
    assert VALUE not in caplog.text and OLD_VALUE not in caplog.text


def test_a_refused_recovery_says_which_role_or_how_to_purge_and_leaks_no_value(aca, caplog):
    caplog.set_level(logging.DEBUG)
    set_then_delete(aca)
    aca.standin.deny_vault_actions(RECOVER)
    with pytest.raises(BackendError) as e:
        set_secret(aca.clients, "HF_TOKEN", VALUE)
    said = str(e.value)
    vault = "127"  # the stand-in's vault URL is https://127.0.0.1:PORT; a real one is https://NAME.vault.azure.net
    assert "deleted secret named hf-token" in said and '"Key Vault Secrets Officer" role' in said
    assert f"`az keyvault secret purge --vault-name {vault} --name hf-token`" in said
    purge_on = aca.standin.deleted_secrets["hf-token"]["scheduledPurgeDate"]
    assert time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(purge_on)) in said
    assert "try again in a minute" not in said and not e.value.transient
    assert VALUE not in said and VALUE not in caplog.text and VALUE not in repr(e.value.__cause__)

    # Following the advice works: purge, then save again.
    aca.clients.secrets.purge_deleted_secret("hf-token")
    set_secret(aca.clients, "HF_TOKEN", VALUE)
    assert [v["value"] for v in aca.standin.vault["hf-token"]] == [VALUE]


def test_a_deleted_secrets_409_says_how_to_free_the_name(aca):
    """What any caller that writes a soft-deleted name without recovering it first is told."""
    set_then_delete(aca)
    with pytest.raises(BackendError) as e, azure_call("write the secret hf-token to Key Vault"):
        aca.clients.secrets.set_secret("hf-token", VALUE)
    said = str(e.value)
    assert "Azure said: Conflict: Secret hf-token is currently in a deleted but recoverable state" in said
    assert "deleted secret named hf-token" in said
    assert "`az keyvault secret recover --vault-name 127 --name hf-token`" in said
    assert "`az keyvault secret purge --vault-name 127 --name hf-token`" in said
    assert "try again in a minute" not in said and not e.value.transient and VALUE not in said
