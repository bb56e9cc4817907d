"""`/finetune list`: the latest runs, newest first; answered privately."""

from __future__ import annotations

from typing import Any

from bot import blocks
from bot.grammar import ListRuns
from bot.listeners.commands.status import positions_of
from bot.listeners.support import answer, answering_errors, call
from bot.runtime import BotRuntime
from jobs.runs import service

LIST_LIMIT = 20


async def handle(ack, cmd: ListRuns, command: dict[str, Any], rt: BotRuntime) -> None:
    await ack()
    url = command["response_url"]
    async with answering_errors(rt, url, "listing the runs"):
        runs = await call(service.list_runs, rt.settings.jobs, LIST_LIMIT)
        await answer(rt, url, blocks.render_run_list(runs, await positions_of(rt, runs)))
