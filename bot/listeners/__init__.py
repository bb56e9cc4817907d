"""Wires every listener into the Bolt app, laid out as Slack's bolt-python starter template does it."""

from __future__ import annotations

from slack_bolt.async_app import AsyncApp

from bot.listeners import actions, commands, events, shortcuts, views


def register_listeners(app: AsyncApp) -> None:
    commands.register(app)
    actions.register(app)
    shortcuts.register(app)
    views.register(app)
    events.register(app)
