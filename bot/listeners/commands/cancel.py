"""`/finetune cancel RUN` (and the card's Cancel button), and the check it shares with resume (`run_to_manage`): for
the run's requester and admins.

The thread tells the outcome when jobs/ reports it; the person gets a private note that it is under way.
"""

from __future__ import annotations

from typing import Any

from bot import blocks
from bot.auth import may_manage
from bot.grammar import Cancel
from bot.listeners.commands.status import unknown_run
from bot.listeners.support import answer, answering_errors, call, log_refusal
from bot.runtime import BotRuntime
from jobs.core.domain import Run
from jobs.runs import service


async def handle_cancel(ack, cmd: Cancel, command: dict[str, Any], rt: BotRuntime) -> None:
    await ack()
    await cancel(rt, cmd.run_id, command["user_id"], command["channel_id"], command["response_url"])


async def run_to_manage(rt: BotRuntime, run_id: str, user: str, channel: str, response_url: str,
                        what: str) -> Run | None:
    """The run when `user` may cancel or resume it; otherwise None, once they were told why (privately)."""
    run = await call(service.get_run, rt.settings.jobs, run_id)
    if run is None:
        await answer(rt, response_url, blocks.render_problem(unknown_run(run_id)))
        return None
    refusal = may_manage(run, user, rt.settings.policy)
    if refusal is not None:
        log_refusal(f"{what} {run_id}", user, channel, refusal.reason)
        await answer(rt, response_url, blocks.render_refusal(refusal.reason))
        return None
    return run


async def cancel(rt: BotRuntime, run_id: str, user: str, channel: str, response_url: str) -> None:
    """Shared by the command and the card's Cancel button."""
    async with answering_errors(rt, response_url, f"cancelling {run_id}"):
        if await run_to_manage(rt, run_id, user, channel, response_url, "cancel") is None:
            return
        await call(service.cancel_run, rt.settings.jobs, run_id, by=user)
        await answer(rt, response_url, blocks.render_info(
            f":octagonal_sign: Cancelling {run_id}; its thread will say when it has stopped."))

