"""`/finetune status [RUN]`: one run in detail, or every queued and running run; answered privately, in the ack when
the store answers in time. Also the store reads that it and `list` share."""

from __future__ import annotations

import json
import time
from typing import Any

import redis.asyncio as aioredis

from bot import blocks
from bot.grammar import Status
from bot.listeners.support import answer_quickly
from bot.runtime import BotRuntime
from jobs.core import store
from jobs.core.domain import RUN_ID_RE, Run, RunState

ACTIVE_LIMIT = 200


async def handle(ack, cmd: Status, command: dict[str, Any], rt: BotRuntime) -> None:
    await answer_quickly(ack, rt, command["response_url"], "reading the run status",
                         lambda: run_status(rt.redis, cmd.run_id))


async def run_status(r: aioredis.Redis, run_id: str | None) -> blocks.Message:
    """One run in detail; without `run_id`, the queued and running runs in the order they will be served."""
    if run_id:
        run = await read_run(r, run_id)
        if run is None:
            return blocks.render_problem(unknown_run(run_id))
        rank = await r.zrank(store.QUEUED, run.id)
        return blocks.render_status(run, None if rank is None else rank + 1, now=time.time())
    runs = [run for run in await recent_runs(r, ACTIVE_LIMIT) if not run.state.terminal]
    runs.reverse()  # oldest first: the line as it will be served
    return blocks.render_run_list(
        runs, await positions_of(r, runs), title="Queued and running",
        empty="Nothing is queued or running. `/finetune list` shows the latest runs.")


def unknown_run(run_id: str) -> str:
    return f"There is no run {run_id}. `/finetune list` shows the runs there are."


# The reads of `list` and `status`, as jobs.runs.service makes them (get_run, list_runs, queue_position) and on the
# store's keys, but with the bot's async Redis client on the event loop: the service is synchronous, and a hop to a
# thread and back (with the GIL handed over twice) cost more CPU than the rest of the command's ack together.


async def read_run(r: aioredis.Redis, run_id: str) -> Run | None:
    if not RUN_ID_RE.match(run_id or ""):
        return None
    raw = await r.get(store.run_key(run_id))
    return Run.from_dict(json.loads(raw)) if raw else None


async def recent_runs(r: aioredis.Redis, limit: int) -> list[Run]:
    """The newest runs first, at most `limit` (1 to 200)."""
    ids = await r.zrevrange(store.ALL_RUNS, 0, max(1, min(limit, 200)) - 1)
    if not ids:
        return []
    return [Run.from_dict(json.loads(raw)) for raw in await r.mget([store.run_key(i) for i in ids]) if raw]


async def positions_of(r: aioredis.Redis, runs: list[Run]) -> dict[str, int]:
    """Places in line of the queued runs among `runs`, in one round trip."""
    queued = [run.id for run in runs if run.state is RunState.QUEUED]
    if not queued:
        return {}
    async with r.pipeline(transaction=False) as pipe:
        for run_id in queued:
            pipe.zrank(store.QUEUED, run_id)
        ranks = await pipe.execute()
    return {run_id: rank + 1 for run_id, rank in zip(queued, ranks, strict=True) if rank is not None}
