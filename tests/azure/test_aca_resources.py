"""The pure builders: job and app bodies, run command and execution template, status mapping, change lines, KQL."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobs.backends.aca.config import SEED_IMAGE
from jobs.backends.aca.logs import build_log_query, kql_string, portal_links
from jobs.backends.aca.provision import differs
from jobs.backends.aca.resources import (
    InvalidSecretName,
    app_body,
    describe_changes,
    env_name_for,
    execution_matches,
    job_body,
    map_execution,
    needs_install,
    payload_requirements,
    run_env,
    run_script,
    run_template,
    secret_name,
    served_manifest,
    share_mount,
)
from jobs.backends.aca.standin import _tokens, run_kql
from jobs.backends.protocol import ExecStatus
from jobs.core.domain import Run
from tests.azure.conftest import ENV, IDENTITY, cfg


@pytest.mark.parametrize("env,name", [("HF_TOKEN", "hf-token"), ("WANDB_API_KEY", "wandb-api-key"),
                                      ("MyKey2", "mykey2")])
def test_secret_names_map_to_valid_key_vault_and_aca_names(env, name):
    assert secret_name(env) == name
    assert env_name_for(name, {}) == env.upper()
    assert env_name_for(name, {"tuneops-env": env}) == env


@pytest.mark.parametrize("bad", ["", "_X", "X_", "HF-TOKEN", "a", "1ABC", "A B", "X" * 65])
def test_invalid_secret_names_are_refused_with_advice(bad):
    with pytest.raises(InvalidSecretName, match="like HF_TOKEN"):
        secret_name(bad)


@given(st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,62}[A-Za-z0-9]", fullmatch=True))
def test_every_valid_env_name_gives_a_name_key_vault_and_aca_accept(env):
    import re

    name = secret_name(env)
    assert re.fullmatch(r"[a-z][a-z0-9-]*[a-z0-9]", name) and len(name) <= 127


def test_the_job_body_is_the_seeds_job_with_key_vault_secret_refs():
    body = job_body(cfg(), ENV, storage_name="envstore", secret_envs=["WANDB_API_KEY", "HF_TOKEN"])
    p = body["properties"]
    assert body["location"] == "westus3" and p["environmentId"] == ENV["id"] and p["workloadProfileName"] == "GPU"
    assert p["configuration"]["triggerType"] == "Manual"
    assert p["configuration"]["replicaTimeout"] == 10800 and p["configuration"]["replicaRetryLimit"] == 0
    assert p["configuration"]["manualTriggerConfig"] == {"replicaCompletionCount": 1, "parallelism": 1}
    assert p["configuration"]["secrets"] == [
        {"name": "hf-token", "keyVaultUrl": "https://kv.vault.azure.net/secrets/hf-token", "identity": IDENTITY},
        {"name": "wandb-api-key", "keyVaultUrl": "https://kv.vault.azure.net/secrets/wandb-api-key",
         "identity": IDENTITY}]
    c = p["template"]["containers"][0]
    assert c["image"] == SEED_IMAGE and c["command"] == ["/bin/bash", "-c", "cd /mount; echo hi"]
    assert {"name": "HF_TOKEN", "secretRef": "hf-token"} in c["env"]
    assert c["volumeMounts"] == [{"volumeName": "share1volume", "mountPath": "/mount"}]
    assert p["template"]["volumes"] == [{"name": "share1volume", "storageType": "AzureFile", "storageName": "envstore"}]
    assert body["identity"] == {"type": "UserAssigned", "userAssignedIdentities": {IDENTITY: {}}}
    assert not any("value" in s for s in p["configuration"]["secrets"])
    assert p["configuration"]["registries"] == []
    private = job_body(cfg(REGISTRY="myacr.azurecr.io"), ENV, storage_name="envstore", secret_envs=[])
    assert private["properties"]["configuration"]["registries"] == [{"server": "myacr.azurecr.io",
                                                                      "identity": IDENTITY}]


def test_an_existing_jobs_mount_identity_and_foreign_secrets_are_kept():
    existing = job_body(cfg(), ENV, storage_name="envstore", secret_envs=[])
    existing["identity"] = {"type": "SystemAssigned"}
    existing["properties"]["template"]["volumes"][0]["name"] = "seedvolume"
    existing["properties"]["template"]["containers"][0]["volumeMounts"][0]["volumeName"] = "seedvolume"
    existing["properties"]["configuration"]["secrets"] = [{"name": "db-pass"}, {"name": "other",
                                                                                "keyVaultUrl": "https://x/secrets/o"}]
    existing["properties"]["template"]["containers"][0]["env"] = [{"name": "DB", "secretRef": "db-pass"},
                                                                  {"name": "GONE", "secretRef": "nope"}]
    body = job_body(cfg(), ENV, storage_name="envstore", secret_envs=["HF_TOKEN"], existing=existing,
                    foreign_secret_values={"db-pass": "v"})
    p = body["properties"]
    assert p["template"]["volumes"][0]["name"] == "seedvolume"
    assert body["identity"]["type"] == "SystemAssigned,UserAssigned"
    names = [s["name"] for s in p["configuration"]["secrets"]]
    assert names == ["hf-token", "db-pass", "other"]
    env = [e["name"] for e in p["template"]["containers"][0]["env"]]
    assert env == ["DB", "HF_TOKEN"]  # GONE pointed at a secret that does not exist


def test_the_app_body_serves_on_7860_with_health_probes_and_scales_to_zero():
    body = app_body(cfg(IMAGE="reg.io/tuneops-payload:1"), ENV, storage_name="envstore", secret_envs=["HF_TOKEN"],
                    base_model="microsoft/Phi-3-mini-4k-instruct",
                    manifest="deployments/microsoft--Phi-3-mini-4k-instruct/adapters.json")
    p = body["properties"]
    assert p["configuration"]["ingress"]["external"] is True and p["configuration"]["ingress"]["targetPort"] == 7860
    assert p["template"]["scale"] == {"minReplicas": 0, "maxReplicas": 3}
    c = p["template"]["containers"][0]
    assert {pr["type"] for pr in c["probes"]} == {"Startup", "Liveness", "Readiness"}
    assert all(pr["httpGet"]["path"] == "/healthz" and pr["httpGet"]["port"] == 7860 for pr in c["probes"])
    script = c["command"][2]
    assert "python -P -m payload.serve --base model-cache/microsoft/Phi-3-mini-4k-instruct --base-only --adapters " \
           "deployments/microsoft--Phi-3-mini-4k-instruct/adapters.json --host 0.0.0.0 --port 7860" in script
    assert "pip install" not in script  # our image has the packages
    assert served_manifest(body) == "deployments/microsoft--Phi-3-mini-4k-instruct/adapters.json"
    assert served_manifest(app_body(cfg(), ENV, storage_name="envstore", secret_envs=[])) == ""  # no manifest
    assert served_manifest(None) is None


def test_the_run_script_is_valid_bash_and_quotes_what_it_is_given(tmp_path):
    script = run_script("ft-0007", "runs/ft-0007/run.json", download_model="org/model's",
                        install=["transformers<6,>=5.0", "peft>=0.13"])
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
    assert "tee -a runs/ft-0007/train.log" in script and "set -o pipefail" in script
    assert "'transformers<6,>=5.0'" in script
    assert "model-cache/org/model" in script and "snapshot_download" in script
    # The download step runs only when the model is not on the share yet: run it with a fake python.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text("#!/bin/sh\necho \"python $*\" >> calls.txt\n")
    (fake / "pip").write_text("#!/bin/sh\necho \"pip $*\" >> calls.txt\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    mount = tmp_path / "mount"
    (mount / "model-cache" / "org" / "model's").mkdir(parents=True)
    runnable = script.replace("/mount", str(mount))
    env = {"PATH": f"{fake}:/usr/bin:/bin", "TMPDIR": str(tmp_path)}
    subprocess.run(["bash", "-c", runnable], env=env, check=True)
    calls = (mount / "calls.txt").read_text()
    assert "snapshot_download" in calls and "python -P -m payload.train --config runs/ft-0007/run.json" in calls
    (mount / "model-cache" / "org" / "model's" / "config.json").write_text("{}")
    (mount / "calls.txt").unlink()
    subprocess.run(["bash", "-c", runnable], env=env, check=True)
    assert "snapshot_download" not in (mount / "calls.txt").read_text()
    assert "downloading" in (mount / "runs" / "ft-0007" / "train.log").read_text()


def test_the_run_runs_the_shared_payload_and_the_workspace_shadows_no_package(tmp_path):
    """cwd is /mount, the workspace: with `python -P` its datasets/ folder cannot stand in for the datasets package,
    and the payload code synced to /mount/payload is still the one that runs."""
    mount = tmp_path / "mount"
    for package in ("datasets", "payload"):
        (mount / package).mkdir(parents=True)
        (mount / package / "__init__.py").write_text("")
    (mount / "payload" / "train.py").write_text(
        "import importlib.util, os, sys\n"
        "import payload\n"
        "spec = importlib.util.find_spec('datasets')\n"
        "print('payload from', os.path.realpath(payload.__file__))\n"
        "print('datasets from', spec.origin if spec else None)\n"
        "print('config', sys.argv[-1])\n")
    script = run_script("ft-0008", "runs/ft-0008/run.json").replace("/mount", str(mount))
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "TMPDIR": str(tmp_path)}
    subprocess.run(["bash", "-c", script], env=env, check=True)
    log = (mount / "runs" / "ft-0008" / "train.log").read_text()
    assert f"payload from {mount / 'payload' / '__init__.py'}" in log
    assert "datasets from" in log and str(mount / "datasets") not in log
    assert "config runs/ft-0008/run.json" in log


def test_the_fallback_image_installs_the_payload_extra_without_torch():
    assert needs_install(SEED_IMAGE) and needs_install("pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime")
    assert not needs_install("myregistry.azurecr.io/tuneops-payload:1")
    reqs = payload_requirements()
    assert any(r.startswith("transformers") for r in reqs) and any(r.startswith("peft") for r in reqs)
    assert any(r.startswith("gradio") for r in reqs)
    assert not any(r.startswith("torch") for r in reqs)


def test_the_run_goes_into_the_jobs_template_with_its_mount_and_secret_refs():
    job = job_body(cfg(), ENV, storage_name="envstore", secret_envs=["HF_TOKEN"])
    t = run_template(job, "echo run", run_env("ft-0003", 2, "runs/ft-0003/run.json"))
    c = t["containers"][0]
    assert c["command"] == ["/bin/bash", "-c", "echo run"] and c["image"] == SEED_IMAGE
    assert {"name": "HF_TOKEN", "secretRef": "hf-token"} in c["env"]
    assert c["resources"] == job["properties"]["template"]["containers"][0]["resources"]
    # The share stays mounted at /mount: the start carries no override, so this is what the execution runs.
    assert c["volumeMounts"] == [{"volumeName": t["volumes"][0]["name"], "mountPath": "/mount"}]
    assert t["volumes"] == job["properties"]["template"]["volumes"] and share_mount(t)["storageName"] == "envstore"
    # A second run replaces the first one's values rather than adding to them.
    again = run_template({"properties": {"template": t}}, "echo two", run_env("ft-0004", 1, "runs/ft-0004/run.json"))
    names = [e["name"] for e in again["containers"][0]["env"]]
    assert len(names) == len(set(names))
    ex = {"properties": {"template": t}}
    assert execution_matches(ex, "ft-0003", 2)
    assert not execution_matches(ex, "ft-0003", 1) and not execution_matches(ex, "ft-0004", 2)


def test_a_job_without_the_share_mounted_cannot_take_a_run():
    job = job_body(cfg(), ENV, storage_name="envstore", secret_envs=[])
    del job["properties"]["template"]["containers"][0]["volumeMounts"]
    with pytest.raises(ValueError, match="/mount"):
        run_template(job, "echo run", run_env("ft-0003", 1, "runs/ft-0003/run.json"))


@pytest.mark.parametrize("status,kw,expect", [
    ("Processing", {}, ExecStatus.PENDING),
    ("Running", {}, ExecStatus.RUNNING),
    ("Succeeded", {}, ExecStatus.SUCCEEDED),
    ("Stopped", {}, ExecStatus.STOPPED),
    ("Unknown", {}, ExecStatus.UNKNOWN),
    (None, {}, ExecStatus.UNKNOWN),
    ("Failed", {"message": "container exited with code 3"}, ExecStatus.FAILED),
    ("Degraded", {}, ExecStatus.FAILED),
    ("Failed", {"start": "2024-01-01T00:00:00Z", "end": "2024-01-01T03:00:00Z", "replica_timeout": 10800},
     ExecStatus.TIMED_OUT),
    ("Failed", {"start": "2024-01-01T00:00:00Z", "end": "2024-01-01T01:00:00Z", "replica_timeout": 10800},
     ExecStatus.FAILED),
    ("Failed", {"reason": "DeadlineExceeded"}, ExecStatus.TIMED_OUT),
])
def test_execution_status_maps_onto_the_run(status, kw, expect):
    info = map_execution(status, **kw)
    assert info.status is expect
    if status == "Failed" and "message" in kw:
        assert info.exit_code == 3 and "exited with code 3" in info.detail
    if status == "Degraded":
        assert "Degraded" in info.detail


def test_change_lines_say_what_changed_and_nothing_when_nothing_did():
    old = job_body(cfg(), ENV, storage_name="envstore", secret_envs=[])
    new = job_body(cfg(IMAGE="reg.io/p:2", REPLICA_TIMEOUT=3600), ENV, storage_name="envstore",
                   secret_envs=["HF_TOKEN"], existing=old)
    lines = describe_changes("job", "ft-job", old, new)
    assert any(line.startswith("image: ") and "reg.io/p:2" in line for line in lines)
    assert "replica timeout: 10800 → 3600" in lines
    assert any(line.startswith("secrets: (none) → hf-token (Key Vault)") for line in lines)
    assert describe_changes("job", "ft-job", new, new) == []
    assert describe_changes("job", "ft-job", None, new)[0].startswith("created job ft-job: image reg.io/p:2")
    assert not differs(new, dict(new, id="/x", properties=dict(new["properties"], provisioningState="Succeeded")))
    assert differs(new, old)
    assert not differs({"secrets": [], "registries": []}, {"secrets": None})
    assert differs({"secrets": [{"name": "a"}]}, {"secrets": None})


@given(st.text(max_size=60))
def test_kql_string_literals_hold_any_text(text):
    tokens = _tokens(f"let x = {kql_string(text)};")
    assert tokens[3] == ("str", text)


def test_the_log_query_filters_by_job_execution_and_grep_in_both_schemas():
    q = build_log_query("ft-job", "ft-job-abc", tail=2, grep='say "hi"')
    now = __import__("datetime").datetime(2024, 1, 1)
    from datetime import timedelta

    rows_cl = [{"TimeGenerated": now + timedelta(seconds=i), "ContainerJobName_s": job,
                "ContainerGroupName_s": f"{ex}-xyz12", "Log_s": log}
               for i, (job, ex, log) in enumerate([("ft-job", "ft-job-abc", 'a: say "hi"'),
                                                   ("ft-job", "ft-job-abc", "no"),
                                                   ("ft-job", "ft-job-zzz", 'say "hi" elsewhere'),
                                                   ("other", "ft-job-abc", 'say "hi" other job'),
                                                   ("ft-job", "ft-job-abc", 'b: SAY "HI"'),
                                                   ("ft-job", "ft-job-abc", 'TUNEOPS_EVENT {"say \\"hi\\""}'),
                                                   ("ft-job", "ft-job-abc", 'c: say "hi"')])]
    got = run_kql(q, {"ContainerAppConsoleLogs_CL": rows_cl})
    assert [r["Log"] for r in got] == ['b: SAY "HI"', 'c: say "hi"']
    rows_mon = [{"TimeGenerated": now, "JobName": "ft-job", "ContainerGroupName": "ft-job-abc-1", "Log": 'say "hi"'}]
    assert [r["Log"] for r in run_kql(q, {"ContainerAppConsoleLogs": rows_mon})] == ['say "hi"']
    with pytest.raises(ValueError):
        build_log_query("ft-job", tail=0)


def test_portal_links_point_at_the_job_its_executions_and_a_log_query():
    c = cfg(LOG_ANALYTICS_WORKSPACE_NAME="logs1")
    run = Run(id="ft-0001", requester="U1", channel="C1", model="m", dataset="d", execution_id="ft-job-abc")
    links = portal_links(c, run)
    assert links["job"] == ("https://portal.azure.com/#resource/subscriptions/sub/resourceGroups/rg/providers/"
                            "Microsoft.App/jobs/ft-job/overview")
    assert links["execution"].endswith("/jobs/ft-job/executionHistory")
    assert "Microsoft.OperationalInsights%2Fworkspaces%2Flogs1" in links["logs"]
    import base64
    import gzip
    from urllib.parse import unquote

    packed = links["logs"].split("/q/")[1].split("/timespan/")[0]
    query = gzip.decompress(base64.b64decode(unquote(packed))).decode()
    assert 'let execution = "ft-job-abc";' in query
    assert "execution" not in portal_links(c, Run(id="ft-0002", requester="U", channel="C", model="m", dataset="d"))


@pytest.mark.parametrize("profile_type, gpus", [("Consumption-GPU-NC24-A100", 1), ("NC24-A100", 1),
                                                ("NC48-A100", 2), ("NC96-A100", 4)])
def test_the_run_script_starts_one_process_per_gpu_of_the_profile(tmp_path, profile_type, gpus):
    """One GPU: the plain trainer. Several: torchrun with one DDP process per GPU of the profile type, with `-P`'s
    safe path for torchrun and every process it starts."""
    config = cfg(WORKLOAD_PROFILE_TYPE=profile_type)
    assert config.gpus == gpus
    script = run_script("ft-0009", "runs/ft-0009/run.json", gpus=config.gpus)
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
    fake = tmp_path / "bin"
    fake.mkdir()
    for name in ("python", "torchrun"):
        (fake / name).write_text(f"#!/bin/sh\necho \"PYTHONSAFEPATH=$PYTHONSAFEPATH {name} $*\" >> calls.txt\n")
        (fake / name).chmod(0o755)
    mount = tmp_path / "mount"
    mount.mkdir()
    subprocess.run(["bash", "-c", script.replace("/mount", str(mount))], check=True,
                   env={"PATH": f"{fake}:/usr/bin:/bin", "TMPDIR": str(tmp_path)})
    calls = (mount / "calls.txt").read_text().splitlines()
    if gpus == 1:
        assert calls == ["PYTHONSAFEPATH= python -P -m payload.train --config runs/ft-0009/run.json"]
    else:
        assert calls == [f"PYTHONSAFEPATH=1 torchrun --standalone --nproc_per_node {gpus} -m payload.train "
                         f"--config runs/ft-0009/run.json"]
    assert (mount / "runs" / "ft-0009" / "exit_code").read_text().strip() == "0"
