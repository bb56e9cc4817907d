"""The ACA backend's inference endpoints: one Container App per base model, running `payload.serve --base-only
--adapters deployments/<base>/adapters.json` on the share, min replicas 0.

A deploy is a manifest write on the Azure Files share (jobs.core.endpoints: the same file as the local backend's) plus
an app update only when the app's command is not yet that one; the running replicas follow the manifest within
seconds (payload.serving.manifest polls it) and a replica that starts from zero reads it whole. So a deploy never
restarts a revision, and an undeploy never touches Azure Resource Manager at all.

Which app serves which base: ACA_APP_NAME (inference.config.json, where AI Toolkit writes its endpoint) serves the
first base model deployed on it; every other base gets an app of its own, `<ACA_APP_NAME>-<8 hex of the base's
name>`. Which base an app serves is read from its command, so it holds across restarts of the bot and of Redis.

Manifest writes take a Redis lock per base model (a deploy op and an undeploy from Slack at once must not lose one
another's entry). Azure Files writes a file as Create (sized, zero-filled) then Put Range: a server that reads
between the two finds no JSON, keeps what it has loaded and reads again at its next poll.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from jobs.backends.aca import share as sharefs
from jobs.backends.aca.clients import AzureClients
from jobs.backends.aca.errors import azure_call
from jobs.backends.aca.provision import (
    ProvisionResult,
    endpoint_of,
    get_app,
    put_app,
    record_endpoint,
    vault_refs_of,
    wanted_app,
)
from jobs.backends.aca.resources import served_manifest
from jobs.core import endpoints, store
from jobs.core.domain import Run
from jobs.core.errors import BackendError
from payload import lorashapes
from payload.modelpath import HUB_ID, MODEL_CACHE

log = logging.getLogger(__name__)

MANIFEST_LOCK_S = 120
APP_NAME_MAX = 32  # Container App names: 2-32 lower-case letters, digits and '-' (ContainerApps.json, the name's pattern)

Notice = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass
class ServedOn:
    """Where a deploy landed: the app, its address, and what changed in Azure to get there."""
    app: str
    endpoint: str
    result: ProvisionResult


def derived_app_name(app_name: str, model: str) -> str:
    """The app of a base model other than the one ACA_APP_NAME serves: a stable name within Container Apps' rules."""
    return _derived(app_name, endpoints.endpoint_name(model))


def _derived(app_name: str, folder: str) -> str:
    digest = hashlib.sha1(folder.encode()).hexdigest()[:8]
    return f"{app_name[:APP_NAME_MAX - 9].rstrip('-')}-{digest}"


def derived_apps(clients: AzureClients) -> list[tuple[str, dict]]:
    """The inference apps of base models other than ACA_APP_NAME's, as they are now: one per adapter list on the
    share whose derived app exists and follows it."""
    with azure_call(f"list {endpoints.ROOT}/ on the share"):
        folders = sharefs.list_dirs(clients.share, endpoints.ROOT)
    apps = []
    for folder in sorted(folders):
        name = _derived(clients.cfg.app_name, folder)
        app = get_app(clients, name) if name != clients.cfg.app_name else None
        if app is not None and served_manifest(app) == f"{endpoints.ROOT}/{folder}/{endpoints.MANIFEST}":
            apps.append((name, app))
    return apps


def ensure_secret_on_derived_apps(clients: AzureClients, env_name: str, notice: Notice = _quiet) -> list[str]:
    """Make every derived inference app reference the Key Vault secret for `env_name` too (what
    provision.ensure_secret_reference does for the job and ACA_APP_NAME); returns the apps it updated."""
    updated: list[str] = []
    for name, app in derived_apps(clients):
        have = vault_refs_of(app)
        if env_name in have:
            continue
        body = wanted_app(clients, name, app, notice, secret_envs=sorted(set(have) | {env_name}))
        put_app(clients, name, body, app, ProvisionResult("secret", name), notice)
        updated.append(name)
    return updated


def app_for(clients: AzureClients, model: str) -> tuple[str, dict | None]:
    """The inference app that serves (or will serve) `model`'s endpoint, and the app as it is now (None: none yet).
    ACA_APP_NAME while it serves no manifest or this base's; else the base's own derived app."""
    cfg = clients.cfg
    manifest = endpoints.manifest_rel(model)
    primary = get_app(clients)
    if primary is None or served_manifest(primary) in ("", manifest):
        return cfg.app_name, primary
    name = derived_app_name(cfg.app_name, model)
    return name, get_app(clients, name)


def manifest_lock(conn, model: str):
    """One writer at a time of the base model's manifest on the share."""
    return store.holding(conn, store.azure_lock("manifest", endpoints.endpoint_name(model)), timeout_s=MANIFEST_LOCK_S,
                         wait_s=MANIFEST_LOCK_S, busy=BackendError(
                             f"another deploy has held the adapter list of {model} for too long; try again later",
                             transient=True))


def read_manifest(clients: AzureClients, model: str) -> list[dict]:
    rel = endpoints.manifest_rel(model)
    with azure_call(f"read {rel} on the share"):
        raw = sharefs.read_range(clients.share, rel)
    return endpoints.parse(raw.decode("utf-8", errors="replace"), f"{rel} on the share") if raw else []


def _write_manifest(clients: AzureClients, model: str, entries: list[dict]) -> None:
    rel = endpoints.manifest_rel(model)
    with azure_call(f"write {rel} on the share"):
        sharefs.write_bytes(clients.share, rel, endpoints.dump(entries).encode())


def _check_adapter(clients: AzureClients, run: Run) -> str:
    """The adapter's folder on the share, after checking that it is there and trained on the run's base model."""
    adapter = run.adapter_path
    with azure_call(f"read the adapter of {run.id} on the share"):
        config = sharefs.read_json(clients.share, f"{adapter}/adapter_config.json")
    if not isinstance(config, dict):
        raise BackendError(f"the adapter of {run.id} is not on the share at {adapter} (no readable "
                           "adapter_config.json); run it again")
    trained_on = str(config.get("base_model_name_or_path") or "")
    if trained_on and not _same_base(trained_on, run.model):
        raise BackendError(f"the adapter of {run.id} was trained on {trained_on}, not on {run.model}; it cannot be "
                           f"served on the endpoint of {run.model}")
    with azure_call(f"read the weights' headers of {run.id}'s adapter and of {run.model} on the share"):
        problem = _shape_problem(clients, adapter, run.model)
    if problem:
        raise BackendError(f"the adapter of {run.id} does not fit {run.model} ({problem}): it was trained for "
                           "another base model; deploy it on that one")
    return adapter


def _weight_shapes(clients: AzureClients, path: str) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape from a safetensors file's header on the share (a few KB read, not the weights); None
    when the file is not there or is not safetensors."""
    first = sharefs.read_range(clients.share, path, 0, lorashapes.HEADER_LENGTH_BYTES)
    if not first:
        return None
    try:
        n = lorashapes.header_length(first)
        return lorashapes.header_shapes(sharefs.read_range(clients.share, path, lorashapes.HEADER_LENGTH_BYTES, n))
    except lorashapes.HeaderError as e:
        log.warning("%s on the share: %s; its shapes are left to the server to check", path, e)
        return None


def _base_folder(clients: AzureClients, model: str) -> str | None:
    """Where the job finds the base on the share, as payload.modelpath.resolve_model looks: the folder given, else a
    hub id's copy in model-cache/; None when neither holds a config.json (the job downloads it from the hub)."""
    model = model.strip("/")
    candidates = [model] + ([f"{MODEL_CACHE}/{model}"] if HUB_ID.match(model) else [])
    return next((c for c in candidates if sharefs.exists(clients.share, f"{c}/config.json")), None)


def _shape_problem(clients: AzureClients, adapter: str, model: str) -> str | None:
    """Why the adapter's LoRA weights do not fit the base's layers (payload.lorashapes), from the safetensors
    headers on the share; None when they fit or when either is not there to read (a base the job downloads from the
    hub, an older .bin adapter): the inference server checks again when it loads the adapter."""
    lora = _weight_shapes(clients, f"{adapter}/adapter_model.safetensors")
    if lora is None:
        return None
    folder = _base_folder(clients, model)
    if folder is None:
        return None
    files = lorashapes.shard_files(sharefs.read_json(clients.share, f"{folder}/model.safetensors.index.json")) \
        or ["model.safetensors"]
    base: dict[str, tuple[int, ...]] = {}
    for name in files:
        shapes = _weight_shapes(clients, f"{folder}/{name}")
        if shapes is None:
            return None
        base.update(shapes)
    return lorashapes.adapter_mismatch(lora, lorashapes.linear_layers(base))


def _same_base(trained_on: str, model: str) -> bool:
    """adapter_config.json names the base as the trainer loaded it: the hub id, or its folder in the model cache."""
    a, b = trained_on.rstrip("/"), model.rstrip("/")
    return a == b or a.endswith("/" + b) or b.endswith("/" + a)


def serve_adapter(clients: AzureClients, conn, run: Run, entry: dict, notice: Notice = _quiet) -> ServedOn:
    """Add the run's adapter to its base model's endpoint: the manifest entry on the share, then the base's app
    (created, or its command set) when it does not run that manifest yet. The entry is taken back out when the app
    cannot be made to serve it."""
    adapter = _check_adapter(clients, run)
    manifest = endpoints.manifest_rel(run.model)
    with manifest_lock(conn, run.model):
        entries = endpoints.placed(read_manifest(clients, run.model), entry, adapter, run.model)
        notice(f"adding {run.id} to {manifest} on the share ({len(entries)} adapter(s) on {run.model})")
        _write_manifest(clients, run.model, entries)
    try:
        name, existing = app_for(clients, run.model)
        result = ProvisionResult("deploy", name, created=existing is None)
        if existing is not None and served_manifest(existing) == manifest:
            notice(f"the inference app {name} already follows {manifest}: it loads {run.id} within seconds, or at "
                   "its next start when it is scaled to zero")
            app = existing
        else:
            body = wanted_app(clients, name, existing, notice, base_model=run.model, manifest=manifest)
            app = put_app(clients, name, body, existing, result, notice)
    except BaseException:
        remove_adapter(clients, conn, run)
        raise
    result.endpoint = endpoint_of(app) or endpoint_of(get_app(clients, name))
    if name == clients.cfg.app_name and result.endpoint:
        record_endpoint(clients.cfg, result.endpoint, notice)  # where AI Toolkit's inference config has it
    others = len(entries) - 1
    result.notes = [f"{run.id} is on the endpoint of {run.model}" +
                    (f" with {others} other adapter{'s' if others != 1 else ''}." if others else ".")]
    return ServedOn(name, result.endpoint, result)


def remove_adapter(clients: AzureClients, conn, run: Run) -> dict | None:
    """Take the run's adapter out of its base model's manifest on the share; the entry removed, or None when it was
    not there. The app stays: it scales to zero by itself once idle."""
    with manifest_lock(conn, run.model):
        entries = read_manifest(clients, run.model)
        removed = next((e for e in entries if e.get("name") == run.id), None)
        if removed is not None:
            _write_manifest(clients, run.model, [e for e in entries if e is not removed])
    return removed


def _served_records(clients: AzureClients, folder: str) -> list:
    with azure_call(f"read {folder} on the share"):
        return [sharefs.read_json(clients.share, f"{folder}/{f}") for f in sharefs.list_files(clients.share, folder)
                if f.endswith(".json")]


def served_counts(clients: AzureClients, model: str) -> dict[str, int]:
    """Requests served per model id on the base model's endpoint, from every replica's record on the share."""
    return endpoints.sum_served(_served_records(
        clients, f"{endpoints.ROOT}/{endpoints.endpoint_name(model)}/{endpoints.SERVED}"))


def uptime(clients: AzureClients) -> list[list[float]]:
    """How long each replica of every endpoint on the share ran ([started, last written])."""
    with azure_call(f"list {endpoints.ROOT} on the share"):
        folders = sharefs.list_dirs(clients.share, endpoints.ROOT)
    return [period for name in folders for period in endpoints.uptime_periods(
        _served_records(clients, f"{endpoints.ROOT}/{name}/{endpoints.SERVED}"))]
