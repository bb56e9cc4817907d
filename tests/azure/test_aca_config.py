"""The Azure config: the seed's files work unchanged, our keys are optional, and every error names file and key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.backends.aca.config import (
    SEED_IMAGE,
    AcaConfigError,
    load_aca_config,
    parse_aca_config,
    resolve_infra_dir,
)

SEED = {
    "SUBSCRIPTION_ID": "00000000-0000-4000-8000-000000000001",
    "RESOURCE_GROUP_NAME": "rg-ai",
    "STORAGE_ACCOUNT_NAME": "aistorageab12c",
    "FILE_SHARE_NAME": "aifileshareab12c",
    "ACA_JOB_NAME": "aiacajobab12c",
    "COMMANDS": ["cd /mount", "pip install -r ./setup/requirements.txt", "python3 ./finetuning/invoke_olive.py"],
}


def write(dir_: Path, finetuning: dict, inference: dict | None = None) -> Path:
    dir_.mkdir(parents=True, exist_ok=True)
    (dir_ / "finetuning.config.json").write_text(json.dumps(finetuning))
    if inference is not None:
        (dir_ / "inference.config.json").write_text(json.dumps(inference))
    return dir_


def test_a_seed_project_config_loads_unchanged_with_defaults(tmp_path):
    infra = write(tmp_path / "infra", SEED, {"SUBSCRIPTION_ID": None, "ACA_APP_NAME": "aiacaappab12c",
                                             "ACA_APP_ENDPOINT": None, "COMMANDS": ["cd /mount"]})
    cfg = load_aca_config({"TUNEOPS_INFRA_DIR": str(infra)})
    assert (cfg.job_name, cfg.file_share, cfg.storage_account) == ("aiacajobab12c", "aifileshareab12c", "aistorageab12c")
    assert cfg.commands == tuple(SEED["COMMANDS"])
    assert cfg.replica_timeout == 10800 and cfg.workload_profile == "GPU"
    assert cfg.job_image == SEED_IMAGE and cfg.arm_endpoint == "https://management.azure.com"
    assert cfg.files_account_url == "https://aistorageab12c.file.core.windows.net"
    assert cfg.app_name == "aiacaappab12c" and cfg.app_min_replicas == 0 and cfg.app_max_replicas == 1
    assert cfg.key_vault_url == "" and cfg.storage_key == ""


def test_the_seeds_unfilled_template_says_to_run_the_deployment(tmp_path):
    infra = write(tmp_path / "infra", dict(SEED, SUBSCRIPTION_ID=None))
    with pytest.raises(AcaConfigError) as e:
        load_aca_config({"TUNEOPS_INFRA_DIR": str(infra)})
    assert "finetuning.config.json: SUBSCRIPTION_ID is empty" in str(e.value)
    assert "Bicep" in str(e.value)


@pytest.mark.parametrize("key,value,expect", [
    ("COMMANDS", "cd /mount", "COMMANDS must be a list of strings"),
    ("REPLICA_TIMEOUT", "3h", "REPLICA_TIMEOUT must be a whole number"),
    ("REPLICA_TIMEOUT", 0, "REPLICA_TIMEOUT must be at least 1"),
    ("ACA_JOB_NAME", "Bad_Name", "ACA_JOB_NAME is not a valid name"),
    ("KEY_VAULT_URL", "my-vault", "KEY_VAULT_URL must be an http(s) URL"),
    ("IDENTITY_ID", "tuneops-id", "IDENTITY_ID must be the managed identity's resource id"),
    ("SYNC_PAYLOAD", "yes", "SYNC_PAYLOAD must be true or false"),
])
def test_a_wrong_value_names_file_and_key(tmp_path, key, value, expect):
    infra = write(tmp_path / "infra", dict(SEED, **{key: value}))
    with pytest.raises(AcaConfigError) as e:
        load_aca_config({"TUNEOPS_INFRA_DIR": str(infra)})
    assert expect in str(e.value)
    assert str(infra / "finetuning.config.json") in str(e.value)


def test_missing_and_broken_files_get_clear_messages(tmp_path):
    with pytest.raises(AcaConfigError, match="finetuning.config.json not found.*TUNEOPS_INFRA_DIR"):
        load_aca_config({"TUNEOPS_INFRA_DIR": str(tmp_path / "nowhere")})
    infra = tmp_path / "infra"
    infra.mkdir()
    (infra / "finetuning.config.json").write_text('{"SUBSCRIPTION_ID": ')
    with pytest.raises(AcaConfigError, match=r"not valid JSON \(line 1"):
        load_aca_config({"TUNEOPS_INFRA_DIR": str(infra)})


def test_a_feature_that_needs_an_optional_key_says_which_and_where(tmp_path):
    cfg = parse_aca_config(SEED, None, {}, tmp_path)
    with pytest.raises(AcaConfigError) as e:
        cfg.require("Key Vault secrets", "key_vault_url", "identity_id")
    assert "Key Vault secrets needs KEY_VAULT_URL, IDENTITY_ID in" in str(e.value)
    assert "finetuning.config.json" in str(e.value)
    with pytest.raises(AcaConfigError, match="ACA_APP_NAME in .*inference.config.json"):
        cfg.require("Provisioning the inference app", "app_name")


def test_env_sets_endpoints_and_the_storage_key_never_comes_from_a_file(tmp_path):
    env = {"TUNEOPS_ARM_ENDPOINT": "https://127.0.0.1:1234", "TUNEOPS_FILES_ENDPOINT": "https://127.0.0.1:5/acct",
           "TUNEOPS_STORAGE_KEY": "a2V5", "TUNEOPS_KEY_VAULT_URL": "https://vault.example/"}
    cfg = parse_aca_config(dict(SEED, STORAGE_KEY="ignored"), None, env, tmp_path)
    assert cfg.arm_endpoint == "https://127.0.0.1:1234"
    assert cfg.files_account_url == "https://127.0.0.1:5/acct"
    assert cfg.key_vault_url == "https://vault.example"
    assert cfg.storage_key == "a2V5" and "a2V5" not in repr(cfg)


def test_inference_replica_bounds_are_checked(tmp_path):
    with pytest.raises(AcaConfigError, match="MIN_REPLICAS \\(3\\) is larger than MAX_REPLICAS \\(2\\)"):
        parse_aca_config(SEED, {"MIN_REPLICAS": 3, "MAX_REPLICAS": 2}, {}, tmp_path)


def test_infra_dir_resolution(tmp_path):
    ws = tmp_path / "ws"
    assert resolve_infra_dir({"TUNEOPS_INFRA_DIR": "/x/infra"}) == Path("/x/infra")
    assert resolve_infra_dir({"TUNEOPS_WORKSPACE": str(ws)}, cwd=tmp_path) == tmp_path / "infra"
    (ws / "infra").mkdir(parents=True)
    assert resolve_infra_dir({"TUNEOPS_WORKSPACE": str(ws)}, cwd=tmp_path) == ws / "infra"
    assert resolve_infra_dir({}, workspace=ws, cwd=tmp_path) == ws / "infra"


def test_the_shipped_example_configs_load(tmp_path):
    root = Path(__file__).resolve().parents[2] / "infra"
    data = json.loads((root / "finetuning.config.json").read_text())
    assert set(json.loads((root / "inference.config.json").read_text())) >= {"ACA_APP_NAME", "ACA_APP_ENDPOINT"}
    filled = {k: (v if v is not None else SEED.get(k)) for k, v in data.items()}
    cfg = parse_aca_config(filled, json.loads((root / "inference.config.json").read_text()), {}, root)
    assert cfg.job_name == SEED["ACA_JOB_NAME"] and cfg.commands


def test_each_client_is_made_once_per_process_and_kept_across_config_edits(tmp_path):
    import dataclasses

    from jobs.backends.aca.clients import get_clients, reset_clients

    class Cred:
        def get_token(self, *a, **k):
            raise AssertionError("no request is made here")

    try:
        cfg = parse_aca_config(SEED, {"ACA_APP_NAME": "app1"}, {}, tmp_path)
        first = get_clients(cfg)
        first._credential = Cred()
        assert get_clients(cfg) is first and first.arm is first.arm
        edited = dataclasses.replace(cfg, app_endpoint="https://app1.example", image="reg.io/p:2")
        again = get_clients(edited)
        assert again.cfg == edited and again.arm is first.arm and again.share is first.share
        elsewhere = get_clients(dataclasses.replace(cfg, arm_endpoint="https://arm.elsewhere"))
        assert elsewhere.arm is not first.arm
    finally:
        reset_clients()


def test_the_workload_profile_type_defaults_to_the_serverless_a100_and_sets_cpu_and_memory(tmp_path):
    cfg = parse_aca_config(SEED, None, {}, tmp_path)
    assert (cfg.workload_profile_type, cfg.cpu, cfg.memory) == ("Consumption-GPU-NC24-A100", 24.0, "220Gi")
    assert (cfg.app_workload_profile_type, cfg.app_cpu, cfg.app_memory) == ("Consumption-GPU-NC24-A100", 24.0, "220Gi")


def test_a_t4_without_cpu_and_memory_gets_what_a_t4_allows(tmp_path):
    cfg = parse_aca_config(dict(SEED, WORKLOAD_PROFILE_TYPE="Consumption-GPU-NC8as-T4"), None, {}, tmp_path)
    assert (cfg.workload_profile_type, cfg.cpu, cfg.memory) == ("Consumption-GPU-NC8as-T4", 8.0, "56Gi")
    # The app on the same profile is on the same T4.
    assert (cfg.app_workload_profile_type, cfg.app_cpu, cfg.app_memory) == ("Consumption-GPU-NC8as-T4", 8.0, "56Gi")
    cfg = parse_aca_config(dict(SEED, WORKLOAD_PROFILE_TYPE="consumption-gpu-nc8as-t4", CPU=4), None, {}, tmp_path)
    assert (cfg.workload_profile_type, cfg.cpu, cfg.memory) == ("Consumption-GPU-NC8as-T4", 4.0, "56Gi")


@pytest.mark.parametrize("profile_type, env, gpus", [
    (None, {}, 1), ("Consumption-GPU-NC8as-T4", {}, 1), ("Consumption", {}, 1), ("NC48-A100", {}, 2),
    ("NC96-A100", {}, 4), ("NC96-A100", {"TUNEOPS_GPUS": "2"}, 2), ("NC48-A100", {"TUNEOPS_GPUS": " 1 "}, 1),
])
def test_a_run_trains_on_every_gpu_of_the_profile_type_or_on_tuneops_gpus(tmp_path, profile_type, env, gpus):
    finetuning = dict(SEED, WORKLOAD_PROFILE_TYPE=profile_type) if profile_type else SEED
    if profile_type == "Consumption":
        finetuning = dict(finetuning, WORKLOAD_PROFILE_NAME="Consumption")
    assert parse_aca_config(finetuning, None, env, tmp_path).gpus == gpus


@pytest.mark.parametrize("value, message", [
    ("4", "TUNEOPS_GPUS=4 asks for more GPUs than the workload profile type NC48-A100 has (2); lower it, unset it, "
          "or set WORKLOAD_PROFILE_TYPE to a larger type"),
    ("two", "TUNEOPS_GPUS must be a whole number of 1 or more (the GPUs a run trains on), not 'two'; unset it to use "
            "all 2 of NC48-A100"),
    ("0", "TUNEOPS_GPUS must be a whole number of 1 or more"),
])
def test_tuneops_gpus_that_the_profile_cannot_give_is_refused(tmp_path, value, message):
    with pytest.raises(AcaConfigError) as e:
        parse_aca_config(dict(SEED, WORKLOAD_PROFILE_TYPE="NC48-A100"), None, {"TUNEOPS_GPUS": value}, tmp_path)
    assert str(e.value).startswith(message)


def test_a_t4_asked_for_24_cpus_is_refused_with_the_limit_and_what_to_do(tmp_path):
    infra = write(tmp_path / "infra", dict(SEED, WORKLOAD_PROFILE_TYPE="Consumption-GPU-NC8as-T4", CPU=24))
    with pytest.raises(AcaConfigError) as e:
        load_aca_config({"TUNEOPS_INFRA_DIR": str(infra)})
    assert str(e.value) == (
        f"{infra / 'finetuning.config.json'}: CPU does not fit the workload profile type Consumption-GPU-NC8as-T4 "
        f"(8 vCPU / 56Gi at most on Consumption-GPU-NC8as-T4; asked 24 / 56Gi). Lower it, or remove it to get the "
        f"profile's 8 / 56Gi; if the profile is of another type, set WORKLOAD_PROFILE_TYPE to it.")
    with pytest.raises(AcaConfigError, match=r"CPU and MEMORY do not fit .*asked 24 / 220Gi\)\. Lower them"):
        parse_aca_config(dict(SEED, WORKLOAD_PROFILE_TYPE="Consumption-GPU-NC8as-T4", CPU=24, MEMORY="220Gi"),
                         None, {}, tmp_path)


def test_the_apps_resources_are_checked_against_its_profile_in_the_inference_file(tmp_path):
    with pytest.raises(AcaConfigError) as e:
        parse_aca_config(dict(SEED, WORKLOAD_PROFILE_TYPE="Consumption-GPU-NC8as-T4"), {"MEMORY": "220Gi"}, {},
                         tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'inference.config.json'}: MEMORY does not fit the workload profile "
                                   f"type Consumption-GPU-NC8as-T4 (8 vCPU / 56Gi at most")
    # An app on a profile of its own has its own type.
    cfg = parse_aca_config(SEED, {"WORKLOAD_PROFILE_NAME": "T4", "WORKLOAD_PROFILE_TYPE": "Consumption-GPU-NC8as-T4"},
                           {}, tmp_path)
    assert (cfg.app_workload_profile, cfg.app_cpu, cfg.app_memory) == ("T4", 8.0, "56Gi")
    assert (cfg.workload_profile, cfg.cpu) == ("GPU", 24.0)
    with pytest.raises(AcaConfigError, match=r"inference.config.json: WORKLOAD_PROFILE_TYPE \(NC24-A100\) differs from "
                                             r"the job's \(Consumption-GPU-NC24-A100"):
        parse_aca_config(SEED, {"WORKLOAD_PROFILE_TYPE": "NC24-A100"}, {}, tmp_path)


@pytest.mark.parametrize("extra,expect", [
    ({"WORKLOAD_PROFILE_TYPE": "T4"}, ("WORKLOAD_PROFILE_TYPE is 'T4', a type tuneops does not know; set it to the "
                                       "type of the environment's profile, one of Consumption, Consumption-GPU-NC24")),
    ({"WORKLOAD_PROFILE_TYPE": 4}, "WORKLOAD_PROFILE_TYPE must be a string"),
    ({"MEMORY": "56GB"}, "MEMORY must be in Gi, like '56Gi' or '0.5Gi', not '56GB'"),
    ({"CPU": 0.1}, "CPU must be at least 0.25"),
    ({"WORKLOAD_PROFILE_TYPE": "NC24-A100", "CPU": 48}, "(24 vCPU / 220Gi at most on NC24-A100; asked 48 / 220Gi)"),
    ({"WORKLOAD_PROFILE_NAME": "Consumption", "CPU": 1, "MEMORY": "3Gi"},
     "CPU and MEMORY do not fit the workload profile type Consumption (Consumption takes only cpu/memory pairs"),
])
def test_a_wrong_profile_type_or_resource_names_file_and_key(tmp_path, extra, expect):
    with pytest.raises(AcaConfigError) as e:
        parse_aca_config(dict(SEED, **extra), None, {}, tmp_path)
    assert expect in str(e.value) and str(tmp_path / "finetuning.config.json") in str(e.value)


def test_the_consumption_profile_defaults_to_its_own_type_and_pairs(tmp_path):
    cfg = parse_aca_config(dict(SEED, WORKLOAD_PROFILE_NAME="Consumption"), None, {}, tmp_path)
    assert (cfg.workload_profile_type, cfg.cpu, cfg.memory) == ("Consumption", 4.0, "8Gi")
    cfg = parse_aca_config(dict(SEED, WORKLOAD_PROFILE_NAME="Consumption", CPU=1.5), None, {}, tmp_path)
    assert (cfg.cpu, cfg.memory) == (1.5, "3Gi")
    # The app keeps the GPU profile's type when the job moves to Consumption.
    assert (cfg.app_workload_profile_type, cfg.app_cpu) == ("Consumption-GPU-NC24-A100", 24.0)


def test_a_dedicated_profile_type_allows_the_whole_node(tmp_path):
    cfg = parse_aca_config(dict(SEED, WORKLOAD_PROFILE_TYPE="NC48-A100"), None, {}, tmp_path)
    assert (cfg.cpu, cfg.memory) == (48.0, "440Gi")
