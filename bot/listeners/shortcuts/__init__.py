"""Shortcut listeners: the message shortcut "Fine-tune on this file"."""

from __future__ import annotations

from slack_bolt.async_app import AsyncApp

from bot.listeners.shortcuts.finetune_file import finetune_file
from bot.runform import SHORTCUT_ID


def register(app: AsyncApp) -> None:
    app.message_shortcut(SHORTCUT_ID)(finetune_file)
