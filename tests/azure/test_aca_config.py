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
