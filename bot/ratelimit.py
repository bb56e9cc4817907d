"""Slack's per-channel posting budget (about one message a second), kept in Redis so every bot process shares it.

Each channel has a next-free-slot time in Redis. A Lua script reserves the next slot atomically and says how long
to wait for it; a 429's Retry-After pauses the channel, and callers whose slot falls inside the pause queue again.
Times are Redis server time, so processes on machines with different clocks still agree.
"""

from __future__ import annotations

import asyncio
import math

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

# Returns the µs left of the channel's pause (0 when not paused), so that a waiter whose slot fell inside a pause
# that began after it reserved can queue again rather than post into the 429.
_PAUSE_LEFT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local pause = tonumber(redis.call('GET', KEYS[1]) or '0')
if pause > now then return pause - now end
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
# Slack allows about one message a second per channel. Slots exactly 1.000 s apart arrive up to a few ms closer
# (network and scheduling jitter), which a strict limiter answers with 429s: measured with bot.bench_thread against
# the stand-in, 32 429s at 1.0/s and none at 0.95/s.
SLACK_RATE_PER_S = 0.95


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
        self._pause_left = redis.register_script(_PAUSE_LEFT)
        self._penalize = redis.register_script(_PENALIZE)

    def _keys(self, channel: str) -> list[str]:
        return [f"{self.prefix}{channel}:next", f"{self.prefix}{channel}:pause"]

    async def acquire(self, channel: str) -> float:
        """Wait until this channel may get one more message; returns the seconds waited.

        The slot is taken when this returns; a caller cancelled while waiting leaves its slot unused (a gap of one
        interval), never an extra message.
        """
        keys = self._keys(channel)
        waited = 0.0
        while True:
            wait_us = int(await self._reserve(keys=keys, args=[round(self.interval_s * 1e6)]))
            if wait_us > 0:
                await asyncio.sleep(wait_us / 1e6)
                waited += wait_us / 1e6
            if int(await self._pause_left(keys=keys[1:])) == 0:
                return waited

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
