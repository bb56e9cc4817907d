"""Two bot processes' notifiers (each its own consumer, Slack client and budget view) against a Slack stand-in that
allows one message a second per channel, while the bots believe they may post twenty: a storm of 429s. Runs log
while both read; one process dies mid-way and the other takes over its runs. Nothing is lost, and every thread
keeps its order."""

from __future__ import annotations

import asyncio
import json
import re
import sys

import pytest
import redis.asyncio as aioredis
from slack_sdk.web.async_client import AsyncWebClient

from bot.notifier import Notifier
from bot.ratelimit import ChannelBudget
from bot.slack import SlackGateway
from bot.standin.slack import SlackStandIn
from bot.stream import ALIVE, OWNERS
from jobs.core import store
from jobs.core.domain import Run, RunEvent, RunState
from jobs.core.settings import JobSettings
from tests.conftest import shown

pytestmark = pytest.mark.timeout(240)

TOKEN = "xoxb-storm-test"
CHANNEL = "C0STORM"
RUNS, ROUNDS, LINES = 3, 5, 6
LINE = re.compile(r"run (\d) line (\d+)")


def new_run(conn) -> Run:
    run = Run(id=store.new_run_id(conn), requester="U0ALICE", channel=CHANNEL, model="model-cache/tiny",
              dataset="datasets/chat.jsonl")
    store.create_run(conn, run, lambda pos: [RunEvent(run.id, "queued", {"position": pos})])
    return run


def move(conn, run_id: str, *states: RunState, events=()) -> None:
    def step(run: Run):
        for state in states:
            run.transition(state)
        run.step = run.total_steps = 10
        run.loss = 1.0
        return [RunEvent(run_id, "state", {"state": str(states[-1])}), *events]

    store.update_run(conn, run_id, step)


def crash(notifier: Notifier) -> None:
    """Stop a notifier the way a killed process stops: no flush, no goodbye, its heartbeat left to lapse."""
    async def nothing():
        return None

    notifier._shutdown = nothing
    notifier._task.cancel()
    for lane in notifier.lanes.values():
        if lane.task is not None:
            lane.task.cancel()


async def test_a_429_storm_across_two_bot_processes_loses_nothing_and_keeps_each_threads_order(redis_url, tmp_path):
    settings = JobSettings.from_env({"REDIS_URL": redis_url, "TUNEOPS_WORKSPACE": str(tmp_path),
                                     "TUNEOPS_PYTHON": sys.executable})
    conn = store.connect(settings)
    with SlackStandIn(token=TOKEN, rate_per_channel=1.0) as slack:
        budget_redis = aioredis.from_url(redis_url)

        def process(name: str) -> Notifier:
            client = AsyncWebClient(token=TOKEN, base_url=slack.api_url)
            gateway = SlackGateway(client, ChannelBudget(budget_redis, rate_per_s=20), max_retries=2)
            return Notifier(settings, gateway, consumer=name, log_interval_s=1.0, block_ms=100, tick_s=0.2)

        bots = {"bot-a": process("bot-a"), "bot-b": process("bot-b")}
        runs = [new_run(conn) for _ in range(RUNS)]
        for bot in bots.values():
            bot.start()
        for run in runs:
            move(conn, run.id, RunState.PREPARING, RunState.RUNNING,
                 events=[RunEvent(run.id, "started", {"execution_id": f"{run.id}/attempt-1"})])

        errors: dict[str, list[str]] = {run.id: [] for run in runs}
        n = 0
        crashed = None
        for rnd in range(ROUNDS):
            for i, run in enumerate(runs):
                lines = []
                for k in range(LINES + 1):
                    n += 1
                    if k == LINES // 2:  # an error line amid ordinary ones
                        lines.append(f"ERROR run {i} line {n}: shard {rnd} failed")
                        errors[run.id].append(lines[-1])
                    else:
                        lines.append(f"run {i} line {n} loss 0.5")
                store.append_event(conn, RunEvent(run.id, "log", {"lines": lines}))
            await asyncio.sleep(0.4)
            if rnd == 1:
                owners = conn.hgetall(OWNERS)
                crashed = "bot-b" if "bot-b" in owners.values() else "bot-a"
                crash(bots[crashed])
                conn.delete(ALIVE.format(crashed))  # its heartbeat lapses (sooner than the real 30 s)
        for run in runs:
            move(conn, run.id, RunState.SUCCEEDED, events=[RunEvent(run.id, "succeeded", {
                "metrics": {"last_loss": 1.0, "loss_history": [[1, 2.0], [10, 1.0]]},
                "adapter": f"runs/{run.id}/adapter"})])

        def finished():
            done = {}
            for run in runs:
                ts = shown(settings, store.load_run(conn, run.id)).thread_ts
                msgs = slack.thread(CHANNEL, ts) if ts else []
                if not any("finished" in m.text for m in msgs):
                    return None
                done[run.id] = msgs
            return done

        threads = await slack.until(finished, 200)
        survivor = next(b for name, b in bots.items() if name != crashed)
        await survivor.stop()
        await budget_redis.aclose()

    assert threads, [(r.id, [m.text for m in slack.thread(CHANNEL, shown(settings, store.load_run(conn, r.id)).thread_ts or "")])
                     for r in runs]
    limited = [c for c in slack.calls if c.status == 429]
    assert len(limited) >= 3, "the stand-in should have answered with 429s"
    assert conn.hgetall(OWNERS) and set(conn.hgetall(OWNERS).values()) == {survivor.consumer}
    for i, run in enumerate(runs):
        msgs = threads[run.id]
        text = [json.dumps(m.blocks) for m in msgs]
        everything = "\n".join(text)
        for err in errors[run.id]:
            assert err in everything, f"{run.id} lost {err!r}"
        # each thread in order: started, the excerpts (lines rising; a takeover may repeat a few), the end
        assert "started" in msgs[0].text
        done = next(k for k, m in enumerate(msgs) if "finished" in m.text)
        assert all(m.text != f"{run.id}: log" for m in msgs[done + 1:])
        numbers = [int(num) for t in text[:done] for r, num in LINE.findall(t) if int(r) == i]
        first_seen = list(dict.fromkeys(numbers))
        assert first_seen == sorted(first_seen), (run.id, numbers)
        assert not any(f"run {j} line" in everything for j in range(RUNS) if j != i)  # no thread got another's
    assert all(c.ok or c.status == 429 for c in slack.calls if c.method == "chat.postMessage")
