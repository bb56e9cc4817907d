"""Bolt middleware: hands listeners the runtime, and drops Slack's retried deliveries before they start work twice.

Runs after Bolt's own signature check, so an unsigned request can never claim a trigger id.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

from slack_bolt.response import BoltResponse

from bot.runtime import CONTEXT_KEY, BotRuntime

log = logging.getLogger(__name__)

SEEN_KEY = "tuneops:seen:{}"
SEEN_TTL_S = 3600  # Slack gives up retrying long before this


def delivery_key(body: dict[str, Any]) -> str | None:
    """What identifies one delivery across Slack's retries: a command's trigger_id, an event's event_id."""
    if body.get("command") and body.get("trigger_id"):
        return "cmd:" + str(body["trigger_id"])
    if body.get("type") == "event_callback" and body.get("event_id"):
        return "event:" + str(body["event_id"])
    return None


def provide_runtime(runtime: BotRuntime) -> Callable[..., Awaitable[BoltResponse | None]]:
    async def provide(context, next):  # noqa: A002 (Bolt passes `next` by name)
        context[CONTEXT_KEY] = runtime
        return await next()

    return provide


def drop_retries(runtime: BotRuntime) -> Callable[..., Awaitable[BoltResponse | None]]:
    async def drop(body, request, next):  # noqa: A002
        key = delivery_key(body)
        if key is None:
            return await next()
        # SET NX: the first delivery claims the key; a retry (X-Slack-Retry-Num) or any copy of it finds it taken
        # and is acknowledged at once with nothing, so one command never starts two runs.
        first = await runtime.redis.set(SEEN_KEY.format(key), "1", nx=True, ex=SEEN_TTL_S)
        if first:
            return await next()
        retry = (request.headers.get("x-slack-retry-num") or [""])[0]
        log.info("dropped a repeated delivery (%s, retry %s)", key.split(":", 1)[0], retry or "-")
        return BoltResponse(status=200, body="")

    return drop
