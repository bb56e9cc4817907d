"""Button listeners: the run card's Cancel; a finished run's Deploy, Resume and Logs; a deploy request's Approve and
Reject."""

from __future__ import annotations

from slack_bolt.async_app import AsyncApp

from bot.blocks import (
    APPROVE_ACTION,
    CANCEL_ACTION,
    DEPLOY_ACTION,
    LOGS_ACTION,
    REJECT_ACTION,
    RESUME_ACTION,
)
from bot.listeners.actions.deploy_decision import deploy_decision
from bot.listeners.actions.run_cancel import run_cancel
from bot.listeners.actions.run_deploy import run_deploy
from bot.listeners.actions.run_logs import run_logs
from bot.listeners.actions.run_resume import run_resume


def register(app: AsyncApp) -> None:
    app.action(CANCEL_ACTION)(run_cancel)
    app.action(DEPLOY_ACTION)(run_deploy)
    app.action(RESUME_ACTION)(run_resume)
    app.action(LOGS_ACTION)(run_logs)
    app.action(APPROVE_ACTION)(deploy_decision)
    app.action(REJECT_ACTION)(deploy_decision)
