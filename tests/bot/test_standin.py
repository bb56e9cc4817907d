"""The Slack stand-in answers slack_sdk's real clients the way Slack does."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncServerErrorRetryHandler
from slack_sdk.signature import SignatureVerifier
from slack_sdk.web.async_client import AsyncWebClient

from bot.standin.slack import SlackStandIn, signed_headers, slash_command_body


@pytest.fixture
def slack():
    with SlackStandIn(token="xoxb-good") as s:
        yield s


async def test_requires_the_bearer_token(slack):
    bad = AsyncWebClient(token="xoxb-bad", base_url=slack.api_url)
    with pytest.raises(SlackApiError) as e:
        await bad.auth_test()
    assert e.value.response["error"] == "invalid_auth"
    good = AsyncWebClient(token="xoxb-good", base_url=slack.api_url)
    assert (await good.auth_test())["user_id"] == slack.bot_user_id


async def test_messages_threads_updates_and_limits(slack):
    client = AsyncWebClient(token="xoxb-good", base_url=slack.api_url)
    root = await client.chat_postMessage(channel="C1", text="card", blocks=[{"type": "section",
                                                                              "text": {"type": "mrkdwn", "text": "a"}}])
    await client.chat_postMessage(channel="C1", thread_ts=root["ts"], text="reply", reply_broadcast=True)
    await client.chat_update(channel="C1", ts=root["ts"], text="card v2")
    [reply] = slack.thread("C1", root["ts"])
    assert reply.text == "reply" and reply.reply_broadcast
    [card] = slack.root_messages("C1")
    assert card.text == "card v2" and card.edits[0]["text"] == "card"
    with pytest.raises(SlackApiError) as e:
        await client.chat_update(channel="C1", ts="1.2", text="x")
    assert e.value.response["error"] == "message_not_found"
    too_many = [{"type": "divider"}] * 51
    with pytest.raises(SlackApiError) as e:
        await client.chat_postMessage(channel="C1", text="x", blocks=too_many)
    assert e.value.response["error"] == "invalid_blocks"
    long_section = [{"type": "section", "text": {"type": "mrkdwn", "text": "x" * 3001}}]
    with pytest.raises(SlackApiError):
        await client.chat_postMessage(channel="C1", text="x", blocks=long_section)
    assert [c.method for c in slack.calls].count("chat.postMessage") == 4


async def test_per_channel_rate_limit_answers_429_with_retry_after():
    with SlackStandIn(token="xoxb-good", rate_per_channel=1) as slack:
        client = AsyncWebClient(token="xoxb-good", base_url=slack.api_url, retry_handlers=[])
        await client.chat_postMessage(channel="C1", text="one")
        await client.chat_postMessage(channel="C2", text="other channel is not limited")
        with pytest.raises(SlackApiError) as e:
            await client.chat_postMessage(channel="C1", text="two")
        assert e.value.response.status_code == 429
        assert e.value.response.headers["Retry-After"] == "1"
        assert [c.status for c in slack.calls_to("chat.postMessage")] == [200, 200, 429]


async def test_file_upload_v2_flow(slack):
    client = AsyncWebClient(token="xoxb-good", base_url=slack.api_url)
    root = await client.chat_postMessage(channel="C1", text="card")
    resp = await client.files_upload_v2(channel="C1", thread_ts=root["ts"], content=b"\x89PNG...",
                                        filename="loss.png", title="Loss", initial_comment="the loss curve")
    assert resp["file"]["title"] == "Loss"
    [f] = slack.files.values()
    assert f["content"] == b"\x89PNG..." and f["thread_ts"] == root["ts"] and f["channel"] == "C1"
    assert [c.method for c in slack.calls][-3:] == ["files.getUploadURLExternal", "upload",
                                                    "files.completeUploadExternal"]


async def test_views_users_conversations_and_ephemeral(slack):
    client = AsyncWebClient(token="xoxb-good", base_url=slack.api_url)
    opened = await client.views_open(trigger_id="t1", view={"type": "modal", "title": {"type": "plain_text",
                                                                                        "text": "x"}, "blocks": []})
    await client.views_update(view_id=opened["view"]["id"], view={"type": "modal", "blocks": []})
    assert (await client.users_info(user="U1"))["user"]["id"] == "U1"
    assert (await client.conversations_info(channel="C1"))["channel"]["is_member"]
    await client.chat_postEphemeral(channel="C1", user="U1", text="psst")
    assert slack.ephemeral[0]["text"] == "psst"


async def test_response_url_records_payloads(slack):
    url = slack.response_url("abc")
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json={"response_type": "ephemeral", "text": "hi"}) as r:
            assert r.status == 200
        async with s.post(url, json={"response_type": "ephemeral"}) as r:
            assert r.status == 400  # neither text nor blocks
    assert slack.responses["abc"] == [{"response_type": "ephemeral", "text": "hi"}]


def test_signed_headers_verify_with_slacks_own_verifier():
    body = slash_command_body("help", response_url="http://x/response/1")
    headers = signed_headers("s3cret", body)
    assert SignatureVerifier("s3cret").is_valid_request(body, headers)
    assert not SignatureVerifier("other").is_valid_request(body, headers)
    stale = signed_headers("s3cret", body, timestamp=1)
    assert not SignatureVerifier("s3cret").is_valid_request(body, stale)


def test_wait_for_returns_none_on_timeout(slack):
    assert slack.wait_for(lambda: slack.calls_to("chat.postMessage"), timeout=0.3) is None


async def test_a_fault_window_answers_429_with_retry_after_then_ends():
    with SlackStandIn(token="xoxb-good") as slack:
        client = AsyncWebClient(token="xoxb-good", base_url=slack.api_url, retry_handlers=[])
        slack.fail_for(0.5, 429, retry_after=3)
        with pytest.raises(SlackApiError) as e:
            await client.chat_postMessage(channel="C1", text="one")
        assert e.value.response.status_code == 429
        assert e.value.response.headers["Retry-After"] == "3"
        assert e.value.response["error"] == "ratelimited"
        assert slack.root_messages("C1") == []  # refused, not done
        await asyncio.sleep(0.6)
        await client.chat_postMessage(channel="C1", text="two")
        assert [(c.status, c.injected) for c in slack.calls_to("chat.postMessage")] == [(429, True), (200, False)]


@pytest.mark.parametrize("status", [500, 503])
async def test_a_fault_window_answers_server_errors_for_the_methods_named(status):
    with SlackStandIn(token="xoxb-good") as slack:
        client = AsyncWebClient(token="xoxb-good", base_url=slack.api_url, retry_handlers=[])
        slack.fail_for(30, status, methods={"chat.postMessage"})
        assert (await client.auth_test())["ok"]  # other methods answer as usual
        with pytest.raises(SlackApiError) as e:
            await client.chat_postMessage(channel="C1", text="one")
        assert e.value.response.status_code == status
        slack.clear_faults()
        await client.chat_postMessage(channel="C1", text="two")
        assert [m.text for m in slack.root_messages("C1")] == ["two"]


async def test_slack_sdks_server_error_retry_handler_rides_out_a_short_window():
    with SlackStandIn(token="xoxb-good") as slack:
        client = AsyncWebClient(token="xoxb-good", base_url=slack.api_url,
                                retry_handlers=[AsyncServerErrorRetryHandler(max_retry_count=3)])
        slack.fail_for(0.3, 503)
        await client.chat_postMessage(channel="C1", text="one")
        statuses = [c.status for c in slack.calls_to("chat.postMessage")]
        assert statuses[0] == 503 and statuses[-1] == 200


def test_a_fault_window_takes_only_429_and_server_errors(slack):
    with pytest.raises(ValueError):
        slack.fail_for(1, 404)
