"""Modal (view submission) listeners: the secret form of `/finetune secret set NAME`, and the run form of the
message shortcut "Fine-tune on this file"."""

from __future__ import annotations

from slack_bolt.async_app import AsyncApp

from bot import runform
from bot.listeners.views.run_submit import run_submit
from bot.listeners.views.secret_submit import secret_submit
from bot.secretform import CALLBACK_ID


def register(app: AsyncApp) -> None:
    app.view(CALLBACK_ID)(secret_submit)
    app.view(runform.CALLBACK_ID)(run_submit)
