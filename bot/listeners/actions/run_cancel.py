"""The card's Cancel button (action `run_cancel`, value = run id): same checks and effect as `/finetune cancel`."""

from __future__ import annotations

from bot.listeners.actions.clicks import button_listener
from bot.listeners.commands.cancel import cancel
from jobs.core.domain import RUN_ID_RE

run_cancel = button_listener("cancel", RUN_ID_RE, "/finetune cancel RUN",
                             lambda rt, c: cancel(rt, c.value, c.user, c.channel, c.response_url))
