"""Commands while the store is down: a Redis that is gone (killed with SIGKILL: connection refused) and one that
accepts the connection and never answers. Every subcommand gets the private "cannot reach its store" answer well
within Slack's 3 seconds, over real HTTP with signed requests."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import threading
import time

import pytest

from bot.listeners.support import STORE_DOWN
from tests.conftest import start_redis_server

SLACK_DEADLINE_S = 3.0

# Every subcommand that reaches the store after its ack; `secret` and `provision` are answered in the ack on the
# local backend (they need Azure), and `help` touches nothing.
STORE_COMMANDS = ["run --dataset datasets/chat.jsonl", "status", "status ft-0001", "list", "logs ft-0001",
                  "cancel ft-0001", "resume ft-0001", "deploy ft-0001"]
ACK_ONLY = ["help", "secret list", "provision"]


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test's own, so it can be killed without touching the session's."""
    proc, port = start_redis_server(shutil.which("redis-server"), tmp_path)
    yield proc, f"redis://127.0.0.1:{port}/0"
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


class SilentRedis:
    """Accepts TCP connections and never answers: a Redis that hangs (a full disk, a stuck fsync, a black hole)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.conns: list[socket.socket] = []
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.sock.getsockname()[1]}/0"

    def _accept(self):
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)  # held open, never read from, never written to

    def close(self):
        self.stopped = True
        for c in [self.sock, *self.conns]:
            try:
                c.close()
            except OSError:
                pass


@pytest.fixture
def store(request, own_redis):
    """The REDIS_URL the bot gets: the test's own redis-server (killed later) or a silent one."""
    if request.param == "killed":
        yield own_redis[1]
    else:
        silent = SilentRedis()
        yield silent.url
        silent.close()


@pytest.fixture
def bot_env(bot_env, store):
    return {**bot_env, "REDIS_URL": store, "TUNEOPS_APPROVERS": "U0BOB"}


async def timed_answer(bot, slack, text: str) -> tuple[float, str, str]:
    """(seconds from sending the command to its private answer, the ack's body, the answer's text)."""
    start = time.monotonic()
    status, ack, key = await asyncio.wait_for(bot.command(text), 10)  # Slack itself gives up after 3 s
    assert status == 200, (text, status, ack)
    if text.split()[0] in ("list", "status"):  # read-only commands answer in the ack
        return time.monotonic() - start, ack, ack
    got = await slack.until(lambda: slack.responses[key], timeout=10)
    elapsed = time.monotonic() - start
    assert got, f"`/finetune {text}`: no answer on response_url within 10 s"
    return elapsed, ack, json.dumps(got[0], ensure_ascii=False)


# A Redis that accepts connections and never answers (silent) holds a store call until the clients' socket timeouts end
# it: the bot's own client's (bot/runtime.py) and jobs.core.store's, which the listeners use.
@pytest.mark.parametrize("store", ["killed", "silent"], indirect=True)
async def test_every_command_answers_within_3_s_when_the_store_is_down(store, own_redis, bot, slack):
    proc, _ = own_redis
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    for text in STORE_COMMANDS:
        elapsed, _, said = await timed_answer(bot, slack, text)
        assert "cannot reach its store" in said and "try again in a minute" in said, (text, said)
        assert "REDIS_URL" in said and "tuneops doctor" in said, (text, said)  # what an operator checks
        assert elapsed < SLACK_DEADLINE_S, f"`/finetune {text}` answered after {elapsed:.1f} s"
    for text in ACK_ONLY:
        start = time.monotonic()
        status, ack, _ = await bot.command(text)
        assert status == 200 and ack, (text, status, ack)
        assert time.monotonic() - start < SLACK_DEADLINE_S, text


def test_the_message_says_what_to_do():
    assert "try again in a minute" in STORE_DOWN
    assert "REDIS_URL" in STORE_DOWN and "tuneops doctor" in STORE_DOWN
