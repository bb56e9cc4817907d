"""Modal (view submission) listeners: the secret form of `/finetune secret set NAME`."""

from __future__ import annotations

from slack_bolt.async_app import AsyncApp

from bot.listeners.views.secret_submit import secret_submit
from bot.secretform import CALLBACK_ID


def register(app: AsyncApp) -> None:
    app.view(CALLBACK_ID)(secret_submit)
