"""The Deploy button of a succeeded run's completion message: same as `/finetune deploy RUN` (an approval card in
the run's thread)."""

from __future__ import annotations

from bot.listeners.actions.clicks import button_listener
from bot.listeners.commands.deploy import request
from jobs.core.domain import RUN_ID_RE

run_deploy = button_listener("deploy", RUN_ID_RE, "/finetune deploy RUN",
                             lambda rt, c: request(rt, c.value, c.user, c.channel, c.response_url))
