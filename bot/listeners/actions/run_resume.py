"""The Resume button of a timed-out (or failed, or cancelled) run's thread message: same checks and effect as
`/finetune resume RUN`."""

from __future__ import annotations

from bot.listeners.actions.clicks import button_listener
from bot.listeners.commands.resume import resume
from jobs.core.domain import RUN_ID_RE

run_resume = button_listener("resume", RUN_ID_RE, "/finetune resume RUN",
                             lambda rt, c: resume(rt, c.value, c.user, c.channel, c.response_url))
