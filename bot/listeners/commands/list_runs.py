"""`/finetune list`: the latest runs, newest first; answered privately, in the ack when the store answers in time."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from bot import blocks
from bot.grammar import ListRuns
from bot.listeners.commands.status import positions_of, recent_runs
from bot.listeners.support import answer_quickly
from bot.runtime import BotRuntime

LIST_LIMIT = 20


async def handle(ack, cmd: ListRuns, command: dict[str, Any], rt: BotRuntime) -> None:
    await answer_quickly(ack, rt, command["response_url"], "listing the runs", lambda: latest_runs(rt.redis))


async def latest_runs(r: aioredis.Redis) -> blocks.Message:
    runs = await recent_runs(r, LIST_LIMIT)
    return blocks.render_run_list(runs, await positions_of(r, runs))
