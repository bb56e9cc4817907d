"""`/finetune run`: check the request and the dataset (jobs.runs.service), queue the run, say where it is in line
and what it is estimated to cost; a run over budget waits for an approver (jobs.deploys.approval). A dataset given
as a Slack file (link or id) is fetched into the workspace first (bot.slackfiles).

The card itself is posted by the notifier when the run's "queued" event arrives.
"""

from __future__ import annotations

from typing import Any

from bot import blocks
from bot.grammar import RunCommand
from bot.listeners.support import answer, answering_errors, queue_run
from bot.runtime import BotRuntime


async def handle(ack, cmd: RunCommand, command: dict[str, Any], rt: BotRuntime) -> None:
    if cmd.dataset_file:
        what = f"the Slack file {cmd.dataset_file}"
    else:
        what = f"`{blocks.escape(cmd.dataset)}`" if cmd.dataset else "the request"
    await ack(**rt.gateway.clean(blocks.render_info(f":mag: Checking {what}…")))
    url = command["response_url"]
    async with answering_errors(rt, url, "queueing the run"):
        run, position = await queue_run(rt, cmd, user=command["user_id"], channel=command["channel_id"],
                                        request_id=command.get("trigger_id"))
        await answer(rt, url, blocks.render_queued_reply(run, position))
