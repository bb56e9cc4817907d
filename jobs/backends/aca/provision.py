"""Creates or updates the ACA job and the inference Container App in the existing environment, and deploys an adapter.

Idempotent: each step reads what Azure has, builds what tuneops wants (jobs.backends.aca.resources) and writes only when they
differ, so running it again updates and never duplicates; the result lists what changed, in words.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from azure.core.exceptions import ResourceNotFoundError

from jobs.backends.aca.clients import AzureClients
from jobs.backends.aca.config import INFERENCE_FILE, AcaConfig
from jobs.backends.aca.errors import azure_call
from jobs.backends.aca.resources import (
    KNOWN_SECRETS,
    InvalidSecretName,
    app_body,
    as_plain,
    describe_changes,
    job_body,
    secret_name,
    share_mount,
    without_run,
)
from jobs.backends.aca.secrets import list_secrets
from jobs.core.errors import BackendError

log = logging.getLogger(__name__)

Notice = Callable[[str], None]


@dataclass
class ProvisionResult:
    kind: str                 # "finetune" | "inference" | "deploy" | "secret"
    name: str
    created: bool = False
    changes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    endpoint: str = ""
    revision: str = ""

    def summary(self) -> str:
        what = {"finetune": "ACA job", "inference": "inference app", "deploy": "inference app",
                "secret": "ACA job"}.get(self.kind, self.kind)
        if self.created:
            head = f"Created the {what} {self.name}."
        elif self.changes:
            head = f"Updated the {what} {self.name}: " + "; ".join(self.changes) + "."
        else:
            head = f"The {what} {self.name} was already up to date; nothing changed."
        if self.endpoint:
            head += f" Endpoint: {self.endpoint}"
        return " ".join([*self.notes, head])


def _quiet(_: str) -> None:
    pass


# Enum values ARM answers in its own case (ingress transport "Auto" comes back "auto": examples/ContainerApps_Get.json,
# Microsoft.App 2025-01-01); their enums are modelAsString, compared without case.
CASELESS_KEYS = frozenset({"transport", "type", "triggerType", "storageType", "activeRevisionsMode", "scheme",
                           "accessMode"})


def _is_arm_id(value: Any) -> bool:
    return isinstance(value, str) and value.lower().startswith("/subscriptions/")


def differs(want: Any, have: Any, key: str = "") -> bool:
    """Would a PUT of `want` change `have`? Only the keys `want` sets count (Azure adds read-only ones and fills
    defaults), an empty list or object is the same as none (ARM answers null for an empty collection), ARM ids and
    enum values compare without case (ARM gives ids back as `resourcegroups/...` or all in lower case:
    Azure/azure-rest-api-specs#18595). Pure."""
    if have is None and want in ([], {}, None):
        return False
    if isinstance(want, Mapping):
        if not isinstance(have, Mapping):
            return True
        by_lower = {k.lower(): v for k, v in have.items() if _is_arm_id(k)}
        return any(differs(v, have[k] if k in have else by_lower.get(k.lower()) if _is_arm_id(k) else None, k)
                   for k, v in want.items() if not (v is None and k not in have))
    if isinstance(want, list):
        if not isinstance(have, list) or len(want) != len(have):
            return True
        return any(differs(a, b, key) for a, b in zip(want, have))
    if isinstance(want, str) and isinstance(have, str) and (key in CASELESS_KEYS or _is_arm_id(want)):
        return want.lower() != have.lower()
    if isinstance(want, float) or isinstance(have, float):
        try:
            return float(want) != float(have)
        except (TypeError, ValueError):
            return True
    return want != have


# ---- reading what is there --------------------------------------------------------------------------------------

def get_job(clients: AzureClients) -> dict | None:
    cfg = clients.cfg
    with azure_call(f"read the ACA job {cfg.job_name}"):
        try:
            return as_plain(clients.arm.jobs.get(cfg.resource_group, cfg.job_name))
        except ResourceNotFoundError:
            return None


def get_app(clients: AzureClients, name: str = "") -> dict | None:
    """The inference app `name` (default: ACA_APP_NAME), None when it does not exist."""
    cfg = clients.cfg
    cfg.require("The inference app", "app_name")
    name = name or cfg.app_name
    with azure_call(f"read the inference app {name}"):
        try:
            return as_plain(clients.arm.container_apps.get(cfg.resource_group, name))
        except ResourceNotFoundError:
            return None


def _storage_of(existing: Mapping | None) -> str:
    volume = share_mount(((existing or {}).get("properties") or {}).get("template"))
    return (volume or {}).get("storageName") or ""


def read_environment(clients: AzureClients, existing: Mapping | None = None, purpose: str = "Reading the environment"
                     ) -> dict:
    """The managed environment of `existing` (a job or app Azure has), else ACA_ENVIRONMENT_NAME's."""
    cfg = clients.cfg
    env_id = ((existing or {}).get("properties") or {}).get("environmentId") or ""
    name = env_id.rstrip("/").rsplit("/", 1)[-1] if env_id else cfg.environment_name
    if not name:
        cfg.require(purpose, "environment_name")
    with azure_call(f"read the Container Apps environment {name}"):
        try:
            return as_plain(clients.arm.managed_environments.get(cfg.resource_group, name))
        except ResourceNotFoundError:
            raise BackendError(f"The Container Apps environment {name} does not exist in {cfg.resource_group}: "
                               f"deploy infra/provision/finetuning.bicep first (see infra/README.md), or fix "
                               f"ACA_ENVIRONMENT_NAME in infra/finetuning.config.json.") from None


def resolve_environment(clients: AzureClients, existing: Mapping | None, profile: str, notice: Notice,
                        profile_type: str = "") -> tuple[dict, str]:
    """The managed environment (the existing resource's, else ACA_ENVIRONMENT_NAME) and the name of its storage for
    the share, both checked: the workload profile must exist, be of the type the config's CPU and memory were
    sized for, and the storage must point at FILE_SHARE_NAME."""
    cfg = clients.cfg
    environment = read_environment(clients, existing, "Creating the ACA job")
    env_name = str(environment.get("name") or cfg.environment_name)
    types = {p.get("name"): p.get("workloadProfileType") or ""
             for p in (environment.get("properties") or {}).get("workloadProfiles") or []}
    if types and profile not in types:
        raise BackendError(f"The environment {env_name} has no workload profile {profile!r} (it has "
                           f"{', '.join(types)}): set WORKLOAD_PROFILE_NAME in infra/finetuning.config.json, or add "
                           f"a GPU profile to the environment with the Bicep template.")
    have = types.get(profile, "")
    if profile_type and have and have.lower() != profile_type.lower():
        raise BackendError(f"The workload profile {profile} of the environment {env_name} is of type {have}, but the "
                           f"config sizes CPU and memory for {profile_type}: set WORKLOAD_PROFILE_TYPE to {have} in "
                           f"infra/finetuning.config.json (and in inference.config.json for the app), then provision "
                           f"again.")
    storage_name = cfg.environment_storage_name or _storage_of(existing)
    if not storage_name:
        cfg.require("Mounting the share in the job", "environment_storage_name")
    with azure_call(f"read the environment storage {storage_name}"):
        try:
            storage = as_plain(clients.arm.managed_environments_storages.get(cfg.resource_group, env_name,
                                                                            storage_name))
        except ResourceNotFoundError:
            storage = None
    if storage is None:
        if not cfg.storage_key:
            raise BackendError(f"The environment {env_name} has no storage {storage_name} for the share: deploy the "
                               f"Bicep template (it creates it), or set TUNEOPS_STORAGE_KEY so that tuneops can.")
        notice(f"adding the share {cfg.file_share} to the environment as storage {storage_name}")
        body = {"properties": {"azureFile": {"accountName": cfg.storage_account, "accountKey": cfg.storage_key,
                                             "shareName": cfg.file_share, "accessMode": "ReadWrite"}}}
        with azure_call(f"add the storage {storage_name} to the environment"):
            clients.arm.managed_environments_storages.create_or_update(cfg.resource_group, env_name, storage_name,
                                                                       body)
    else:
        share = ((storage.get("properties") or {}).get("azureFile") or {}).get("shareName")
        if share and share != cfg.file_share:
            raise BackendError(f"The environment storage {storage_name} mounts the share {share}, but "
                               f"FILE_SHARE_NAME is {cfg.file_share}: make them agree in infra/finetuning.config.json.")
    return environment, storage_name


def vault_secret_envs(clients: AzureClients, notice: Notice) -> list[str]:
    """The env vars whose secrets are in Key Vault (set through tuneops, or named HF_TOKEN / WANDB_API_KEY)."""
    cfg = clients.cfg
    if not cfg.key_vault_url:
        notice("KEY_VAULT_URL is not set: the job gets no HF_TOKEN / WANDB_API_KEY secrets")
        return []
    envs = [s.env_name for s in list_secrets(clients) if s.tagged or s.env_name in KNOWN_SECRETS]
    if envs:
        cfg.require("Key Vault secret references", "identity_id")
    return sorted(set(envs))


def vault_refs_of(resource: Mapping | None) -> list[str]:
    """The env vars of a job or app that read a Key Vault reference as tuneops makes them (HF_TOKEN -> hf-token). A
    plain secret, or someone else's reference, is not one: rebuilt as ours it would point at a vault secret that may
    not exist; the body builders keep it as it is."""
    props = (resource or {}).get("properties") or {}
    vault = {s.get("name") for s in (props.get("configuration") or {}).get("secrets") or [] if s.get("keyVaultUrl")}
    out = set()
    for c in (props.get("template") or {}).get("containers") or []:
        for e in c.get("env") or []:
            if e.get("secretRef") not in vault:
                continue
            try:
                if secret_name(e.get("name") or "") == e["secretRef"]:
                    out.add(e["name"])
            except InvalidSecretName:
                pass
    return sorted(out)


def _foreign_values(clients: AzureClients, kind: str, existing: Mapping | None, ours: Iterable[str]) -> dict[str, str]:
    """Values of plain (non-Key Vault) secrets someone else put on the resource, which ARM's GET leaves out: a PUT
    without them would drop them. They stay in memory for that PUT only."""
    cfg = clients.cfg
    mine = {secret_name(e) for e in ours}
    plain = [s.get("name") for s in (((existing or {}).get("properties") or {}).get("configuration") or {})
             .get("secrets") or [] if not s.get("keyVaultUrl") and s.get("name") not in mine]
    if not plain:
        return {}
    with azure_call(f"read the {kind}'s secrets"):
        if kind == "job":
            listed = clients.arm.jobs.list_secrets(cfg.resource_group, cfg.job_name)
        else:
            listed = clients.arm.container_apps.list_secrets(cfg.resource_group, cfg.app_name)
    return {s.name: s.value for s in listed.value or [] if s.value is not None}


# ---- the job and the inference app ---------------------------------------------------------------------------

def _wanted(clients: AzureClients, kind: str, existing: Mapping | None, profile: str,
            secret_envs: Iterable[str] | None, notice: Notice, build: Callable[..., dict]) -> dict:
    """The body tuneops wants for the job or the app (`build` makes it): the environment and its storage for the
    share checked, the Key Vault references (those given, else the vault's), and others' plain secrets kept."""
    cfg = clients.cfg
    if cfg.registry:
        cfg.require(f"Pulling the image from {cfg.registry}", "identity_id")
    profile_type = cfg.workload_profile_type if kind == "job" else cfg.app_workload_profile_type
    environment, storage_name = resolve_environment(clients, existing, profile, notice, profile_type)
    envs = list(secret_envs) if secret_envs is not None else vault_secret_envs(clients, notice)
    return build(cfg, environment, storage_name=storage_name, secret_envs=envs, existing=existing,
                 foreign_secret_values=_foreign_values(clients, kind, existing, envs))


def _put(clients: AzureClients, what: str, name: str, begin: Callable, body: dict, existing: dict | None,
         result: ProvisionResult, notice: Notice, change_kind: str) -> dict | None:
    """PUT `body` when it changes what is there, with the changes in words on `result`; returns the resource."""
    if existing is not None and not differs(body, existing):
        return existing
    result.changes = describe_changes(change_kind, name, existing, body) or (
        [] if existing is None else ["settings refreshed"])
    notice(("creating" if existing is None else "updating") + f" the {what} {name}")
    with azure_call(f"{'create' if existing is None else 'update'} the {what} {name}"):
        return as_plain(begin(clients.cfg.resource_group, name, body).result())


def provision_finetune(clients: AzureClients, notice: Notice = _quiet,
                       secret_envs: Iterable[str] | None = None) -> ProvisionResult:
    """Create or update the fine-tuning job: GPU profile, Manual trigger, replica timeout, no retries, parallelism 1,
    the share at /mount, the image and command, Key Vault secret refs as env vars."""
    cfg = clients.cfg
    notice(f"reading the ACA job {cfg.job_name}")
    # The last run's command and env in the job's template are not a change to undo (see resources.run_template).
    existing = without_run(cfg, get_job(clients))
    body = _wanted(clients, "job", existing, cfg.workload_profile, secret_envs, notice, job_body)
    result = ProvisionResult("finetune", cfg.job_name, created=existing is None)
    _put(clients, "ACA job", cfg.job_name, clients.arm.jobs.begin_create_or_update, body, existing, result, notice,
         change_kind="job")
    return result


def endpoint_of(app: Mapping | None) -> str:
    """The app's https address from its ingress, '' when it has none yet."""
    fqdn = ((((app or {}).get("properties") or {}).get("configuration") or {}).get("ingress") or {}).get("fqdn")
    return f"https://{fqdn}" if fqdn else ""


def record_endpoint(cfg: AcaConfig, endpoint: str, notice: Notice) -> None:
    """Write ACA_APP_ENDPOINT back to inference.config.json, as AI Toolkit does after provisioning."""
    path = cfg.infra_dir / INFERENCE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        if data.get("ACA_APP_ENDPOINT") == endpoint:
            return
        data["ACA_APP_ENDPOINT"] = endpoint
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
    except (OSError, json.JSONDecodeError) as e:
        notice(f"could not record the endpoint in {path}: {e}")


def put_app(clients: AzureClients, name: str, body: dict, existing: dict | None, result: ProvisionResult,
            notice: Notice) -> dict | None:
    return _put(clients, "inference app", name, clients.arm.container_apps.begin_create_or_update, body, existing,
                result, notice, change_kind="inference app")


def provision_inference(clients: AzureClients, notice: Notice = _quiet,
                        secret_envs: Iterable[str] | None = None) -> ProvisionResult:
    """Create or update the inference Container App (payload.serve on 7860, external ingress, /healthz probes,
    0..MAX_REPLICAS replicas)."""
    cfg = clients.cfg
    cfg.require("Provisioning the inference app", "app_name")
    notice(f"reading the inference app {cfg.app_name}")
    existing = get_app(clients)
    body = _wanted(clients, "app", existing, cfg.app_workload_profile, secret_envs, notice, app_body)
    result = ProvisionResult("inference", cfg.app_name, created=existing is None)
    app = put_app(clients, cfg.app_name, body, existing, result, notice)
    result.endpoint = endpoint_of(app) or endpoint_of(get_app(clients))
    if result.endpoint:
        record_endpoint(cfg, result.endpoint, notice)
    return result


def wanted_app(clients: AzureClients, name: str, existing: dict | None, notice: Notice,
               secret_envs: Iterable[str] | None = None, **serve: str) -> dict:
    """The body of inference app `name` serving `serve` (base_model and manifest: resources.app_body; none: what it
    serves now), with the Key Vault references given, else those it has (a new app: the vault's)."""
    envs = secret_envs if secret_envs is not None else vault_refs_of(existing) if existing is not None else None
    return _wanted(clients, "app", existing, clients.cfg.app_workload_profile, envs, notice,
                   functools.partial(app_body, name=name, **serve))


# ---- a secret reference -------------------------------------------------------------------------------------------

def ensure_secret_reference(clients: AzureClients, env_name: str, notice: Notice = _quiet) -> ProvisionResult:
    """Make the job (and the inference app, if there is one) reference the Key Vault secret for `env_name`."""
    cfg = clients.cfg
    cfg.require("Secret references", "key_vault_url", "identity_id")
    name = secret_name(env_name)
    existing = get_job(clients)
    if existing is None:
        notice(f"the ACA job {cfg.job_name} does not exist yet; creating it with the secret")
        return provision_finetune(clients, notice)
    have = vault_refs_of(existing)
    result = ProvisionResult("secret", cfg.job_name)
    if env_name in have:
        notice(f"the job already references {name} as {env_name}")
    else:
        result = provision_finetune(clients, notice, secret_envs=sorted(set(have) | {env_name}))
        result.kind = "secret"
    if cfg.app_name:
        app = get_app(clients)
        if app is not None:
            app_envs = vault_refs_of(app)
            if env_name not in app_envs:
                sub = provision_inference(clients, notice, secret_envs=sorted(set(app_envs) | {env_name}))
                result.changes += [f"inference app: {c}" for c in sub.changes]
    return result

