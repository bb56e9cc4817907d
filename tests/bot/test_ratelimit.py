"""The per-channel budget against a real redis-server: shared across clients and processes, per channel, 429-aware."""

from __future__ import annotations

import asyncio
import contextvars
import json
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from bot.ratelimit import ChannelBudget

ROOT = Path(__file__).resolve().parents[2]

# Sleep wake-ups on a busy 2-core box run late by tens of milliseconds; a late wake-up can only shorten the gap
# to the next message, so spacing is asserted with this much slack and the total span with little.
SLACK_S = 0.07


def gaps(stamps: list[float]) -> list[float]:
    s = sorted(stamps)
    return [b - a for a, b in zip(s, s[1:])]


@pytest.fixture
async def clients(redis_url):
    made = [aioredis.Redis.from_url(redis_url) for _ in range(2)]
    yield made
    for c in made:
        await c.aclose()


async def test_two_clients_share_one_channel_budget(clients):
    rate, n = 10.0, 6
    budgets = [ChannelBudget(c, rate_per_s=rate) for c in clients]
    stamps: dict[int, list[float]] = {0: [], 1: []}

    async def post(i):
        for _ in range(n):
            await budgets[i].acquire("C1")
            stamps[i].append(time.monotonic())

    await asyncio.gather(post(0), post(1))
    every = stamps[0] + stamps[1]
    assert len(every) == 2 * n
    assert min(gaps(every)) >= 1 / rate - SLACK_S, gaps(every)
    assert max(every) - min(every) >= (2 * n - 1) / rate - SLACK_S
    # Both clients posted all along: the budget interleaved them rather than one running after the other.
    assert min(stamps[1]) < max(stamps[0]) and min(stamps[0]) < max(stamps[1])


CHILD = textwrap.dedent("""
    import asyncio, json, sys, time
    import redis.asyncio as aioredis
    from bot.ratelimit import ChannelBudget

    async def main(url, n, rate):
        r = aioredis.Redis.from_url(url)
        budget = ChannelBudget(r, rate_per_s=rate)
        await r.ping()
        print("ready", flush=True)
        sys.stdin.readline()  # "go": both children are ready, however long their start took
        stamps = []
        for _ in range(n):
            await budget.acquire("C-shared")
            stamps.append(time.time())
        await r.aclose()
        print(json.dumps(stamps))

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
""")


async def test_two_processes_are_spaced_by_the_shared_budget(redis_url):
    rate, n = 5.0, 5
    procs = [await asyncio.create_subprocess_exec(sys.executable, "-c", CHILD, redis_url, str(n), str(rate), cwd=ROOT,
                                                  stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                  stderr=asyncio.subprocess.PIPE)
             for _ in range(2)]
    # Both children start posting at the same moment: when both have said they are ready, not at a set time.
    for p in procs:
        line = await asyncio.wait_for(p.stdout.readline(), 60)
        assert line == b"ready\n", (line, await p.stderr.read())
    for p in procs:
        p.stdin.write(b"go\n")
    await asyncio.gather(*(p.stdin.drain() for p in procs))
    outs = [await p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err.decode()
    per_proc = [json.loads(out) for out, _ in outs]
    every = per_proc[0] + per_proc[1]
    assert len(every) == 2 * n
    assert min(gaps(every)) >= 1 / rate - SLACK_S, gaps(every)
    assert max(every) - min(every) >= (2 * n - 1) / rate - SLACK_S
    assert min(per_proc[1]) < max(per_proc[0]) and min(per_proc[0]) < max(per_proc[1])


async def test_channels_do_not_block_each_other(clients):
    rate, n = 5.0, 5
    budget = ChannelBudget(clients[0], rate_per_s=rate)
    stamps: dict[str, list[float]] = {"A": [], "B": []}

    async def post(channel):
        for _ in range(n):
            await budget.acquire(channel)
            stamps[channel].append(time.monotonic())

    t0 = time.monotonic()
    await asyncio.gather(post("A"), post("B"))
    elapsed = time.monotonic() - t0
    for channel in "AB":
        assert min(gaps(stamps[channel])) >= 1 / rate - SLACK_S
    # One channel's n messages take (n-1) intervals; were the channels one budget, at least 2n-1 (less the slack of
    # late wake-ups). Only that bound tells the two apart; a tighter one would measure the machine's load.
    assert elapsed < (2 * n - 1) / rate - SLACK_S


async def test_a_penalty_delays_the_channel_and_its_waiters(clients):
    budget = ChannelBudget(clients[0], rate_per_s=10.0)
    other = ChannelBudget(clients[1], rate_per_s=10.0)
    await budget.acquire("C1")
    # A waiter that reserved its slot before the 429 arrived must not post inside the pause either.
    waiter = asyncio.create_task(budget.acquire("C1"))
    await asyncio.sleep(0.01)
    t0 = time.monotonic()
    await other.penalize("C1", 1.0)
    # Another channel is not paused: its slot comes without the pause (asked during it; the margin is for load).
    await budget.acquire("C2")
    assert time.monotonic() - t0 < 1.0 - 0.02
    await waiter
    assert time.monotonic() - t0 >= 1.0 - 0.02
    t1 = time.monotonic()
    await budget.acquire("C1")
    assert time.monotonic() - t1 >= 0.1 - SLACK_S  # and the queue goes on at the usual spacing


async def test_penalty_bounds_and_bad_values(clients):
    budget = ChannelBudget(clients[0], rate_per_s=2.0)
    await budget.penalize("C1", float("nan"))  # a garbled Retry-After still pauses one interval
    t0 = time.monotonic()
    await budget.acquire("C1")
    assert time.monotonic() - t0 >= 0.5 - 0.02
    await budget.penalize("C9", 10_000_000)
    ttl = await clients[0].pttl("tuneops:rl:C9:pause")
    assert 0 < ttl <= 3600_000 + 60_000
    with pytest.raises(ValueError, match="rate_per_s"):
        ChannelBudget(clients[0], rate_per_s=0)


async def test_keys_expire_and_hold_no_message_content(clients):
    budget = ChannelBudget(clients[0], rate_per_s=1.0, prefix="t:rl:")
    await budget.acquire("C7")
    keys = sorted(k.decode() for k in await clients[0].keys("*"))
    assert keys == ["t:rl:C7:next", "t:rl:C7:sent"]
    for key in keys:
        assert 0 < await clients[0].pttl(key) <= 61_000 + 1000
        assert float(await clients[0].get(key)) > 0  # a time in µs, nothing of the message


async def test_an_urgent_post_goes_ahead_of_routine_waiters(clients):
    budget = ChannelBudget(clients[0], rate_per_s=5.0)
    other = ChannelBudget(clients[1], rate_per_s=5.0)  # another process's view of the same channel
    order: list[str] = []

    async def post(name: str, b: ChannelBudget, urgent: bool) -> None:
        await b.acquire("C1", urgent=urgent)
        order.append(name)

    await budget.acquire("C1")  # the channel is busy for one interval
    routine = [asyncio.create_task(post(f"routine-{i}", b, False)) for i, b in enumerate((budget, other, budget))]
    await asyncio.sleep(0.05)
    await post("urgent", other, True)
    await asyncio.gather(*routine)
    assert order[0] == "urgent", order
    assert sorted(order[1:]) == ["routine-0", "routine-1", "routine-2"]  # and no routine post starved


async def test_routine_posts_keep_the_spacing_and_all_go_out_without_urgent_ones(clients):
    rate, n = 10.0, 5
    budgets = [ChannelBudget(c, rate_per_s=rate) for c in clients]
    stamps: list[float] = []

    async def post(b: ChannelBudget) -> None:
        await b.acquire("C1", urgent=False)
        stamps.append(time.monotonic())

    t0 = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(post(budgets[i % 2]) for i in range(n))), 30)
    assert len(stamps) == n
    assert min(gaps(stamps)) >= 1 / rate - SLACK_S, gaps(stamps)
    # Polling, with jitter, wastes some of each slot, but far less than a waiter's poll interval each.
    assert max(stamps) - t0 < n * (1 / rate + 0.5 + 0.25 / rate) + 1.0


async def test_a_held_turn_is_the_next_post_of_the_task_and_a_routine_wait_turns_urgent(clients):
    budget = ChannelBudget(clients[0], rate_per_s=5.0)
    other = ChannelBudget(clients[1], rate_per_s=5.0)
    stamps: dict[str, float] = {}
    urgent = asyncio.Event()

    async def post(name: str, b: ChannelBudget) -> None:
        await b.acquire("C1")
        stamps[name] = time.monotonic()

    async def lane() -> None:
        # Waits routinely while the channel is booked, then (told it has an error now) queues as urgent, and its
        # next acquire (a routine one, even) posts in the slot it holds.
        assert await budget.hold("C1", urgent.is_set, lead_s=0.1)
        stamps["held"] = time.monotonic()
        await budget.acquire("C1", urgent=False)
        stamps["lane"] = time.monotonic()

    booked = [asyncio.create_task(post(f"booked-{i}", other)) for i in range(3)]
    await asyncio.sleep(0.02)
    task = asyncio.create_task(lane())
    await asyncio.sleep(0.05)
    urgent.set()
    await asyncio.sleep(0.9)  # the lane has reserved by now (it looks again at least every 0.5 s)
    await post("later", other)
    await asyncio.gather(task, *booked)
    assert stamps["lane"] < stamps["later"]
    assert stamps["lane"] - stamps["held"] >= 0.1 - SLACK_S  # woken `lead_s` before its slot
    assert min(gaps([v for k, v in stamps.items() if k != "held"])) >= 0.2 - SLACK_S
    # A card edit that gives up holds nothing; with nobody else waiting a routine turn is taken at once.
    assert not await budget.hold("C2", lambda: False, give_up=lambda: True)
    t0 = time.monotonic()
    assert await budget.hold("C2", lambda: False)
    await budget.acquire("C2", urgent=False)
    assert time.monotonic() - t0 < 0.5


async def test_a_post_that_leaves_its_slot_late_pushes_the_next_one_back(clients):
    # Slack counts the calls as they arrive, not the slots they were given: a post that went 0.15 s after its slot
    # (a busy event loop, a slow render) must not have the next slot's post land 0.05 s after it.
    budget = ChannelBudget(clients[0], rate_per_s=5.0)
    other = ChannelBudget(clients[1], rate_per_s=5.0)
    stamps: dict[str, float] = {}

    async def lane() -> None:
        assert await budget.hold("C3", lambda: True, lead_s=0)  # the channel's slot now
        await asyncio.sleep(0.15)
        await budget.acquire("C3")  # the held slot, 0.15 s late
        stamps["late"] = time.monotonic()

    async def next_one() -> None:
        await other.acquire("C3")  # reserves the slot 0.2 s after the lane's
        stamps["next"] = time.monotonic()

    held = asyncio.create_task(lane())
    await asyncio.sleep(0.02)
    await asyncio.gather(held, next_one())
    assert stamps["next"] - stamps["late"] >= 0.2 - SLACK_S, stamps


async def test_a_held_slot_is_used_once_even_by_tasks_that_copied_the_context(clients):
    budget = ChannelBudget(clients[0], rate_per_s=5.0)
    assert await budget.hold("C4", lambda: True, lead_s=0)
    copy = contextvars.copy_context()  # what asyncio.create_task and gather give a task started now
    assert await budget._use_held("C4")
    assert not await asyncio.create_task(budget._use_held("C4"), context=copy)
