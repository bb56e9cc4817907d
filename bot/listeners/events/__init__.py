"""Events API listeners: a mention of the bot gets a pointer to the slash command; opening the bot's Home tab
publishes the person's Home view."""

from __future__ import annotations

from slack_bolt.async_app import AsyncApp

from bot.listeners.events.app_home_opened import app_home_opened
from bot.listeners.events.app_mention import app_mention


def register(app: AsyncApp) -> None:
    app.event("app_mention")(app_mention)
    app.event("app_home_opened")(app_home_opened)
