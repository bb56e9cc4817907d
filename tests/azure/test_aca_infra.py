"""infra/ agrees with itself and with the code: parameter files vs. template parameters, outputs vs. config keys."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from jobs.backends.aca import profiles
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


def bicep_block(text: str, opening: str) -> str:
    """The text from `opening` (a line that ends with '{' or '[') to the bracket that closes it."""
    start = text.index(opening)
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "[": 1, "}": -1, "]": -1}.get(text[i], 0)
        if depth == 0 and text[i] in "}]":
            return text[start:i + 1]
    raise AssertionError(f"{opening!r} is not closed")


def bicep_value(token: str):
    token = token.strip()
    if token in ("true", "false"):
        return token == "true"
    if token.startswith("'"):
        return token.strip("'")
    return float(token)


def bicep_profile_map(text: str) -> dict[str, dict]:
    """`var gpuProfiles = { 'TYPE': { key: value ... } ... }` as a dict."""
    block = bicep_block(text, "var gpuProfiles = {")
    return {m.group(1): {k: bicep_value(v) for k, v in re.findall(r"^\s*(\w+):\s*(.+?)\s*$", m.group(2), re.M)}
            for m in re.finditer(r"'([\w-]+)':\s*\{(.*?)\}", block, re.S)}


def bicep_allowed(text: str, param: str) -> list[str]:
    m = re.search(r"@allowed\(\[(.*?)\]\)\s*\nparam\s+" + param + r"\s", text, re.S)
    assert m, f"param {param} has no @allowed list"
    return re.findall(r"'([^']+)'", m.group(1))


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
    # The serverless default gets a GPU profile with no instance counts; the counts join only a dedicated type's.
    assert re.search(r"var gpuWorkloadProfile = \{\s+workloadProfileType: gpuProfileType\s+name: 'GPU'\s+\}", t)
    assert "gpuProfile.dedicated ? union(gpuWorkloadProfile, dedicatedCounts) : gpuWorkloadProfile" in t
    assert re.search(r"var dedicatedCounts = \{\s+minimumCount: 0\s+maximumCount: maximumInstanceCount\s+\}", t)
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


@pytest.mark.parametrize("name", ["finetuning", "inference"])
def test_the_templates_profile_maps_are_the_profile_table(name):
    t = (INFRA / "provision" / f"{name}.bicep").read_text()
    table = {p.type_name: {"dedicated": p.dedicated, "cpu": p.max_cpu, "memory": profiles.format_memory(p.memory_gib)}
             for p in map(profiles.profile, profiles.GPU_PROFILE_TYPES)}
    assert bicep_profile_map(t) == table
    assert bicep_allowed(t, "gpuProfileType") == list(profiles.GPU_PROFILE_TYPES)
    assert f"param gpuProfileType string = '{profiles.DEFAULT_PROFILE_TYPE}'" in t
    assert not profiles.profile(profiles.DEFAULT_PROFILE_TYPE).dedicated
    # What the container asks for comes from the map, and the map's figures are each type's default resources.
    assert re.search(r"resources: \{\s+cpu: gpuProfile\.cpu\s+memory: gpuProfile\.memory\s+\}", t)
    assert "cpu: 24\n" not in bicep_block(t, "template: {") and "'220Gi'" not in bicep_block(t, "template: {")
    for type_name, row in table.items():
        assert profiles.default_resources(type_name) == (row["cpu"], row["memory"])
    given = json.loads((INFRA / "provision" / f"{name}.parameters.json").read_text())["parameters"]
    assert given["gpuProfileType"]["value"] in table


def _profiles_as_deployed(gpu_profile_type: str) -> list[dict]:
    """The environment's workloadProfiles as finetuning.bicep's expressions give them for one gpuProfileType."""
    t = (INFRA / "provision" / "finetuning.bicep").read_text()
    row = bicep_profile_map(t)[gpu_profile_type]
    wp = {"workloadProfileType": gpu_profile_type, "name": "GPU"}
    counts = {"minimumCount": 0, "maximumCount": 1}  # maximumInstanceCount's default
    return [{"workloadProfileType": "Consumption", "name": "Consumption"}, {**wp, **counts} if row["dedicated"] else wp]


@pytest.mark.parametrize("gpu_profile_type", profiles.GPU_PROFILE_TYPES)
def test_instance_counts_go_only_to_a_dedicated_gpu_profile(gpu_profile_type):
    deployed = _profiles_as_deployed(gpu_profile_type)
    assert [profiles.check_workload_profile(wp) for wp in deployed] == ["", ""]
    gpu = deployed[1]
    assert ("minimumCount" in gpu) == profiles.profile(gpu_profile_type).dedicated
    # The old template's shape, counts on every type, is what Azure refuses for a serverless one.
    with_counts = {**gpu, "minimumCount": 0, "maximumCount": 1}
    expect = "" if profiles.profile(gpu_profile_type).dedicated else "WorkloadProfilePropertyNotSupported"
    assert profiles.check_workload_profile(with_counts).startswith(expect)


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
