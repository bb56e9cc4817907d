"""The local backend whole: the trainer as a process on this machine (LocalExecutor), deploys to a local inference
server (`jobs.backends.local.inference`), logs from the run's train.log. No portal, no secret store, nothing to
provision: those it refuses with what to do instead.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from jobs.backends.local import inference
from jobs.backends.local.executor import LocalExecutor
from jobs.backends.logtext import grep_lines
from jobs.backends.protocol import (
    PROVISION,
    SECRETS,
    Check,
    DeployStarted,
    LogsAnswer,
    SecretInfo,
    SmokeResult,
    SmokeStep,
)
from jobs.core import endpoints
from jobs.core.cost import LOCAL_PROFILE, GpuProfile
from jobs.core.domain import Run
from jobs.core.errors import BackendError
from jobs.core.settings import JobSettings

# A grep on the local backend looks through this many of the newest lines.
GREP_WINDOW = 500



class LocalBackend(LocalExecutor):
    def __init__(self, settings: JobSettings, grace_s: float = 10.0):
        super().__init__(settings, grace_s=grace_s)
        self.settings = settings

    def _refuse(self, capability: str):
        raise BackendError(f"the local backend keeps no {capability}: they need the aca backend (TUNEOPS_BACKEND=aca)")

    # Logs ---------------------------------------------------------------------------------------------------------

    def run_logs(self, run: Run, tail: int, grep: str | None) -> LogsAnswer:
        lines = self.tail_logs(run, GREP_WINDOW if grep else tail) if run.attempts else []
        note = f"Searched the last {GREP_WINDOW} lines." if grep and len(lines) >= GREP_WINDOW else ""
        return LogsAnswer(grep_lines(lines, grep, tail), "the run's log file", note)

    # Deploys ------------------------------------------------------------------------------------------------------

    def describe_target(self) -> str:
        host = inference.public_host(self.settings.serve_host)
        port = self.settings.serve_port
        where = f"at {host}:{port}" if port else f"on {host} (a free port)"
        return (f"the local inference endpoint of the run's base model (payload.serve) {where}, beside the adapters "
                "it already serves")

    def gpu_profile(self) -> GpuProfile:
        return LOCAL_PROFILE

    def deploy(self, run: Run, approval_id: str, requester: str) -> DeployStarted:
        try:
            server = inference.serve_adapter(self.settings, run,
                                             endpoints.new_entry(run.id, run.name, approval_id, requester))
        except (inference.ServeError, endpoints.ManifestDamaged) as e:
            raise BackendError(str(e)) from None
        return DeployStarted(url=server.url, api_url=server.api_url)

    def deploy_endpoint(self) -> str:
        return ""  # one endpoint per base model: each deploy says where its adapter answers

    def undeploy(self, run: Run) -> bool:
        try:
            _, stopped = inference.unserve_adapter(self.settings, run)
        except (inference.ServeError, endpoints.ManifestDamaged) as e:
            raise BackendError(str(e)) from None
        return stopped

    def requests_served(self, model: str) -> dict[str, int]:
        return endpoints.served_here(Path(self.settings.workspace), model)

    def inference_usage(self) -> tuple[GpuProfile, list[list[float]]]:
        return LOCAL_PROFILE, endpoints.uptime_here(Path(self.settings.workspace))

    # Doctor -------------------------------------------------------------------------------------------------------

    def doctor(self) -> list[Check]:
        """The workspace, the default model in it (nothing is downloaded at run time) and a trainer that imports."""
        s = self.settings
        ws = Path(s.workspace)
        if not ws.is_dir():
            return [Check("workspace", False, f"TUNEOPS_WORKSPACE={ws} does not exist: create it, with datasets/ "
                                              "for the JSONL files and model-cache/ for the models.")]
        checks = [Check("workspace", True, str(ws))]
        model = ws / s.default_model
        if any((c / "config.json").is_file() for c in (model, ws / "model-cache" / s.default_model)):
            checks.append(Check("default model", True, s.default_model))
        else:
            checks.append(Check("default model", False, f"TUNEOPS_DEFAULT_MODEL={s.default_model} has no config.json "
                                                        f"under {model}: put the model there (nothing is downloaded "
                                                        "at run time), or set TUNEOPS_DEFAULT_MODEL to one that is."))
        probe = subprocess.run([s.python, "-c", f"import {s.train_module}"], capture_output=True, text=True,
                               timeout=120)
        if probe.returncode == 0:
            checks.append(Check("trainer", True, f"{s.python} imports {s.train_module}"))
        else:
            last = (probe.stderr.strip().splitlines() or ["(no output)"])[-1]
            checks.append(Check("trainer", False, f"{s.python} cannot import {s.train_module}: {last}. Install the "
                                                  "payload there (pip install -e '.[payload]') or set TUNEOPS_PYTHON."))
        return checks

    # What only other backends offer -------------------------------------------------------------------------------

    def check_secret_name(self, name: str) -> str:
        self._refuse(SECRETS)

    def check_secret(self, name: str, value: str) -> str:
        self._refuse(SECRETS)

    def set_secret(self, name: str, value: str) -> SecretInfo:
        self._refuse(SECRETS)

    def list_secrets(self) -> list[SecretInfo]:
        self._refuse(SECRETS)

    def enqueue_secret_reference(self, name: str, requester: str, channel: str) -> str:
        self._refuse(SECRETS)

    def provision_targets(self, target: str | None) -> tuple[list[str], str]:
        self._refuse(PROVISION)

    def enqueue_provision(self, kind: str, requester: str, channel: str) -> str:
        self._refuse(PROVISION)

    def smoke_check(self, report: Callable[[SmokeStep], None], log_wait_s: float | None = None) -> SmokeResult:
        raise BackendError("the local backend has no Azure to check: the smoke check starts a short execution on "
                           "Azure Container Apps (TUNEOPS_BACKEND=aca). Here, `tuneops doctor` checks the workspace, "
                           "the default model and the trainer.")
