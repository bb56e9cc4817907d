"""`@tuneops ...`: the bot works through `/finetune`; a mention is answered in its thread with how to use it."""

from __future__ import annotations

from typing import Any

from bot import blocks
from bot.auth import check_place
from bot.listeners.support import log_refusal
from bot.runtime import runtime_of


async def app_mention(event: dict[str, Any], context) -> None:
    rt = runtime_of(context)
    channel, user = event.get("channel", ""), event.get("user", "")
    refusal = check_place(user, channel, rt.settings.policy)
    if refusal is not None:
        # Logged, but not answered: a public thread reply is not the place for a refusal.
        log_refusal("mention", user, channel, refusal.reason)
        return
    text = ("I work through the slash command: `/finetune run --dataset datasets/train.jsonl` starts a run, "
            "`/finetune help` shows everything.")
    await rt.gateway.post_message(channel, blocks.render_info(text), thread_ts=event.get("thread_ts") or event.get("ts"))
