"""Starting, killing and restarting tuneops' real processes on this machine, for the soak and the fault tests of the suite.

`Cluster` runs a private redis-server with AOF (`appendfsync everysec`, as DESIGN.md asks of tuneops' Redis), N RQ
workers (`python -m jobs.worker`), N bots in HTTP mode (`python -m bot.cli bot --http`) behind one address (a small
reverse proxy, as a load balancer would put them), the Slack stand-in (bot.standin.slack), and a workspace whose
runs use the soak's fast trainer (bot.soak.trainer). A supervisor thread restarts a worker or a bot that exited,
as a container's restart policy would, and records each exit it did not cause (`unexpected_exits`).
Faults are SIGKILLs: `kill_worker`, `kill_bot`, `kill_redis` (then `start_redis`, which reloads the AOF).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import aiohttp
import redis
from aiohttp import web

from bot.demo import stop_process
from bot.standin.slack import SlackStandIn, signed_headers, slash_command_body

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_DATASET = REPO_ROOT / "payload" / "examples" / "chat.jsonl"
DATASET = "datasets/chat.jsonl"


class HarnessError(Exception):
    """A piece of the cluster did not start; the message says which, with the end of its log."""


def free_port() -> int:
    """A port that was free a moment ago; for servers that cannot bind port 0 and report it (redis-server, the
    bots' fixed ports that must stay the same across restarts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


@dataclass
class Slot:
    """One supervised process: a worker or a bot. `held_until`: the supervisor leaves it down until then."""
    kind: str
    index: int
    port: int = 0
    proc: subprocess.Popen | None = None
    held_until: float = 0.0
    killed: bool = False          # the last exit was ours (a fault), not the process's own doing
    starts: int = 0
    log: Path | None = None

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.index}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Exit:
    name: str
    pid: int
    code: int | None
    at: float
    log_tail: str


@dataclass
class Cluster:
    root: Path
    bots: int = 2
    workers: int = 3
    max_running: int = 6
    monitor_interval_s: float = 1.0
    rate_per_channel: float | None = 1.0      # the stand-in's chat.postMessage limit per channel
    step_s: float = 0.1                        # the soak trainer's seconds a step
    lines: int = 1                             # its log lines a step
    # A shorter heartbeat for the bots' stream consumers (tests): bot.stream's ALIVE_TTL_MS / REAP_EVERY_S.
    alive_ttl_ms: int | None = None
    reap_every_s: float | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.root = Path(self.root)
        self.workspace = self.root / "workspace"
        self.logs = self.root / "logs"
        self.token = "xoxb-soak-" + secrets.token_hex(6)
        self.signing_secret = secrets.token_hex(16)
        self.slack: SlackStandIn | None = None
        self.redis_proc: subprocess.Popen | None = None
        self.redis_port = 0
        self.redis_dir = self.root / "redis"
        self.slots: list[Slot] = []
        self.unexpected_exits: list[Exit] = []
        self.kills: list[tuple[float, str, int]] = []   # (time, what, pid)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._proxy: _Proxy | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------------------

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def events_url(self) -> str:
        """The one address the bots answer Slack at (the proxy)."""
        return f"{self._proxy.url}/slack/events"

    def start(self) -> Cluster:
        for d in (self.logs, self.redis_dir, self.workspace / "datasets", self.workspace / "model-cache" / "tiny"):
            d.mkdir(parents=True, exist_ok=True)
        shutil.copy(EXAMPLE_DATASET, self.workspace / DATASET)
        # The soak trainer loads no model: the folder only has to exist for `--model`'s check.
        (self.workspace / "model-cache" / "tiny" / "config.json").write_text("{}")
        self.slack = SlackStandIn(token=self.token, rate_per_channel=self.rate_per_channel).start()
        self.redis_port = free_port()
        self.start_redis()
        self.env = self._env()
        self.slots = ([Slot("worker", i) for i in range(self.workers)]
                      + [Slot("bot", i, port=free_port()) for i in range(self.bots)])
        for slot in self.slots:
            self._start(slot)
        for slot in self.slots:
            if slot.kind == "bot":
                self.wait_bot(slot)
        self._proxy = _Proxy([s for s in self.slots if s.kind == "bot"]).start()
        self._supervisor = threading.Thread(target=self._supervise, name="soak-supervisor", daemon=True)
        self._supervisor.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.join(5)
        if self._proxy is not None:
            self._proxy.stop()
        for slot in self.slots:
            if slot.alive():
                stop_process(slot.proc, group=True)
        for pid in self.trainer_pids():
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.redis_proc is not None and self.redis_proc.poll() is None:
            self.redis_proc.kill()
            self.redis_proc.wait(10)
        if self.slack is not None:
            self.slack.stop()

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])),
            "SLACK_BOT_TOKEN": self.token,
            "SLACK_SIGNING_SECRET": self.signing_secret,
            "SLACK_API_URL": self.slack.api_url,
            "SLACK_APP_TOKEN": "",
            "REDIS_URL": self.redis_url,
            "TUNEOPS_BACKEND": "local",
            "TUNEOPS_WORKSPACE": str(self.workspace),
            "TUNEOPS_DEFAULT_MODEL": "model-cache/tiny",
            "TUNEOPS_ALLOWED_CHANNELS": "",
            "TUNEOPS_ALLOWED_USERS": "",
            "TUNEOPS_MAX_RUNNING": str(self.max_running),
            "TUNEOPS_MONITOR_INTERVAL": str(self.monitor_interval_s),
            "TUNEOPS_PYTHON": sys.executable,
            "TUNEOPS_TRAIN_MODULE": "bot.soak.trainer",
            "TUNEOPS_TRAIN_OVERRIDES": json.dumps({"save_steps": 5, "eval_generations": 0}),
            "SOAK_STEP_S": str(self.step_s),
            "SOAK_LINES": str(self.lines),
            **self.extra_env,
        }

    # ---- Redis ----------------------------------------------------------------------------------------------------

    def start_redis(self, timeout: float = 30.0) -> None:
        """redis-server on its port and folder; after a SIGKILL it comes back with what its AOF holds."""
        exe = shutil.which("redis-server")
        if exe is None:
            raise HarnessError("redis-server is not installed (apt-get install redis-server)")
        with open(self.logs / "redis.log", "ab") as log:
            proc = subprocess.Popen([exe, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir",
                                     str(self.redis_dir), "--save", "", "--appendonly", "yes",
                                     "--appendfsync", "everysec", "--maxmemory-policy", "noeviction"],
                                    stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.redis_port, socket_timeout=2, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    info = client.info("server")
                    if int(info["process_id"]) == proc.pid and client.ping():
                        self.redis_proc = proc
                        return
                except redis.BusyLoadingError:
                    pass  # still loading its AOF
                except redis.ConnectionError:
                    pass
                time.sleep(0.05)
        finally:
            client.close()
        proc.kill()
        raise HarnessError(f"redis-server did not start on port {self.redis_port}:\n{_tail(self.logs / 'redis.log')}")

    def kill_redis(self) -> int:
        proc = self.redis_proc
        assert proc is not None
        proc.kill()
        proc.wait(10)
        self.kills.append((time.time(), "redis", proc.pid))
        return proc.pid

    def redis_client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, decode_responses=True, socket_timeout=2,
                                    socket_connect_timeout=1)

    # ---- workers and bots -----------------------------------------------------------------------------------------

    def _command(self, slot: Slot) -> list[str]:
        if slot.kind == "worker":
            return [sys.executable, "-m", "jobs.worker"]
        bot = ["bot", "--http", "--host", "127.0.0.1", "--port", str(slot.port)]
        if self.alive_ttl_ms is None and self.reap_every_s is None:
            return [sys.executable, "-m", "bot.cli", *bot]
        # The same bot with a shorter stream heartbeat, so that a test sees a takeover in seconds.
        patch = "import bot.stream as s; "
        if self.alive_ttl_ms is not None:
            patch += f"s.ALIVE_TTL_MS = {int(self.alive_ttl_ms)}; "
        if self.reap_every_s is not None:
            patch += f"s.REAP_EVERY_S = {float(self.reap_every_s)}; "
        return [sys.executable, "-c", patch + f"import sys; from bot.cli import main; sys.exit(main({bot!r}))"]

    def _start(self, slot: Slot) -> None:
        slot.log = self.logs / f"{slot.name}.log"
        with open(slot.log, "ab") as log:
            log.write(f"---- start {slot.starts + 1} at {time.time():.3f}\n".encode())
            log.flush()
            slot.proc = subprocess.Popen(self._command(slot), cwd=REPO_ROOT, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        slot.starts += 1
        slot.killed = False

    def wait_bot(self, slot: Slot, timeout: float = 60.0) -> None:
        """Until the bot answers /healthz (it has checked its token and serves)."""
        url = f"http://127.0.0.1:{slot.port}/healthz"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not slot.alive():
                break
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise HarnessError(f"{slot.name} did not start:\n{_tail(slot.log)}")

    def slot(self, kind: str, index: int) -> Slot:
        return next(s for s in self.slots if s.kind == kind and s.index == index)

    def kill(self, slot: Slot, down_s: float = 1.0) -> int:
        """SIGKILL the process and its process group (a worker's work-horse goes with it; a trainer does not, it
        runs in a session of its own); the supervisor starts it again after `down_s`."""
        with self._lock:
            proc = slot.proc
            slot.killed = True
            slot.held_until = time.monotonic() + down_s
            pid = proc.pid if proc else 0
            if proc is not None and proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)
        self.kills.append((time.time(), slot.name, pid))
        return pid

    def kill_worker(self, index: int, down_s: float = 1.0) -> int:
        return self.kill(self.slot("worker", index), down_s)

    def kill_bot(self, index: int, down_s: float = 2.0) -> int:
        return self.kill(self.slot("bot", index), down_s)

    def _supervise(self) -> None:
        while not self._stop.wait(0.25):
            with self._lock:
                for slot in self.slots:
                    if slot.proc is None or slot.alive() or time.monotonic() < slot.held_until:
                        continue
                    if not slot.killed:
                        self.unexpected_exits.append(Exit(slot.name, slot.proc.pid, slot.proc.returncode,
                                                          time.time(), _tail(slot.log)))
                        slot.killed = True
                        slot.held_until = time.monotonic() + 1.0  # a restart policy's back-off
                        continue
                    self._start(slot)

    def trainer_pids(self) -> list[int]:
        """Live processes working in the workspace (trainers and their launchers)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if Path(os.readlink(entry / "cwd")) != self.workspace.resolve():
                    continue
            except OSError:
                continue
            pids.append(int(entry.name))
        return pids

    # ---- what Slack sends ----------------------------------------------------------------------------------------

    async def command(self, session: aiohttp.ClientSession, text: str, *, user: str, channel: str, key: str,
                      retries: int = 3, timeout: float = 3.0) -> tuple[int, str]:
        """A signed slash command to the bots' address, delivered as Slack delivers it: when no 200 comes within
        3 s, Slack tries again (up to 3 times) with X-Slack-Retry-Num, the same trigger_id and body."""
        body = slash_command_body(text, user_id=user, channel_id=channel, response_url=self.slack.response_url(key))
        status, answer = 0, ""
        for attempt in range(retries + 1):
            headers = signed_headers(self.signing_secret, body, retry_num=attempt or None)
            try:
                async with session.post(self.events_url, data=body.encode(), headers=headers,
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                    status, answer = r.status, await r.text()
            except (aiohttp.ClientError, TimeoutError) as e:
                status, answer = 0, type(e).__name__
            if status == 200:
                break
            await asyncio.sleep(1.0 * (attempt + 1))
        return status, answer


class _Proxy:
    """One address in front of the bots, as a load balancer: requests go to the bots in turn, and a bot that refuses
    the connection (dead, or not listening yet) is skipped for the next one. It does not retry a request a bot
    accepted and then failed to answer: that is Slack's to retry."""

    def __init__(self, bots: list[Slot]):
        self.bots = bots
        self._next = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.forwarded: dict[str, int] = {}
        self.skipped = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> _Proxy:
        ready = threading.Event()

        def serve():
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self._setup())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, name="soak-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise HarnessError("the proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop and self._thread:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    async def _setup(self) -> None:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _cleanup(self) -> None:
        await self._session.close()
        await self._runner.cleanup()

    async def _forward(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        for _ in range(len(self.bots)):
            bot = self.bots[self._next % len(self.bots)]
            self._next += 1
            try:
                async with self._session.request(request.method, f"http://127.0.0.1:{bot.port}{request.path_qs}",
                                                 data=body, headers=headers) as r:
                    data = await r.read()
                    self.forwarded[bot.name] = self.forwarded.get(bot.name, 0) + 1
                    return web.Response(status=r.status, body=data,
                                        headers={"Content-Type": r.headers.get("Content-Type", "text/plain")})
            except aiohttp.ClientConnectorError:
                self.skipped += 1
                continue
            except aiohttp.ClientError:
                return web.Response(status=502, text="the bot closed the connection")
        return web.Response(status=502, text="no bot is listening")
