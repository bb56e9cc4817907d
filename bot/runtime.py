"""What every listener and the notifier share in one bot process: settings, the async Redis client, the gateway.

Listeners find it in Bolt's `context` (put there by `bot.middleware.provide_runtime`) via `runtime_of(context)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from slack_sdk.web.async_client import AsyncWebClient

from bot.ratelimit import ChannelBudget
from bot.settings import BotSettings
from bot.slack import SlackGateway

CONTEXT_KEY = "tuneops"


@dataclass
class BotRuntime:
    settings: BotSettings
    redis: aioredis.Redis
    gateway: SlackGateway

    @classmethod
    def create(cls, settings: BotSettings, client: AsyncWebClient) -> BotRuntime:
        r = aioredis.from_url(settings.jobs.redis_url, decode_responses=True)
        return cls(settings=settings, redis=r, gateway=SlackGateway(client, ChannelBudget(r)))

    async def close(self) -> None:
        await self.gateway.close()
        await self.redis.aclose()


def runtime_of(context: Any) -> BotRuntime:
    return context[CONTEXT_KEY]
