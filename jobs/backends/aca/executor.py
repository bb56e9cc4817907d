"""The Azure Container Apps backend: a run is an execution of the ACA job, working on the Azure Files share.

start syncs what the run needs to the share (dataset, local model, payload code), writes `runs/<id>/run.json`
there, puts the run's command and env into the job's template and starts an execution of it (no override: see
`resources.run_template`). Progress and log
lines are read from `runs/<id>/events.jsonl` and `train.log` on the share (seconds of lag, where Log Analytics lags
by minutes); status comes from the execution; stop stops it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from azure.core.exceptions import ResourceNotFoundError

import payload
from jobs.backends.aca import share as sharefs
from jobs.backends.aca.clients import AzureClients, get_clients
from jobs.backends.aca.config import AcaConfig, load_aca_config
from jobs.backends.aca.errors import azure_call
from jobs.backends.aca.logs import portal_links, query_logs
from jobs.backends.aca.resources import (
    as_plain,
    execution_matches,
    exit_code_path,
    is_hub_id,
    map_execution,
    model_cache_dir,
    needs_install,
    payload_requirements,
    run_env,
    run_script,
    run_template,
)
from jobs.backends.aca.secrets import masks_for_job
from jobs.backends.aca.sync import (
    HashCache,
    Source,
    SyncResult,
    default_cache_path,
    sync_workspace,
)
from jobs.backends.logtext import split_log
from jobs.backends.protocol import EventBatch, ExecStatus, ExecutionInfo
from jobs.core import queue, store
from jobs.core.domain import Run
from jobs.core.errors import BackendError, Hint
from jobs.core.masking import mask, mask_lines
from payload.config import ConfigError, parse_config
from payload.events import EVENTS_FILE, parse_line

log = logging.getLogger(__name__)

LOG_NAME = "train.log"
MAX_EVENT_READ = 1024 * 1024
MAX_LOG_READ = 256 * 1024
SYNC_LOCK = store.ACA_SYNC_LOCK
STOP_WAIT_S = 120.0
# The job's lock, for a run's template patch and start: held at most this long (a worker that dies frees it then),
# waited for at most this long (a provisioning holds it for minutes), within the start's own time (START_TIMEOUT_S).
STAGE_HOLD_S = 600
STAGE_WAIT_S = 900
FIND_STARTED_S = 60.0


def payload_dir() -> Path:

    return Path(payload.__file__).resolve().parent


def split_complete(data: bytes, cursor: int, max_read: int) -> tuple[bytes, int]:
    """The complete lines of a chunk read at `cursor`, and the cursor after them. A half-written last line waits for
    the next read, unless the chunk is one giant line that filled the whole read."""
    end = data.rfind(b"\n")
    if end < 0:
        if len(data) >= max_read:
            return data, cursor + len(data)
        return b"", cursor
    return data[: end + 1], cursor + end + 1


class AcaExecutor:
    name = "aca"

    def __init__(self, settings, cfg: AcaConfig | None = None, clients: AzureClients | None = None):
        self.settings = settings
        self.workspace = Path(getattr(settings, "workspace", ".")).resolve()
        self.cfg = cfg or (clients.cfg if clients else load_aca_config(workspace=self.workspace))
        self.clients = clients or get_clients(self.cfg)
        # The execution a start just made, for links() asked before the run record holds the execution id.
        self._started: dict[str, str] = {}

    # Paths on the share ---------------------------------------------------------------------------------------------

    @staticmethod
    def run_dir(run: Run) -> str:
        return f"runs/{run.id}"

    def _job(self) -> dict:
        with azure_call(f"read the ACA job {self.cfg.job_name}"):
            try:
                return as_plain(self.clients.arm.jobs.get(self.cfg.resource_group, self.cfg.job_name))
            except ResourceNotFoundError:
                raise BackendError(
                    f"The ACA job {self.cfg.job_name} does not exist in {self.cfg.resource_group}: provision it "
                    f"first (or check ACA_JOB_NAME in infra/finetuning.config.json).",
                    hint=Hint("provision finetune", "creates it")) from None

    def _existing_execution(self, run: Run) -> str:
        with azure_call("list the job's executions"):
            for ex in self.clients.arm.jobs_executions.list(self.cfg.resource_group, self.cfg.job_name):
                if execution_matches(as_plain(ex), run.id, run.attempts):
                    return ex.name
        return ""

    # Sync -----------------------------------------------------------------------------------------------------------

    def sources_for(self, config: dict[str, Any]) -> tuple[list[Source], str]:
        """What the run needs on the share, and the hub model to download there ('' when none)."""
        sources: list[Source] = []
        dataset = self.workspace / config["dataset"]
        if dataset.exists():
            sources.append(Source(dataset, config["dataset"]))
        elif not sharefs.exists(self.clients.share, config["dataset"]):
            raise BackendError(f"The dataset {config['dataset']} is neither in the workspace ({self.workspace}) nor on "
                               f"the share: put it under the workspace and try again.")
        model = config["base_model"]
        download = ""
        local_model = self.workspace / model
        cached = self.workspace / model_cache_dir(model)
        if local_model.is_dir():
            sources.append(Source(local_model, model))
        elif is_hub_id(model) and cached.is_dir():
            sources.append(Source(cached, model_cache_dir(model)))
        elif is_hub_id(model):
            download = model
        else:
            raise BackendError(f"The model {model} is not a folder in the workspace and not a hub id (org/name): give "
                               f"--model a folder like model-cache/NAME or a hub id.")
        if self.cfg.sync_payload:
            sources.append(Source(payload_dir(), "payload"))
        return sources, download

    def sync(self, sources: list[Source]) -> SyncResult:
        lock = None
        redis_url = getattr(self.settings, "redis_url", "")
        if redis_url:
            # One manifest on the share: two workers syncing at once would each overwrite the other's entries.
            lock = store.connect(self.settings).lock(SYNC_LOCK, timeout=1800, blocking_timeout=1800)
        with azure_call("sync the workspace to the Azure Files share"):
            return sync_workspace(self.clients.share, sources, concurrency=self.clients.upload_concurrency,
                                  cache=HashCache(default_cache_path()), lock=lock)

    # The protocol ---------------------------------------------------------------------------------------------------

    def start(self, run: Run, config: dict[str, Any]) -> str:
        found = self._existing_execution(run)
        if found:
            log.info("%s: attempt %d already has execution %s; not starting another", run.id, run.attempts, found)
            self._started[run.id] = found
            return found
        job = self._job()
        try:
            cfg = parse_config(dict(config, run_id=run.id, output_dir=self.run_dir(run)), "run config")
        except ConfigError as e:
            raise BackendError(str(e)) from None
        data = cfg.model_dump()
        for key in ("dataset", "base_model"):
            if Path(data[key]).is_absolute() or ".." in Path(data[key]).parts:
                raise BackendError(f"{key} must be relative to the workspace, not {data[key]!r}")
        sources, download = self.sources_for(data)
        result = self.sync(sources)
        log.info("%s: %s", run.id, result.summary())
        config_rel = f"{self.run_dir(run)}/run.json"
        with azure_call("write the run config to the share"):
            sharefs.write_bytes(self.clients.share, config_rel, (json.dumps(data, indent=2) + "\n").encode())
        image = ((job["properties"]["template"].get("containers") or [{}])[0]).get("image") or self.cfg.job_image
        script = run_script(run.id, config_rel, download_model=download,
                            install=payload_requirements() if needs_install(image) else (), gpus=self.cfg.gpus)
        name = self._start_staged(run, script, run_env(run.id, run.attempts, config_rel))
        log.info("%s: started execution %s", run.id, name)
        self._started[run.id] = name
        return name

    def _start_staged(self, run: Run, script: str, env: dict[str, str]) -> str:
        """Put the run into the job's template and start an execution of it, the two under the job's lock so that
        neither another run nor a provisioning changes the template in between."""
        redis_url = getattr(self.settings, "redis_url", "")
        lock = (store.connect(self.settings).lock(store.azure_lock("job", self.cfg.job_name), timeout=STAGE_HOLD_S,
                                                  blocking_timeout=STAGE_WAIT_S) if redis_url else None)
        if lock is not None and not lock.acquire():
            raise BackendError(f"The ACA job {self.cfg.job_name} stayed busy (a provisioning or another start) for "
                               f"{STAGE_WAIT_S // 60} minutes; the start will be tried again.", transient=True)
        try:
            job = self._job()
            try:
                template = run_template(job, script, env)
            except ValueError:
                raise BackendError(f"The ACA job {self.cfg.job_name} does not mount the file share at /mount, so a run "
                                   f"could not read its data: provision the job again.",
                                   hint=Hint("provision finetune", "mounts the share")) from None
            rg, name = self.cfg.resource_group, self.cfg.job_name
            with azure_call(f"put the run into the ACA job {name}"):
                self.clients.arm.jobs.begin_update(rg, name, {"properties": {"template": template}}).result()
            with azure_call(f"start the ACA job {name}"):
                started = self.clients.arm.jobs.begin_start(rg, name).result()
        finally:
            if lock is not None:
                queue.release(lock, "ACA job")
        # The start's long-running operation may end on a Location poll with no body (Jobs_Start answers 202 with a
        # Location header only: examples/Job_Start.json); the execution is then found by the run it carries.
        found = getattr(started, "name", None) if started is not None else None
        deadline = time.monotonic() + FIND_STARTED_S
        while not found:
            found = self._existing_execution(run)
            if found or time.monotonic() > deadline:
                break
            time.sleep(min(2.0, max(0.05, self.cfg.polling_interval)))
        if not found:
            raise BackendError("Azure accepted the start but neither said the execution's name nor lists it yet; the "
                               "start will be checked again.", transient=True)
        return found

    def _execution(self, run: Run) -> dict | None:
        with azure_call("read the job execution"):
            try:
                return as_plain(self.clients.arm.job_execution(self.cfg.resource_group, self.cfg.job_name,
                                                               run.execution_id))
            except ResourceNotFoundError:
                return None

    def status(self, run: Run) -> ExecutionInfo:
        if not run.execution_id:
            return ExecutionInfo(ExecStatus.UNKNOWN, "not started")
        ex = self._execution(run)
        if ex is None:
            return ExecutionInfo(ExecStatus.UNKNOWN, f"execution {run.execution_id} not found")
        p = ex.get("properties") or {}
        info = map_execution(p.get("status"), reason=p.get("reason") or "", message=p.get("message") or "",
                             start=p.get("startTime"), end=p.get("endTime"),
                             replica_timeout=self.cfg.replica_timeout)
        if info.status is ExecStatus.SUCCEEDED and not self._adapter_exists(run):
            return ExecutionInfo(ExecStatus.FAILED, "the trainer exited without saving an adapter", 0)
        if info.status is ExecStatus.FAILED and info.exit_code is None:
            code = self._exit_code(run)
            if code is not None:
                return ExecutionInfo(ExecStatus.FAILED, f"{info.detail} (the container exited with code {code})", code)
        return info

    def _exit_code(self, run: Run) -> int | None:
        """The exit code the run's script left on the share (see resources.run_script), if it got that far."""
        with azure_call("read the run's exit code from the share"):
            raw = sharefs.read_range(self.clients.share, exit_code_path(run.id), 0, 32)
        text = raw.decode("ascii", "replace").strip()
        return int(text) if text.lstrip("-").isdigit() else None

    def _current_masks(self) -> tuple[str, ...]:
        """Values of the Key Vault secrets the job references, to mask out of what the container printed (the
        worker's own environment does not hold them, so the jobs side's masking cannot know them)."""
        return masks_for_job(self.clients)

    def read(self, run: Run, event_cursor: int, log_cursor: int) -> EventBatch:
        d = self.run_dir(run)
        with azure_call("read the run's progress from the share"):
            raw = sharefs.read_range(self.clients.share, f"{d}/{EVENTS_FILE}", event_cursor, MAX_EVENT_READ)
            chunk, new_event_cursor = split_complete(raw, event_cursor, MAX_EVENT_READ)
            events = [ev for ev in (parse_line(line) for line in chunk.decode("utf-8", "replace").splitlines())
                      if ev is not None]
            raw = sharefs.read_range(self.clients.share, f"{d}/{LOG_NAME}", log_cursor, MAX_LOG_READ)
            chunk, new_log_cursor = split_complete(raw, log_cursor, MAX_LOG_READ)
        lines = split_log(chunk)
        if lines or any(ev.get("type") == "error" for ev in events):
            masks = self._current_masks()
            lines = mask_lines(lines, masks)
            for ev in events:
                if ev.get("type") == "error":
                    ev["message"] = mask(str(ev.get("message", "")), masks)
        return EventBatch(events=events, log_lines=lines, event_cursor=new_event_cursor, log_cursor=new_log_cursor)

    def tail_logs(self, run: Run, lines: int = 20) -> list[str]:
        """The last lines of train.log; when the container died before writing it, the console log from Log
        Analytics (which lags, so it may still be empty)."""
        if lines <= 0:
            return []
        with azure_call("read the run's train.log"):
            data, whole = sharefs.read_tail(self.clients.share, f"{self.run_dir(run)}/{LOG_NAME}",
                                            max(16384, lines * 400))
        out = split_log(data)
        if out and not whole:
            out = out[1:]  # the first line of the chunk may be cut
        if not out and run.execution_id and self.cfg.log_analytics_workspace_id:
            try:
                out = query_logs(self.clients, self.cfg.job_name, run.execution_id, tail=lines)
            except BackendError as e:
                log.warning("%s: no log excerpt from Log Analytics: %s", run.id, e)
                out = []
        return mask_lines(out[-lines:], self._current_masks()) if out else []

    def stop(self, run: Run) -> None:
        if not run.execution_id:
            return
        with azure_call(f"stop the execution {run.execution_id}"):
            try:
                self.clients.arm.jobs.begin_stop_execution(self.cfg.resource_group, self.cfg.job_name,
                                                           run.execution_id).result()
            except ResourceNotFoundError:
                return
        # Stopping is asynchronous in ACA: wait until the execution says it is no longer running.
        deadline = time.monotonic() + STOP_WAIT_S
        while time.monotonic() < deadline:
            info = self.status(run)
            if info.status not in (ExecStatus.RUNNING, ExecStatus.PENDING):
                return
            time.sleep(min(2.0, max(0.05, self.cfg.polling_interval)))
        raise BackendError(f"{run.id}: the execution {run.execution_id} still runs {STOP_WAIT_S:.0f} s after the stop "
                           f"request; it will be checked again.", transient=True)

    def _adapter_exists(self, run: Run) -> bool:
        with azure_call("look for the adapter on the share"):
            return sharefs.exists(self.clients.share, f"{self.run_dir(run)}/adapter/adapter_config.json")

    def outputs(self, run: Run) -> dict[str, Any]:
        with azure_call("read the run's outputs from the share"):
            metrics = sharefs.read_json(self.clients.share, f"{self.run_dir(run)}/metrics.json")
        adapter = f"{self.run_dir(run)}/adapter" if self._adapter_exists(run) else ""
        return {"metrics": metrics if isinstance(metrics, dict) else {}, "adapter": adapter}

    def links(self, run: Run) -> dict[str, str]:
        if not run.execution_id and run.id in self._started:
            run = Run.from_dict(dict(run.to_dict(), execution_id=self._started[run.id]))
        return portal_links(self.cfg, run)
