"""A cheap smoke check before the first GPU minute: one short execution of a CPU job `<ACA_JOB_NAME>-smoke` that
proves the chain a run needs, end to end: the share is mounted at /mount and writable, the Key Vault references
resolve, the payload package imports, and a line reaches Log Analytics.

The smoke job is the fine-tuning job's twin (same image, same Key Vault references, same share at /mount; built by
`jobs.backends.aca.resources.job_body`) on the environment's Consumption profile with 0.5 CPU / 1Gi. Its execution is
started without a template override, so it runs the job's own template: ACA drops the volumes of an execution started
with an override (microsoft/azure-container-apps issue 909). Each check's id reaches the container as an env var of the
job (TUNEOPS_SMOKE_ID), so every check updates the job, then starts it.

The container reports each referenced secret as present or absent with its length, never its value.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from azure.core.exceptions import ResourceNotFoundError

from jobs.backends.aca import share as sharefs
from jobs.backends.aca.clients import AzureClients
from jobs.backends.aca.config import AcaConfig
from jobs.backends.aca.errors import azure_call
from jobs.backends.aca.executor import payload_dir
from jobs.backends.aca.logs import portal_links, query_logs
from jobs.backends.aca.provision import (
    differs,
    get_job,
    read_environment,
    resolve_environment,
    vault_refs_of,
    vault_secret_envs,
)
from jobs.backends.aca.quota import read_gpu_quota
from jobs.backends.aca.resources import (
    CODE_PATH,
    MOUNT,
    PYTHON,
    as_plain,
    job_body,
    map_execution,
    needs_install,
    payload_requirements,
    secret_name,
)
from jobs.backends.aca.secrets import list_secrets, masks_for_job
from jobs.backends.aca.sync import Source, SyncResult
from jobs.backends.protocol import ExecStatus, SmokeResult, SmokeStep
from jobs.core.domain import Run
from jobs.core.errors import BackendError, Hint
from jobs.core.masking import mask

log = logging.getLogger(__name__)

SMOKE_SUFFIX = "-smoke"
SMOKE_ID_ENV = "TUNEOPS_SMOKE_ID"
MARKER = "tuneops-smoke-marker"
RESULT_DIR = "smoke"
SMOKE_CPU = 0.5
SMOKE_MEMORY = "1Gi"
# A stock PyTorch image is pulled (minutes on a Consumption profile) and may install the payload's packages first.
SMOKE_REPLICA_TIMEOUT = 1200
# Log Analytics ingests console lines minutes late; how long a check waits for its marker line unless told.
DEFAULT_LOG_WAIT_S = 300.0

Report = Callable[[SmokeStep], None]
Sync = Callable[[list[Source]], SyncResult]


# ---- pure: names, the container's script, the config ---------------------------------------------------------

def smoke_job_name(job_name: str) -> str:
    """`<ACA_JOB_NAME>-smoke`, cut to ACA's 32 characters for a job name."""
    head = job_name[: 32 - len(SMOKE_SUFFIX)].rstrip("-")
    return head + SMOKE_SUFFIX


def result_path(smoke_id: str) -> str:
    """Where the container writes its result, relative to the share (the container's /mount)."""
    return f"{RESULT_DIR}/{smoke_id}/result.json"


def marker(smoke_id: str) -> str:
    """The unique stdout line looked for in Log Analytics."""
    return f"{MARKER} {smoke_id}"


# The container's reporter: one JSON file of facts. Secrets: present or not and the length, never the value.
_REPORTER = """\
import json, os, platform, sys
path, names = sys.argv[1], sys.argv[2:]
out = os.environ.get("SMOKE_IMPORT_OUT", "").strip().splitlines()
result = {
    "id": os.environ.get("TUNEOPS_SMOKE_ID", ""),
    "share": os.environ.get("SMOKE_SHARE") == "ok",
    "secrets": {n: {"present": bool(os.environ.get(n)), "length": len(os.environ.get(n) or "")} for n in names},
    "import": {"ok": os.environ.get("SMOKE_IMPORT_RC") == "0", "error": (out[-1] if out else "")[:500]},
    "python": platform.python_version(),
}
print("tuneops-smoke result " + json.dumps(result), flush=True)
try:
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)
except OSError as e:
    print("tuneops-smoke: cannot write the result to the share: %s" % e, flush=True)
    sys.exit(3)
ok = result["share"] and result["import"]["ok"] and all(s["present"] for s in result["secrets"].values())
sys.exit(0 if ok else 1)
"""


def smoke_script(secret_envs: Iterable[str], install: Iterable[str] = ()) -> str:
    """The bash script of the smoke container. It prints the marker line, writes `smoke/<id>/result.json` on /mount
    (the id comes from TUNEOPS_SMOKE_ID), tries `python -P -c "import payload.train"` with the synced payload code on
    the path (as a run does), and reports the secrets' presence and length. Exit code 0 only when all of it worked.
    Pure."""
    names = sorted(set(secret_envs))
    d = f'{MOUNT}/{RESULT_DIR}/"$TUNEOPS_SMOKE_ID"'
    steps = [
        f': "${{{SMOKE_ID_ENV}:?is not set}}"',
        f'echo "{MARKER} ${SMOKE_ID_ENV}"',
        f'if mkdir -p {d} && : > {d}/.write-test; then SMOKE_SHARE=ok; else SMOKE_SHARE=fail; fi',
    ]
    reqs = list(install)
    if reqs:
        steps.append("pip install --no-cache-dir --quiet " + " ".join(shlex.quote(r) for r in reqs))
    steps += [
        CODE_PATH,
        f'SMOKE_IMPORT_OUT="$({PYTHON} -c "import payload.train" 2>&1)"; SMOKE_IMPORT_RC=$?',
        "export SMOKE_SHARE SMOKE_IMPORT_OUT SMOKE_IMPORT_RC",
        f"{PYTHON} -c {shlex.quote(_REPORTER)} {d}/result.json" + "".join(f" {shlex.quote(n)}" for n in names),
    ]
    return "\n".join(steps)


def consumption_profile(environment: Mapping[str, Any]) -> str:
    """The name of the environment's Consumption workload profile (every workload-profiles environment has one),
    or ''. Pure."""
    for p in (environment.get("properties") or {}).get("workloadProfiles") or []:
        if (p.get("workloadProfileType") or p.get("workload_profile_type")) == "Consumption":
            return p.get("name") or ""
    return ""


def smoke_config(cfg: AcaConfig, profile: str, script: str) -> AcaConfig:
    """The fine-tuning job's config as the smoke job's: its name, the Consumption profile, 0.5 CPU / 1Gi, the smoke
    script as its command, a short replica timeout. Image, identity, registry, share and vault stay. Pure."""
    changes: dict[str, Any] = {"job_name": smoke_job_name(cfg.job_name), "workload_profile": profile,
                               "cpu": SMOKE_CPU, "memory": SMOKE_MEMORY, "commands": (script,),
                               "replica_timeout": SMOKE_REPLICA_TIMEOUT}
    if "workload_profile_type" in {f.name for f in dataclasses.fields(cfg)}:
        changes["workload_profile_type"] = "Consumption"
    return dataclasses.replace(cfg, **changes)


def with_smoke_id(body: dict[str, Any], smoke_id: str) -> dict[str, Any]:
    """The job body with TUNEOPS_SMOKE_ID set to this check's id in its container. Pure."""
    out = dict(body)
    props = dict(out["properties"])
    template = dict(props["template"])
    containers = [dict(c) for c in template["containers"]]
    env = [e for e in containers[0].get("env") or [] if e.get("name") != SMOKE_ID_ENV]
    containers[0]["env"] = env + [{"name": SMOKE_ID_ENV, "value": smoke_id}]
    template["containers"] = containers
    props["template"] = template
    out["properties"] = props
    return out


def execution_has_id(execution: Mapping[str, Any], smoke_id: str) -> bool:
    containers = (((execution.get("properties") or {}).get("template") or {}).get("containers")) or []
    return any(e.get("name") == SMOKE_ID_ENV and e.get("value") == smoke_id
               for c in containers for e in c.get("env") or [])


_SECRET_WORDS = ("secret", "key vault", "keyvault", "vault.azure")


def judge(result: Mapping[str, Any] | None, secret_envs: Iterable[str], *, share_name: str, status: ExecStatus,
          detail: str, result_rel: str, not_in_vault: Iterable[str] = ()) -> list[SmokeStep]:
    """The share, Key Vault and import steps from the container's result (None: not on the share), how the execution
    ended, and which referenced env vars' secrets Key Vault lacks (`not_in_vault`). Pure."""
    names = sorted(set(secret_envs))
    lacking = sorted(set(not_in_vault))
    if result is None:
        if status is not ExecStatus.SUCCEEDED and lacking:
            which = ", ".join(f"{secret_name(n)} (for {n})" for n in lacking)
            return [SmokeStep("Key Vault references", "fail",
                              f"the execution ended {detail or status.value} before its container wrote anything, and "
                              f"the job references {which}, which Key Vault does not have (deleted, disabled or never "
                              f"set): a reference that does not resolve stops the container. Set it again, then check "
                              f"again.", hint=Hint(f"secret set {lacking[0]}", "stores it again"))]
        if status is not ExecStatus.SUCCEEDED and any(w in detail.lower() for w in _SECRET_WORDS):
            return [SmokeStep("Key Vault references", "fail",
                              f"the execution failed before its container ran ({detail}): a Key Vault reference did "
                              f"not resolve. Check that each secret exists and that the job's identity may read it "
                              f"(role Key Vault Secrets User), then check again.",
                              hint=Hint("secret list", "shows the secrets Key Vault has"))]
        if status is ExecStatus.SUCCEEDED:
            return [SmokeStep("share", "fail",
                              f"the container ran, but {result_rel} is not on the share {share_name}: /mount in the "
                              f"container is not that share (the job's volume is missing, or its environment storage "
                              f"points at another share). Check ACA_ENVIRONMENT_STORAGE_NAME and the environment's "
                              f"storage, provision the job again, then check again.")]
        return [SmokeStep("execution", "fail",
                          f"the execution ended {detail or status.value} without writing {result_rel} to the share "
                          f"{share_name}: its console log (the logs link) says why. The usual causes: the image could "
                          f"not be pulled, no share at /mount to write to, or a Key Vault secret the job's identity may "
                          f"not read (role Key Vault Secrets User).")]
    steps = [SmokeStep("share", "ok", f"the container wrote {result_rel} at {MOUNT}, read back from the share "
                                      f"{share_name}")]
    if not result.get("share"):
        steps = [SmokeStep("share", "fail", f"{MOUNT} was not writable in the container, yet its result reached the "
                                            f"share {share_name}; check the environment storage's access mode "
                                            f"(ReadWrite).")]
    secrets = result.get("secrets") or {}
    missing = [n for n in names if not (secrets.get(n) or {}).get("present")]
    if missing:
        steps.append(SmokeStep("Key Vault references", "fail",
                               f"the container did not get {', '.join(missing)}: the Key Vault reference resolved to "
                               f"nothing. Set it again, then check again.",
                               hint=Hint(f"secret set {missing[0]}", "stores it again")))
    elif names:
        got = ", ".join(f"{n} ({(secrets.get(n) or {}).get('length', 0)} characters)" for n in names)
        steps.append(SmokeStep("Key Vault references", "ok", f"resolved in the container: {got}"))
    else:
        steps.append(SmokeStep("Key Vault references", "ok", "the job references no Key Vault secrets (none to "
                                                             "resolve)"))
    imp = result.get("import") or {}
    if imp.get("ok"):
        steps.append(SmokeStep("payload import", "ok", f"`{PYTHON} -c \"import payload.train\"` works (Python "
                                                      f"{result.get('python') or '?'})"))
    else:
        steps.append(SmokeStep("payload import", "fail",
                               f"`import payload.train` failed in the container: {imp.get('error') or 'no output'}. "
                               f"The payload code on the share or the image's packages are broken: sync the payload "
                               f"again (SYNC_PAYLOAD), or fix the image, then check again."))
    return steps


def verdict(steps: list[SmokeStep]) -> tuple[bool, str]:
    """Passed, and the one line that says so or where it failed. Pure."""
    failed = next((s for s in steps if s.status == "fail"), None)
    if failed is not None:
        return False, f"Smoke check failed at {failed.name}: {failed.text}"
    warnings = [s.name for s in steps if s.status == "warn"]
    tail = f" ({len(warnings)} warning(s): {', '.join(warnings)})" if warnings else ""
    return True, ("Smoke check passed: the share is mounted and writable, the Key Vault references resolve and the "
                  f"payload imports; a run has what it needs{tail}.")


# ---- the check -------------------------------------------------------------------------------------------------

class _Failed(Exception):
    pass


def run_smoke(clients: AzureClients, report: Report, *, sync: Sync | None = None, log_wait_s: float | None = None,
              smoke_id: str = "") -> SmokeResult:
    """Create or update the smoke job, start one execution, and check what it proves; each step is reported as it
    ends. Never raises for what Azure answers: a failure is the result's verdict."""
    cfg = clients.cfg
    smoke_id = smoke_id or uuid.uuid4().hex[:12]
    steps: list[SmokeStep] = []
    links: dict[str, str] = {}

    def step(name: str, status: str, text: str, step_links: dict[str, str] | None = None, stop: bool = True,
             hint: Hint | None = None) -> None:
        s = SmokeStep(name, status, " ".join(text.split()), dict(step_links or {}), hint)
        steps.append(s)
        report(s)
        if status == "fail" and stop:
            raise _Failed()

    def attempt(name: str, fn):
        try:
            return fn()
        except BackendError as e:
            step(name, "fail", e.reason, hint=e.hint)

    try:
        main_job = attempt("the fine-tuning job", lambda: get_job(clients))
        try:
            quota = read_gpu_quota(clients, job=main_job)
            step("GPU quota", "ok" if quota.state in ("ok", "not_gpu") else "warn", quota.line())
        except BackendError as e:
            step("GPU quota", "warn", f"could not read it: {e.reason}")
        smoke_clients, name, envs = attempt("smoke job", lambda: _ensure_smoke_job(clients, main_job, smoke_id, step))
        if cfg.sync_payload and sync is not None:
            synced = attempt("payload code", lambda: sync([Source(payload_dir(), "payload")]))
            step("payload code", "ok", f"payload/ is on the share ({synced.summary()})")
        execution = attempt("start", lambda: _start(smoke_clients, smoke_id))
        links = portal_links(smoke_clients.cfg, Run(smoke_id, "", "", "", "", backend="aca", execution_id=execution))
        step("start", "ok", f"started the execution {execution} of {name} (no template override: the job's own "
                            f"template, with the share's volume)", links)
        info = attempt("execution", lambda: _wait(smoke_clients, execution))
        rel = result_path(smoke_id)
        result = attempt("share", lambda: _read_result(smoke_clients, rel))
        # Azure does not say why an execution failed; for one that wrote nothing, Key Vault says what it lacks.
        lacking = _not_in_vault(clients, envs) if result is None and info.status is not ExecStatus.SUCCEEDED else []
        found = judge(result, envs, share_name=cfg.file_share, status=info.status, detail=info.detail,
                      result_rel=rel, not_in_vault=lacking)
        for s in found:
            text = mask(s.text, masks_for_job(smoke_clients)) if s.name == "payload import" else s.text
            # The facts of one result all help: report each, then stop at a failure among them.
            step(s.name, s.status, text, stop=False, hint=s.hint)
        if any(s.status == "fail" for s in found):
            raise _Failed()
        _check_logs(smoke_clients, execution, smoke_id, step, DEFAULT_LOG_WAIT_S if log_wait_s is None else log_wait_s)
    except _Failed:
        pass
    passed, line = verdict(steps)
    failed = next((s for s in steps if s.status == "fail"), None)
    return SmokeResult(passed, line, steps, links, failed.hint if failed else None)


def _ensure_smoke_job(clients: AzureClients, main_job: Mapping | None, smoke_id: str, step) -> tuple:
    """Create or update `<job>-smoke` (idempotent, like provisioning); returns its clients, name and the env vars
    of its Key Vault references."""
    cfg = clients.cfg
    # The same Key Vault references as the fine-tuning job (a reference to a deleted secret included: that is what
    # the check is for); without a job yet, those provisioning would give it.
    if main_job is not None:
        envs = vault_refs_of(main_job)
        if envs:
            cfg.require("Key Vault secret references", "identity_id")
    else:
        envs = vault_secret_envs(clients, lambda text: step("smoke job", "info", text))
    script = smoke_script(envs, payload_requirements() if needs_install(cfg.job_image) else ())
    smoke_clients = clients.with_config(smoke_config(cfg, "Consumption", script))
    existing = get_job(smoke_clients)
    # The smoke job lives where the fine-tuning job does, with the same storage for the share.
    base = existing or main_job
    profile = consumption_profile(read_environment(smoke_clients, base))
    if not profile:
        raise BackendError("The job's Container Apps environment has no Consumption workload profile to run the smoke "
                           "check on (a workload-profiles environment always has one): check the environment.")
    smoke_cfg = smoke_config(cfg, profile, script)
    smoke_clients = clients.with_config(smoke_cfg)
    environment, storage_name = resolve_environment(smoke_clients, base, profile,
                                                    lambda text: step("smoke job", "info", text))
    body = with_smoke_id(job_body(smoke_cfg, environment, storage_name=storage_name, secret_envs=envs,
                                  existing=existing), smoke_id)
    name = smoke_cfg.job_name
    if existing is None or differs(body, existing):
        with azure_call(f"{'create' if existing is None else 'update'} the smoke job {name}"):
            smoke_clients.arm.jobs.begin_create_or_update(cfg.resource_group, name, body).result()
    step("smoke job", "ok", f"{'created' if existing is None else 'updated'} {name}: {profile} profile, {SMOKE_CPU:g} "
                            f"CPU / {SMOKE_MEMORY}, image {smoke_cfg.job_image}, Key Vault references: "
                            f"{', '.join(envs) or 'none'}, the share {cfg.file_share} at {MOUNT}")
    return smoke_clients, name, envs


def _start(smoke_clients: AzureClients, smoke_id: str) -> str:
    """Start one execution with the job's own template; its name (found by the check's id when ARM's answer lacks it)."""
    cfg = smoke_clients.cfg
    with azure_call(f"start the smoke job {cfg.job_name}"):
        started = smoke_clients.arm.jobs.begin_start(cfg.resource_group, cfg.job_name).result()
    if started is not None and getattr(started, "name", None):
        return started.name
    # `begin_start(...).result()` may be None: the execution carries this check's id in its env.
    with azure_call("list the smoke job's executions"):
        for ex in smoke_clients.arm.jobs_executions.list(cfg.resource_group, cfg.job_name):
            if execution_has_id(as_plain(ex), smoke_id):
                return ex.name
    raise BackendError("Azure started the smoke job but did not say the execution's name; check again.",
                       transient=True)


def _wait(smoke_clients: AzureClients, execution: str):
    """Poll the execution until it ends (at most its replica timeout and two minutes)."""
    cfg = smoke_clients.cfg
    deadline = time.monotonic() + cfg.replica_timeout + 120
    interval = max(0.05, min(5.0, cfg.polling_interval))
    while True:
        with azure_call(f"read the execution {execution}"):
            try:
                ex = as_plain(smoke_clients.arm.job_execution(cfg.resource_group, cfg.job_name, execution))
            except ResourceNotFoundError:
                ex = None
        p = (ex or {}).get("properties") or {}
        info = map_execution(p.get("status"), reason=p.get("reason") or "", message=p.get("message") or "",
                             start=p.get("startTime"), end=p.get("endTime"), replica_timeout=cfg.replica_timeout)
        if info.status.finished:
            return info
        if time.monotonic() > deadline:
            raise BackendError(f"the execution {execution} still runs {cfg.replica_timeout + 120} s after its start: "
                               f"stop it in the portal (execution history) and check again; a pull of a large image "
                               f"on a Consumption profile can take minutes.")
        time.sleep(interval)


def _not_in_vault(clients: AzureClients, envs: Iterable[str]) -> list[str]:
    """The env vars among `envs` whose Key Vault secret is missing or disabled ([] when the vault cannot tell)."""
    try:
        listed = {info.vault_name: info for info in list_secrets(clients)}
    except BackendError as e:
        log.warning("smoke check: cannot list the Key Vault secrets: %s", e)
        return []
    return [e for e in envs if secret_name(e) not in listed or not listed[secret_name(e)].enabled]


def _read_result(smoke_clients: AzureClients, rel: str) -> dict | None:
    with azure_call(f"read the smoke check's result {rel} from the share"):
        data = sharefs.read_json(smoke_clients.share, rel)
    return data if isinstance(data, dict) else None


def _check_logs(smoke_clients: AzureClients, execution: str, smoke_id: str, step, wait_s: float) -> None:
    """Look for the marker line in Log Analytics for up to `wait_s`; not seen yet is a warning, not a failure."""
    cfg = smoke_clients.cfg
    if not cfg.log_analytics_workspace_id:
        step("Log Analytics", "warn", "LOG_ANALYTICS_WORKSPACE_ID is not set in infra/finetuning.config.json: run logs "
                                      "come from train.log on the share only.")
        return
    line = marker(smoke_id)
    deadline = time.monotonic() + wait_s
    interval = max(0.2, min(15.0, wait_s / 10))
    while True:
        try:
            found = query_logs(smoke_clients, cfg.job_name, execution, tail=5, grep=line)
        except BackendError as e:
            step("Log Analytics", "warn", f"could not query it: {e.reason} The check does not fail for this; run "
                                          f"logs also come from train.log on the share.")
            return
        if any(line in f for f in found):
            step("Log Analytics", "ok", f"the marker line `{line}` reached Log Analytics")
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    step("Log Analytics", "warn",
         f"the marker line `{line}` is not yet seen after {wait_s:g} s (ingestion lags by minutes): look for it later "
         f"with the logs link; if it never shows, check that the environment sends its logs to the workspace "
         f"LOG_ANALYTICS_WORKSPACE_ID (appLogsConfiguration) and that the bot may read it (Log Analytics Reader).")
