"""`/finetune logs RUN [--tail N] [--grep TEXT]`: the last log lines of a run, answered privately, from wherever its
backend keeps them (the run's log file; Log Analytics, or the share's train.log while ingestion lags)."""

from __future__ import annotations

from typing import Any

from bot import blocks
from bot.grammar import Logs
from bot.listeners.commands.status import unknown_run
from bot.listeners.support import answer, answering_errors, call
from bot.runtime import BotRuntime
from jobs.runs import service


async def handle(ack, cmd: Logs, command: dict[str, Any], rt: BotRuntime) -> None:
    await ack()
    url = command["response_url"]
    async with answering_errors(rt, url, "reading the logs"):
        run = await call(service.get_run, rt.settings.jobs, cmd.run_id)
        if run is None:
            await answer(rt, url, blocks.render_problem(unknown_run(cmd.run_id)))
            return
        found = await call(service.run_logs, rt.settings.jobs, run.id, cmd.tail, cmd.grep)
        await answer(rt, url, blocks.render_logs(run, found.lines, source=found.source, note=found.note,
                                                 grep=cmd.grep))
