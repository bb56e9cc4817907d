"""What every listener and the notifier share in one bot process: settings, the async Redis client, the gateway, the
Home tab's publisher.

Listeners find it in Bolt's `context` (put there by `bot.middleware.DeliveryMiddleware`) via `runtime_of(context)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError
from slack_sdk.web.async_client import AsyncWebClient

from bot.home import HomeTab
from bot.ratelimit import TIER4_PER_S, ChannelBudget
from bot.settings import BotSettings
from bot.slack import SlackGateway

CONTEXT_KEY = "tuneops"

# A Redis that accepts connections and never answers (stopped, a stuck fsync, a black hole) must not hold a command
# past Slack's 3 s: every call of this client ends within about a second. It makes no blocking reads (the notifier's
# XREAD BLOCK goes through jobs.core.store's client), so no call of its legitimately waits longer than that.
SOCKET_TIMEOUT_S = 1.0
CONNECT_TIMEOUT_S = 1.0
# A connection reset (Redis restarted, a pooled connection gone stale) is retried on a fresh connection, briefly: two
# retries after 20 and 40 ms. A timeout is not retried: a Redis that did not answer in a second will not in the next.
RETRIES = 2


def redis_client(url: str) -> aioredis.Redis:
    return aioredis.from_url(
        url, decode_responses=True, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=CONNECT_TIMEOUT_S,
        retry=Retry(ExponentialBackoff(cap=0.1, base=0.02), RETRIES, supported_errors=(ConnectionError,)),
        retry_on_error=[ConnectionError],
    )


@dataclass
class BotRuntime:
    settings: BotSettings
    redis: aioredis.Redis
    gateway: SlackGateway
    home: HomeTab = field(init=False)

    def __post_init__(self) -> None:
        self.home = HomeTab(self.settings, self.redis, self.gateway)

    @classmethod
    def create(cls, settings: BotSettings, client: AsyncWebClient) -> BotRuntime:
        r = redis_client(settings.jobs.redis_url)
        # Channel messages share a budget per channel; views.publish one per app (its key is the method's name).
        gateway = SlackGateway(client, ChannelBudget(r), app_budget=ChannelBudget(r, TIER4_PER_S))
        return cls(settings=settings, redis=r, gateway=gateway)

    async def close(self) -> None:
        await self.home.stop()
        await self.gateway.close()
        await self.redis.aclose()


def runtime_of(context: Any) -> BotRuntime:
    return context[CONTEXT_KEY]
