"""Builds the Bolt app: an AsyncApp whose Web API client points at SLACK_API_URL, with its middleware and listeners."""

from __future__ import annotations

import logging

from slack_bolt.async_app import AsyncApp
from slack_sdk.web.async_client import AsyncWebClient

from bot.listeners import register_listeners
from bot.middleware import DeliveryMiddleware
from bot.runtime import BotRuntime
from bot.settings import BotSettings


def build_app(settings: BotSettings, runtime: BotRuntime | None = None) -> tuple[AsyncApp, BotRuntime]:
    client = AsyncWebClient(token=settings.slack_bot_token, base_url=settings.slack_api_url)
    runtime = runtime or BotRuntime.create(settings, client)
    # The token travels with the client (Bolt takes it from there), so that every call goes to SLACK_API_URL.
    app = AsyncApp(
        signing_secret=settings.slack_signing_secret,
        client=client,
        logger=logging.getLogger("bot.app"),
    )
    app.use(DeliveryMiddleware(runtime))
    register_listeners(app)
    return app, runtime
