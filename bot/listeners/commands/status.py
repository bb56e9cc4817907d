"""`/finetune status [RUN]`: one run in detail, or every queued and running run; answered privately."""

from __future__ import annotations

import time
from typing import Any

from bot import blocks
from bot.grammar import Status
from bot.listeners.support import answer, answering_errors, call
from bot.runtime import BotRuntime
from jobs.core.domain import RunState
from jobs.runs import service

ACTIVE_LIMIT = 200


async def handle(ack, cmd: Status, command: dict[str, Any], rt: BotRuntime) -> None:
    await ack()
    url = command["response_url"]
    async with answering_errors(rt, url, "reading the run status"):
        if cmd.run_id:
            run = await call(service.get_run, rt.settings.jobs, cmd.run_id)
            if run is None:
                await answer(rt, url, blocks.render_problem(unknown_run(cmd.run_id)))
                return
            position = await call(service.queue_position, rt.settings.jobs, run.id)
            await answer(rt, url, blocks.render_status(run, position, now=time.time()))
            return
        runs = [r for r in await call(service.list_runs, rt.settings.jobs, ACTIVE_LIMIT) if not r.state.terminal]
        runs.reverse()  # oldest first: the line as it will be served
        positions = await positions_of(rt, runs)
        await answer(rt, url, blocks.render_run_list(
            runs, positions, title="Queued and running",
            empty="Nothing is queued or running. `/finetune list` shows the latest runs."))


def unknown_run(run_id: str) -> str:
    return f"There is no run {run_id}. `/finetune list` shows the runs there are."


async def positions_of(rt: BotRuntime, runs) -> dict[str, int]:
    """Places in line of the queued runs among `runs`."""
    out = {}
    for r in runs:
        if r.state is RunState.QUEUED:
            pos = await call(service.queue_position, rt.settings.jobs, r.id)
            if pos:
                out[r.id] = pos
    return out
