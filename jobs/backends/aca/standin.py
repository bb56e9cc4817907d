"""A local stand-in for the Azure services tuneops uses, served over TLS so the real azure-* SDK clients talk to it.

It implements what the code calls, with the REST shapes the SDKs send and expect: ARM Container Apps (managed
environments and their storages, jobs with start/executions/stop, container apps with revision restart, long-running
operations), Key Vault secrets (with the 401 challenge handshake), Azure Files (share, directory, file create, put
range, list, get with ranges, properties, delete) and the Log Analytics query API (a small KQL subset, failing loudly
on anything else). Faults can be injected: an HTTP status with Retry-After, a slow answer, an execution that ends
Failed or Degraded, a replica timeout. A started execution runs a "container program" against the share's folder,
which stands in for the GPU container that mounts the share at /mount.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import random
import re
import ssl
import string
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape as xml_escape

from aiohttp import web

from payload.events import EVENTS_FILE, encode, make_event

SUBSCRIPTION = "00000000-0000-4000-8000-000000000001"
TENANT = "00000000-0000-4000-8000-0000000000aa"
ACCOUNT = "tuneopsstore"
ACCOUNT_KEY = base64.b64encode(b"stand-in storage account key, not a secret").decode()
WORKSPACE_ID = "11111111-2222-4333-8444-555555555555"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _iso(t: dt.datetime | None) -> str | None:
    return None if t is None else t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _rand(n: int) -> str:
    return "".join(random.choices(string.ascii_lowercase + string.digits, k=n))


@dataclass
class Fault:
    """One injected failure: requests to `service` whose method and path match get `status` (or just `delay`)."""

    service: str                      # "arm", "vault", "files", "logs" or "*"
    path: str = ""                    # a regex searched in the request path
    method: str = ""                  # "" = any
    status: int | None = 500          # None: answer normally, after `delay`
    retry_after: float | None = None
    delay: float = 0.0
    code: str = ""
    message: str = "injected fault"
    times: int = 1
    hits: int = 0

    def matches(self, service: str, method: str, path: str) -> bool:
        return (self.times > 0 and self.service in (service, "*") and (not self.method or self.method == method)
                and re.search(self.path, path) is not None)


@dataclass
class RecordedRequest:
    service: str
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes             # empty for file data (only its size is kept, in `size`)
    size: int
    status: int = 0


@dataclass
class ContainerContext:
    """What a container program gets: the mounted share, its env (secrets resolved), the command."""

    mount: Path
    env: dict[str, str]
    command: list[str]
    stop: threading.Event
    console: Callable[[str], None]

    @property
    def script(self) -> str:
        return self.command[-1] if self.command else ""

    def config_path(self) -> Path | None:
        m = re.search(r"--config\s+([^\s;&|]+)", self.script)
        return self.mount / m.group(1) if m else None


# A container program returns the exit code; it should return early (any code) when `stop` is set.
Program = Callable[[ContainerContext], int]


@dataclass
class ExecutionPlan:
    program: Program | None = None        # default: simulated_trainer()
    processing_s: float = 0.1             # how long the execution stays "Processing"
    final_status: str | None = None       # force "Degraded" etc.; default from the exit code
    reason: str = ""


def simulated_trainer(steps: int = 6, step_delay: float = 0.05, fail_at_step: int | None = None,
                      write_outputs: bool = True, leak_env: str = "") -> Program:
    """Stands in for `python -m payload.train` in the GPU container: reads the run config from the share, writes the
    payload's progress events, train.log, metrics.json and the adapter there, and echoes to the console log."""

    def program(ctx: ContainerContext) -> int:
        cfg_path = ctx.config_path()
        if cfg_path is None or not cfg_path.exists():
            ctx.console(f"error: config not found: {cfg_path}")
            return 2
        cfg = json.loads(cfg_path.read_text())
        out = ctx.mount / cfg["output_dir"]
        out.mkdir(parents=True, exist_ok=True)
        log = (out / "train.log").open("a", encoding="utf-8")

        def say(line: str) -> None:
            log.write(line + "\n")
            log.flush()
            ctx.console(line)

        def emit(type_: str, **fields) -> None:
            line = encode(make_event(type_, **fields))
            with (out / EVENTS_FILE).open("a", encoding="utf-8") as f:
                f.write(line + "\n")
            say("TUNEOPS_EVENT " + line)

        say(f"loading {cfg['base_model']} in 4-bit (nf4)")
        if not (ctx.mount / cfg["dataset"]).exists():
            say(f"FileNotFoundError: dataset {cfg['dataset']} not on the share")
            emit("error", message=f"dataset {cfg['dataset']} not found")
            return 1
        say(f"HF_TOKEN set: {'yes' if ctx.env.get('HF_TOKEN') else 'no'}")
        if leak_env:  # a careless trainer that prints a secret, as a traceback might
            say(f"debug: {leak_env}={ctx.env.get(leak_env)}")
        emit("start", total_steps=steps)
        for step in range(1, steps + 1):
            if ctx.stop.wait(step_delay):
                say("received SIGTERM, stopping")
                return 143
            if fail_at_step == step:
                say("RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB")
                emit("error", message="CUDA out of memory" + (f" ({ctx.env.get(leak_env)})" if leak_env else ""))
                return 1
            emit("step", step=step, total_steps=steps, epoch=step / steps, loss=round(2.0 / step, 4), lr=1e-4,
                 tokens_per_s=1000.0, eta_s=(steps - step) * step_delay)
            say(f"step {step}/{steps} loss {2.0 / step:.4f}")
        if write_outputs:
            adapter = out / "adapter"
            adapter.mkdir(exist_ok=True)
            (adapter / "adapter_config.json").write_text(json.dumps({"r": cfg.get("lora_r", 64), "peft_type": "LORA"}))
            (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 128)
            metrics = {"train_loss": round(2.0 / steps, 4), "eval_loss": 0.5, "steps": steps}
            (out / "metrics.json").write_text(json.dumps(metrics))
            emit("done", adapter=str(Path(cfg["output_dir"]) / "adapter"), metrics=metrics)
        say("training finished")
        log.close()
        return 0

    return program


def sleeper(seconds: float = 3600) -> Program:
    """A container that runs until stopped or killed (for stop and replica-timeout tests)."""

    def program(ctx: ContainerContext) -> int:
        ctx.console("started, waiting")
        return 143 if ctx.stop.wait(seconds) else 0

    return program


def dies_at_once(lines: tuple[str, ...] = ("exec /bin/bash: exec format error",)) -> Program:
    """A container that dies before writing anything to the share; only the console log has its last words."""

    def program(ctx: ContainerContext) -> int:
        for line in lines:
            ctx.console(line)
        return 1

    return program


def run_command(python: str = sys.executable, timeout: float = 600) -> Program:
    """Runs the job's real bash command, with /mount being the share's folder and `python` on PATH."""

    def program(ctx: ContainerContext) -> int:
        script = ctx.script.replace("/mount", str(ctx.mount))
        env = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "TMPDIR")}
        env.update(ctx.env)
        env["PATH"] = str(Path(python).parent) + os.pathsep + os.environ.get("PATH", "")
        proc = subprocess.Popen(["bash", "-c", script], cwd=ctx.mount, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        reader = threading.Thread(target=lambda: [ctx.console(line.rstrip("\n")) for line in proc.stdout], daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if ctx.stop.wait(0.1) or time.monotonic() > deadline:
                proc.terminate()
                proc.wait(10)
                break
        reader.join(5)
        return proc.returncode

    return program


# ----------------------------------------------------------------------------------------------------------------
# KQL: the subset tuneops' queries use. Anything else is a 400, so a query the stand-in does not understand fails.

_TOKEN_RE = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<num>\d+)|(?P<op>==|!=|=~|[(),;|=])|(?P<word>!?[A-Za-z_][\w.]*))')


class KqlError(ValueError):
    pass


def _tokens(query: str) -> list[tuple[str, Any]]:
    out, pos = [], 0
    query = query.strip()
    while pos < len(query):
        m = _TOKEN_RE.match(query, pos)
        if not m or m.end() == pos:
            raise KqlError(f"cannot parse query at {query[pos:pos + 20]!r}")
        pos = m.end()
        if m.group("str") is not None:
            out.append(("str", json.loads(m.group("str"))))
        elif m.group("num") is not None:
            out.append(("num", int(m.group("num"))))
        elif m.group("op") is not None:
            out.append(("op", m.group("op")))
        else:
            out.append(("word", m.group("word")))
        while pos < len(query) and query[pos].isspace():
            pos += 1
    return out


class _Kql:
    def __init__(self, query: str, tables: dict[str, list[dict]]):
        self.t = _tokens(query)
        self.i = 0
        self.tables = tables
        self.lets: dict[str, Any] = {}

    def peek(self, k=0):
        return self.t[self.i + k] if self.i + k < len(self.t) else ("eof", None)

    def take(self, kind=None, value=None):
        tok = self.peek()
        if (kind and tok[0] != kind) or (value is not None and tok[1] != value):
            raise KqlError(f"expected {value or kind}, got {tok[1]!r}")
        self.i += 1
        return tok[1]

    def run(self) -> list[dict]:
        while self.peek() == ("word", "let"):
            self.take()
            name = self.take("word")
            self.take("op", "=")
            kind, value = self.peek()
            if kind not in ("str", "num"):
                raise KqlError("let supports literals only")
            self.take()
            self.lets[name] = value
            self.take("op", ";")
        rows = self.source()
        while self.peek() == ("op", "|"):
            self.take()
            rows = self.operator(rows)
        if self.peek()[0] != "eof":
            raise KqlError(f"unexpected {self.peek()[1]!r}")
        return rows

    def source(self) -> list[dict]:
        if self.peek() == ("word", "union"):
            self.take()
            fuzzy = False
            if self.peek() == ("word", "isfuzzy"):
                self.take()
                self.take("op", "=")
                fuzzy = self.take("word") == "true"
            rows = []
            while True:
                self.take("op", "(")
                rows += self.subquery(fuzzy)
                self.take("op", ")")
                if self.peek() != ("op", ","):
                    return rows
                self.take()
        return self.subquery(False)

    def subquery(self, fuzzy: bool) -> list[dict]:
        name = self.take("word")
        if name not in self.tables and not fuzzy:
            raise KqlError(f"'{name}' could not be resolved to a table")
        rows = [dict(r) for r in self.tables.get(name, [])]
        while self.peek() == ("op", "|"):
            self.take()
            rows = self.operator(rows)
        return rows

    def value(self):
        kind, v = self.peek()
        self.take()
        if kind == "word":
            if v not in self.lets:
                raise KqlError(f"unknown name {v}")
            return self.lets[v]
        return v

    def operator(self, rows: list[dict]) -> list[dict]:
        op = self.take("word")
        if op == "where":
            conds = [self.condition()]
            while self.peek() == ("word", "and"):
                self.take()
                conds.append(self.condition())
            return [r for r in rows if all(c(r) for c in conds)]
        if op == "project":
            cols = []
            while True:
                name = self.take("word")
                src = name
                if self.peek() == ("op", "="):
                    self.take()
                    src = self.take("word")
                cols.append((name, src))
                if self.peek() != ("op", ","):
                    break
                self.take()
            return [{n: r.get(s) for n, s in cols} for r in rows]
        if op == "top":
            n = self.take("num")
            self.take("word", "by")
            col = self.take("word")
            desc = self.take("word") == "desc" if self.peek()[1] in ("asc", "desc") else True
            return sorted(rows, key=lambda r: r.get(col), reverse=desc)[:n]
        if op in ("order", "sort"):
            self.take("word", "by")
            col = self.take("word")
            desc = self.take("word") == "desc" if self.peek()[1] in ("asc", "desc") else True
            return sorted(rows, key=lambda r: r.get(col), reverse=desc)
        if op in ("take", "limit"):
            return rows[: self.take("num")]
        raise KqlError(f"operator {op!r} is not supported by the stand-in")

    def condition(self) -> Callable[[dict], bool]:
        col = self.take("word")
        kind, op = self.peek()
        self.take()
        want = self.value()
        if op == "==":
            return lambda r: r.get(col) == want
        if op == "startswith":
            return lambda r: str(r.get(col) or "").lower().startswith(str(want).lower())
        if op == "contains":
            return lambda r: str(want).lower() in str(r.get(col) or "").lower()
        if op == "!startswith":
            return lambda r: not str(r.get(col) or "").lower().startswith(str(want).lower())
        if op == "contains_cs":
            return lambda r: str(want) in str(r.get(col) or "")
        raise KqlError(f"comparison {op!r} is not supported by the stand-in")


def run_kql(query: str, tables: dict[str, list[dict]]) -> list[dict]:
    return _Kql(query, tables).run()


# ----------------------------------------------------------------------------------------------------------------


class AzureStandIn:
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

    def add_environment(self, name: str, profiles: tuple[str, ...] = ("Consumption", "GPU")) -> dict:
        env = {
            "id": self._rid(f"managedEnvironments/{name}"), "name": name, "type": "Microsoft.App/managedEnvironments",
            "location": self.location,
            "properties": {"provisioningState": "Succeeded", "defaultDomain": f"{name}.{self.location}.azurecontainerapps.io",
                           "workloadProfiles": [{"name": p, "workloadProfileType":
                                                 "Consumption" if p == "Consumption" else "Consumption-GPU-NC24-A100"}
                                                for p in profiles]},
        }
        with self.lock:
            self.environments[name] = env
        return env

    def add_env_storage(self, env: str, name: str, share: str, account: str = ACCOUNT) -> None:
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
        if fault.retry_after is not None:
            headers["Retry-After"] = str(fault.retry_after if fault.retry_after % 1 else int(fault.retry_after))
        rec.status = fault.status
        if service == "files":
            headers["x-ms-error-code"] = fault.code or "ServerBusy"
            return self._storage_error(fault.status, fault.code or "ServerBusy", fault.message, headers), body
        code = fault.code or {429: "TooManyRequests"}.get(fault.status, "InternalServerError")
        return web.json_response({"error": {"code": code, "message": fault.message}}, status=fault.status,
                                 headers=headers), body

    @staticmethod
    def _arm_error(status: int, code: str, message: str) -> web.Response:
        return web.json_response({"error": {"code": code, "message": message}}, status=status)

    # ---- ARM -------------------------------------------------------------------------------------------------

    def _arm_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        prefix = "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.App"
        app.router.add_route("*", prefix + "/managedEnvironments/{env}", self._arm(self.arm_environment))
        app.router.add_route("*", prefix + "/managedEnvironments/{env}/storages/{name}", self._arm(self.arm_env_storage))
        app.router.add_route("*", prefix + "/jobs/{job}", self._arm(self.arm_job))
        app.router.add_route("POST", prefix + "/jobs/{job}/start", self._arm(self.arm_job_start))
        app.router.add_route("POST", prefix + "/jobs/{job}/listSecrets", self._arm(self.arm_list_secrets))
        app.router.add_route("POST", prefix + "/containerApps/{app}/listSecrets", self._arm(self.arm_list_secrets))
        app.router.add_route("GET", prefix + "/jobs/{job}/executions", self._arm(self.arm_executions))
        app.router.add_route("GET", prefix + "/jobs/{job}/executions/{ex}", self._arm(self.arm_execution))
        app.router.add_route("POST", prefix + "/jobs/{job}/executions/{ex}/stop", self._arm(self.arm_stop))
        app.router.add_route("*", prefix + "/containerApps/{app}", self._arm(self.arm_app))
        app.router.add_route("POST", prefix + "/containerApps/{app}/revisions/{rev}/restart",
                             self._arm(self.arm_restart))
        app.router.add_route("GET", "/subscriptions/{sub}/providers/Microsoft.App/locations/{loc}/operations/{op}",
                             self._arm(self.arm_operation))
        return app

    def _arm(self, handler):
        async def wrapped(request: web.Request) -> web.StreamResponse:
            early, body = await self._gate("arm", request)
            if early is not None:
                return early
            if not request.headers.get("Authorization", "").startswith("Bearer "):
                return self._arm_error(401, "AuthenticationFailed", "no bearer token")
            if "api-version" not in request.query:
                return self._arm_error(400, "MissingApiVersionParameter", "api-version is required")
            if request.match_info.get("sub") not in (None, SUBSCRIPTION):
                return self._arm_error(404, "SubscriptionNotFound", f"subscription {request.match_info['sub']}")
            try:
                data = json.loads(body) if body else None
            except json.JSONDecodeError:
                return self._arm_error(400, "InvalidRequestContent", "body is not JSON")
            with self.lock:
                return handler(request, data)

        return wrapped

    def _lro(self, request: web.Request, result: dict | None, polls: int = 1) -> str:
        op = uuid.uuid4().hex
        self.operations[op] = {"polls": polls, "result": result}
        host = f"{request.scheme}://{request.host}"
        return f"{host}/subscriptions/{SUBSCRIPTION}/providers/Microsoft.App/locations/{self.location}/operations/{op}" \
               f"?api-version={request.query['api-version']}"

    def arm_operation(self, request, data):
        op = self.operations.get(request.match_info["op"])
        if op is None:
            return self._arm_error(404, "ResourceNotFound", "no such operation")
        if op["polls"] > 0:
            op["polls"] -= 1
            if op["result"] is None:
                return web.json_response({"status": "InProgress"})
            return web.json_response({}, status=202, headers={"Location": str(request.url)})
        if op["result"] is None:
            return web.json_response({"status": "Succeeded"})
        return web.json_response(op["result"])

    def arm_environment(self, request, data):
        env = self.environments.get(request.match_info["env"])
        if request.method != "GET":
            return self._arm_error(405, "MethodNotAllowed", "the stand-in's environments are read-only")
        if env is None:
            return self._arm_error(404, "ResourceNotFound", f"managed environment {request.match_info['env']}")
        return web.json_response(env)

    def arm_env_storage(self, request, data):
        key = (request.match_info["env"], request.match_info["name"])
        if key[0] not in self.environments:
            return self._arm_error(404, "ParentResourceNotFound", f"managed environment {key[0]}")
        if request.method == "GET":
            if key not in self.env_storages:
                return self._arm_error(404, "ResourceNotFound", f"storage {key[1]}")
            return web.json_response(self.env_storages[key])
        if request.method == "PUT":
            af = ((data or {}).get("properties") or {}).get("azureFile") or {}
            if not af.get("accountName") or not af.get("shareName") or not af.get("accountKey"):
                return self._arm_error(400, "InvalidParameterValue", "azureFile needs accountName, accountKey, shareName")
            stored = {"id": self._rid(f"managedEnvironments/{key[0]}/storages/{key[1]}"), "name": key[1],
                      "type": "Microsoft.App/managedEnvironments/storages",
                      "properties": {"azureFile": {k: v for k, v in af.items() if k != "accountKey"}}}
            self.env_storages[key] = stored
            self.add_share(af["shareName"])
            return web.json_response(stored)
        return self._arm_error(405, "MethodNotAllowed", request.method)

    def _validate_job(self, body: dict) -> str:
        props = body.get("properties") or {}
        if not body.get("location"):
            return "location is required"
        env_name = str(props.get("environmentId", "")).rsplit("/", 1)[-1]
        env = self.environments.get(env_name)
        if env is None:
            return f"environmentId {props.get('environmentId')!r} is not a managed environment"
        profiles = {p["name"] for p in env["properties"]["workloadProfiles"]}
        if props.get("workloadProfileName") and props["workloadProfileName"] not in profiles:
            return f"workload profile {props['workloadProfileName']!r} is not in the environment"
        conf = props.get("configuration") or {}
        if conf.get("triggerType") not in ("Manual", "Schedule", "Event"):
            return "configuration.triggerType is required"
        if not isinstance(conf.get("replicaTimeout"), int):
            return "configuration.replicaTimeout is required"
        identities = set(((body.get("identity") or {}).get("userAssignedIdentities") or {}).keys())
        secret_names = set()
        for s in conf.get("secrets") or []:
            if not re.match(r"^[a-z0-9][a-z0-9-]*[a-z0-9]$", s.get("name", "")):
                return f"secret name {s.get('name')!r} is invalid"
            if "value" in s and s["value"] is not None and s.get("keyVaultUrl"):
                return "a secret has either a value or a keyVaultUrl"
            if s.get("keyVaultUrl") and s.get("identity") not in identities and s.get("identity") != "system":
                return f"secret {s['name']}: identity {s.get('identity')!r} is not assigned to the job"
            secret_names.add(s["name"])
        template = props.get("template") or {}
        containers = template.get("containers") or []
        if not containers or not all(c.get("image") and c.get("name") for c in containers):
            return "template.containers needs at least one container with a name and an image"
        volumes = {v["name"]: v for v in template.get("volumes") or []}
        for v in volumes.values():
            if v.get("storageType") == "AzureFile" and (env_name, v.get("storageName")) not in self.env_storages:
                return f"volume {v['name']}: storage {v.get('storageName')!r} is not in the environment"
        for c in containers:
            for e in c.get("env") or []:
                if e.get("secretRef") and e["secretRef"] not in secret_names:
                    return f"env {e['name']}: secretRef {e['secretRef']!r} is not a secret of the job"
            for m in c.get("volumeMounts") or []:
                if m.get("volumeName") not in volumes:
                    return f"volumeMount {m.get('volumeName')!r} names no volume"
        return ""

    def arm_job(self, request, data):
        name = request.match_info["job"]
        if request.method == "GET":
            job = self.jobs.get(name)
            if job is None:
                return self._arm_error(404, "ResourceNotFound", f"The Resource 'Microsoft.App/jobs/{name}' was not found.")
            return web.json_response(self._without_values(job))
        if request.method == "PUT":
            problem = self._validate_job(data or {})
            if problem:
                return self._arm_error(400, "InvalidParameterValue", problem)
            created = name not in self.jobs
            job = json.loads(json.dumps(data))
            job.update(id=self._rid(f"jobs/{name}", request.match_info["rg"]), name=name, type="Microsoft.App/jobs")
            job["properties"]["provisioningState"] = "Succeeded"
            job["properties"]["runningState"] = "Ready"
            self.jobs[name] = job
            self.executions.setdefault(name, {})
            url = self._lro(request, None, polls=1)
            return web.json_response(self._without_values(job), status=201 if created else 200,
                                     headers={"Azure-AsyncOperation": url})
        return self._arm_error(405, "MethodNotAllowed", request.method)

    @staticmethod
    def _without_values(resource: dict) -> dict:
        """ARM's GET leaves secret values out; listSecrets gives them."""
        out = json.loads(json.dumps(resource))
        for sec in ((out.get("properties") or {}).get("configuration") or {}).get("secrets") or []:
            sec.pop("value", None)
        return out

    def arm_list_secrets(self, request, data):
        if "job" in request.match_info:
            res = self.jobs.get(request.match_info["job"])
        else:
            res = self.apps.get(request.match_info["app"])
        if res is None:
            return self._arm_error(404, "ResourceNotFound", "no such resource")
        secrets = (res["properties"].get("configuration") or {}).get("secrets") or []
        return web.json_response({"value": [dict(s) for s in secrets]})

    def arm_job_start(self, request, data):
        name = request.match_info["job"]
        job = self.jobs.get(name)
        if job is None:
            return self._arm_error(404, "ResourceNotFound", f"The Resource 'Microsoft.App/jobs/{name}' was not found.")
        base = job["properties"]["template"]
        template = data if data else {"containers": base["containers"], "initContainers": base.get("initContainers")}
        if not template.get("containers"):
            return self._arm_error(400, "InvalidParameterValue", "template.containers is empty")
        ex_name = f"{name}-{_rand(7)}"
        ex = {"id": self._rid(f"jobs/{name}/executions/{ex_name}", request.match_info["rg"]), "name": ex_name,
              "type": "Microsoft.App/jobs/executions",
              "properties": {"status": "Processing", "startTime": _iso(_now()), "endTime": None,
                             "template": json.loads(json.dumps(template))}}
        self.executions.setdefault(name, {})[ex_name] = ex
        plan = self.plans.pop(0) if self.plans else self.default_plan
        self._launch(job, ex, plan)
        url = self._lro(request, {"name": ex_name, "id": ex["id"]}, polls=1)
        return web.json_response({"name": ex_name, "id": ex["id"]}, status=202, headers={"Location": url})

    def arm_executions(self, request, data):
        name = request.match_info["job"]
        if name not in self.jobs:
            return self._arm_error(404, "ResourceNotFound", f"job {name}")
        items = sorted(self.executions.get(name, {}).values(), key=lambda e: e["properties"]["startTime"], reverse=True)
        return web.json_response({"value": items})

    def arm_execution(self, request, data):
        ex = self.executions.get(request.match_info["job"], {}).get(request.match_info["ex"])
        if ex is None:
            return self._arm_error(404, "ResourceNotFound", f"execution {request.match_info['ex']}")
        return web.json_response(ex)

    def arm_stop(self, request, data):
        ex = self.executions.get(request.match_info["job"], {}).get(request.match_info["ex"])
        if ex is None:
            return self._arm_error(404, "ResourceNotFound", f"execution {request.match_info['ex']}")
        stop = self._stop_events.get(ex["name"])
        if ex["properties"]["status"] in ("Running", "Processing"):
            self._stopped.add(ex["name"])
            if stop is not None:
                stop.set()
        return web.Response(status=200)

    def arm_app(self, request, data):
        name = request.match_info["app"]
        if request.method == "GET":
            app = self.apps.get(name)
            if app is None:
                return self._arm_error(404, "ResourceNotFound", f"The Resource 'Microsoft.App/containerApps/{name}' was not found.")
            return web.json_response(self._without_values(app))
        if request.method == "PUT":
            props = (data or {}).get("properties") or {}
            env_name = str(props.get("environmentId", "")).rsplit("/", 1)[-1]
            env = self.environments.get(env_name)
            if env is None:
                return self._arm_error(400, "InvalidParameterValue", "environmentId is not a managed environment")
            template = props.get("template") or {}
            if not template.get("containers"):
                return self._arm_error(400, "InvalidParameterValue", "template.containers is empty")
            old = self.apps.get(name)
            revision = (old or {}).get("properties", {}).get("latestRevisionName")
            if old is None or old["properties"].get("template") != template:
                revision = f"{name}--{_rand(7)}"
            app = json.loads(json.dumps(data))
            app.update(id=self._rid(f"containerApps/{name}", request.match_info["rg"]), name=name,
                       type="Microsoft.App/containerApps")
            p = app["properties"]
            p["provisioningState"] = "Succeeded"
            p["latestRevisionName"] = p["latestReadyRevisionName"] = revision
            ingress = (p.get("configuration") or {}).get("ingress")
            if ingress:
                ingress["fqdn"] = f"{name}.{env['properties']['defaultDomain']}"
            self.apps[name] = app
            url = self._lro(request, None, polls=1)
            return web.json_response(self._without_values(app), status=201 if old is None else 200,
                                     headers={"Azure-AsyncOperation": url})
        return self._arm_error(405, "MethodNotAllowed", request.method)

    def arm_restart(self, request, data):
        app = self.apps.get(request.match_info["app"])
        rev = request.match_info["rev"]
        if app is None or app["properties"].get("latestRevisionName") != rev:
            return self._arm_error(404, "ResourceNotFound", f"revision {rev}")
        self.restarts.append(rev)
        return web.Response(status=200)

    # ---- executions: the "container" -------------------------------------------------------------------------

    def _console(self, job: str, execution: str) -> Callable[[str], None]:
        group = f"{execution}-{_rand(5)}"

        def console(line: str) -> None:
            with self.lock:
                # Strictly increasing times, as a container's lines are in order; ties would make ordering arbitrary.
                t = max(_now(), self._last_log_time + dt.timedelta(microseconds=1))
                self._last_log_time = t
                if self.log_schema == "custom":
                    self.log_tables["ContainerAppConsoleLogs_CL"].append(
                        {"TimeGenerated": t, "ContainerJobName_s": job, "ContainerGroupName_s": group, "Log_s": line,
                         "Stream_s": "stdout"})
                else:
                    self.log_tables["ContainerAppConsoleLogs"].append(
                        {"TimeGenerated": t, "JobName": job, "ContainerGroupName": group, "Log": line,
                         "Stream": "stdout"})

        return console

    def _resolve_env(self, job: dict, container: dict) -> tuple[dict[str, str], str]:
        secrets = {s["name"]: s for s in job["properties"]["configuration"].get("secrets") or []}
        env: dict[str, str] = {}
        for e in container.get("env") or []:
            if "secretRef" in e and e["secretRef"]:
                s = secrets.get(e["secretRef"])
                if s is None:
                    return {}, f"secret {e['secretRef']} not found"
                if s.get("keyVaultUrl"):
                    vault_name = s["keyVaultUrl"].rstrip("/").split("/secrets/", 1)[-1].split("/")[0]
                    versions = self.vault.get(vault_name)
                    if not versions:
                        return {}, f"Key Vault secret {vault_name} not found"
                    env[e["name"]] = versions[-1]["value"]
                else:
                    env[e["name"]] = s.get("value") or ""
            else:
                env[e["name"]] = e.get("value", "")
        return env, ""

    def _mount_dir(self, job: dict) -> Path | None:
        env_name = job["properties"]["environmentId"].rsplit("/", 1)[-1]
        container = job["properties"]["template"]["containers"][0]
        volumes = {v["name"]: v for v in job["properties"]["template"].get("volumes") or []}
        for m in container.get("volumeMounts") or []:
            v = volumes.get(m["volumeName"])
            if m.get("mountPath") == "/mount" and v and v.get("storageType") == "AzureFile":
                storage = self.env_storages.get((env_name, v["storageName"]))
                if storage:
                    return self.add_share(storage["properties"]["azureFile"]["shareName"])
        return None

    def _launch(self, job: dict, ex: dict, plan: ExecutionPlan) -> None:
        stop = threading.Event()
        self._stop_events[ex["name"]] = stop
        self._stops.append(stop)
        job_name = job["name"]
        timeout = job["properties"]["configuration"]["replicaTimeout"]

        def finish(status: str, reason: str = "", message: str = "") -> None:
            with self.lock:
                p = ex["properties"]
                if ex["name"] in self._stopped:
                    status, reason = "Stopped", ""
                p["status"] = plan.final_status or status
                p["endTime"] = _iso(_now())
                if reason or plan.reason:
                    p["reason"] = plan.reason or reason
                if message:
                    p["message"] = message

        def run() -> None:
            if stop.wait(plan.processing_s):
                finish("Stopped")
                return
            container = ex["properties"]["template"]["containers"][0]
            with self.lock:
                env, problem = self._resolve_env(job, container)
                mount = self._mount_dir(job)
                ex["properties"]["status"] = "Running"
            console = self._console(job_name, ex["name"])
            if problem or mount is None:
                console(problem or "no share mounted at /mount")
                finish("Failed", "ContainerCreateFailure", problem or "no volume mounted at /mount")
                return
            with self.lock:
                self.execution_env[ex["name"]] = env
            ctx = ContainerContext(mount=mount, env=env, command=list(container.get("command") or []) +
                                   list(container.get("args") or []), stop=stop, console=console)
            result: dict[str, int] = {}
            worker = threading.Thread(target=lambda: result.setdefault("code", (plan.program or simulated_trainer())(ctx)),
                                      daemon=True)
            worker.start()
            worker.join(timeout)
            if worker.is_alive():
                stop.set()
                worker.join(10)
                finish("Failed", "DeadlineExceeded", f"replica timed out after {timeout}s")
                return
            code = result.get("code", 1)
            finish("Succeeded" if code == 0 else "Failed", "" if code == 0 else "BackoffLimitExceeded",
                   "" if code == 0 else f"container exited with code {code}")

        t = threading.Thread(target=run, name=f"execution-{ex['name']}", daemon=True)
        self._threads.append(t)
        t.start()

    # ---- Key Vault -------------------------------------------------------------------------------------------

    def _vault_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/secrets", self._vault(self.kv_list))
        app.router.add_route("*", "/secrets/{name}", self._vault(self.kv_secret))
        # get_secret without a version asks for /secrets/NAME/ (an empty version: the latest).
        app.router.add_route("*", "/secrets/{name}/", self._vault(self.kv_secret))
        app.router.add_route("*", "/secrets/{name}/{version}", self._vault(self.kv_secret))
        return app

    def _vault(self, handler):
        async def wrapped(request: web.Request) -> web.StreamResponse:
            early, body = await self._gate("vault", request)
            if early is not None:
                return early
            if not request.headers.get("Authorization", "").startswith("Bearer "):
                # The handshake: Key Vault's client first asks without a token and learns where to get one.
                return web.json_response(
                    {"error": {"code": "Unauthorized", "message": "AKV10000: Request is missing a Bearer token."}},
                    status=401, headers={"WWW-Authenticate": f'Bearer authorization="https://login.microsoftonline.com/'
                                                             f'{TENANT}", resource="https://vault.azure.net"'})
            with self.lock:
                return handler(request, json.loads(body) if body else None)

        return wrapped

    def _bundle(self, name: str, version: dict, with_value: bool) -> dict:
        out = {"id": f"{self.vault_url}/secrets/{name}/{version['version']}", "attributes": version["attributes"],
               "tags": version.get("tags") or {}}
        if version.get("contentType"):
            out["contentType"] = version["contentType"]
        if with_value:
            out["value"] = version["value"]
        return out

    def kv_list(self, request, data):
        if request.method != "GET":
            return web.json_response({"error": {"code": "BadParameter", "message": "method"}}, status=405)
        items = [self._bundle(n, v[-1], False) for n, v in sorted(self.vault.items())]
        for item in items:
            item["id"] = item["id"].rsplit("/", 1)[0]
        return web.json_response({"value": items, "nextLink": None})

    def kv_secret(self, request, data):
        name = request.match_info["name"]
        if not re.match(r"^[0-9a-zA-Z-]{1,127}$", name):
            return web.json_response({"error": {"code": "BadParameter", "message": f"invalid secret name {name}"}},
                                     status=400)
        if request.method == "PUT":
            if not isinstance(data, dict) or not isinstance(data.get("value"), str):
                return web.json_response({"error": {"code": "BadParameter", "message": "value is required"}}, status=400)
            now = int(time.time())
            versions = self.vault.setdefault(name, [])
            created = versions[0]["attributes"]["created"] if versions else now
            v = {"version": uuid.uuid4().hex, "value": data["value"], "tags": data.get("tags") or {},
                 "contentType": data.get("contentType"),
                 "attributes": {"enabled": True, "created": created, "updated": now,
                                "recoveryLevel": "Recoverable+Purgeable", "recoverableDays": 90}}
            versions.append(v)
            return web.json_response(self._bundle(name, v, True))
        if request.method == "GET":
            versions = self.vault.get(name)
            if not versions:
                return web.json_response({"error": {"code": "SecretNotFound",
                                                    "message": f"A secret with (name/id) {name} was not found in this key vault."}},
                                         status=404)
            want = request.match_info.get("version")
            v = next((x for x in versions if x["version"] == want), None) if want else versions[-1]
            if v is None:
                return web.json_response({"error": {"code": "SecretNotFound", "message": "no such version"}}, status=404)
            return web.json_response(self._bundle(name, v, True))
        return web.json_response({"error": {"code": "BadParameter", "message": "method"}}, status=405)

    # ---- Azure Files -----------------------------------------------------------------------------------------

    def _files_app(self) -> web.Application:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_route("*", "/{account}/{share}", self._files(self.files_share))
        app.router.add_route("*", "/{account}/{share}/{path:.+}", self._files(self.files_path))
        return app

    @staticmethod
    def _storage_error(status: int, code: str, message: str, headers: dict | None = None) -> web.Response:
        body = (f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code><Message>{xml_escape(message)}'
                f"</Message></Error>")
        h = {"x-ms-error-code": code, "x-ms-request-id": uuid.uuid4().hex, "x-ms-version": "2025-05-05",
             "Content-Type": "application/xml"}
        h.update(headers or {})
        return web.Response(status=status, body=body.encode(), headers=h)

    def _files(self, handler):
        async def wrapped(request: web.Request) -> web.StreamResponse:
            early, body = await self._gate("files", request)
            if early is not None:
                return early
            auth = request.headers.get("Authorization", "")
            if not (auth.startswith(f"SharedKey {ACCOUNT}:") or
                    (auth.startswith("Bearer ") and request.headers.get("x-ms-file-request-intent") == "backup")):
                return self._storage_error(403, "AuthenticationFailed", "Server failed to authenticate the request.")
            if request.match_info["account"] != ACCOUNT:
                return self._storage_error(400, "InvalidUri", "unknown account")
            share = request.match_info["share"]
            root = self.share_dir(share)
            rel = request.match_info.get("path", "")
            if ".." in Path(rel).parts:
                return self._storage_error(400, "InvalidResourceName", "bad path")
            # Disk work runs in a thread so that big uploads do not stall the event loop.
            return await asyncio.to_thread(handler, request, root, rel, body)

        return wrapped

    def _ok_headers(self, extra: dict | None = None) -> dict:
        h = {"x-ms-request-id": uuid.uuid4().hex, "x-ms-version": "2025-05-05",
             "Date": _now().strftime("%a, %d %b %Y %H:%M:%S GMT")}
        h.update(extra or {})
        return h

    def _file_headers(self, path: Path) -> dict:
        st = path.stat()
        mtime = dt.datetime.fromtimestamp(st.st_mtime, dt.timezone.utc)
        return self._ok_headers({
            "Last-Modified": mtime.strftime("%a, %d %b %Y %H:%M:%S GMT"), "ETag": f'"0x{st.st_mtime_ns:X}"',
            "x-ms-type": "File", "x-ms-server-encrypted": "true", "x-ms-file-attributes": "Archive",
            "x-ms-file-creation-time": _iso(mtime).replace("Z", "0000Z"),
            "x-ms-file-last-write-time": _iso(mtime).replace("Z", "0000Z"),
            "x-ms-file-change-time": _iso(mtime).replace("Z", "0000Z"),
            "x-ms-file-permission-key": "1*1", "x-ms-file-id": str(st.st_ino), "x-ms-file-parent-id": "0",
            "Accept-Ranges": "bytes"})

    def files_share(self, request, root: Path, rel: str, body: bytes):
        restype, comp = request.query.get("restype"), request.query.get("comp")
        if restype == "share" and request.method == "PUT" and not comp:
            if root.exists():
                return self._storage_error(409, "ShareAlreadyExists", "The specified share already exists.")
            root.mkdir(parents=True)
            return web.Response(status=201, headers=self._ok_headers({"ETag": '"0x1"'}))
        if not root.exists():
            return self._storage_error(404, "ShareNotFound", "The specified share does not exist.")
        if restype == "share" and request.method in ("GET", "HEAD") and not comp:
            return web.Response(status=200, headers=self._ok_headers({"x-ms-share-quota": "1024", "ETag": '"0x1"',
                                                                      "Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT"}))
        if restype == "directory":
            return self.files_path(request, root, "", body)
        return self._storage_error(400, "UnsupportedQueryParameter", f"{request.method} {request.query_string}")

    def files_path(self, request, root: Path, rel: str, body: bytes):
        restype, comp, method = request.query.get("restype"), request.query.get("comp"), request.method
        target = root / rel if rel else root
        if not root.exists():
            return self._storage_error(404, "ShareNotFound", "The specified share does not exist.")
        if restype == "directory":
            if method == "PUT" and not comp:
                if target.is_dir():
                    return self._storage_error(409, "ResourceAlreadyExists", "The specified resource already exists.")
                if not target.parent.is_dir():
                    return self._storage_error(404, "ParentNotFound", "The specified parent path does not exist.")
                target.mkdir()
                return web.Response(status=201, headers=self._ok_headers({"ETag": '"0x1"',
                                                                          "Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT"}))
            if not target.is_dir():
                return self._storage_error(404, "ResourceNotFound", "The specified resource does not exist.")
            if method in ("GET", "HEAD") and comp == "list":
                return self._list(request, root, target, rel)
            if method in ("GET", "HEAD") and not comp:
                return web.Response(status=200, headers=self._ok_headers({"ETag": '"0x1"',
                                                                          "Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT"}))
            if method == "DELETE":
                if any(target.iterdir()):
                    return self._storage_error(409, "DirectoryNotEmpty", "The specified directory is not empty.")
                target.rmdir()
                return web.Response(status=202, headers=self._ok_headers())
            return self._storage_error(400, "UnsupportedHttpVerb", method)
        # files
        if method == "PUT" and comp == "range":
            if not target.is_file():
                return self._storage_error(404, "ResourceNotFound", "The specified resource does not exist.")
            rng = request.headers.get("x-ms-range") or request.headers.get("Range", "")
            m = re.match(r"bytes=(\d+)-(\d+)", rng)
            if not m or request.headers.get("x-ms-write", "update") != "update":
                return self._storage_error(400, "InvalidHeaderValue", "x-ms-range")
            start, end = int(m.group(1)), int(m.group(2))
            if end - start + 1 != len(body) or end - start + 1 > 4 * 1024 * 1024:
                return self._storage_error(400, "InvalidRange", "range length does not match the body (max 4 MiB)")
            if end >= target.stat().st_size:
                return self._storage_error(416, "InvalidRange", "The range specified is invalid for the current size of the resource.")
            with target.open("r+b") as f:
                f.seek(start)
                f.write(body)
            return web.Response(status=201, headers=self._file_headers(target))
        if method == "PUT" and not comp:
            if request.headers.get("x-ms-type", "").lower() != "file":
                return self._storage_error(400, "MissingRequiredHeader", "x-ms-type")
            if not target.parent.is_dir():
                return self._storage_error(404, "ParentNotFound", "The specified parent path does not exist.")
            if target.is_dir():
                return self._storage_error(409, "ResourceTypeMismatch", "a directory has that name")
            size = int(request.headers.get("x-ms-content-length", "0"))
            with target.open("wb") as f:
                f.truncate(size)
            return web.Response(status=201, headers=self._file_headers(target))
        if method in ("GET", "HEAD") and not comp:
            if not target.is_file():
                return self._storage_error(404, "ResourceNotFound", "The specified resource does not exist.")
            size = target.stat().st_size
            rng = request.headers.get("x-ms-range") or request.headers.get("Range")
            headers = self._file_headers(target)
            if method == "HEAD":
                headers["Content-Length"] = str(size)
                return web.Response(status=200, headers=headers)
            if rng:
                m = re.match(r"bytes=(\d+)-(\d*)", rng)
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else size - 1
                if start >= size:
                    return self._storage_error(416, "InvalidRange",
                                               "The range specified is invalid for the current size of the resource.",
                                               {"Content-Range": f"bytes */{size}"})
                end = min(end, size - 1)
                with target.open("rb") as f:
                    f.seek(start)
                    data = f.read(end - start + 1)
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
                return web.Response(status=206, body=data, headers=headers)
            return web.Response(status=200, body=target.read_bytes(), headers=headers)
        if method == "DELETE" and not comp:
            if not target.is_file():
                return self._storage_error(404, "ResourceNotFound", "The specified resource does not exist.")
            target.unlink()
            return web.Response(status=202, headers=self._ok_headers())
        return self._storage_error(400, "UnsupportedQueryParameter", f"{method} {request.query_string}")

    def _list(self, request, root: Path, target: Path, rel: str) -> web.Response:
        prefix = request.query.get("prefix", "")
        marker = request.query.get("marker", "")
        max_results = int(request.query.get("maxresults", "5000"))
        names = sorted(p.name for p in target.iterdir() if p.name.startswith(prefix))
        names = [n for n in names if n > marker] if marker else names
        page, rest = names[:max_results], names[max_results:]
        entries = []
        for n in page:
            p = target / n
            if p.is_dir():
                entries.append(f"<Directory><Name>{xml_escape(n)}</Name><FileId>{p.stat().st_ino}</FileId>"
                               f"<Properties /></Directory>")
            else:
                entries.append(f"<File><Name>{xml_escape(n)}</Name><FileId>{p.stat().st_ino}</FileId><Properties>"
                               f"<Content-Length>{p.stat().st_size}</Content-Length></Properties></File>")
        next_marker = page[-1] if rest else ""
        xml = (f'<?xml version="1.0" encoding="utf-8"?><EnumerationResults ServiceEndpoint="{self.files_url}/" '
               f'ShareName="{xml_escape(root.name)}" DirectoryPath="{xml_escape(rel)}"><Prefix>{xml_escape(prefix)}'
               f"</Prefix><MaxResults>{max_results}</MaxResults><Entries>{''.join(entries)}</Entries>"
               f"<NextMarker>{xml_escape(next_marker)}</NextMarker></EnumerationResults>")
        return web.Response(status=200, body=xml.encode(), headers=self._ok_headers({"Content-Type": "application/xml"}))

    # ---- Log Analytics ---------------------------------------------------------------------------------------

    def _logs_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("POST", "/v1/workspaces/{ws}/query", self.logs_query)
        return app

    async def logs_query(self, request: web.Request) -> web.Response:
        early, body = await self._gate("logs", request)
        if early is not None:
            return early
        if not request.headers.get("Authorization", "").startswith("Bearer "):
            return web.json_response({"error": {"code": "AuthorizationRequiredError", "message": "no token"}}, status=401)
        if request.match_info["ws"] != WORKSPACE_ID:
            return web.json_response({"error": {"code": "WorkspaceNotFoundError", "message": "no such workspace"}},
                                     status=404)
        data = json.loads(body)
        with self.lock:
            tables = {k: list(v) for k, v in self.log_tables.items() if v or k == "ContainerAppConsoleLogs_CL"}
        try:
            rows = run_kql(data["query"], tables)
        except KqlError as e:
            return web.json_response({"error": {"code": "BadArgumentError", "message": "The request had some invalid properties",
                                                "innererror": {"code": "SemanticError", "message": str(e)}}},
                                     status=400)
        cols = list(rows[0].keys()) if rows else ["TimeGenerated", "Log"]
        types = {c: "datetime" if c == "TimeGenerated" else "string" for c in cols}
        out_rows = [[_iso(r[c]) if isinstance(r.get(c), dt.datetime) else r.get(c) for c in cols] for r in rows]
        return web.json_response({"tables": [{"name": "PrimaryResult",
                                              "columns": [{"name": c, "type": types[c]} for c in cols],
                                              "rows": out_rows}]})


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

