"""Pure builders for what tuneops asks of Azure: the ACA job and inference app bodies, a run's command and its
execution template, what changed between two bodies, and how an execution's status maps onto a run.

No I/O here: each function takes plain data (the config, the resource Azure returned) and gives plain JSON-ready dicts,
so they are tested without a network and the SDK sends them unchanged.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, requires
from typing import Any

from jobs.backends.aca.config import SEED_IMAGE, AcaConfig
from jobs.backends.protocol import ExecStatus, ExecutionInfo

MOUNT = "/mount"
SERVE_PORT = 7860
HEALTH_PATH = "/healthz"
# Env vars that mark an execution as a run's attempt: how a second start of the same attempt finds the first one.
RUN_ID_ENV = "TUNEOPS_RUN_ID"
ATTEMPT_ENV = "TUNEOPS_ATTEMPT"
CONFIG_ENV = "TUNEOPS_CONFIG"
# What a run puts into the job's env besides its command (see run_env); a provisioning takes them out again.
RUN_ENV_NAMES = (RUN_ID_ENV, ATTEMPT_ENV, CONFIG_ENV, "PYTHONUNBUFFERED")
# Well-known secrets the payload reads from its environment.
KNOWN_SECRETS = ("HF_TOKEN", "WANDB_API_KEY")
# Key Vault tag that records which env var a secret feeds; set by `jobs.backends.aca.secrets.set_secret`.
ENV_TAG = "tuneops-env"

_ENV_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}[A-Za-z0-9]$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class InvalidSecretName(ValueError):
    pass


def secret_name(env_name: str) -> str:
    """The Key Vault and ACA secret name for an env var: HF_TOKEN -> hf-token."""
    if not _ENV_NAME_RE.match(env_name or ""):
        raise InvalidSecretName(
            f"{env_name!r} is not a valid secret name: use an environment variable name of 2-64 letters, digits and "
            f"underscores that starts with a letter, like HF_TOKEN or WANDB_API_KEY")
    return env_name.lower().replace("_", "-")


def env_name_for(name: str, tags: Mapping[str, str] | None) -> str:
    """The env var a Key Vault secret feeds: its tag, or the name back-mapped (hf-token -> HF_TOKEN)."""
    tagged = (tags or {}).get(ENV_TAG)
    return tagged if tagged and _ENV_NAME_RE.match(tagged) else name.upper().replace("-", "_")


def is_hub_id(model: str) -> bool:
    return bool(_HUB_ID_RE.match(model)) and not model.startswith(("model-cache/", "runs/", "./"))


def needs_install(image: str) -> bool:
    """The seed's PyTorch image (or any stock pytorch/pytorch image) lacks our packages: a run installs them first."""
    name = image.split("/", 1)[1] if image.startswith("docker.io/") else image
    return image == SEED_IMAGE or name.startswith("pytorch/pytorch")


def payload_requirements() -> list[str]:
    """The payload extra's requirements from the installed package's metadata (one source: pyproject.toml).
    torch is left out: the PyTorch image has it, and reinstalling it would pull gigabytes."""

    try:
        reqs = requires("tuneops") or []
    except PackageNotFoundError:
        return []
    out = []
    for r in reqs:
        spec, _, marker = r.partition(";")
        if 'extra == "payload"' in marker or 'extra == "serve"' in marker:
            if not re.match(r"^torch\b", spec.strip()):
                out.append(spec.strip())
    return out


# ---- a run ---------------------------------------------------------------------------------------------------------

def model_cache_dir(model: str) -> str:
    return f"model-cache/{model}"


# `python -P` keeps the working directory (/mount, the workspace) off sys.path, where its datasets/ folder would shadow
# the datasets package. The payload code synced to /mount/payload comes onto the path through a folder that holds
# nothing else; where the share has none, the image's installed payload serves.
CODE_PATH = (f'code="${{TMPDIR:-/tmp}}/tuneops-code" && mkdir -p "$code" && ln -sfn {MOUNT}/payload "$code/payload" '
             '&& export PYTHONPATH="$code${PYTHONPATH:+:$PYTHONPATH}"')
PYTHON = "python -P"


def train_command(config_rel: str, gpus: int = 1) -> str:
    """The trainer's command: one process, or with several GPUs one per GPU under torchrun (DDP; rank 0 writes the
    run folder). PYTHONSAFEPATH is `-P` for torchrun and every process it starts; `--standalone` keeps the
    rendezvous on the replica, and torchrun stops every rank when one fails."""
    train = f"-m payload.train --config {shlex.quote(config_rel)}"
    if gpus <= 1:
        return f"{PYTHON} {train}"
    return f"PYTHONSAFEPATH=1 torchrun --standalone --nproc_per_node {int(gpus)} {train}"


def run_script(run_id: str, config_rel: str, *, download_model: str = "", install: Sequence[str] = (),
               gpus: int = 1) -> str:
    """The bash script a run's container runs in /mount. Everything it prints goes to the console log (Log
    Analytics) and is appended to `runs/<id>/train.log` on the share, from which live progress is read."""
    log = f"runs/{run_id}/train.log"
    steps = ["set -o pipefail", f"cd {MOUNT}", f"mkdir -p runs/{run_id}"]
    inner = [CODE_PATH]
    if install:
        inner.append("pip install --no-cache-dir --quiet " + " ".join(shlex.quote(r) for r in install))
    if download_model:
        target = model_cache_dir(download_model)
        code = (f"from huggingface_hub import snapshot_download; "
                f"snapshot_download({json.dumps(download_model)}, local_dir={json.dumps(target)})")
        # Downloaded once to the share; later runs find config.json there and skip it. HF_TOKEN serves gated models.
        inner.append(
            f"if [ ! -f {shlex.quote(target + '/config.json')} ]; then echo 'downloading {download_model} to {target}'; "
            f"{PYTHON} -c {shlex.quote(code)}; fi")
    inner.append(train_command(config_rel, gpus))
    steps.append("{ " + " && ".join(inner) + "; } 2>&1 | tee -a " + shlex.quote(log))
    # An execution says Failed but not how (JobExecution has status, start and end only: Jobs.json 2025-01-01), so
    # the script leaves its exit code next to the log.
    steps += ["rc=$?", f"echo $rc > {shlex.quote(exit_code_path(run_id))}", "exit $rc"]
    return "; ".join(steps)


def exit_code_path(run_id: str) -> str:
    return f"runs/{run_id}/exit_code"


def share_mount(template: Mapping[str, Any] | None) -> dict | None:
    """The AzureFile volume a job's or an app's first container mounts at /mount, or None."""
    template = template or {}
    volumes = {v.get("name"): v for v in template.get("volumes") or []}
    for c in (template.get("containers") or [])[:1]:
        for m in c.get("volumeMounts") or []:
            v = volumes.get(m.get("volumeName"))
            if m.get("mountPath") == MOUNT and v and v.get("storageType") == "AzureFile":
                return dict(v)
    return None


def run_template(job: Mapping[str, Any], script: str, env: Mapping[str, str]) -> dict[str, Any]:
    """The job's template with a run's command and env in its first container; volumes, mounts, image, resources
    and secret references stay the job's own.

    A run's execution starts from this template with no override. ACA replaces the job's containers with an
    override's and the override cannot carry volume mounts: JobExecutionContainer has no volumeMounts and
    JobExecutionTemplate no volumes (Jobs.json, Microsoft.App 2025-01-01; microsoft/azure-container-apps#1044), and
    executions started with an override lost the job's volumes (microsoft/azure-container-apps#909), which would
    leave /mount empty. So the run goes into the job's template (a JSON merge patch of `properties.template`,
    which replaces the template's arrays whole) and the start sends no body."""
    template = json.loads(json.dumps(((job.get("properties") or {}).get("template")) or {}))
    containers = template.get("containers") or []
    if not containers or share_mount(template) is None:
        raise ValueError("the job's template has no container that mounts the share at /mount")
    base = containers[0]
    ours = set(env)
    container_env = [dict(e) for e in base.get("env") or [] if e.get("name") not in ours]
    container_env += [{"name": k, "value": v} for k, v in env.items()]
    base.update(command=["/bin/bash", "-c", script], env=container_env)
    base.pop("args", None)
    for c in containers + (template.get("initContainers") or []):
        # What Azure fills in and refuses back: ContainerResources.ephemeralStorage is read-only.
        (c.get("resources") or {}).pop("ephemeralStorage", None)
    return {k: v for k, v in template.items() if k in ("containers", "initContainers", "volumes") and v is not None}


def run_env(run_id: str, attempt: int, config_rel: str) -> dict[str, str]:
    return {RUN_ID_ENV: run_id, ATTEMPT_ENV: str(attempt), CONFIG_ENV: config_rel, "PYTHONUNBUFFERED": "1"}


def execution_matches(execution: Mapping[str, Any], run_id: str, attempt: int) -> bool:
    """Was this execution started for this run's attempt? (Its template carries the run id and attempt.)"""
    containers = (((execution.get("properties") or {}).get("template") or {}).get("containers")) or []
    env = {e.get("name"): e.get("value") for c in containers for e in c.get("env") or []}
    return env.get(RUN_ID_ENV) == run_id and env.get(ATTEMPT_ENV) == str(attempt)


def _parse_time(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
    if isinstance(value, str) and value:
        try:
            return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return None


def map_execution(status: str | None, *, reason: str = "", message: str = "", start: Any = None, end: Any = None,
                  replica_timeout: int | None = None) -> ExecutionInfo:
    """ACA's execution status -> the executor's. A Failed execution that ran for the whole replica timeout (or
    whose reason says so) timed out; Degraded (some replica failed) is a failure."""
    s = (status or "Unknown").strip()
    said = "; ".join(x for x in (reason, message) if x)
    if s == "Processing":
        return ExecutionInfo(ExecStatus.PENDING, "Processing")
    if s == "Running":
        return ExecutionInfo(ExecStatus.RUNNING, "Running")
    if s == "Succeeded":
        return ExecutionInfo(ExecStatus.SUCCEEDED, "Succeeded", 0)
    if s == "Stopped":
        return ExecutionInfo(ExecStatus.STOPPED, "Stopped")
    if s in ("Failed", "Degraded"):
        t0, t1 = _parse_time(start), _parse_time(end)
        ran = (t1 - t0).total_seconds() if t0 and t1 else None
        hit_limit = replica_timeout is not None and ran is not None and ran >= replica_timeout - 1
        if hit_limit or re.search(r"deadline|timed? ?out|timeout", said, re.I):
            return ExecutionInfo(ExecStatus.TIMED_OUT,
                                 f"the replica timeout ({replica_timeout} s) ended it" if replica_timeout else
                                 f"timed out ({said})")
        detail = s + (f": {said}" if said else "")
        if s == "Degraded":
            detail = "Degraded (a replica of the execution failed)" + (f": {said}" if said else "")
        code = re.search(r"exit(?:ed with)? code (-?\d+)", said)
        return ExecutionInfo(ExecStatus.FAILED, detail, int(code.group(1)) if code else None)
    return ExecutionInfo(ExecStatus.UNKNOWN, s)


# ---- the job -------------------------------------------------------------------------------------------------------

def volume_name(share: str) -> str:
    return f"{share}volume"  # the seed's naming


def secret_refs(cfg: AcaConfig, env_names: Iterable[str]) -> tuple[list[dict], list[dict]]:
    """ACA secrets that reference Key Vault through the managed identity, and the env vars that use them."""
    secrets, env = [], []
    for e in sorted(set(env_names)):
        name = secret_name(e)
        secrets.append({"name": name, "keyVaultUrl": f"{cfg.key_vault_url}/secrets/{name}",
                        "identity": cfg.identity_id})
        env.append({"name": e, "secretRef": name})
    return secrets, env


def _identity(cfg: AcaConfig, existing: Mapping[str, Any] | None) -> dict[str, Any]:
    old = dict((existing or {}).get("identity") or {})
    types = {t.strip() for t in str(old.get("type") or "None").split(",") if t.strip() and t.strip() != "None"}
    users = dict(old.get("userAssignedIdentities") or {})
    if cfg.identity_id:
        types.add("UserAssigned")
        # ARM gives identity ids back in another case (resourcegroups/..., or all lower case:
        # Azure/azure-rest-api-specs#18595, pulumi/pulumi-azure-native#2152); ids are case-insensitive, so the
        # configured one replaces its differently spelled twin rather than being listed twice.
        users = {k: v for k, v in users.items() if k.lower() != cfg.identity_id.lower()}
        users[cfg.identity_id] = {}
    if not types:
        return {"type": "None"}
    out: dict[str, Any] = {"type": ",".join(sorted(types, key=lambda t: t != "SystemAssigned"))}
    if "UserAssigned" in types:
        out["userAssignedIdentities"] = {k: {} for k in users}
    return out


def _mount(existing_template: Mapping[str, Any] | None, share: str, storage_name: str) -> tuple[dict, dict]:
    """The share's volume and its /mount; an existing job's own are kept (a seed-provisioned job names them)."""
    volume = share_mount(existing_template)
    if volume and (not storage_name or volume.get("storageName") == storage_name):
        return volume, {"volumeName": volume["name"], "mountPath": MOUNT}
    name = volume_name(share)
    return ({"name": name, "storageType": "AzureFile", "storageName": storage_name},
            {"volumeName": name, "mountPath": MOUNT})


def _keep_foreign_secrets(existing_secrets: Iterable[Mapping[str, Any]], ours: Iterable[Mapping[str, Any]],
                          values: Mapping[str, str]) -> list[dict]:
    """Secrets of the job that tuneops does not manage stay: Key Vault refs as they are, plain values with the
    value Azure gave back (ARM's GET leaves values out)."""
    taken = {s["name"] for s in ours}
    kept = []
    for s in existing_secrets:
        name = s.get("name")
        if not name or name in taken:
            continue
        if s.get("keyVaultUrl"):
            kept.append({k: s[k] for k in ("name", "keyVaultUrl", "identity") if s.get(k)})
        elif name in values:
            kept.append({"name": name, "value": values[name]})
    return kept


def _registries(cfg: AcaConfig, existing_conf: Mapping[str, Any]) -> list[dict]:
    """A private registry (REGISTRY, e.g. myacr.azurecr.io) is pulled from with the managed identity (AcrPull)."""
    out = [dict(r) for r in existing_conf.get("registries") or [] if r.get("server") != cfg.registry]
    if cfg.registry:
        out.insert(0, {"server": cfg.registry, "identity": cfg.identity_id})
    return out


def _secrets_and_env(cfg: AcaConfig, old_props: Mapping[str, Any], old_container: Mapping[str, Any],
                     secret_envs: Iterable[str], foreign_secret_values: Mapping[str, str] | None
                     ) -> tuple[list[dict], list[dict]]:
    """A resource's secrets (our Key Vault references, then the foreign ones kept) and its container's env vars."""
    ours_secrets, ours_env = secret_refs(cfg, secret_envs)
    secrets = ours_secrets + _keep_foreign_secrets((old_props.get("configuration") or {}).get("secrets") or [],
                                                   ours_secrets, foreign_secret_values or {})
    known = {s["name"] for s in secrets}
    ours_env_names = {e["name"] for e in ours_env}
    # The container's other env vars stay, unless they point at a secret that is gone.
    env = [dict(e) for e in old_container.get("env") or []
           if e.get("name") not in ours_env_names and (not e.get("secretRef") or e["secretRef"] in known)]
    return secrets, env + ours_env


def _resource_body(cfg: AcaConfig, environment: Mapping[str, Any], existing: Mapping[str, Any] | None,
                   profile: str, configuration: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
    """The PUT body around a job's or an app's configuration and template; the existing resource's tags stay."""
    body: dict[str, Any] = {
        "location": (existing or {}).get("location") or environment.get("location"),
        "identity": _identity(cfg, existing),
        "properties": {"environmentId": environment.get("id"), "workloadProfileName": profile,
                       "configuration": configuration, "template": template},
    }
    if (existing or {}).get("tags"):
        body["tags"] = dict(existing["tags"])
    return body


def job_command(cfg: AcaConfig) -> list[str]:
    return ["/bin/bash", "-c", "; ".join(cfg.commands)]


def without_run(cfg: AcaConfig, job: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The job as its provisioning left it: the last run's command and env (see run_template) taken out."""
    if not job:
        return None
    out = json.loads(json.dumps(job))
    containers = ((out.get("properties") or {}).get("template") or {}).get("containers") or []
    if containers and any(e.get("name") == RUN_ID_ENV for e in containers[0].get("env") or []):
        containers[0]["env"] = [e for e in containers[0].get("env") or [] if e.get("name") not in RUN_ENV_NAMES]
        containers[0]["command"] = job_command(cfg)
    return out


def job_body(cfg: AcaConfig, environment: Mapping[str, Any], *, storage_name: str, secret_envs: Iterable[str],
             existing: Mapping[str, Any] | None = None, foreign_secret_values: Mapping[str, str] | None = None
             ) -> dict[str, Any]:
    """The whole ACA job as tuneops wants it (a PUT body). `existing` is the job Azure has now, if any."""
    existing = without_run(cfg, existing)
    old_props = (existing or {}).get("properties") or {}
    old_template = old_props.get("template") or {}
    old_container = (old_template.get("containers") or [{}])[0]
    secrets, env = _secrets_and_env(cfg, old_props, old_container, secret_envs, foreign_secret_values)
    volume, mount = _mount(old_template, cfg.file_share, storage_name)
    container = {
        "name": old_container.get("name") or cfg.job_name,
        "image": cfg.job_image,
        "command": job_command(cfg),
        "resources": {"cpu": cfg.cpu, "memory": cfg.memory},
        "env": env,
        "volumeMounts": [mount],
    }
    configuration = {
        "triggerType": "Manual",
        "replicaTimeout": cfg.replica_timeout,
        "replicaRetryLimit": 0,
        "manualTriggerConfig": {"replicaCompletionCount": 1, "parallelism": 1},
        "secrets": secrets,
        "registries": _registries(cfg, old_props.get("configuration") or {}),
    }
    return _resource_body(cfg, environment, existing, cfg.workload_profile, configuration,
                          {"containers": [container], "volumes": [volume]})


def app_command(cfg: AcaConfig, base_model: str = "", manifest: str = "") -> list[str]:
    """The inference app's command: the seed's COMMANDS when inference.config.json has them, else payload.serve; with
    `manifest` (relative to the share), the base model's endpoint serving every adapter that manifest lists."""
    if cfg.app_commands and not base_model:
        return ["/bin/bash", "-c", "; ".join(cfg.app_commands)]
    base = model_cache_dir(base_model) if base_model and is_hub_id(base_model) else (base_model or "model-cache/base")
    which = f"--base-only --adapters {shlex.quote(manifest)}" if manifest else "--base-only"
    steps = [f"cd {MOUNT}", CODE_PATH]
    if needs_install(cfg.app_image or cfg.job_image):
        steps.append("pip install --no-cache-dir --quiet " + " ".join(shlex.quote(r) for r in payload_requirements()))
    steps.append(f"{PYTHON} -m payload.serve --base {shlex.quote(base)} {which} --host 0.0.0.0 --port {SERVE_PORT}")
    return ["/bin/bash", "-c", "; ".join(steps)]


MANIFEST_ARG = re.compile(r"--adapters\s+'?([^\s';]+)")


def served_manifest(app: Mapping[str, Any] | None) -> str | None:
    """The adapter manifest an inference app's payload.serve follows; '' when it runs no manifest (the seed's
    commands, a base model alone, an adapter of the old one-adapter command), None when there is no app."""
    if app is None:
        return None
    containers = (((app.get("properties") or {}).get("template") or {}).get("containers") or [{}])
    m = MANIFEST_ARG.search(" ".join(containers[0].get("command") or []))
    return m.group(1) if m else ""


def app_body(cfg: AcaConfig, environment: Mapping[str, Any], *, storage_name: str, secret_envs: Iterable[str],
             existing: Mapping[str, Any] | None = None, name: str = "", base_model: str = "", manifest: str = "",
             foreign_secret_values: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The inference Container App running payload.serve: external ingress on 7860, probes on /healthz, min
    replicas 0 (the seed keeps one A100 on around the clock; this one scales to zero) and max from the config."""
    old_props = (existing or {}).get("properties") or {}
    old_template = old_props.get("template") or {}
    old_container = (old_template.get("containers") or [{}])[0]
    if not base_model and existing:
        # A provision keeps what a deploy put there: the serve command names the model and its manifest.
        old_cmd = old_container.get("command") or []
        if any("payload.serve" in part for part in old_cmd):
            command = list(old_cmd)
        else:
            command = app_command(cfg)
    else:
        command = app_command(cfg, base_model, manifest)
    secrets, env = _secrets_and_env(cfg, old_props, old_container, secret_envs, foreign_secret_values)
    volume, mount = _mount(old_template, cfg.file_share, storage_name)
    probe = {"httpGet": {"path": HEALTH_PATH, "port": SERVE_PORT, "scheme": "HTTP"}}
    container = {
        "name": old_container.get("name") or name or cfg.app_name,
        "image": cfg.app_image or cfg.job_image,
        "command": command,
        "resources": {"cpu": cfg.app_cpu, "memory": cfg.app_memory},
        "env": env,
        "probes": [
            {"type": "Startup", **probe, "initialDelaySeconds": 30, "periodSeconds": 30, "failureThreshold": 40,
             "timeoutSeconds": 5},
            {"type": "Liveness", **probe, "periodSeconds": 30, "failureThreshold": 3, "timeoutSeconds": 5},
            {"type": "Readiness", **probe, "periodSeconds": 10, "failureThreshold": 3, "timeoutSeconds": 5},
        ],
        "volumeMounts": [mount],
    }
    configuration = {
        "activeRevisionsMode": "Single",
        "ingress": {"external": True, "targetPort": SERVE_PORT, "transport": "auto", "allowInsecure": False,
                    "traffic": [{"latestRevision": True, "weight": 100}]},
        "secrets": secrets,
        "registries": _registries(cfg, old_props.get("configuration") or {}),
    }
    template = {"containers": [container], "volumes": [volume],
                "scale": {"minReplicas": cfg.app_min_replicas, "maxReplicas": cfg.app_max_replicas}}
    return _resource_body(cfg, environment, existing, cfg.app_workload_profile, configuration, template)


# ---- what changed ----------------------------------------------------------------------------------------------------

def _facts(body: Mapping[str, Any] | None) -> dict[str, str]:
    """The fields a person cares about, flattened to comparable text."""
    if not body:
        return {}
    p = body.get("properties") or {}
    conf = p.get("configuration") or {}
    template = p.get("template") or {}
    c = (template.get("containers") or [{}])[0]
    res = c.get("resources") or {}
    ingress = conf.get("ingress") or {}
    scale = template.get("scale") or {}
    facts = {
        "image": c.get("image"),
        "command": " ".join(c.get("command") or []),
        "workload profile": p.get("workloadProfileName"),
        "cpu/memory": f"{res.get('cpu')} / {res.get('memory')}" if res else None,
        "replica timeout": conf.get("replicaTimeout"),
        "replica retry limit": conf.get("replicaRetryLimit"),
        "trigger": conf.get("triggerType"),
        "parallelism": (conf.get("manualTriggerConfig") or {}).get("parallelism"),
        "secrets": ", ".join(sorted(f"{s.get('name')}{' (Key Vault)' if s.get('keyVaultUrl') else ''}"
                                    for s in conf.get("secrets") or [])),
        "env": ", ".join(sorted(f"{e.get('name')}{'→' + e['secretRef'] if e.get('secretRef') else ''}"
                                for e in c.get("env") or [])),
        "share mount": ", ".join(f"{v.get('storageName')} at {m.get('mountPath')}"
                                 for m in c.get("volumeMounts") or []
                                 for v in template.get("volumes") or [] if v.get("name") == m.get("volumeName")),
        "identity": ", ".join(sorted(k.lower() for k in (body.get("identity") or {}).get("userAssignedIdentities")
                                     or {})) or
                    (body.get("identity") or {}).get("type"),
        "ingress": f"{'external' if ingress.get('external') else 'internal'} :{ingress.get('targetPort')}"
                   if ingress else None,
        "replicas": f"{scale.get('minReplicas')}..{scale.get('maxReplicas')}" if scale else None,
        "probes": ", ".join(f"{pr.get('type')} {(pr.get('httpGet') or {}).get('path')}" for pr in c.get("probes") or []),
    }
    return {k: str(v) for k, v in facts.items() if v not in (None, "")}


def _short(value: str, limit: int = 80) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


def describe_changes(kind: str, name: str, old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """Human lines for what a PUT of `new` changes on `old` ([] when nothing does)."""
    if not old:
        f = _facts(new)
        return [f"created {kind} {name}: " + "; ".join(f"{k} {_short(v)}" for k, v in f.items()
                                                         if k in ("image", "workload profile", "replica timeout",
                                                                  "secrets", "ingress", "replicas"))]
    a, b = _facts(old), _facts(new)
    out = []
    for key in b.keys() | a.keys():
        if a.get(key) != b.get(key):
            out.append(f"{key}: {_short(a.get(key, '(none)'))} → {_short(b.get(key, '(none)'))}")
    return sorted(out)


def as_plain(obj: Any) -> Any:
    """An SDK model (a MutableMapping) or anything JSON-like, as plain JSON data."""
    if obj is None:
        return None
    if hasattr(obj, "as_dict") and not isinstance(obj, Mapping):
        return obj.as_dict()
    return json.loads(json.dumps(obj, default=_default))


def _default(o):
    if isinstance(o, dt.datetime):
        return o.isoformat()
    if isinstance(o, Mapping):
        return dict(o)
    if hasattr(o, "value"):
        return o.value
    return str(o)
