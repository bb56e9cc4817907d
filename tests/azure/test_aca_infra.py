"""infra/ agrees with itself and with the code: parameter files vs. template parameters, outputs vs. config keys."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from jobs.backends.aca.config import (
    FINETUNING_OUTPUT_KEYS,
    INFERENCE_OUTPUT_KEYS,
    OPTIONAL_FINETUNING_KEYS,
    OPTIONAL_INFERENCE_KEYS,
    SEED_FINETUNING_KEYS,
    SEED_INFERENCE_KEYS,
)

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"


def bicep_params(text: str) -> dict[str, bool]:
    """Template parameter name -> has a default."""
    out = {}
    for m in re.finditer(r"^param\s+(\w+)\s+\w+(\s*=)?", text, re.M):
        out[m.group(1)] = bool(m.group(2))
    return out


def bicep_outputs(text: str) -> set[str]:
    return set(re.findall(r"^output\s+(\w+)\s", text, re.M))


@pytest.mark.parametrize("name,output_keys", [("finetuning", FINETUNING_OUTPUT_KEYS),
                                              ("inference", INFERENCE_OUTPUT_KEYS)])
def test_parameter_files_templates_and_config_keys_agree(name, output_keys):
    template = (INFRA / "provision" / f"{name}.bicep").read_text()
    params = bicep_params(template)
    given = json.loads((INFRA / "provision" / f"{name}.parameters.json").read_text())["parameters"]
    assert set(given) <= set(params), f"{name}.parameters.json sets parameters the template lacks"
    required = {p for p, has_default in params.items() if not has_default}
    assert required <= set(given), f"{name}.parameters.json misses required parameters {required - set(given)}"
    # The deployment's outputs are exactly the config keys the code reads from the Bicep outputs.
    assert bicep_outputs(template) == set(output_keys)
    config = json.loads((INFRA / f"{name}.config.json").read_text())
    assert set(output_keys) <= set(config)
    known = set(SEED_FINETUNING_KEYS + OPTIONAL_FINETUNING_KEYS) if name == "finetuning" else \
        set(SEED_INFERENCE_KEYS + OPTIONAL_INFERENCE_KEYS + INFERENCE_OUTPUT_KEYS)
    assert set(config) <= known, f"{name}.config.json has keys the code does not read: {set(config) - known}"


def test_the_base_environment_has_what_the_issue_asks_for():
    t = (INFRA / "provision" / "finetuning.bicep").read_text()
    assert "param gpuProfileType string = 'Consumption-GPU-NC24-A100'" in t
    assert re.search(r"workloadProfileType: gpuProfileType\s+name: 'GPU'\s+minimumCount: 0", t)
    for resource in ("Microsoft.Storage/storageAccounts/fileServices/shares", "Microsoft.OperationalInsights/workspaces",
                     "Microsoft.App/managedEnvironments/storages", "Microsoft.KeyVault/vaults",
                     "Microsoft.ManagedIdentity/userAssignedIdentities", "Microsoft.App/jobs"):
        assert f"'{resource}@" in t
    assert "enableRbacAuthorization: true" in t
    assert "roles.keyVaultSecretsUser" in t and "identity.properties.principalId" in t
    for role in ("contributor", "keyVaultSecretsOfficer", "storageFileDataPrivilegedContributor", "logAnalyticsReader"):
        assert f"roles.{role})" in t
    i = (INFRA / "provision" / "inference.bicep").read_text()
    assert "targetPort: 7860" in i and "minReplicas: 0" in i and "path: '/healthz'" in i


def test_the_readme_shows_the_deployment_lines_and_the_roles():
    readme = (INFRA / "README.md").read_text()
    assert "az deployment group create" in readme and "provision/finetuning.bicep" in readme
    assert "provision/inference.bicep" in readme
    for role in ("Key Vault Secrets User", "Key Vault Secrets Officer", "Storage File Data Privileged Contributor",
                 "Log Analytics Reader", "Contributor"):
        assert role in readme


def test_the_dockerfile_has_the_bot_and_payload_targets():
    d = (ROOT / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", d, re.M))
    resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], d)
    stages = dict(re.findall(r"^FROM\s+(\S+)\s+AS\s+(\w+)", resolved, re.M | re.I))
    targets = {v: k for k, v in stages.items()}
    assert {"bot", "payload"} <= set(targets)
    assert targets["payload"].startswith("pytorch/pytorch") and "cuda" in targets["payload"]
    assert targets["bot"].startswith("python:") and "slim" in targets["bot"]
    bot = d.split("AS bot", 1)[1].split("\nFROM ", 1)[0]
    assert re.search(r"^USER\s+(?!root)\w+", bot, re.M) and "tuneops" in bot
    payload = d.split("AS payload", 1)[1].split("\nFROM ", 1)[0]
    assert ".[payload,serve]" in payload and "WORKDIR /mount" in payload


def test_the_payload_image_keeps_a_cuda_torch_that_transformers_can_use():
    d = (ROOT / "Dockerfile").read_text()
    base = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", d, re.M))["PYTORCH_IMAGE"]
    major, minor = (int(x) for x in re.match(r"pytorch/pytorch:(\d+)\.(\d+)\.", base).groups())
    assert (major, minor) >= (2, 6) and re.search(r"-cuda\d+", base) and base.endswith("-runtime")
    payload = d.split("AS payload", 1)[1].split("\nFROM ", 1)[0]
    # torch pinned to the image's build while the extras go in, then checked for CUDA and for transformers
    assert "print('torch==' + version('torch'))\" > /tmp/torch.txt" in payload
    assert 'pip install -c /tmp/torch.txt ".[payload,serve]"' in payload
    assert "torch.version.cuda" in payload and "is_torch_available()" in payload
    assert 'CMD ["python", "-P", "-m", "payload.serve"' in payload
