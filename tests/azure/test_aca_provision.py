"""Provisioning the job and the inference app, deploying an adapter, and the RQ ops that report it in a thread."""

from __future__ import annotations

import json
import threading
import time

import pytest
from azure.core.exceptions import HttpResponseError

from jobs.backends.aca import endpoints as aca_endpoints
from jobs.backends.aca import ops
from jobs.backends.aca.backend import AcaBackend
from jobs.backends.aca.provision import (
    ensure_secret_reference,
    provision_finetune,
    provision_inference,
)
from jobs.backends.aca.resources import job_body
from jobs.backends.aca.standin import SUBSCRIPTION, Fault
from jobs.core import endpoints as core_endpoints
from jobs.core import store
from jobs.core.domain import Run
from jobs.core.errors import BackendError
from payload.serving.manifest import parse_manifest
from tests.azure.conftest import ENV_STORAGE, run_worker_burst


def test_provision_twice_gives_one_job_and_says_what_changed(aca):
    first = provision_finetune(aca.clients)
    assert first.created and first.summary().startswith("Created the ACA job tuneops-ft")
    job = aca.standin.jobs["tuneops-ft"]
    p = job["properties"]
    assert p["workloadProfileName"] == "GPU" and p["configuration"]["triggerType"] == "Manual"
    assert p["configuration"]["replicaTimeout"] == 10800 and p["configuration"]["replicaRetryLimit"] == 0
    assert p["configuration"]["manualTriggerConfig"]["parallelism"] == 1
    assert p["template"]["volumes"][0]["storageName"] == ENV_STORAGE
    assert p["template"]["containers"][0]["volumeMounts"][0]["mountPath"] == "/mount"

    second = provision_finetune(aca.clients)
    assert not second.created and second.changes == []
    assert "already up to date" in second.summary()
    assert list(aca.standin.jobs) == ["tuneops-ft"]
    puts = aca.standin.requests_to("arm", "PUT", r"/jobs/tuneops-ft$")
    assert len(puts) == 1  # nothing changed, nothing written

    changed = provision_finetune(aca.reload(IMAGE="reg.io/tuneops-payload:2", REPLICA_TIMEOUT=7200).clients)
    assert "replica timeout: 10800 → 7200" in changed.changes
    assert any(c.startswith("image:") and "reg.io/tuneops-payload:2" in c for c in changed.changes)
    assert aca.standin.jobs["tuneops-ft"]["properties"]["configuration"]["replicaTimeout"] == 7200
    assert len(aca.standin.jobs) == 1


def test_what_azure_gives_back_in_its_own_spelling_is_no_change(aca):
    """Defect: real GETs give identity ids back in lower case and fill in defaults such as ingress transport "auto";
    every provisioning then saw a change, PUT again (listing one identity twice) and posted noise."""
    provision_finetune(aca.clients)
    provision_inference(aca.clients)
    job = aca.clients.arm.jobs.get("tuneops-rg", "tuneops-ft").as_dict()
    assert all(k == k.lower() for k in job["identity"]["userAssignedIdentities"])  # the stand-in answers as Azure does
    app = aca.clients.arm.container_apps.get("tuneops-rg", "tuneops-infer").as_dict()
    assert app["properties"]["configuration"]["ingress"]["transport"] == "auto"
    puts = len(aca.standin.requests_to("arm", "PUT"))

    again, app_again = provision_finetune(aca.clients), provision_inference(aca.clients)
    assert again.changes == [] and app_again.changes == [] and "already up to date" in again.summary()
    assert len(aca.standin.requests_to("arm", "PUT")) == puts

    # A real change still goes through, and the identity is listed once, in the configured spelling.
    provision_finetune(aca.reload(REPLICA_TIMEOUT=7200).clients)
    sent = json.loads(aca.standin.requests_to("arm", "PUT", r"/jobs/tuneops-ft$")[-1].body)
    assert list(sent["identity"]["userAssignedIdentities"]) == [aca.cfg.identity_id]


def test_a_run_staged_into_the_job_is_not_a_change_to_provision(aca, settings):
    from jobs.backends.aca.executor import AcaExecutor
    from jobs.core.domain import Run
    from jobs.core.runconfig import build_train_config

    provision_finetune(aca.clients)
    run = Run(id="ft-0001", requester="U1", channel="C1", model="model-cache/tiny", dataset="datasets/train.jsonl")
    AcaExecutor(settings, clients=aca.clients).start(run, build_train_config(
        run.id, run.model, run.dataset, {"max_steps": 2}).model_dump())
    puts = len(aca.standin.requests_to("arm", "PUT", r"/jobs/tuneops-ft$"))
    assert provision_finetune(aca.clients).changes == []
    assert len(aca.standin.requests_to("arm", "PUT", r"/jobs/tuneops-ft$")) == puts
    # A provisioning that does change the job leaves the run's env out of it.
    provision_finetune(aca.reload(REPLICA_TIMEOUT=7200).clients)
    env = aca.standin.jobs["tuneops-ft"]["properties"]["template"]["containers"][0]["env"]
    assert not any(e["name"].startswith("TUNEOPS_") for e in env)


def test_a_seed_provisioned_job_keeps_its_mount_and_gets_our_settings(aca):
    # What the seed's Bicep made: its own volume name, no identity, no secrets.
    env_id = aca.standin.environments["tuneops-env"]["id"]
    aca.standin.jobs["tuneops-ft"] = {
        "id": "x", "name": "tuneops-ft", "location": "westus3", "identity": {"type": "None"},
        "properties": {"environmentId": env_id, "workloadProfileName": "GPU",
                       "configuration": {"triggerType": "Manual", "replicaTimeout": 10800, "replicaRetryLimit": 0,
                                         "secrets": [{"name": "legacy", "value": "kept-value"}]},
                       "template": {"containers": [{"name": "tuneops-ft", "image": "img", "command": ["x"],
                                                    "volumeMounts": [{"volumeName": "seedvol",
                                                                      "mountPath": "/mount"}]}],
                                    "volumes": [{"name": "seedvol", "storageType": "AzureFile",
                                                 "storageName": ENV_STORAGE}]}}}
    aca.standin.executions["tuneops-ft"] = {}
    a = aca.reload(ACA_ENVIRONMENT_NAME=None, ACA_ENVIRONMENT_STORAGE_NAME=None)
    result = provision_finetune(a.clients)
    assert not result.created and result.changes
    job = aca.standin.jobs["tuneops-ft"]
    assert job["properties"]["template"]["volumes"][0]["name"] == "seedvol"
    assert job["identity"]["type"] == "UserAssigned"
    # A plain secret someone else put there survives the PUT (its value came from listSecrets).
    assert {"name": "legacy", "value": "kept-value"} in job["properties"]["configuration"]["secrets"]


def test_missing_environment_profile_or_storage_are_clear_errors(aca):
    with pytest.raises(BackendError, match="environment nope does not exist.*finetuning.bicep"):
        provision_finetune(aca.reload(ACA_ENVIRONMENT_NAME="nope").clients)
    with pytest.raises(BackendError, match="no workload profile 'A100'.*Consumption, GPU"):
        provision_finetune(aca.reload(WORKLOAD_PROFILE_NAME="A100").clients)
    a = aca.reload(ACA_ENVIRONMENT_STORAGE_NAME="newstorage")
    notes = []
    provision_finetune(a.clients, notes.append)  # the storage key is in the env: tuneops adds the storage
    assert ("tuneops-env", "newstorage") in aca.standin.env_storages
    assert any("adding the share" in n for n in notes)
    a.env.pop("TUNEOPS_STORAGE_KEY")
    with pytest.raises(BackendError, match="no storage other.*TUNEOPS_STORAGE_KEY"):
        provision_finetune(a.reload(ACA_ENVIRONMENT_STORAGE_NAME="other").clients)


def test_provision_inference_serves_on_7860_scales_to_zero_and_records_the_endpoint(aca):
    result = provision_inference(aca.clients)
    app = aca.standin.apps["tuneops-infer"]
    p = app["properties"]
    assert p["configuration"]["ingress"]["external"] is True and p["configuration"]["ingress"]["targetPort"] == 7860
    assert p["template"]["scale"] == {"minReplicas": 0, "maxReplicas": 2}
    assert {pr["httpGet"]["path"] for pr in p["template"]["containers"][0]["probes"]} == {"/healthz"}
    assert result.endpoint == "https://tuneops-infer.tuneops-env.westus3.azurecontainerapps.io"
    recorded = json.loads((aca.infra / "inference.config.json").read_text())
    assert recorded["ACA_APP_ENDPOINT"] == result.endpoint and recorded["MAX_REPLICAS"] == 2
    assert provision_inference(aca.clients).changes == [] and len(aca.standin.apps) == 1


def adapter_on_share(aca, run_id: str, base: str = "model-cache/tiny") -> Run:
    """A finished run whose adapter the job left on the share (what the trainer writes of it that a deploy reads)."""
    adapter = aca.standin.share_dir(aca.cfg.file_share) / "runs" / run_id / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8,
                                                             "base_model_name_or_path": f"/mount/{base}"}))
    return Run(id=run_id, requester="U0ALICE", channel="C0TRAIN", model=base, dataset="datasets/chat.jsonl",
               name=f"{run_id}-name", adapter_path=f"runs/{run_id}/adapter")


def share_manifest(aca, base: str) -> list[dict]:
    path = aca.standin.share_dir(aca.cfg.file_share) / core_endpoints.manifest_rel(base)
    return json.loads(path.read_text())["adapters"]


def test_deploys_add_adapters_to_their_base_models_app_by_manifest_without_restarts(aca, settings):
    conn = store.connect(settings)
    first, second = adapter_on_share(aca, "ft-0001"), adapter_on_share(aca, "ft-0002")
    other = adapter_on_share(aca, "ft-0003", base="Qwen/Qwen2.5-0.5B-Instruct")

    # No app yet: the first deploy creates ACA_APP_NAME, scaled to zero, following the base's manifest.
    served = aca_endpoints.serve_adapter(aca.clients, conn, first, core_endpoints.new_entry("ft-0001", "", "dp-1", "U1"))
    assert served.app == "tuneops-infer" and served.result.created
    p = aca.standin.apps["tuneops-infer"]["properties"]
    assert p["template"]["scale"]["minReplicas"] == 0
    command = p["template"]["containers"][0]["command"][2]
    assert "--base model-cache/tiny --base-only --adapters deployments/model-cache--tiny/adapters.json" in command
    assert served.endpoint == "https://tuneops-infer.tuneops-env.westus3.azurecontainerapps.io"
    assert json.loads((aca.infra / "inference.config.json").read_text())["ACA_APP_ENDPOINT"] == served.endpoint
    assert served.result.summary().startswith("ft-0001 is on the endpoint of model-cache/tiny. Created")

    # The second adapter of the same base: one file write on the share, nothing written to ARM, no restart.
    puts = len(aca.standin.requests_to("arm", "PUT"))
    again = aca_endpoints.serve_adapter(aca.clients, conn, second, core_endpoints.new_entry(
        "ft-0002", second.name, "dp-2", "U2"))
    assert again.app == "tuneops-infer" and not again.result.created and again.result.changes == []
    assert "with 1 other adapter." in again.result.summary()
    assert len(aca.standin.requests_to("arm", "PUT")) == puts and aca.standin.restarts == []
    entries = share_manifest(aca, "model-cache/tiny")
    assert [(e["name"], e["path"], e["aliases"]) for e in entries] == [
        ("ft-0001", "../../runs/ft-0001/adapter", []), ("ft-0002", "../../runs/ft-0002/adapter", ["ft-0002-name"])]
    # What the server makes of the file, from the share's root as its replicas mount it.
    share = aca.standin.share_dir(aca.cfg.file_share)
    manifest = share / core_endpoints.manifest_rel("model-cache/tiny")
    parsed, refused = parse_manifest(manifest.read_text(), manifest.parent)
    assert refused == {} and [e.path.resolve() for e in parsed] == [
        (share / "runs/ft-0001/adapter").resolve(), (share / "runs/ft-0002/adapter").resolve()]

    # Another base model gets an app of its own; ACA_APP_NAME keeps serving the first.
    third = aca_endpoints.serve_adapter(aca.clients, conn, other, core_endpoints.new_entry("ft-0003", "", "dp-3", "U1"))
    assert third.app == aca_endpoints.derived_app_name("tuneops-infer", other.model) != "tuneops-infer"
    assert len(third.app) <= 32 and third.app.startswith("tuneops-infer-")
    assert "--adapters deployments/Qwen--Qwen2.5-0.5B-Instruct/adapters.json" in json.dumps(
        aca.standin.apps[third.app])
    assert aca_endpoints.app_for(aca.clients, "model-cache/tiny")[0] == "tuneops-infer"
    # A provision afterwards keeps what the deploys put there.
    assert provision_inference(aca.clients).changes == []

    # Undeploy: out of the manifest, nothing written to ARM, the app left to scale to zero.
    puts = len(aca.standin.requests_to("arm", "PUT"))
    backend = AcaBackend(settings, clients=aca.clients)
    assert backend.undeploy(first) is False
    assert [e["name"] for e in share_manifest(aca, "model-cache/tiny")] == ["ft-0002"]
    assert len(aca.standin.requests_to("arm", "PUT")) == puts and "tuneops-infer" in aca.standin.apps
    assert aca_endpoints.remove_adapter(aca.clients, conn, first) is None  # not there any more

    # Requests served, summed over every replica's record beside the manifest; nothing wakes the app.
    folder = manifest.parent / core_endpoints.SERVED
    folder.mkdir()
    (folder / "tuneops-infer--abc-1-100.json").write_text(json.dumps({"requests": {"ft-0001": 4, "ft-0002": 1},
                                                                       "started": 100.0, "updated": 700.0}))
    (folder / "tuneops-infer--def-1-200.json").write_text(json.dumps({"requests": {"ft-0002": 2}}))
    assert backend.requests_served("model-cache/tiny") == {"ft-0001": 4, "ft-0002": 3}
    assert backend.requests_served(other.model) == {}
    # and how long each replica ran, for the month's GPU spend, priced at the inference app's profile
    profile, periods = backend.inference_usage()
    assert periods == [[100.0, 700.0]] and profile.name == "Consumption-GPU-NC24-A100" and profile.gpus == 1


def test_a_deploy_of_an_adapter_that_is_not_there_or_for_another_base_is_refused(aca, settings):
    conn = store.connect(settings)
    served = adapter_on_share(aca, "ft-0001")
    aca_endpoints.serve_adapter(aca.clients, conn, served, core_endpoints.new_entry("ft-0001", "", "dp-1", "U1"))
    missing = Run(id="ft-0002", requester="U0ALICE", channel="C0TRAIN", model="model-cache/tiny",
                  dataset="datasets/chat.jsonl", adapter_path="runs/ft-0002/adapter")
    with pytest.raises(BackendError, match="the adapter of ft-0002 is not on the share at runs/ft-0002/adapter"):
        aca_endpoints.serve_adapter(aca.clients, conn, missing, core_endpoints.new_entry("ft-0002", "", "dp-2", "U1"))
    misfit = adapter_on_share(aca, "ft-0003", base="Qwen/Qwen2.5-0.5B-Instruct")
    misfit.model = "model-cache/tiny"  # trained on Qwen, asked to be served on tiny
    with pytest.raises(BackendError, match="trained on /mount/Qwen/Qwen2.5-0.5B-Instruct, not on model-cache/tiny"):
        aca_endpoints.serve_adapter(aca.clients, conn, misfit, core_endpoints.new_entry("ft-0003", "", "dp-3", "U1"))
    assert [e["name"] for e in share_manifest(aca, "model-cache/tiny")] == ["ft-0001"]


def test_an_adapter_whose_shapes_do_not_fit_its_base_is_refused_in_one_line(aca, settings, tiny_model, tmp_path):
    """The base in the model cache on the share (sharded, as large models are), a real adapter of it, and one of a
    wider model whose adapter_config.json names the same base: only the safetensors headers tell them apart."""
    import re

    from transformers import AutoModelForCausalLM

    from payload.tinymodel import build_tiny_adapter, build_tiny_model

    share = aca.standin.share_dir(aca.cfg.file_share)
    AutoModelForCausalLM.from_pretrained(tiny_model).save_pretrained(share / "model-cache/tiny", max_shard_size="100KB")
    assert (share / "model-cache/tiny/model.safetensors.index.json").is_file()
    build_tiny_adapter(tiny_model, share / "runs/ft-0001/adapter")
    wider = build_tiny_model(tmp_path / "wider", hidden_size=96)
    misfit = share / "runs/ft-0002/adapter"
    build_tiny_adapter(wider, misfit)
    for adapter in (share / "runs/ft-0001/adapter", misfit):      # as the job names the base it loaded
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config,
                                                                 "base_model_name_or_path": "/mount/model-cache/tiny"}))
    runs = [Run(id=f"ft-000{i}", requester="U0ALICE", channel="C0TRAIN", model="model-cache/tiny",
                dataset="datasets/chat.jsonl", adapter_path=f"runs/ft-000{i}/adapter") for i in (1, 2)]
    conn = store.connect(settings)

    aca_endpoints.serve_adapter(aca.clients, conn, runs[0], core_endpoints.new_entry("ft-0001", "", "dp-1", "U1"))
    puts = len(aca.standin.requests_to("arm", "PUT"))
    with pytest.raises(BackendError) as refused:
        aca_endpoints.serve_adapter(aca.clients, conn, runs[1], core_endpoints.new_entry("ft-0002", "", "dp-2", "U1"))
    assert re.fullmatch(r"the adapter of ft-0002 does not fit model-cache/tiny \(layer model\.layers\.0\.\S+ has "
                        r"(64|128) (inputs|outputs) in the base model but (96|192) in the adapter\): it was trained for "
                        r"another base model; deploy it on that one", str(refused.value)), str(refused.value)
    assert [e["name"] for e in share_manifest(aca, "model-cache/tiny")] == ["ft-0001"]
    assert len(aca.standin.requests_to("arm", "PUT")) == puts


def test_a_deploy_whose_app_cannot_be_made_takes_its_entry_back_out(aca, settings):
    conn = store.connect(settings)
    run = adapter_on_share(aca, "ft-0001")
    aca.standin.inject(Fault("arm", path=r"/containerApps/tuneops-infer$", method="PUT", status=400,
                             code="InvalidParameterValue", message="the environment has no such workload profile"))
    with pytest.raises(BackendError, match="no such workload profile"):
        aca_endpoints.serve_adapter(aca.clients, conn, run, core_endpoints.new_entry("ft-0001", "", "dp-1", "U1"))
    assert share_manifest(aca, "model-cache/tiny") == []


def test_deploy_and_a_new_secret_reference_keep_plain_secrets_as_they_are(aca, settings):
    provision_finetune(aca.clients)
    provision_inference(aca.clients)
    resources = (aca.standin.jobs["tuneops-ft"], aca.standin.apps["tuneops-infer"])
    # A plain secret someone else put on each (not in Key Vault), read through an env var.
    for r in resources:
        r["properties"]["configuration"].setdefault("secrets", []).append({"name": "db-pass", "value": "plain-1234"})
        r["properties"]["template"]["containers"][0].setdefault("env", []).append(
            {"name": "DB_PASS", "secretRef": "db-pass"})
    aca_endpoints.serve_adapter(aca.clients, store.connect(settings), adapter_on_share(aca, "ft-0001"),
                                core_endpoints.new_entry("ft-0001", "", "dp-1", "U1"))
    ensure_secret_reference(aca.clients, "HF_TOKEN")
    for r in (aca.standin.jobs["tuneops-ft"], aca.standin.apps["tuneops-infer"]):
        secrets = r["properties"]["configuration"]["secrets"]
        assert {"name": "db-pass", "value": "plain-1234"} in secrets
        assert {"name": "DB_PASS", "secretRef": "db-pass"} in r["properties"]["template"]["containers"][0]["env"]
        assert [s["name"] for s in secrets if s.get("keyVaultUrl")] == ["hf-token"]


def test_a_new_secret_reference_reaches_the_apps_of_every_base_model(aca, settings):
    """A secret set after deploys on two base models: the job, ACA_APP_NAME and the other base's app all reference
    it, each app still serving its own adapter list."""
    provision_finetune(aca.clients)
    conn = store.connect(settings)
    aca_endpoints.serve_adapter(aca.clients, conn, adapter_on_share(aca, "ft-0001"),
                                core_endpoints.new_entry("ft-0001", "", "dp-1", "U1"))
    other = adapter_on_share(aca, "ft-0002", base="Qwen/Qwen2.5-0.5B-Instruct")
    derived = aca_endpoints.serve_adapter(aca.clients, conn, other,
                                          core_endpoints.new_entry("ft-0002", "", "dp-2", "U1")).app
    commands = {n: aca.standin.apps[n]["properties"]["template"]["containers"][0]["command"]
                for n in ("tuneops-infer", derived)}
    assert [name for name, _ in aca_endpoints.derived_apps(aca.clients)] == [derived]

    op_id = ops.enqueue_secret_reference(settings, "HF_TOKEN", "U1", "C1")
    run_worker_burst(settings)
    done = op_events(settings, op_id)[-1]
    assert done.kind == "succeeded"
    assert done.data["text"].startswith(f"The inference app of other base models ({derived}) now references HF_TOKEN.")
    for r in (aca.standin.jobs["tuneops-ft"], *(aca.standin.apps[n] for n in commands)):
        secrets = r["properties"]["configuration"]["secrets"]
        assert [x["name"] for x in secrets if x.get("keyVaultUrl")] == ["hf-token"]
        assert {"name": "HF_TOKEN", "secretRef": "hf-token"} in r["properties"]["template"]["containers"][0]["env"]
    for name, command in commands.items():
        assert aca.standin.apps[name]["properties"]["template"]["containers"][0]["command"] == command
    # Once there, setting it again changes nothing anywhere.
    puts = len(aca.standin.requests_to("arm", "PUT"))
    assert aca_endpoints.ensure_secret_on_derived_apps(aca.clients, "HF_TOKEN") == []
    assert len(aca.standin.requests_to("arm", "PUT")) == puts


# ---- as RQ jobs, reporting in the thread's event stream ------------------------------------------------------------

def op_events(settings, op_id):
    return store.run_events(store.connect(settings), op_id)


def test_provision_through_rq_acks_with_an_op_id_and_reports_steps_and_result(aca, settings):
    op_id = ops.enqueue_provision(settings, "finetune", "U1", "C1")
    assert op_id == "pv-0001"
    assert [e.kind for e in op_events(settings, op_id)] == ["notice"]
    run_worker_burst(settings)
    events = op_events(settings, op_id)
    assert events[-1].kind == "succeeded"
    assert events[-1].data["created"] is True and "Created the ACA job tuneops-ft" in events[-1].data["text"]
    assert events[-1].data["links"]["job"].endswith("/jobs/tuneops-ft/overview")
    assert any("creating the ACA job" in e.data.get("text", "") for e in events if e.kind == "notice")
    op = store.load_op(store.connect(settings), op_id)
    assert op.state == "succeeded" and op.requester == "U1" and op.channel == "C1"

    again = ops.enqueue_provision(settings, "finetune", "U1", "C1")
    run_worker_burst(settings)
    assert "already up to date" in op_events(settings, again)[-1].data["text"]
    assert len(aca.standin.jobs) == 1


def test_a_failed_provision_says_what_to_do_without_a_stack_trace(aca, settings):
    aca.standin.inject(Fault("arm", path=r"/jobs/tuneops-ft$", method="PUT", status=403, code="AuthorizationFailed",
                             message="does not have authorization to perform action 'Microsoft.App/jobs/write'"))
    op_id = ops.enqueue_provision(settings, "finetune", "U1", "C1")
    run_worker_burst(settings)
    last = op_events(settings, op_id)[-1]
    assert last.kind == "failed" and "not allowed to" in last.data["error"] and "Roles" in last.data["error"]
    assert "Traceback" not in last.data["error"]
    with pytest.raises(BackendError, match=r"training job \(finetune\) or the inference app \(inference\)"):
        ops.enqueue_provision(settings, "everything", "U1", "C1")


def test_an_error_of_ours_before_the_op_begins_is_reported_not_left_queued(aca, settings, caplog):
    class Broken:  # clients whose set-up fails in a way tuneops did not foresee
        @property
        def cfg(self):
            raise RuntimeError("clients set-up failed")

    op_id = ops.enqueue_provision(settings, "finetune", "U1", "C1")
    assert ops.run_op(op_id, clients=Broken()) == "failed"
    last = op_events(settings, op_id)[-1]
    assert last.kind == "failed" and last.data["error"] == (f"{op_id} failed because of an error in tuneops; the "
                                                            "worker log has the details.")
    assert store.load_op(store.connect(settings), op_id).state == "failed"
    assert "clients set-up failed" in caplog.text  # the trace is in the worker log


def test_two_provisions_of_the_same_job_are_serialized_not_interleaved(aca, settings):
    # Slow ARM writes widen the window in which two unserialized provisions would interleave.
    aca.standin.inject(Fault("arm", path=r"/jobs/tuneops-ft$", method="PUT", status=None, delay=0.5, times=10))
    a = ops.enqueue_provision(settings, "finetune", "U1", "C1")
    b = ops.enqueue_provision(settings, "finetune", "U2", "C1")
    spans = {}

    def run(op_id):
        t0 = time.monotonic()
        ops.run_op(op_id)
        spans[op_id] = (t0, time.monotonic())

    threads = [threading.Thread(target=run, args=(op,)) for op in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    results = {op: op_events(settings, op)[-1] for op in (a, b)}
    assert all(e.kind == "succeeded" for e in results.values())
    # Exactly one created the job; the other waited for it and then found nothing to change.
    assert sorted(e.data["created"] for e in results.values()) == [False, True]
    waited = [op for op in (a, b) if any("waiting for another provisioning" in e.data.get("text", "")
                                         for e in op_events(settings, op))]
    assert len(waited) == 1
    assert len(aca.standin.requests_to("arm", "PUT", r"/jobs/tuneops-ft$")) == 1
    assert len(aca.standin.jobs) == 1


def test_an_op_done_once_is_not_done_again(aca, settings):
    op_id = ops.enqueue_provision(settings, "inference", "U1", "C1")
    run_worker_burst(settings)
    n = len(op_events(settings, op_id))
    assert ops.run_op(op_id) == "nothing to do"
    assert len(op_events(settings, op_id)) == n
    assert store.load_op(store.connect(settings), op_id).state == "succeeded"
    assert SUBSCRIPTION in aca.standin.apps["tuneops-infer"]["id"]


def test_a_job_is_sized_for_the_profile_type_the_environment_really_has(aca):
    """A T4 profile allows 8 vCPU / 56Gi (jobs.backends.aca.profiles); the A100's 24 / 220Gi there is refused by Azure
    (ContainerAppInvalidResourceTotal), so a config sized for another type is caught before the PUT."""
    aca.standin.add_environment("tuneops-env", types={"GPU": "Consumption-GPU-NC8as-T4"})
    with pytest.raises(BackendError) as e:
        provision_finetune(aca.clients)
    assert "of type Consumption-GPU-NC8as-T4" in e.value.reason and "WORKLOAD_PROFILE_TYPE" in e.value.reason
    assert not aca.standin.requests_to("arm", "PUT", r"/jobs/")

    t4 = aca.reload(WORKLOAD_PROFILE_TYPE="Consumption-GPU-NC8as-T4")
    assert provision_finetune(t4.clients).created
    container = aca.standin.jobs["tuneops-ft"]["properties"]["template"]["containers"][0]
    assert (container["resources"]["cpu"], container["resources"]["memory"]) == (8.0, "56Gi")

    # What Azure itself answers for too much on the profile.
    environment = t4.clients.arm.managed_environments.get("tuneops-rg", "tuneops-env").as_dict()
    job = job_body(t4.cfg, environment, storage_name=ENV_STORAGE, secret_envs=[])
    job["properties"]["template"]["containers"][0]["resources"] = {"cpu": 24.0, "memory": "220Gi"}
    with pytest.raises(HttpResponseError) as refused:
        t4.clients.arm.jobs.begin_create_or_update("tuneops-rg", "tuneops-ft", job).result()
    assert refused.value.error.code == "ContainerAppInvalidResourceTotal"
    assert "8 vCPU / 56Gi at most" in refused.value.error.message


def test_instance_counts_fit_dedicated_profiles_only(aca):
    with pytest.raises(ValueError, match="WorkloadProfilePropertyNotSupported"):
        aca.standin.add_environment("other-env", counts={"GPU": (0, 1)})
    env = aca.standin.add_environment("other-env", types={"GPU": "NC24-A100"}, counts={"GPU": (0, 1)})
    assert env["properties"]["workloadProfiles"][1]["maximumCount"] == 1
