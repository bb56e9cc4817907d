"""Fixtures for the bot's tests over real HTTP: a workspace, the Slack stand-in, the Bolt app served by aiohttp on
port 0 (with its notifier), a signed-request client, and a real RQ worker subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bot.standin.slack import (
    SlackStandIn,
    block_actions_body,
    signed_headers,
    slash_command_body,
)
from tests.conftest import ROOT

SIGNING_SECRET = "test-signing-secret-0123456789"
BOT_TOKEN = "xoxb-test-0000-bot-token"


@pytest.fixture
def workspace(tmp_path, tiny_model, example_dataset) -> Path:
    ws = tmp_path / "workspace"
    shutil.copytree(tiny_model, ws / "model-cache" / "tiny")
    (ws / "datasets").mkdir(parents=True)
    shutil.copy(example_dataset, ws / "datasets" / "chat.jsonl")
    return ws


@pytest.fixture
def slack():
    with SlackStandIn(token=BOT_TOKEN) as s:
        yield s


@pytest.fixture
def bot_env(redis_url, workspace, slack) -> dict[str, str]:
    """The environment of the bot and the worker; tests may add to it before `bot` starts."""
    return {
        "SLACK_BOT_TOKEN": BOT_TOKEN,
        "SLACK_SIGNING_SECRET": SIGNING_SECRET,
        "SLACK_API_URL": slack.api_url,
        "REDIS_URL": redis_url,
        "TUNEOPS_BACKEND": "local",
        "TUNEOPS_WORKSPACE": str(workspace),
        "TUNEOPS_MONITOR_INTERVAL": "0.5",
        "TUNEOPS_PYTHON": sys.executable,
        # Small runs on a CPU: no held-out generations, frequent checkpoints.
        "TUNEOPS_TRAIN_OVERRIDES": json.dumps({"eval_generations": 0, "save_steps": 2, "max_seq_length": 128,
                                               "gradient_accumulation_steps": 1, "lora_r": 8, "lora_alpha": 16}),
    }


def site_url(runner: web.AppRunner) -> str:
    """The URL of the one site `runner` serves, bound to port 0: the port the kernel gave, never one that another
    process could take between our choosing it and binding it."""
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}"


class BotClient:
    """Sends requests to the bot exactly as Slack would: form bodies, signed with the signing secret."""

    def __init__(self, url: str, slack: SlackStandIn, secret: str = SIGNING_SECRET):
        self.url, self.slack, self.secret = url, slack, secret

    async def post(self, body: str, headers: dict[str, str]) -> tuple[int, str]:
        async with aiohttp.ClientSession() as s:
            async with s.post(self.url + "/slack/events", data=body.encode(), headers=headers) as r:
                return r.status, await r.text()

    async def command(self, text: str, *, user: str = "U0ALICE", channel: str = "C0TRAIN",
                      trigger_id: str | None = None, retry_num: int | None = None, **sign: Any):
        """Returns (status, ack body, response_url key)."""
        key = os.urandom(6).hex()
        body = slash_command_body(text, user_id=user, channel_id=channel, response_url=self.slack.response_url(key),
                                  trigger_id=trigger_id)
        status, ack = await self.post(body, signed_headers(self.secret, body, retry_num=retry_num, **sign))
        return status, ack, key

    async def click(self, action_id: str, value: str, *, user: str = "U0ALICE", channel: str = "C0TRAIN",
                    message_ts: str = ""):
        key = os.urandom(6).hex()
        body = block_actions_body(action_id=action_id, value=value, user_id=user, channel_id=channel,
                                  message_ts=message_ts, response_url=self.slack.response_url(key))
        status, text = await self.post(body, signed_headers(self.secret, body))
        return status, text, key


@pytest.fixture
async def bot(bot_env, slack, monkeypatch):
    """The bot in HTTP mode on a port the kernel chose, in this test's event loop, with its notifier running."""
    from bot.server import build_web_app, make_bot
    from bot.settings import BotSettings

    settings = BotSettings.from_env(bot_env)
    app, runtime, notifier = make_bot(settings)
    notifier.throttle.interval_s = 1.0  # the same throttling, on a test's time scale
    runner = web.AppRunner(build_web_app(app, runtime, notifier=notifier), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    client = BotClient(site_url(runner), slack)
    client.settings = settings
    client.notifier = notifier
    yield client
    await runner.cleanup()


def workspace_processes(workspace: Path, marker: str = "") -> list[int]:
    """Live processes working in `workspace` (the trainer and its launcher) whose command line holds `marker`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if Path(os.readlink(entry / "cwd")) != workspace:
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next((line for line in (entry / "status").read_text().splitlines()
                          if line.startswith("State:")), "State: ?")
        except OSError:
            continue
        if marker in cmdline and state.split()[1] != "Z":
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def worker(bot_env):
    """A real RQ worker (`python -m jobs.worker`) in its own process group; killed with its children afterwards."""
    procs: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        env = {**os.environ, **bot_env, "PYTHONPATH": str(ROOT)}
        log = open(Path(bot_env["TUNEOPS_WORKSPACE"]).parent / f"worker-{len(procs)}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "jobs.worker"], cwd=ROOT, env=env, start_new_session=True,
                                stdout=log, stderr=subprocess.STDOUT)
        log.close()
        procs.append(proc)
        return proc

    start()
    yield start
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + 15
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)
    # A test that failed mid-run may leave a trainer behind (it runs in a session of its own): end it too.
    for pid in workspace_processes(Path(bot_env["TUNEOPS_WORKSPACE"])):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
