"""Slack's retries of a slash command over real HTTP, against the delivery claims in a real Redis: a retry is dropped
only when the first delivery was really handled (done) or is being handled by a live bot; a retry after the handling
bot died is processed; and however a command is delivered, it makes one run."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from types import SimpleNamespace

import pytest

from bot.standin.slack import signed_headers, slash_command_body
from jobs.core import store
from jobs.runs import service
from tests.bot.conftest import SIGNING_SECRET

TRIGGER = "4242.5151.deadbeef"
COMMAND = "run --dataset datasets/chat.jsonl --max-steps 2"


def runs(bot) -> list[str]:
    return sorted(r.id for r in service.list_runs(bot.settings.jobs))


def claim_of(bot) -> dict[str, str]:
    return store.connect(bot.settings.jobs).hgetall(store.DELIVERY_KEY.format("cmd:" + TRIGGER))


def leave_claim(bot, owner: str, lease_s: float, state: str = "handling") -> None:
    """What a bot that claimed the delivery left in Redis (lease_s from now, in Redis's clock)."""
    conn = store.connect(bot.settings.jobs)
    secs, micros = conn.time()
    conn.hset(store.DELIVERY_KEY.format("cmd:" + TRIGGER),
              mapping={"state": state, "owner": owner, "until": int(secs * 1000 + micros // 1000 + lease_s * 1000)})
    conn.expire(store.DELIVERY_KEY.format("cmd:" + TRIGGER), 3600)


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


async def deliver(bot, slack, key: str, retry_num: int | None = None) -> tuple[int, str]:
    body = slash_command_body(COMMAND, response_url=slack.response_url(key), trigger_id=TRIGGER)
    return await bot.post(body, signed_headers(SIGNING_SECRET, body, retry_num=retry_num))


async def queued_answer(slack, key: str) -> str:
    got = await slack.until(lambda: slack.responses[key], 30)
    assert got, f"no answer on {key}"
    return json.dumps(got)


async def settled(bot, slack) -> None:
    """A later, different command answered: by then the bot handled whatever the earlier deliveries started."""
    _, _, later = await bot.command(COMMAND)
    assert "Queued" in await queued_answer(slack, later)


@pytest.mark.parametrize("how", ["dead process", "lapsed lease"])
async def test_a_retry_after_the_handling_bot_died_is_processed_once(bot, slack, how, monkeypatch):
    monkeypatch.setattr(service, "REQUEST_WAIT_S", 0.3)
    if how == "dead process":  # on this host, its lease still running: its pid tells
        leave_claim(bot, f"{socket.gethostname()}:{dead_pid()}:gone00", lease_s=60)
    else:  # on another host: its lease ran out
        leave_claim(bot, "elsewhere:4242:gone00", lease_s=-1)
    # ... and it had even claimed the run's id before it died.
    conn = store.connect(bot.settings.jobs)
    conn.set(store.REQUEST_KEY.format(TRIGGER), store.new_run_id(conn), ex=service.REQUEST_TTL_S)

    status, ack = await deliver(bot, slack, "retry", retry_num=1)
    assert status == 200 and "Checking" in ack
    assert "Queued *ft-0001*" in await queued_answer(slack, "retry")
    assert await slack.until(lambda: claim_of(bot).get("state") == "done", 10)  # marked just after the ack

    status, ack = await deliver(bot, slack, "again", retry_num=2)
    assert status == 200 and ack == ""
    await settled(bot, slack)
    assert runs(bot) == ["ft-0001", "ft-0002"] and not slack.responses["again"]


async def test_a_retry_while_a_live_bot_handles_the_first_is_dropped(bot, slack):
    leave_claim(bot, "elsewhere:4242:alive0", lease_s=60)
    status, ack = await deliver(bot, slack, "retry", retry_num=1)
    assert status == 200 and ack == ""
    await settled(bot, slack)
    assert runs(bot) == ["ft-0001"] and not slack.responses["retry"]  # ft-0001 is the later command's
    assert claim_of(bot)["owner"] == "elsewhere:4242:alive0"


async def test_a_retry_after_the_first_was_handled_is_dropped(bot, slack):
    status, ack = await deliver(bot, slack, "first")
    assert status == 200 and "Checking" in ack
    assert "Queued *ft-0001*" in await queued_answer(slack, "first")
    assert await slack.until(lambda: claim_of(bot).get("state") == "done", 10)  # marked just after the ack
    for n in (1, 2, 3):
        assert await deliver(bot, slack, f"retry{n}", retry_num=n) == (200, "")
    await settled(bot, slack)
    assert runs(bot) == ["ft-0001", "ft-0002"]
    assert not any(slack.responses[f"retry{n}"] for n in (1, 2, 3))


async def test_concurrent_deliveries_make_one_run(bot, slack):
    replies = await asyncio.gather(*(deliver(bot, slack, f"copy{n}", retry_num=n or None) for n in range(4)))
    assert [status for status, _ in replies] == [200] * 4
    assert sorted(bool(ack) for _, ack in replies) == [False, False, False, True], replies
    await settled(bot, slack)
    assert runs(bot) == ["ft-0001", "ft-0002"]
    assert sum(len(slack.responses[f"copy{n}"]) for n in range(4)) == 1


async def test_a_claim_is_held_while_its_handler_runs_and_lapses_when_it_stops(redis_url, monkeypatch):
    """The lease is short; a live handler renews it (so a slow ack keeps the delivery), a dead one cannot."""
    import redis.asyncio as aioredis

    from bot import middleware

    monkeypatch.setattr(middleware, "LEASE_MS", 300)
    monkeypatch.setattr(middleware, "RENEW_EVERY_S", 0.1)
    r = aioredis.from_url(redis_url, decode_responses=True)
    try:
        runtime = type("Runtime", (), {"redis": r})()
        mine = middleware.DeliveryClaims(runtime, me="here:1:aaaaaa")
        other = middleware.DeliveryClaims(runtime, me="there:2:bbbbbb")
        assert await mine.claim("cmd:slow") == ("claimed", "")
        ack = middleware.WatchedAck()
        watcher = asyncio.ensure_future(mine.see_through("cmd:slow", ack))
        await asyncio.sleep(1.0)  # three leases, and the listener has not acked yet
        assert await other.claim("cmd:slow") == ("busy", "here:1:aaaaaa")
        ack.response = SimpleNamespace(status=200)  # acked
        await asyncio.wait_for(watcher, 5)
        assert await other.claim("cmd:slow") == ("done", "here:1:aaaaaa")

        # a handler whose process stops renewing (it died) loses the claim when the lease lapses
        assert (await mine.claim("cmd:died"))[0] == "claimed"
        await asyncio.sleep(0.5)
        assert await other.claim("cmd:died") == ("taken", "here:1:aaaaaa")
        assert not await mine.renew("cmd:died")  # a late first handler learns that it lost the claim

        # a listener that failed before its ack lets go at once, so that Slack's retry is processed
        assert (await mine.claim("cmd:failed"))[0] == "claimed"
        failed = middleware.WatchedAck()
        failed.response = SimpleNamespace(status=500)  # what Bolt sets when the listener raised before its ack
        await mine.see_through("cmd:failed", failed)
        assert (await other.claim("cmd:failed"))[0] == "claimed"
    finally:
        await r.aclose()
