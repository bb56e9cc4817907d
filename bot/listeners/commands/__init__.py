"""Slash command listeners: `/finetune`, dispatched by subcommand to one module each."""

from __future__ import annotations

from slack_bolt.async_app import AsyncApp

from bot.listeners.commands.finetune import finetune_command


def register(app: AsyncApp) -> None:
    app.command("/finetune")(finetune_command)
