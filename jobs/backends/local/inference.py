"""The local backend's inference server: `python -m payload.serve` on a run's adapter, started as a detached process by
the deploy task, checked on /healthz, and replaced by the next deploy. Redis records which one is serving.

One server at a time: a deploy takes a lock, starts the new server (on TUNEOPS_SERVE_PORT, or a free port), waits
until it answers, records it, then stops the previous one. With a fixed port the previous one has to go first.
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
from jobs.core import store
from jobs.core.domain import Run
from jobs.core.procs import group_alive, pid_alive, start_time
from jobs.core.runconfig import run_dir
from jobs.core.settings import JobSettings

log = logging.getLogger(__name__)

SERVER_KEY = store.LOCAL_SERVER_KEY
LOCK_KEY = store.LOCAL_SERVER_LOCK
SERVE_LOG = "serve.log"
# Loading a 7B base on a GPU takes minutes; the tiny model seconds.
HEALTH_TIMEOUT_S = 600.0
STOP_GRACE_S = 15.0


class ServeError(Exception):
    """Why the server could not be started, in words for the run's thread."""


@dataclass
class LocalServer:
    run_id: str
    approval: str
    pid: int
    start: str          # the process's start time, which tells it from a later process with the same pid
    port: int
    url: str
    log: str

    @property
    def api_url(self) -> str:
        return f"{self.url}/v1"

    def alive(self) -> bool:
        return pid_alive(self.pid, self.start)


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


def current(settings: JobSettings) -> LocalServer | None:
    raw = store.connect(settings).get(SERVER_KEY)
    if not raw:
        return None
    try:
        return LocalServer(**json.loads(raw))
    except (TypeError, ValueError):
        return None


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


def start_server(settings: JobSettings, run: Run, approval_id: str, port: int,
                 timeout_s: float = HEALTH_TIMEOUT_S) -> LocalServer:
    """Start payload.serve on the run's adapter in a session of its own, and wait until /healthz answers."""
    workspace = Path(settings.workspace).resolve()
    base = base_model_dir(workspace, run.model)
    adapter = workspace / (run.adapter_path or f"{run_dir(run.id)}/adapter")
    if not (adapter / "adapter_config.json").is_file():
        raise ServeError(f"the adapter of {run.id} is not at {run.adapter_path or adapter} any more; run it again")
    out_dir = workspace / run_dir(run.id)
    log_path = out_dir / SERVE_LOG
    host = settings.serve_host
    url = f"http://{public_host(host)}:{port}"
    command = [settings.python, "-P", "-m", "payload.serve", "--base", str(base), "--adapter", str(adapter),
               "--port", str(port), "--host", host, "--model-name", run.id]
    with open(log_path, "ab") as logf:
        logf.write(f"[tuneops] {approval_id}: {' '.join(command[2:])}\n".encode())
        logf.flush()
        try:
            proc = subprocess.Popen(command, cwd=workspace, stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**clean_env(dict(os.environ)), "HF_HUB_OFFLINE": "1"})
        except OSError as e:
            raise ServeError(f"cannot start {settings.python!r}: {e.strerror}; set TUNEOPS_PYTHON to an "
                             "interpreter that has the payload (with its serve extra) installed") from None
    server = LocalServer(run.id, approval_id, proc.pid, start_time(proc.pid), port, url, str(log_path))
    # The server outlives this task (and its worker): nobody waits on it here once it answers.
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            last = _tail(log_path, 1)
            raise ServeError(f"payload.serve exited with code {code} before it answered"
                             + (f": {last[0]}" if last else "") + f" (log: {run_dir(run.id)}/{SERVE_LOG})")
        if _healthy(f"http://127.0.0.1:{port}" if host in ("", "0.0.0.0", "::") else url):
            proc.returncode = 0  # let go of the child without Popen warning that it still runs
            return server
        time.sleep(0.5)
    stop_server(server)
    raise ServeError(f"payload.serve did not answer /healthz within {timeout_s:.0f} s; it was stopped "
                     f"(log: {run_dir(run.id)}/{SERVE_LOG})")


def stop_server(server: LocalServer, grace_s: float = STOP_GRACE_S) -> None:
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
    log.warning("the inference server of %s (pid %d) survived SIGKILL", server.run_id, server.pid)


def replace_server(settings: JobSettings, run: Run, approval_id: str) -> tuple[LocalServer, LocalServer | None]:
    """Serve `run`'s adapter in place of whatever the local server serves now; returns (new, replaced)."""
    conn = store.connect(settings)
    lock = conn.lock(LOCK_KEY, timeout=HEALTH_TIMEOUT_S + 120, blocking_timeout=HEALTH_TIMEOUT_S + 60)
    if not lock.acquire():
        raise ServeError("another deploy has held the local server for too long; try again later")
    try:
        old = current(settings)
        if old is not None and not old.alive():
            old = None
        port = settings.serve_port
        if port and old is not None:
            stop_server(old)  # a fixed port holds one server: the old one goes first
            conn.delete(SERVER_KEY)
        try:
            new = start_server(settings, run, approval_id, port or free_port(settings.serve_host))
        except ServeError as e:
            if old is not None and not port:
                raise ServeError(f"{e}; {old.run_id} is still served at {old.url}") from None
            raise
        conn.set(SERVER_KEY, json.dumps(asdict(new)))
        if old is not None and not port:
            stop_server(old)
        return new, old
    finally:
        try:
            lock.release()
        except Exception:  # expired: the next deploy may already hold it
            log.warning("the local server lock had expired")
