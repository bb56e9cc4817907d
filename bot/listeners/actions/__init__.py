"""Button listeners: the run card's Cancel button."""

from __future__ import annotations

from slack_bolt.async_app import AsyncApp

from bot.blocks import CANCEL_ACTION
from bot.listeners.actions.run_cancel import run_cancel


def register(app: AsyncApp) -> None:
    app.action(CANCEL_ACTION)(run_cancel)
