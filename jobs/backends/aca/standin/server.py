"""The stand-in's server: four aiohttp apps on local TLS ports (one per service, each in a module of this package),
the state they share, fault injection, and what tests configure and inspect (see the package's docstring)."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import threading
import time
from pathlib import Path

from aiohttp import web

from jobs.backends.aca import profiles as profile_table
from jobs.backends.aca import schema as spec
from jobs.backends.aca.standin.arm import ArmService
from jobs.backends.aca.standin.common import (
    ACCOUNT,
    SUBSCRIPTION,
    WORKSPACE_ID,
    Fault,
    RecordedRequest,
    _now,
)
from jobs.backends.aca.standin.files import FilesService
from jobs.backends.aca.standin.logs import LogsService
from jobs.backends.aca.standin.programs import (
    ExecutionPlan,
)
from jobs.backends.aca.standin.usages import UsagesService
from jobs.backends.aca.standin.vault import VaultService

# ----------------------------------------------------------------------------------------------------------------

class AzureStandIn(ArmService, UsagesService, VaultService, FilesService, LogsService):
    """ARM (Container Apps), Key Vault, Azure Files and Log Analytics on four local TLS ports."""

    def __init__(self, root: Path, *, location: str = "westus3", log_schema: str = "custom"):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.location = location
        self.log_schema = log_schema             # "custom": ContainerAppConsoleLogs_CL; "monitor": ContainerAppConsoleLogs
        self.lock = threading.RLock()
        self.faults: list[Fault] = []
        self.requests: list[RecordedRequest] = []
        self.record = True
        self.environments: dict[str, dict] = {}
        self.env_storages: dict[tuple[str, str], dict] = {}
        self.jobs: dict[str, dict] = {}
        self.apps: dict[str, dict] = {}
        self.executions: dict[str, dict[str, dict]] = {}
        self.execution_env: dict[str, dict[str, str]] = {}     # what each execution's container saw in its env
        self.execution_mounts: dict[str, tuple[str, list, list]] = {}  # environment id, volumes, mounts
        self.start_answers_name = True           # False: a start's operation ends with an empty body
        self.execution_outcome: dict[str, dict[str, str]] = {}  # why each execution ended (not in its answer)
        self.check_spec = True                   # refuse requests the REST specs refuse (jobs.backends.aca.schema)
        self.spec_violations: list = []          # what was refused for it, for the tests to see
        self._stop_events: dict[str, threading.Event] = {}
        self._stopped: set[str] = set()
        self.restarts: list[str] = []
        self.operations: dict[str, dict] = {}
        self.vault: dict[str, list[dict]] = {}
        self.log_tables: dict[str, list[dict]] = {"ContainerAppConsoleLogs_CL": [], "ContainerAppConsoleLogs": []}
        self.plans: list[ExecutionPlan] = []
        self._last_log_time = _now()
        self.default_plan = ExecutionPlan()
        self._threads: list[threading.Thread] = []
        self._stops: list[threading.Event] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ports: dict[str, int] = {}
        self.ca_path = self.root / "ca.pem"

    # ---- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> AzureStandIn:
        # trustme is needed only to serve TLS, made on start
        import trustme

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        ca.cert_pem.write_to_path(str(self.ca_path))
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        ready = threading.Event()
        self._runners: list[web.AppRunner] = []

        async def serve():
            for service, app in (("arm", self._arm_app()), ("vault", self._vault_app()),
                                 ("files", self._files_app()), ("logs", self._logs_app())):
                runner = web.AppRunner(app, access_log=None)
                await runner.setup()
                site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
                await site.start()
                self.ports[service] = site._server.sockets[0].getsockname()[1]
                self._runners.append(runner)
            ready.set()

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="azure-standin", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(serve(), self.loop).result(30)
        ready.wait(30)
        self.add_environment("tuneops-env")
        return self

    def stop(self) -> None:
        for ev in self._stops:
            ev.set()
        for t in self._threads:
            t.join(10)
        if self.loop is None:
            return

        async def down():
            for r in self._runners:
                await r.cleanup()

        asyncio.run_coroutine_threadsafe(down(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
        self.loop = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---- what tests configure and inspect --------------------------------------------------------------------

    @property
    def arm_url(self) -> str:
        return f"https://127.0.0.1:{self.ports['arm']}"

    @property
    def vault_url(self) -> str:
        return f"https://127.0.0.1:{self.ports['vault']}"

    @property
    def files_url(self) -> str:
        return f"https://127.0.0.1:{self.ports['files']}/{ACCOUNT}"

    @property
    def logs_url(self) -> str:
        return f"https://127.0.0.1:{self.ports['logs']}"

    def share_dir(self, share: str) -> Path:
        return self.root / "shares" / share

    def add_share(self, share: str) -> Path:
        d = self.share_dir(share)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def add_environment(self, name: str, profiles: tuple[str, ...] = ("Consumption", "GPU"),
                        types: dict[str, str] | None = None, counts: dict[str, tuple[int, int]] | None = None) -> dict:
        """A managed environment with workload profiles `profiles` (their types from `types`, by default Consumption
        for "Consumption" and the serverless A100 for the others; `counts` gives a profile minimum and maximum
        instance counts). An entry Azure would refuse (jobs.backends.aca.profiles.check_workload_profile: counts on a
        serverless type, an unknown type) is refused here too, with Azure's code."""
        # The environment's shape is ManagedEnvironments_Get's (ManagedEnvironments.json, Microsoft.App 2025-01-01).
        # defaultDomain: "<unique>.<region>.azurecontainerapps.io" as real apps' fqdns show it
        # (microsoft/azure-container-apps#1174: "<app>.somename-804dbc47.northeurope.azurecontainerapps.io"); the
        # stand-in uses the environment's name as the unique part.
        entries = []
        for p in profiles:
            entry = {"name": p, "workloadProfileType": (types or {}).get(
                p, "Consumption" if p == "Consumption" else "Consumption-GPU-NC24-A100")}
            if counts and p in counts:
                entry["minimumCount"], entry["maximumCount"] = counts[p]
            problem = profile_table.check_workload_profile(entry)
            if problem:
                raise ValueError(problem)
            entries.append(entry)
        env = {
            "id": self._rid(f"managedEnvironments/{name}"), "name": name, "type": "Microsoft.App/managedEnvironments",
            "location": self.location,
            "properties": {"provisioningState": "Succeeded", "defaultDomain": f"{name}.{self.location}.azurecontainerapps.io",
                           "workloadProfiles": entries},
        }
        with self.lock:
            self.environments[name] = env
        return env

    def add_env_storage(self, env: str, name: str, share: str, account: str = ACCOUNT) -> None:
        # As ManagedEnvironmentsStorages_Get answers it (examples/ManagedEnvironmentsStorages_Get.json): the
        # azureFile properties without the accountKey, which is x-ms-secret (CommonDefinitions.json
        # AzureFileProperties).
        with self.lock:
            self.env_storages[(env, name)] = {
                "id": self._rid(f"managedEnvironments/{env}/storages/{name}"), "name": name,
                "type": "Microsoft.App/managedEnvironments/storages",
                "properties": {"azureFile": {"accountName": account, "shareName": share, "accessMode": "ReadWrite"}},
            }
        self.add_share(share)

    def inject(self, fault: Fault) -> Fault:
        with self.lock:
            self.faults.append(fault)
        return fault

    def plan_execution(self, plan: ExecutionPlan) -> None:
        with self.lock:
            self.plans.append(plan)

    def requests_to(self, service: str, method: str | None = None, path: str = "") -> list[RecordedRequest]:
        with self.lock:
            return [r for r in self.requests if r.service == service and (method is None or r.method == method)
                    and re.search(path, r.path)]

    def execution(self, job: str, name: str) -> dict:
        with self.lock:
            return json.loads(json.dumps(self.executions[job][name]))

    def wait_execution(self, job: str, name: str, timeout: float = 30) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            ex = self.execution(job, name)
            if ex["properties"]["status"] not in ("Running", "Processing"):
                return ex
            time.sleep(0.05)
        raise TimeoutError(f"execution {name} still running")

    def add_log_rows(self, job: str, execution: str, lines: list[str]) -> None:
        console = self._console(job, execution)
        for line in lines:
            console(line)

    # ---- shared helpers --------------------------------------------------------------------------------------

    def _rid(self, tail: str, rg: str = "tuneops-rg") -> str:
        # ARM resource ids as the operations' paths spell them (Jobs.json, ContainerApps.json 2025-01-01).
        return f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{rg}/providers/Microsoft.App/{tail}"

    async def _gate(self, service: str, request: web.Request) -> tuple[web.Response | None, bytes]:
        body = await request.read()
        rec = RecordedRequest(service, request.method, request.path, dict(request.query),
                              {k: v for k, v in request.headers.items()},
                              b"" if service == "files" else body, len(body))
        fault = None
        with self.lock:
            if self.record:
                self.requests.append(rec)
            for f in self.faults:
                if f.matches(service, request.method, request.path):
                    f.times -= 1
                    f.hits += 1
                    fault = f
                    break
        if fault is None:
            return None, body
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.status is None:
            return None, body
        headers = {}
        # Retry-After in seconds, as ARM's throttled answers carry it ("Request limits and throttling",
        # learn.microsoft.com/azure/azure-resource-manager/management/request-limits-and-throttling) and as
        # azure-core's RetryPolicy reads it; a fraction is kept only for the tests' short waits.
        if fault.retry_after is not None:
            headers["Retry-After"] = str(fault.retry_after if fault.retry_after % 1 else int(fault.retry_after))
        rec.status = fault.status
        if service == "files":
            # Storage answers in its XML error shape with x-ms-error-code (FilesService._storage_error); ServerBusy is
            # its throttling code ("Common REST API error codes", learn.microsoft.com/rest/api/storageservices).
            headers["x-ms-error-code"] = fault.code or "ServerBusy"
            return self._storage_error(fault.status, fault.code or "ServerBusy", fault.message, headers), body
        # The others answer in ARM's JSON error shape (_arm_error). A 429 is ARM's subscription throttling,
        # SubscriptionRequestsThrottled ("Troubleshoot the TooManyRequestsReceived or SubscriptionRequestsThrottled
        # error code", learn.microsoft.com/troubleshoot/azure/azure-kubernetes). InternalServerError for other
        # statuses: no public source found; kept because a test fault's code only labels it.
        code = fault.code or {429: "SubscriptionRequestsThrottled"}.get(fault.status, "InternalServerError")
        return web.json_response({"error": {"code": code, "message": fault.message}}, status=fault.status,
                                 headers=headers), body

    def _against_spec(self, service: str, request: web.Request, data) -> web.Response | None:
        """Refuse what the official REST spec refuses (jobs.backends.aca.schema: the operation's body schema, its
        read-only members, enums and required headers), in the service's error shape; None when the spec is met."""
        if not self.check_spec:
            return None
        violation = spec.check_request(service, request.method, request.path, dict(request.query),
                                       dict(request.headers), data)
        if violation is None:
            return None
        with self.lock:
            self.spec_violations.append(violation)
        if service == "files":
            return self._storage_error(violation.status, violation.code, violation.message)
        return web.json_response(violation.arm_body(), status=violation.status)

    @staticmethod
    def _arm_error(status: int, code: str, message: str) -> web.Response:
        # ARM's error body {"error": {"code", "message"}}: DefaultErrorResponse (CommonDefinitions.json, Microsoft.App
        # 2025-01-01); Key Vault's KeyVaultError and Log Analytics' errorResponse have the same outer shape.
        return web.json_response({"error": {"code": code, "message": message}}, status=status)



class StaticTokenCredential:
    """The tests' credential: a fixed bearer token (the edge of the world: no Entra ID here)."""

    def __init__(self, token: str = "stand-in-token"):
        self.token = token
        self.scopes: list[tuple[str, ...]] = []

    def get_token(self, *scopes, **kwargs):
        # azure-core is loaded by whoever asks for a token, not by the stand-in's server
        from azure.core.credentials import AccessToken

        self.scopes.append(scopes)
        return AccessToken(self.token, int(time.time()) + 3600)

    def get_token_info(self, *scopes, options=None):
        # azure-core is loaded by whoever asks for a token, not by the stand-in's server
        from azure.core.credentials import AccessTokenInfo

        self.scopes.append(scopes)
        return AccessTokenInfo(self.token, int(time.time()) + 3600)

    def close(self):
        pass


def standin_config(standin: AzureStandIn, infra_dir: Path, *, share: str = "tuneopsshare", job: str = "tuneops-ft",
                   app: str = "tuneops-infer", identity: str = "", extra: dict | None = None,
                   inference: dict | None = None) -> None:
    """Write seed-format config files in `infra_dir` that point at the stand-in."""
    infra_dir.mkdir(parents=True, exist_ok=True)
    identity = identity or (f"/subscriptions/{SUBSCRIPTION}/resourceGroups/tuneops-rg/providers/"
                            f"Microsoft.ManagedIdentity/userAssignedIdentities/tuneops-id")
    ft = {"SUBSCRIPTION_ID": SUBSCRIPTION, "RESOURCE_GROUP_NAME": "tuneops-rg", "STORAGE_ACCOUNT_NAME": ACCOUNT,
          "FILE_SHARE_NAME": share, "ACA_JOB_NAME": job, "COMMANDS": ["cd /mount", "echo ready"],
          "KEY_VAULT_URL": standin.vault_url, "IDENTITY_ID": identity, "LOG_ANALYTICS_WORKSPACE_ID": WORKSPACE_ID,
          "ACA_ENVIRONMENT_NAME": "tuneops-env", "ACA_ENVIRONMENT_STORAGE_NAME": "tuneopsstorage",
          "ARM_ENDPOINT": standin.arm_url, "FILES_ENDPOINT": standin.files_url, "LOGS_ENDPOINT": standin.logs_url,
          "POLLING_INTERVAL": 0.05, "IMAGE": "tuneops.azurecr.io/tuneops-payload:test"}
    ft.update(extra or {})
    inf = {"SUBSCRIPTION_ID": SUBSCRIPTION, "RESOURCE_GROUP_NAME": "tuneops-rg", "STORAGE_ACCOUNT_NAME": ACCOUNT,
           "FILE_SHARE_NAME": share, "ACA_APP_NAME": app, "ACA_APP_ENDPOINT": None, "MAX_REPLICAS": 2}
    inf.update(inference or {})
    (infra_dir / "finetuning.config.json").write_text(json.dumps({k: v for k, v in ft.items() if v is not None},
                                                                 indent=2))
    (infra_dir / "inference.config.json").write_text(json.dumps(inf, indent=2))

