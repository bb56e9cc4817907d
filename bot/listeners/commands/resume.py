"""`/finetune resume RUN` and the Resume button of a run's thread: for the run's requester and admins.

The run goes back in line and its trainer continues from its newest complete checkpoint; the card and the thread
follow it, and the person gets a private note that it is under way.
"""

from __future__ import annotations

from typing import Any

from bot import blocks
from bot.grammar import Resume
from bot.listeners.commands.cancel import run_to_manage
from bot.listeners.support import answer, answering_errors, call
from bot.runtime import BotRuntime
from jobs.runs import service


async def handle(ack, cmd: Resume, command: dict[str, Any], rt: BotRuntime) -> None:
    await ack()
    await resume(rt, cmd.run_id, command["user_id"], command["channel_id"], command["response_url"])


async def resume(rt: BotRuntime, run_id: str, user: str, channel: str, response_url: str) -> None:
    """Shared by the command and the Resume button."""
    async with answering_errors(rt, response_url, f"resuming {run_id}"):
        if await run_to_manage(rt, run_id, user, channel, response_url, "resume") is None:
            return
        run = await call(service.resume_run, rt.settings.jobs, run_id, by=user)
        where = (f"from the checkpoint of step {run.last_checkpoint_step}" if run.last_checkpoint_step
                 else "from the start (it saved no checkpoint)")
        await answer(rt, response_url, blocks.render_info(
            f":arrow_forward: Resuming {run_id} {where}; its card and thread follow it."))
