"""The card's Cancel button (action `run_cancel`, value = run id): same checks and effect as `/finetune cancel`."""

from __future__ import annotations

from typing import Any

from bot import blocks
from bot.auth import check_place
from bot.listeners.commands.cancel import cancel
from bot.listeners.support import answer, log_refusal
from bot.runtime import runtime_of
from jobs.core.domain import RUN_ID_RE


async def run_cancel(ack, body: dict[str, Any], action: dict[str, Any], context) -> None:
    await ack()
    rt = runtime_of(context)
    user = body.get("user", {}).get("id", "")
    channel = (body.get("channel") or {}).get("id") or body.get("container", {}).get("channel_id", "")
    url = body.get("response_url", "")
    run_id = str(action.get("value", ""))
    if not RUN_ID_RE.match(run_id):
        await answer(rt, url, blocks.render_problem("That button does not name a run; use `/finetune cancel RUN`."))
        return
    refusal = check_place(user, channel, rt.settings.policy)
    if refusal is not None:
        log_refusal(f"cancel button {run_id}", user, channel, refusal.reason)
        await answer(rt, url, blocks.render_refusal(refusal.reason))
        return
    await cancel(rt, run_id, user, channel, url)
