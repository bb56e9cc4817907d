"""`/finetune run`: check the request and the dataset (jobs.runs.service), queue the run, say where it is in line.

The card itself is posted by the notifier when the run's "queued" event arrives.
"""

from __future__ import annotations

from typing import Any

from bot import blocks
from bot.grammar import RunCommand
from bot.listeners.support import answer, answering_errors, call
from bot.runtime import BotRuntime
from jobs.runs import service


async def handle(ack, cmd: RunCommand, command: dict[str, Any], rt: BotRuntime) -> None:
    what = f"`{blocks.escape(cmd.dataset)}`" if cmd.dataset else "the request"
    await ack(**rt.gateway.clean(blocks.render_info(f":mag: Checking {what}…")))
    url = command["response_url"]
    async with answering_errors(rt, url, "queueing the run"):
        run = await call(service.submit_run, rt.settings.jobs, requester=command["user_id"],
                         channel=command["channel_id"], model=cmd.model, dataset=cmd.dataset, epochs=cmd.epochs,
                         lr=cmd.lr, max_steps=cmd.max_steps, name=cmd.name,
                         request_id=command.get("trigger_id"))
        position = await call(service.queue_position, rt.settings.jobs, run.id)
        await answer(rt, url, blocks.render_queued_reply(run, position))
