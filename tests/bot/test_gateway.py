"""The Slack gateway: redaction of everything sent, the shared per-channel budget, and Slack's 429 Retry-After."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis.asyncio as aioredis
from slack_sdk.web.async_client import AsyncWebClient

from bot.ratelimit import ChannelBudget
from bot.redact import Redactor
from bot.slack import SlackGateway
from bot.standin.slack import SlackStandIn

TOKEN = "xoxb-gateway-test-token"
HF = "hf_" + "Zy9" * 12


@pytest.fixture
async def redis_client(redis_url):
    r = aioredis.from_url(redis_url)
    yield r
    await r.aclose()


async def test_everything_sent_is_redacted(redis_client):
    with SlackStandIn(token=TOKEN) as slack:
        gw = SlackGateway(AsyncWebClient(token=TOKEN, base_url=slack.api_url), ChannelBudget(redis_client, 50),
                          Redactor(known=["my-very-secret-value"]))
        msg = {"text": f"token {HF}", "blocks": [{"type": "section", "text": {"type": "mrkdwn",
                                                                              "text": "my-very-secret-value"}}]}
        ts = await gw.post_message("C1", msg)
        await gw.update_message("C1", ts, msg)
        await gw.post_message("C1", msg, thread_ts=ts, reply_broadcast=True)
        await gw.post_ephemeral("C1", "U1", msg)
        await gw.respond(slack.response_url("r"), msg)
        await gw.upload_file("C1", b"png", "loss.png", title=f"loss {HF}", thread_ts=ts,
                             initial_comment="my-very-secret-value")
        await gw.close()
        sent = json.dumps([c.params for c in slack.calls])
        assert HF not in sent and "my-very-secret-value" not in sent
        assert sent.count("***") >= 10
        assert slack.thread("C1", ts)[0].reply_broadcast


async def test_429_retry_after_is_honoured_and_nothing_is_lost(redis_client):
    # Slack allows 1 message a second per channel; the budget is set far too generous, so Slack answers 429s.
    with SlackStandIn(token=TOKEN, rate_per_channel=1) as slack:
        gw = SlackGateway(AsyncWebClient(token=TOKEN, base_url=slack.api_url), ChannelBudget(redis_client, 100))
        t0 = time.monotonic()
        await asyncio.gather(*(gw.post_message("C1", {"text": f"m{i}"}) for i in range(3)))
        took = time.monotonic() - t0
        calls = slack.calls_to("chat.postMessage")
        assert sorted(m.text for m in slack.root_messages("C1")) == ["m0", "m1", "m2"]
        assert any(c.status == 429 for c in calls)
        ok_times = sorted(c.time for c in calls if c.status == 200)
        assert ok_times[2] - ok_times[0] >= 1.9  # every success waited for Slack's window
        assert took >= 1.9


async def test_the_budget_keeps_posts_under_slacks_rate(redis_client):
    with SlackStandIn(token=TOKEN, rate_per_channel=5) as slack:
        gw = SlackGateway(AsyncWebClient(token=TOKEN, base_url=slack.api_url), ChannelBudget(redis_client, 4))
        await asyncio.gather(*(gw.post_message("C1", {"text": f"m{i}"}) for i in range(6)))
        calls = slack.calls_to("chat.postMessage")
        assert [c.status for c in calls] == [200] * 6  # no 429 at all: the budget kept below Slack's limit


async def test_a_429_on_an_edit_waits_and_retries(redis_client, monkeypatch):
    with SlackStandIn(token=TOKEN) as slack:
        client = AsyncWebClient(token=TOKEN, base_url=slack.api_url)
        gw = SlackGateway(client, ChannelBudget(redis_client, 50))
        ts = await gw.post_message("C1", {"text": "v1"})
        # Slack throttles chat.update once (Tier 3): answer one 429 with Retry-After 1, then the real thing.
        state = {"left": 1}

        def throttled_once(method, params, now):
            if method == "chat.update" and state["left"]:
                state["left"] -= 1
                return 1
            return 0

        monkeypatch.setattr(slack, "_throttle", throttled_once)
        t0 = time.monotonic()
        await gw.update_message("C1", ts, {"text": "v2"})
        assert time.monotonic() - t0 >= 0.9
        assert [c.status for c in slack.calls_to("chat.update")] == [429, 200]
        assert slack.root_messages("C1")[0].text == "v2"
