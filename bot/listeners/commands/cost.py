"""`/finetune cost`: this month's GPU spend by person and by model, the biggest runs and how good the estimates are;
answered privately, in the ack when the store answers in time."""

from __future__ import annotations

from typing import Any

from bot import blocks
from bot.grammar import Cost
from bot.listeners.support import answer_quickly, call
from bot.runtime import BotRuntime
from jobs.runs import costs


async def handle(ack, cmd: Cost, command: dict[str, Any], rt: BotRuntime) -> None:
    async def compose() -> blocks.Message:
        return blocks.render_cost_report(await call(costs.month_report, rt.settings.jobs))

    await answer_quickly(ack, rt, command["response_url"], "adding up this month's GPU spend", compose)
