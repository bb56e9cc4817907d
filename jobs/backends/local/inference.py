"""The local backend's inference endpoints: one `python -m payload.serve` per base model, serving every adapter
deployed on it, started as a detached process by the first deploy on that base and stopped when its last adapter is
undeployed. The server follows its manifest (jobs.core.endpoints): a deploy adds its entry and has the server reload
at once, an undeploy takes it out. Each base has its own record in Redis and its own lock.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from jobs.backends.local.executor import clean_env
from jobs.core import endpoints, store
from jobs.core.domain import Run
from jobs.core.procs import group_alive, pid_alive, start_time
from jobs.core.runconfig import run_dir
from jobs.core.settings import JobSettings

log = logging.getLogger(__name__)

SERVE_LOG = "serve.log"
# Loading a 7B base on a GPU takes minutes; the tiny model seconds.
HEALTH_TIMEOUT_S = 600.0
STOP_GRACE_S = 15.0


class ServeError(Exception):
    """Why the server could not be started, in words for the run's thread."""


def public_host(host: str) -> str:
    """The host name for the URL: the bind address, or this machine's name when it listens on every address."""
    return socket.getfqdn() if host in ("", "0.0.0.0", "::") else host


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host if host not in ("", "::") else "0.0.0.0", 0))
        return s.getsockname()[1]


def base_model_dir(workspace: Path, model: str) -> Path:
    """The base model's folder: as given (relative to the workspace) or in model-cache/<model> (a hub id)."""
    for candidate in (workspace / model, workspace / "model-cache" / model):
        if (candidate / "config.json").is_file():
            return candidate
    raise ServeError(f"the base model {model} is not on disk (neither {model}/ nor model-cache/{model}/ in the "
                     "workspace holds a config.json); the local server loads it from there, so put it there and "
                     "deploy again")


def _tail(path: Path, lines: int = 5) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
            return r.status == 200 and json.loads(r.read() or b"{}").get("status") == "ok"
    except (urllib.error.URLError, OSError, ValueError):
        return False


def stop_server(server: Endpoint, grace_s: float = STOP_GRACE_S) -> None:
    """Stop a server and everything of its process group; a pid that now belongs to another process is left alone."""
    if not server.alive():
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not group_alive(server.pid):
                return
            time.sleep(0.1)
    log.warning("the inference server of %s (pid %d) survived SIGKILL", server.model, server.pid)


ENDPOINT_KEY = store.LOCAL_SERVER_KEY + ":{}"
ENDPOINT_LOCK = store.LOCAL_SERVER_LOCK + ":{}"
API_KEY_ENV = "TUNEOPS_SERVE_API_KEY"
RELOAD_TIMEOUT_S = 600.0  # loading an adapter on a big base: seconds; unloading waits for requests in flight


@dataclass
class Endpoint:
    """A base model's inference server."""
    name: str           # the endpoint's name (jobs.core.endpoints.endpoint_name of the base)
    model: str          # the base model as runs name it
    pid: int
    start: str
    port: int
    url: str
    log: str
    local_url: str      # where workers on this machine reach it (127.0.0.1 when it listens on every address)

    @property
    def api_url(self) -> str:
        return f"{self.url}/v1"

    def alive(self) -> bool:
        return pid_alive(self.pid, self.start)


def _running(raw: bytes | str | None) -> Endpoint | None:
    """The server a Redis record names, if it still runs."""
    try:
        found = Endpoint(**json.loads(raw)) if raw else None
    except (TypeError, ValueError):
        return None
    return found if found is not None and found.alive() else None


def endpoint(settings: JobSettings, model: str) -> Endpoint | None:
    """The base model's server as recorded, if it still runs."""
    return _running(store.connect(settings).get(ENDPOINT_KEY.format(endpoints.endpoint_name(model))))


def _admin(server: Endpoint, method: str, path: str, timeout_s: float = RELOAD_TIMEOUT_S) -> dict:
    request = urllib.request.Request(f"{server.local_url}{path}", method=method, data=b"" if method == "POST" else None)
    key = os.environ.get(API_KEY_ENV)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as r:
            return json.loads(r.read() or b"{}")
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ServeError(f"the inference server of {server.model} at {server.url} did not answer {path} ({e}); "
                         f"its log: {server.log}") from None


def _start_endpoint(settings: JobSettings, model: str, timeout_s: float) -> Endpoint:
    """Start the base model's server on its manifest (empty or not), and wait until /healthz answers."""
    workspace = Path(settings.workspace).resolve()
    base = base_model_dir(workspace, model)
    manifest = endpoints.manifest_path(workspace, model)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    name = endpoints.endpoint_name(model)
    log_path = manifest.parent / SERVE_LOG
    host = settings.serve_host
    port = settings.serve_port if settings.serve_port and not _port_taken(settings, settings.serve_port) else 0
    port = port or free_port(host)
    url = f"http://{public_host(host)}:{port}"
    local_url = f"http://127.0.0.1:{port}" if host in ("", "0.0.0.0", "::") else url
    command = [settings.python, "-P", "-m", "payload.serve", "--base", str(base), "--base-only", "--adapters",
               str(manifest), "--port", str(port), "--host", host]
    with open(log_path, "ab") as logf:
        logf.write(f"[tuneops] endpoint {name}: {' '.join(command[2:])}\n".encode())
        logf.flush()
        try:
            proc = subprocess.Popen(command, cwd=workspace, stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**clean_env(dict(os.environ)), "HF_HUB_OFFLINE": "1"})
        except OSError as e:
            raise ServeError(f"cannot start {settings.python!r}: {e.strerror}; set TUNEOPS_PYTHON to an "
                             "interpreter that has the payload (with its serve extra) installed") from None
    server = Endpoint(name, model, proc.pid, start_time(proc.pid), port, url, str(log_path), local_url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            last = _tail(log_path, 1)
            raise ServeError(f"payload.serve exited with code {code} before it answered"
                             + (f": {last[0]}" if last else "") + f" (log: {log_path})")
        if _healthy(local_url):
            proc.returncode = 0  # let go of the child: the server outlives this task
            return server
        time.sleep(0.5)
    stop_server(server)
    raise ServeError(f"payload.serve did not answer /healthz within {timeout_s:.0f} s; it was stopped "
                     f"(log: {log_path})")


def _port_taken(settings: JobSettings, port: int) -> bool:
    """Whether another base model's server holds TUNEOPS_SERVE_PORT (then this one takes a free port)."""
    conn = store.connect(settings)
    return any((other := _running(conn.get(key))) is not None and other.port == port
               for key in conn.scan_iter(ENDPOINT_KEY.format("*")))


def _holding(conn, name: str, model: str, timeout_s: float):
    """The endpoint's lock, for one deploy or undeploy at a time per base model."""
    return store.holding(conn, ENDPOINT_LOCK.format(name), timeout_s=timeout_s + 120, wait_s=timeout_s + 60,
                         busy=ServeError(f"another deploy has held the endpoint of {model} for too long; try again "
                                         "later"))


def _follow_removal(conn, server: Endpoint, left: list[dict]) -> bool:
    """After an entry left the manifest: the server reloads, or stops when nothing is left on it (True)."""
    if left:
        _admin(server, "POST", "/admin/reload")
        return False
    stop_server(server)
    conn.delete(ENDPOINT_KEY.format(server.name))
    return True


def serve_adapter(settings: JobSettings, run: Run, entry: dict, timeout_s: float = HEALTH_TIMEOUT_S) -> Endpoint:
    """Add the run's adapter to its base model's endpoint (starting the endpoint when none runs) and wait until the
    server has loaded it; ServeError with the server's one-line reason when it refuses the adapter."""
    workspace = Path(settings.workspace).resolve()
    adapter = workspace / (run.adapter_path or f"{run_dir(run.id)}/adapter")
    if not (adapter / "adapter_config.json").is_file():
        raise ServeError(f"the adapter of {run.id} is not at {run.adapter_path or adapter} any more; run it again")
    conn = store.connect(settings)
    name = endpoints.endpoint_name(run.model)
    with _holding(conn, name, run.model, timeout_s):
        endpoints.add_entry(workspace, run.model, {**entry, "path": str(adapter)})
        server = endpoint(settings, run.model)
        if server is None:
            server = _start_endpoint(settings, run.model, timeout_s)  # loads the manifest, this entry included
            conn.set(ENDPOINT_KEY.format(name), json.dumps(asdict(server)))
        status = _admin(server, "POST", "/admin/reload")
        row = next((a for a in status.get("adapters", []) if a.get("name") == run.id), None)
        if row is None or row.get("status") != "loaded":
            _, left = endpoints.remove_entry(workspace, run.model, run.id)
            _follow_removal(conn, server, left)
            reason = (row or {}).get("reason") or status.get("error") or "it is not in the server's list"
            raise ServeError(f"the endpoint of {run.model} refused the adapter of {run.id}: {reason}")
        return server


def unserve_adapter(settings: JobSettings, run: Run) -> tuple[dict | None, bool]:
    """Take the run's adapter off its base model's endpoint; returns (the manifest entry removed, or None when it was
    not served; whether the endpoint was stopped because nothing was left on it)."""
    workspace = Path(settings.workspace).resolve()
    conn = store.connect(settings)
    with _holding(conn, endpoints.endpoint_name(run.model), run.model, RELOAD_TIMEOUT_S):
        removed, left = endpoints.remove_entry(workspace, run.model, run.id)
        server = endpoint(settings, run.model)
        return removed, server is not None and _follow_removal(conn, server, left)
