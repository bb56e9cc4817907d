"""Slack's per-channel posting budget (about one message a second), kept in Redis so every bot process shares it.

Each channel has a next-free-slot time in Redis. Posts come in two classes. An urgent post (an error excerpt, a run's
result, anything a person waits for) reserves the next slot atomically and sleeps until it: urgent posts keep their
order. A routine post (an ordinary log excerpt, a progress edit of a card) never reserves a future slot: it takes a
slot only when one is free now, which it never is while an urgent post is waiting, so urgent posts jump ahead of
every routine one. A 429's Retry-After pauses the channel, and callers whose slot falls inside the pause queue again.
Whatever the slots say, a call goes out only once the channel's previous call went out a whole interval ago (the gate,
checked at the moment of sending): a post that left its slot late pushes the next one back instead of landing inside
Slack's one-second window with it. Times are Redis server time, so processes on machines with different clocks still
agree.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

# KEYS[1]: the channel's next free slot (µs), KEYS[2]: the channel's pause end (µs).
# ARGV[1]: the spacing between slots (µs). Returns the wait in µs until the reserved slot.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local slot = math.max(now, tonumber(redis.call('GET', KEYS[1]) or '0'), tonumber(redis.call('GET', KEYS[2]) or '0'))
local interval = tonumber(ARGV[1])
local ttl_ms = math.floor((slot + interval - now) / 1000) + 60000
redis.call('SET', KEYS[1], string.format('%.0f', slot + interval), 'PX', ttl_ms)
return slot - now
"""

# KEYS as for _RESERVE; ARGV[1]: the spacing (µs) that follows the slot, ARGV[2]: 1 to take the slot, 0 to only look.
# Returns 0 when a slot is free now (taken with ARGV[2] = 1), else the µs until the channel is next free: a routine
# post never queues behind the slots that urgent posts reserved.
_TAKE_FREE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local free = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), tonumber(redis.call('GET', KEYS[2]) or '0'))
if free > now then return free - now end
if ARGV[2] == '1' then
  local ttl_ms = math.floor(tonumber(ARGV[1]) / 1000) + 60000
  redis.call('SET', KEYS[1], string.format('%.0f', now + tonumber(ARGV[1])), 'PX', ttl_ms)
end
return 0
"""

# KEYS[1], KEYS[2] as for _RESERVE, KEYS[3]: when the channel's last call went out (µs). ARGV[1]: the spacing (µs).
# The last step before a call: returns a negative µs when the channel is paused (a 429 came meanwhile: the caller
# queues again), a positive µs to wait when the last call went out less than a spacing ago, else 0 after noting the
# call as sent now and moving the next free slot out to a spacing from now (routine posts then see the channel busy).
_GO = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local pause = tonumber(redis.call('GET', KEYS[2]) or '0')
if pause > now then return -(pause - now) end
local spacing = tonumber(ARGV[1])
local after = tonumber(redis.call('GET', KEYS[3]) or '0') + spacing
if after > now then return after - now end
local ttl_ms = math.floor(spacing / 1000) + 60000
redis.call('SET', KEYS[3], string.format('%.0f', now), 'PX', ttl_ms)
if tonumber(redis.call('GET', KEYS[1]) or '0') < now + spacing then
  redis.call('SET', KEYS[1], string.format('%.0f', now + spacing), 'PX', ttl_ms)
end
return 0
"""

# KEYS as for _RESERVE; ARGV[1]: the pause (µs). Pushes the pause end and the next free slot out to now + pause.
_PENALIZE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local until_ = now + tonumber(ARGV[1])
local ttl_ms = math.floor(tonumber(ARGV[1]) / 1000) + 60000
local pause = tonumber(redis.call('GET', KEYS[2]) or '0')
if until_ > pause then redis.call('SET', KEYS[2], string.format('%.0f', until_), 'PX', ttl_ms) end
local slot = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_ > slot then redis.call('SET', KEYS[1], string.format('%.0f', until_), 'PX', ttl_ms) end
return 0
"""

# A Retry-After this long is a broken header rather than advice; an hour is the most a channel waits.
MAX_PENALTY_S = 3600.0
# Slack allows about one message a second per channel. Calls spaced exactly 1.000 s apart when they leave arrive up to
# a few tens of ms closer on a busy machine (network and scheduling jitter), which a strict limiter answers with 429s:
# the 5% margin (52 ms) covers that jitter between the gate and Slack.
SLACK_RATE_PER_S = 0.95
# Methods whose limit is per app and workspace rather than per channel are budgeted the same way, keyed by the method's
# name. views.publish (the Home tab) is Tier 4 in Slack's rate-limit tiers (https://api.slack.com/apis/rate-limits,
# "Tier 4: 100+ per minute"), with the same 5% margin.
TIER4_PER_S = 100 / 60 * 0.95
# A routine waiter looks again at most this often, and adds up to this share of an interval at random, so that the
# routine waiters of several lanes and processes do not all ask at the same instant.
ROUTINE_POLL_S = 0.5
ROUTINE_JITTER = 0.25
# A slot held across rendering (see `hold`) is used this long after its time at most (the gate then holds back the
# slot reserved after it by as much); later, it is given up and asked for again.
HELD_LATE_S = 0.25
# A routine slot held across rendering is taken now and may be used this late: the next slot moves out by as much.
ROUTINE_HOLD_S = 0.2


@dataclass
class _Held:
    channel: str
    at: float      # time.monotonic() of the slot
    late_s: float  # how late it may still be used
    used: bool = False  # one use, even by tasks that copied the context (asyncio.create_task, gather) after `hold`


# The slot the current task holds (set by `hold`, used by the task's next `acquire` of that channel). A context
# variable because the slot is taken in the notifier's lane and used deep inside the gateway's call, in the same task,
# without passing a ticket through every layer between.
_HELD: contextvars.ContextVar[_Held | None] = contextvars.ContextVar("tuneops_held_slot", default=None)


def _never() -> bool:
    return False


class ChannelBudget:
    """A per-channel budget of `rate_per_s` messages a second, shared by every process that uses the same Redis."""

    def __init__(self, redis: aioredis.Redis, rate_per_s: float = SLACK_RATE_PER_S, prefix: str = "tuneops:rl:"):
        if not (rate_per_s > 0 and math.isfinite(rate_per_s)):
            raise ValueError(f"rate_per_s must be a positive number, got {rate_per_s!r}")
        self.redis = redis
        self.rate_per_s = rate_per_s
        self.interval_s = 1.0 / rate_per_s
        self.prefix = prefix
        self._reserve = redis.register_script(_RESERVE)
        self._take_free = redis.register_script(_TAKE_FREE)
        self._penalize = redis.register_script(_PENALIZE)
        self._go = redis.register_script(_GO)

    def _keys(self, channel: str) -> list[str]:
        """The channel's keys, in the order every script takes them (each reads the ones it needs): the next free
        slot, the pause end, when the last call went out."""
        return [f"{self.prefix}{channel}:next", f"{self.prefix}{channel}:pause", f"{self.prefix}{channel}:sent"]

    async def acquire(self, channel: str, urgent: bool = True) -> float:
        """Wait until this channel may get one more message; returns the seconds waited.

        Urgent callers queue for the next slot in order; routine ones (`urgent=False`) take only a slot that is free
        now and else look again, so they wait as long as urgent posts keep coming. A slot this task `hold`s for the
        channel is used first. The slot is taken when this returns; a caller cancelled while waiting leaves its slot
        unused (a gap of one interval), never an extra message.
        """
        t0 = time.monotonic()
        held = await self._use_held(channel)
        while True:
            if not held:
                if urgent:
                    await self._acquire_urgent(channel)
                else:
                    while (wait_s := await self._try_free(channel, take=True, spacing_s=self.interval_s)) > 0:
                        await asyncio.sleep(self._routine_nap(wait_s))
            if await self._gate(channel):
                return time.monotonic() - t0
            held = False

    async def _gate(self, channel: str) -> bool:
        """Wait until the channel's last call went out an interval ago and note this one as going out now; False when
        the channel was paused meanwhile (the caller queues again)."""
        keys = self._keys(channel)
        while (wait_us := int(await self._go(keys=keys, args=[round(self.interval_s * 1e6)]))) != 0:
            if wait_us < 0:
                return False
            await asyncio.sleep(wait_us / 1e6)
        return True

    async def _acquire_urgent(self, channel: str) -> None:
        """Reserve the next slot and sleep until it (the gate then checks for a 429's pause that began meanwhile)."""
        wait_us = int(await self._reserve(keys=self._keys(channel), args=[round(self.interval_s * 1e6)]))
        if wait_us > 0:
            await asyncio.sleep(wait_us / 1e6)

    async def _try_free(self, channel: str, take: bool, spacing_s: float) -> float:
        """0 when a slot is free now (taken with `take`), else the seconds until the channel is next free."""
        wait_us = int(await self._take_free(keys=self._keys(channel), args=[round(spacing_s * 1e6), int(take)]))
        return wait_us / 1e6

    def _routine_nap(self, wait_s: float) -> float:
        return min(wait_s, ROUTINE_POLL_S) + random.uniform(0, ROUTINE_JITTER * self.interval_s)

    async def hold(self, channel: str, urgent: Callable[[], bool], give_up: Callable[[], bool] = _never,
                   lead_s: float = 0.3) -> bool:
        """Wait for this channel's next slot and hold it for this task's next `acquire`, so that what is posted in it
        is put together when the slot comes rather than when the wait began (lines that arrive while waiting go in
        the same message). Returns False, holding nothing, when `give_up()` turns true while waiting routinely.

        `urgent()` is asked again while waiting: a routine wait becomes an urgent one as soon as it turns true. An
        urgent slot is reserved and this returns `lead_s` before it (time to put the message together); a routine
        one is taken when free, and the next slot moves out by ROUTINE_HOLD_S to leave that time.
        """
        self.release()
        while not urgent():
            if give_up():
                return False
            wait_s = await self._try_free(channel, take=True, spacing_s=self.interval_s + ROUTINE_HOLD_S)
            if wait_s == 0:
                _HELD.set(_Held(channel, time.monotonic(), ROUTINE_HOLD_S))
                return True
            await asyncio.sleep(self._routine_nap(wait_s))
        wait_us = int(await self._reserve(keys=self._keys(channel), args=[round(self.interval_s * 1e6)]))
        at = time.monotonic() + wait_us / 1e6
        _HELD.set(_Held(channel, at, HELD_LATE_S))
        if wait_us / 1e6 > lead_s:
            await asyncio.sleep(wait_us / 1e6 - lead_s)
        return True

    def release(self) -> None:
        """Let go of the slot this task holds, unused (a gap of one slot in the channel)."""
        held = _HELD.get()
        if held is not None:
            held.used = True
        _HELD.set(None)

    async def _use_held(self, channel: str) -> bool:
        """Use the slot this task holds for `channel`: sleep until it, unless the slot is past; False when there is
        none to use (the caller queues as usual). The gate comes after."""
        held = _HELD.get()
        if held is None or held.channel != channel or held.used:
            return False
        held.used = True
        _HELD.set(None)
        late = time.monotonic() - held.at
        if late > held.late_s:
            return False
        if late < 0:
            await asyncio.sleep(-late)
        return True

    async def penalize(self, channel: str, retry_after_s: float) -> None:
        """Pause the channel for a 429's Retry-After (at least one interval, at most MAX_PENALTY_S)."""
        try:
            seconds = float(retry_after_s)
        except (TypeError, ValueError):
            seconds = self.interval_s
        if not math.isfinite(seconds):
            seconds = self.interval_s
        seconds = min(max(seconds, self.interval_s), MAX_PENALTY_S)
        await self._penalize(keys=self._keys(channel), args=[round(seconds * 1e6)])
