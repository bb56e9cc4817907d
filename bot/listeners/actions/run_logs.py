"""The Logs button of a finished run's thread message: the last log lines, privately, as `/finetune logs RUN`."""

from __future__ import annotations

from bot.grammar import Logs
from bot.listeners.actions.clicks import already_acked, button_listener
from bot.listeners.commands import logs
from jobs.core.domain import RUN_ID_RE

TAIL = 40

run_logs = button_listener("logs", RUN_ID_RE, "/finetune logs RUN",
                           lambda rt, c: logs.handle(already_acked, Logs(c.value, TAIL),
                                                     {"response_url": c.response_url}, rt))
