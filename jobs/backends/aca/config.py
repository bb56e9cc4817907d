"""The Azure backend's settings: the AI Toolkit seed's `infra/*.config.json` files plus our optional keys and env.

`infra/finetuning.config.json` and `infra/inference.config.json` keep the seed's format, so an existing AI Toolkit
project works unchanged; the keys we add are optional and a feature that needs one says which, and where to put it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.backends.aca import profiles
from jobs.core.errors import BackendError

FINETUNING_FILE = "finetuning.config.json"
INFERENCE_FILE = "inference.config.json"

# The seed's keys, exactly as the seed's Bicep outputs name them.
SEED_FINETUNING_KEYS = ("SUBSCRIPTION_ID", "RESOURCE_GROUP_NAME", "STORAGE_ACCOUNT_NAME", "FILE_SHARE_NAME",
                        "ACA_JOB_NAME", "COMMANDS")
SEED_INFERENCE_KEYS = ("ACA_APP_NAME", "ACA_APP_ENDPOINT")
# Our optional keys in finetuning.config.json: first those that infra/provision/finetuning.bicep writes (its outputs
# beyond the seed's), then those a person sets.
OPTIONAL_FINETUNING_OUTPUT_KEYS = (
    "KEY_VAULT_URL", "IDENTITY_ID", "LOG_ANALYTICS_WORKSPACE_ID", "LOG_ANALYTICS_WORKSPACE_NAME",
    "ACA_ENVIRONMENT_NAME", "ACA_ENVIRONMENT_STORAGE_NAME", "WORKLOAD_PROFILE_TYPE",
)
OPTIONAL_FINETUNING_KEYS = OPTIONAL_FINETUNING_OUTPUT_KEYS + (
    "WORKLOAD_PROFILE_NAME", "IMAGE", "REGISTRY", "REPLICA_TIMEOUT", "CPU", "MEMORY", "SYNC_PAYLOAD",
    "ARM_ENDPOINT", "FILES_ENDPOINT", "LOGS_ENDPOINT", "POLLING_INTERVAL",
)
OPTIONAL_INFERENCE_KEYS = ("COMMANDS", "IMAGE", "MIN_REPLICAS", "MAX_REPLICAS", "CPU", "MEMORY",
                           "WORKLOAD_PROFILE_NAME", "WORKLOAD_PROFILE_TYPE")
# Keys whose value the Bicep deployment writes (its outputs); the infra test checks they agree with the templates.
FINETUNING_OUTPUT_KEYS = SEED_FINETUNING_KEYS + OPTIONAL_FINETUNING_OUTPUT_KEYS
INFERENCE_OUTPUT_KEYS = ("SUBSCRIPTION_ID", "RESOURCE_GROUP_NAME", "STORAGE_ACCOUNT_NAME", "FILE_SHARE_NAME",
                         "ACA_APP_NAME", "ACA_APP_ENDPOINT")

# The job's image when IMAGE is unset: a stock PyTorch CUDA runtime image like the seed's, with torch 2.6 (transformers
# 5 disables an older torch). It lacks our packages, so a run on it installs them first (see jobs.backends.aca.resources).
SEED_IMAGE = "docker.io/pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime"
DEFAULT_REPLICA_TIMEOUT = 10800
DEFAULT_WORKLOAD_PROFILE = "GPU"
# The type of the GPU profile finetuning.bicep makes unless told otherwise; CPU and MEMORY default to what it allows.
DEFAULT_WORKLOAD_PROFILE_TYPE = profiles.DEFAULT_PROFILE_TYPE
DEFAULT_CPU, DEFAULT_MEMORY = profiles.default_resources(DEFAULT_WORKLOAD_PROFILE_TYPE)

# Environment variables (documented in the README); env wins over the files for endpoints, which differ per place.
ENV_INFRA_DIR = "TUNEOPS_INFRA_DIR"
ENV_ARM_ENDPOINT = "TUNEOPS_ARM_ENDPOINT"
ENV_FILES_ENDPOINT = "TUNEOPS_FILES_ENDPOINT"
ENV_LOGS_ENDPOINT = "TUNEOPS_LOGS_ENDPOINT"
ENV_KEY_VAULT_URL = "TUNEOPS_KEY_VAULT_URL"
ENV_GPUS = "TUNEOPS_GPUS"
ENV_CA_BUNDLE = "TUNEOPS_AZURE_CA_BUNDLE"
ENV_STORAGE_KEY = "TUNEOPS_STORAGE_KEY"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class AcaConfigError(BackendError):
    """The Azure config is missing or wrong; the message names the file, the key and what to do."""


@dataclass(frozen=True)
class AcaConfig:
    infra_dir: Path
    subscription_id: str
    resource_group: str
    storage_account: str
    file_share: str
    job_name: str
    commands: tuple[str, ...]
    key_vault_url: str = ""
    identity_id: str = ""
    log_analytics_workspace_id: str = ""
    log_analytics_workspace_name: str = ""
    environment_name: str = ""
    environment_storage_name: str = ""
    workload_profile: str = DEFAULT_WORKLOAD_PROFILE
    workload_profile_type: str = DEFAULT_WORKLOAD_PROFILE_TYPE
    image: str = ""
    registry: str = ""
    replica_timeout: int = DEFAULT_REPLICA_TIMEOUT
    cpu: float = DEFAULT_CPU
    memory: str = DEFAULT_MEMORY
    sync_payload: bool = True
    arm_endpoint: str = "https://management.azure.com"
    files_endpoint: str = ""
    logs_endpoint: str = "https://api.loganalytics.io"
    polling_interval: float = 5.0
    ca_bundle: str = ""
    # The storage account key is a secret: it comes from the environment only, never from a file in the repo.
    storage_key: str = field(default="", repr=False)
    app_name: str = ""
    app_endpoint: str = ""
    app_commands: tuple[str, ...] = ()
    app_image: str = ""
    app_min_replicas: int = 0
    app_max_replicas: int = 1
    app_cpu: float = DEFAULT_CPU
    app_memory: str = DEFAULT_MEMORY
    app_workload_profile: str = DEFAULT_WORKLOAD_PROFILE
    app_workload_profile_type: str = DEFAULT_WORKLOAD_PROFILE_TYPE
    gpus: int = 1  # training processes a run starts (torchrun DDP when more than 1): the profile's GPUs

    @property
    def files_account_url(self) -> str:
        return self.files_endpoint or f"https://{self.storage_account}.file.core.windows.net"

    @property
    def job_image(self) -> str:
        return self.image or SEED_IMAGE

    @property
    def job_id(self) -> str:
        return (f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"
                f"/providers/Microsoft.App/jobs/{self.job_name}")

    def require(self, feature: str, *attrs: str) -> None:
        """Raise a clear AcaConfigError if `feature` needs a key that is not set."""
        missing = [a for a in attrs if not getattr(self, a)]
        if missing:
            keys = ", ".join(_ATTR_KEYS.get(a, a) for a in missing)
            where = INFERENCE_FILE if all(a.startswith("app_") for a in missing) else FINETUNING_FILE
            raise AcaConfigError(
                f"{feature} needs {keys} in {self.infra_dir / where}: it is an output of the Bicep deployment "
                f"(see infra/README.md); add it and try again.")


_ATTR_KEYS = {
    "key_vault_url": "KEY_VAULT_URL", "identity_id": "IDENTITY_ID",
    "log_analytics_workspace_id": "LOG_ANALYTICS_WORKSPACE_ID", "environment_name": "ACA_ENVIRONMENT_NAME",
    "environment_storage_name": "ACA_ENVIRONMENT_STORAGE_NAME", "app_name": "ACA_APP_NAME",
    "app_endpoint": "ACA_APP_ENDPOINT",
}


def resolve_infra_dir(env: Mapping[str, str] | None = None, workspace: str | Path | None = None,
                      cwd: str | Path | None = None) -> Path:
    """TUNEOPS_INFRA_DIR, else `<workspace>/infra` when it exists, else `./infra`."""
    env = os.environ if env is None else env
    if env.get(ENV_INFRA_DIR):
        return Path(env[ENV_INFRA_DIR]).expanduser()
    workspace = workspace or env.get("TUNEOPS_WORKSPACE")
    if workspace:
        candidate = Path(workspace).expanduser() / "infra"
        if candidate.is_dir():
            return candidate
    return Path(cwd or Path.cwd()) / "infra"


def _read_json(path: Path, required: bool) -> dict[str, Any] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise AcaConfigError(
                f"{path} not found: the Azure backend needs the AI Toolkit config files. Set TUNEOPS_INFRA_DIR to the "
                f"folder that holds them, or copy infra/ from this repository and fill in the Bicep outputs.") from None
        return None
    except OSError as e:
        raise AcaConfigError(f"{path}: cannot read it ({e.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise AcaConfigError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise AcaConfigError(f"{path}: must hold a JSON object with the keys {', '.join(SEED_FINETUNING_KEYS)}")
    return data


class _Reader:
    """Typed reads of one config file, each error naming the file and the key."""

    def __init__(self, data: Mapping[str, Any], path: Path):
        self.data, self.path = data, path

    def fail(self, key: str, what: str) -> AcaConfigError:
        return AcaConfigError(f"{self.path}: {key} {what}")

    def text(self, key: str, required: bool = False, pattern: re.Pattern | None = None) -> str:
        value = self.data.get(key)
        if value is None or value == "":
            if required:
                raise self.fail(key, "is empty: run the Bicep deployment (infra/README.md) and put its output here")
            return ""
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string, not {type(value).__name__}")
        value = value.strip()
        if pattern is not None and not pattern.match(value):
            raise self.fail(key, f"is not a valid name: {value!r}")
        return value

    def url(self, key: str) -> str:
        value = self.text(key)
        if value and not re.match(r"^https?://[^/\s]+", value):
            raise self.fail(key, f"must be an http(s) URL, not {value!r}")
        return value.rstrip("/")

    def commands(self, key: str, required: bool) -> tuple[str, ...]:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self.fail(key, "is missing: it lists the job's shell commands (the seed's format)")
            return ()
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise self.fail(key, "must be a list of strings (shell commands, joined with '; ')")
        return tuple(value)

    def number(self, key: str, default, kind=int, minimum=None):
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
            raise self.fail(key, f"must be a {'whole ' if kind is int else ''}number, not {value!r}")
        if minimum is not None and value < minimum:
            raise self.fail(key, f"must be at least {minimum}, not {value!r}")
        return kind(value)

    def profile_type(self, default: str) -> str:
        """WORKLOAD_PROFILE_TYPE, spelled as the table spells it."""
        value = self.text("WORKLOAD_PROFILE_TYPE")
        if not value:
            return default
        try:
            return profiles.profile(value).type_name
        except ValueError:
            raise self.fail("WORKLOAD_PROFILE_TYPE",
                            f"is {value!r}, a type tuneops does not know; set it to the type of the environment's "
                            f"profile, one of {', '.join(profiles.PROFILES)}") from None

    def resources(self, type_name: str) -> tuple[float, str]:
        """CPU and MEMORY, an unset one filled in from the profile type; asking for more than it allows is refused."""
        cpu = self.number("CPU", None, kind=float, minimum=0.25)
        memory = self.text("MEMORY") or None
        if memory is not None:
            try:
                profiles.parse_memory(memory)
            except ValueError:
                raise self.fail("MEMORY", f"must be in Gi, like '56Gi' or '0.5Gi', not {memory!r}") from None
        given = [k for k, v in (("CPU", cpu), ("MEMORY", memory)) if v is not None]
        cpu, memory = profiles.fill_resources(type_name, cpu, memory)
        reason = profiles.check_resources(type_name, cpu, memory)
        if reason:
            keys, them = " and ".join(given), "them" if len(given) > 1 else "it"
            change = "Change" if profiles.profile(type_name).allocations else "Lower"
            default_cpu, default_memory = profiles.default_resources(type_name)
            raise AcaConfigError(
                f"{self.path}: {keys} {'do' if len(given) > 1 else 'does'} not fit the workload profile type "
                f"{type_name} ({reason}). {change} {them}, or remove {them} to get the profile's {default_cpu:g} / "
                f"{default_memory}; if the profile is of another type, set WORKLOAD_PROFILE_TYPE to it.")
        return cpu, memory

    def flag(self, key: str, default: bool) -> bool:
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, not {value!r}")
        return value


def parse_aca_config(finetuning: Mapping[str, Any], inference: Mapping[str, Any] | None,
                     env: Mapping[str, str], infra_dir: Path) -> AcaConfig:
    """Build the config from the two files' contents and the environment. Pure: no I/O."""
    f = _Reader(finetuning, infra_dir / FINETUNING_FILE)
    i = _Reader(inference or {}, infra_dir / INFERENCE_FILE)
    arm = env.get(ENV_ARM_ENDPOINT) or f.url("ARM_ENDPOINT") or "https://management.azure.com"
    files = env.get(ENV_FILES_ENDPOINT) or f.url("FILES_ENDPOINT")
    logs = env.get(ENV_LOGS_ENDPOINT) or f.url("LOGS_ENDPOINT") or "https://api.loganalytics.io"
    vault = env.get(ENV_KEY_VAULT_URL) or f.url("KEY_VAULT_URL")
    identity = f.text("IDENTITY_ID")
    if identity and not identity.lower().startswith("/subscriptions/"):
        raise f.fail("IDENTITY_ID", "must be the managed identity's resource id (/subscriptions/.../"
                                    "userAssignedIdentities/NAME), as the Bicep output IDENTITY_ID gives it")
    job_profile = f.text("WORKLOAD_PROFILE_NAME") or DEFAULT_WORKLOAD_PROFILE
    job_type = f.profile_type(_default_type(job_profile))
    app_profile = i.text("WORKLOAD_PROFILE_NAME") or DEFAULT_WORKLOAD_PROFILE
    # The app and the job live in one environment: the same profile name is the same profile, so of the same type.
    app_type = i.profile_type(job_type if app_profile == job_profile else _default_type(app_profile))
    if app_profile == job_profile and app_type != job_type:
        raise i.fail("WORKLOAD_PROFILE_TYPE", f"({app_type}) differs from the job's ({job_type}, in {f.path}) while "
                                              f"both run on the profile {app_profile!r}: set the profile's one type in "
                                              f"both files")
    cpu, memory = f.resources(job_type)
    app_cpu, app_memory = i.resources(app_type)
    app_max = i.number("MAX_REPLICAS", 1, minimum=1)
    app_min = i.number("MIN_REPLICAS", 0, minimum=0)
    if app_min > app_max:
        raise i.fail("MIN_REPLICAS", f"({app_min}) is larger than MAX_REPLICAS ({app_max})")
    return AcaConfig(
        infra_dir=infra_dir,
        subscription_id=f.text("SUBSCRIPTION_ID", required=True),
        resource_group=f.text("RESOURCE_GROUP_NAME", required=True, pattern=_NAME_RE),
        storage_account=f.text("STORAGE_ACCOUNT_NAME", required=True, pattern=re.compile(r"^[a-z0-9]{3,24}$")),
        file_share=f.text("FILE_SHARE_NAME", required=True, pattern=re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")),
        job_name=f.text("ACA_JOB_NAME", required=True, pattern=re.compile(r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$")),
        commands=f.commands("COMMANDS", required=True),
        key_vault_url=vault.rstrip("/"),
        identity_id=identity,
        log_analytics_workspace_id=f.text("LOG_ANALYTICS_WORKSPACE_ID"),
        log_analytics_workspace_name=f.text("LOG_ANALYTICS_WORKSPACE_NAME", pattern=_NAME_RE),
        environment_name=f.text("ACA_ENVIRONMENT_NAME", pattern=_NAME_RE),
        environment_storage_name=f.text("ACA_ENVIRONMENT_STORAGE_NAME", pattern=_NAME_RE),
        workload_profile=job_profile,
        workload_profile_type=job_type,
        image=f.text("IMAGE"),
        registry=f.text("REGISTRY", pattern=re.compile(r"^[a-z0-9][a-z0-9.-]*(:\d+)?$")),
        replica_timeout=f.number("REPLICA_TIMEOUT", DEFAULT_REPLICA_TIMEOUT, minimum=1),
        cpu=cpu,
        memory=memory,
        sync_payload=f.flag("SYNC_PAYLOAD", True),
        arm_endpoint=arm.rstrip("/"),
        files_endpoint=files.rstrip("/"),
        logs_endpoint=logs.rstrip("/"),
        polling_interval=f.number("POLLING_INTERVAL", 5.0, kind=float, minimum=0.0),
        ca_bundle=env.get(ENV_CA_BUNDLE, ""),
        storage_key=env.get(ENV_STORAGE_KEY, ""),
        app_name=i.text("ACA_APP_NAME", pattern=re.compile(r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$")),
        app_endpoint=i.text("ACA_APP_ENDPOINT"),
        app_commands=i.commands("COMMANDS", required=False),
        app_image=i.text("IMAGE"),
        app_min_replicas=app_min,
        app_max_replicas=app_max,
        app_cpu=app_cpu,
        app_memory=app_memory,
        app_workload_profile=app_profile,
        app_workload_profile_type=app_type,
        gpus=gpu_processes(job_type, env),
    )


def gpu_processes(type_name: str, env: Mapping[str, str]) -> int:
    """How many training processes (one per GPU) a run on the profile type starts: its GPUs, or TUNEOPS_GPUS."""
    have = profiles.profile(type_name).gpu_count
    value = (env.get(ENV_GPUS) or "").strip()
    if not value:
        return max(have, 1)
    if not value.isdigit() or int(value) < 1:
        raise AcaConfigError(f"{ENV_GPUS} must be a whole number of 1 or more (the GPUs a run trains on), "
                             f"not {value!r}; unset it to use all {max(have, 1)} of {type_name}")
    if have and int(value) > have:
        raise AcaConfigError(f"{ENV_GPUS}={value} asks for more GPUs than the workload profile type {type_name} has "
                             f"({have}); lower it, unset it, or set WORKLOAD_PROFILE_TYPE to a larger type")
    return int(value)


def _default_type(profile_name: str) -> str:
    """The type a profile has when no WORKLOAD_PROFILE_TYPE says: the environment's Consumption profile is of type
    Consumption; any other is the GPU profile finetuning.bicep makes."""
    return "Consumption" if profile_name.lower() == "consumption" else DEFAULT_WORKLOAD_PROFILE_TYPE


def load_aca_config(env: Mapping[str, str] | None = None, workspace: str | Path | None = None) -> AcaConfig:
    """Read `infra/finetuning.config.json` (required) and `infra/inference.config.json` (optional)."""
    env = os.environ if env is None else env
    infra = resolve_infra_dir(env, workspace)
    finetuning = _read_json(infra / FINETUNING_FILE, required=True)
    inference = _read_json(infra / INFERENCE_FILE, required=False)
    return parse_aca_config(finetuning, inference, env, infra)
