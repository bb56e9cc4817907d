"""`@tuneops ...`: the bot works through `/finetune`; a mention is answered in its thread with how to use it."""

from __future__ import annotations

from typing import Any

from bot import blocks
from bot.auth import check_place
from bot.runtime import runtime_of


async def app_mention(event: dict[str, Any], context) -> None:
    rt = runtime_of(context)
    channel, user = event.get("channel", ""), event.get("user", "")
    if check_place(user, channel, rt.settings.policy) is not None:
        return  # silence where tuneops is not enabled: a channel message is not the place for a refusal
    text = ("I work through the slash command: `/finetune run --dataset datasets/train.jsonl` starts a run, "
            "`/finetune help` shows everything.")
    await rt.gateway.post_message(channel, blocks.render_info(text), thread_ts=event.get("thread_ts") or event.get("ts"))
