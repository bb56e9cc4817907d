"""A Redis outage is logged once when the bot notices it and once when Redis is back, however many commands meet it:
pure checks of the tracker, then a real redis-server killed and started again under the bot, over signed HTTP."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import redis

from bot.outage import REDIS, Outage
from tests.conftest import restart_redis_server, start_redis_server


def test_one_warning_when_it_goes_and_one_line_when_it_is_back(caplog):
    now = [100.0]
    outage = Outage("Redis", logging.getLogger("test.outage"), clock=lambda: now[0])
    caplog.set_level(logging.DEBUG, logger="test.outage")
    outage.ok()  # nothing to say while it was never down
    for _ in range(5):
        outage.failed(redis.exceptions.TimeoutError("Timeout reading from socket"), "listing the runs")
    now[0] += 12.5
    outage.ok()
    outage.ok()
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in lines] == ["WARNING"] + ["DEBUG"] * 4 + ["INFO"]
    assert "unreachable (TimeoutError" in lines[0][1] and "listing the runs" in lines[0][1]
    assert "reachable again after 12.5 s (5 calls failed meanwhile)" in lines[-1][1]
    assert not outage.down


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test's own (killed and started again on its port by the test)."""
    exe = shutil.which("redis-server")
    proc, port = start_redis_server(exe, tmp_path)
    procs = [proc]
    yield procs, exe, port, tmp_path
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)


@pytest.fixture
def bot_env(bot_env, own_redis):
    _, _, port, _ = own_redis
    REDIS.down_since, REDIS.failures = None, 0  # the process-wide tracker starts each test with Redis up
    return {**bot_env, "REDIS_URL": f"redis://127.0.0.1:{port}/0"}


async def answer_to(bot, slack, text: str) -> str:
    status, ack, key = await bot.command(text)
    assert status == 200
    if ack:  # read-only commands answer in the ack
        return ack
    got = await slack.until(lambda: slack.responses[key], timeout=10)
    assert got, f"no answer to `/finetune {text}`"
    return json.dumps(got[0])


async def test_an_outage_is_one_warning_and_one_line_when_it_ends(own_redis, bot, slack, caplog):
    procs, exe, port, tmp = own_redis
    caplog.set_level(logging.INFO, logger="bot.outage")
    procs[0].kill()
    procs[0].wait(10)
    for _ in range(3):
        assert "cannot reach its store" in await answer_to(bot, slack, "list")
    said = [r for r in caplog.records if r.name == "bot.outage"]
    assert [r.levelname for r in said] == ["WARNING"], [r.getMessage() for r in said]

    # the same port again (redis-server cannot take port 0; a port taken meanwhile would fail this test loudly)
    procs.append(restart_redis_server(exe, tmp, port))
    for _ in range(2):
        assert "No runs yet" in await answer_to(bot, slack, "list")
    said = [r for r in caplog.records if r.name == "bot.outage"]
    assert [r.levelname for r in said] == ["WARNING", "INFO"], [r.getMessage() for r in said]
    assert "reachable again" in said[1].getMessage()

