"""Bolt middleware: hands listeners the runtime, and drops Slack's retried deliveries once the first one was handled.

Runs after Bolt's own signature check, so an unsigned request can never claim a delivery.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import redis
from slack_bolt.response import BoltResponse

from bot.runtime import CONTEXT_KEY, BotRuntime
from bot.stream import consumer_name
from jobs.core import store

log = logging.getLogger(__name__)

DONE_TTL_S = 3600     # Slack gives up retrying long before this
LEASE_MS = 5000       # how long a claim outlives its holder's last renewal; Slack's first retry comes after ~3 s
RENEW_EVERY_S = 1.5
ACK_POLL_S = 0.02
HANDLER_TIMEOUT_S = 60.0  # a listener that has not acked by then never will
CLAIM_DEADLINE_S = 0.5   # of Slack's 3 s for the ack: a Redis that does not answer by then is down

# A delivery's claim is a hash: state ("handling" or "done"), owner (the claiming process), until (the lease's end,
# in the server's clock, so that hosts' clocks never matter).
#
# KEYS: the claim. ARGV: me, lease ms, done ttl s, an owner the caller knows to be dead (or "").
# Returns {"claimed"|"taken"|"done"|"busy", the owner before}.
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HGET', KEYS[1], 'state')
local owner = redis.call('HGET', KEYS[1], 'owner') or ''
if state == 'done' then return {'done', owner} end
local verdict = 'claimed'
if state then
  local until_ms = tonumber(redis.call('HGET', KEYS[1], 'until') or '0') or 0
  if until_ms > now and not (ARGV[4] ~= '' and owner == ARGV[4]) then return {'busy', owner} end
  verdict = 'taken'
end
redis.call('HSET', KEYS[1], 'state', 'handling', 'owner', ARGV[1], 'until', now + tonumber(ARGV[2]))
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {verdict, owner}
"""

# KEYS: the claim. ARGV: me, lease ms. Extends my lease; 0 when the claim is no longer mine.
_RENEW = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'state') ~= 'handling' then
  return 0
end
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'until', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2]))
return 1
"""

# KEYS: the claim. ARGV: me, "done" or "release", done ttl s. Ends my claim: done for good, or let go for a retry.
_FINISH = """
if ARGV[2] == 'done' then
  redis.call('HSET', KEYS[1], 'state', 'done', 'owner', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return 1
end
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] and redis.call('HGET', KEYS[1], 'state') == 'handling' then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


def delivery_key(body: dict[str, Any]) -> str | None:
    """What identifies one delivery across Slack's retries: a command's trigger_id, an event's event_id."""
    if body.get("command") and body.get("trigger_id"):
        return "cmd:" + str(body["trigger_id"])
    if body.get("type") == "event_callback" and body.get("event_id"):
        return "event:" + str(body["event_id"])
    return None


def process_gone(owner: str) -> bool:
    """True when `owner` (a name from `consumer_name`: host:pid:tag) is a process of this host that no longer runs.
    A process of another host is never judged here: its lease says whether it is alive."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def provide_runtime(runtime: BotRuntime) -> Callable[..., Awaitable[BoltResponse | None]]:
    async def provide(context, next):
        context[CONTEXT_KEY] = runtime
        return await next()

    return provide


class DeliveryClaims:
    """Who handles each delivery. A claim names its process and holds a short lease, renewed while the handler runs;
    it is marked done once the handler acked. Another delivery of the same thing is dropped while the claim is done or
    its lease is live, and takes the claim over (atomically, in the claim script) when its holder is gone: the lease
    lapsed, or the holder is a dead process of this host. So a bot that dies between the claim and the ack loses
    nothing, and Slack's retry of a handled command is never run twice."""

    def __init__(self, runtime: BotRuntime, me: str | None = None):
        self.redis = runtime.redis
        self.me = me or consumer_name()
        self._claim = self.redis.register_script(_CLAIM)
        self._renew = self.redis.register_script(_RENEW)
        self._finish = self.redis.register_script(_FINISH)

    async def claim(self, key: str) -> tuple[str, str]:
        """("claimed" | "taken", previous owner) when this process is to handle the delivery, else ("done" |
        "busy", owner)."""
        rkey = store.DELIVERY_KEY.format(key)
        verdict, owner = await self._claim(keys=[rkey], args=[self.me, LEASE_MS, DONE_TTL_S, ""])
        if verdict == "busy" and process_gone(owner):
            # Only the owner judged dead is displaced: if a third delivery took it over meanwhile, it stays busy.
            verdict, owner = await self._claim(keys=[rkey], args=[self.me, LEASE_MS, DONE_TTL_S, owner])
        return verdict, owner

    async def renew(self, key: str) -> bool:
        return bool(await self._renew(keys=[store.DELIVERY_KEY.format(key)], args=[self.me, LEASE_MS]))

    async def finish(self, key: str, handled: bool) -> None:
        await self._finish(keys=[store.DELIVERY_KEY.format(key)],
                           args=[self.me, "done" if handled else "release", DONE_TTL_S])

    async def see_through(self, key: str, context) -> None:
        """Hold the claim while the delivery's listener runs, then mark it done once the listener acked, or let it go
        when the listener failed before its ack (or never acked), so that Slack's retry is processed.

        Bolt runs the listener after every middleware returned, and the ack is the only sign of it a middleware can
        see: Bolt itself waits for `context.ack.response` the same way."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HANDLER_TIMEOUT_S
        renew_at = loop.time() + RENEW_EVERY_S
        handled = False
        try:
            while loop.time() < deadline:
                response = getattr(context.get("ack"), "response", None)
                if response is not None:
                    handled = response.status < 500
                    break
                if loop.time() >= renew_at:
                    renew_at = loop.time() + RENEW_EVERY_S
                    if not await self.renew(key):
                        log.warning("lost the claim of a delivery (%s) before its ack", key.split(":", 1)[0])
                        return
                await asyncio.sleep(ACK_POLL_S)
            else:
                log.info("a delivery (%s) was not acked within %.0f s: letting a retry have it",
                         key.split(":", 1)[0], HANDLER_TIMEOUT_S)
            await self.finish(key, handled)
        except Exception:
            log.warning("could not keep the claim of a delivery (%s)", key.split(":", 1)[0], exc_info=True)


def drop_retries(runtime: BotRuntime,
                 claims: DeliveryClaims | None = None) -> Callable[..., Awaitable[BoltResponse | None]]:
    claims = claims or DeliveryClaims(runtime)

    async def drop(body, request, context, next):
        key = delivery_key(body)
        if key is None:
            return await next()
        try:
            verdict, owner = await asyncio.wait_for(claims.claim(key), CLAIM_DEADLINE_S)
        except (redis.RedisError, asyncio.TimeoutError) as e:
            # Without Redis nothing can start, so the command cannot run twice: let it through unclaimed, and its
            # listener answers that the store is unreachable, within Slack's 3 s.
            log.warning("cannot claim a delivery (%s): Redis is unreachable (%s); handling it unclaimed",
                        key.split(":", 1)[0], type(e).__name__)
            return await next()
        retry = (request.headers.get("x-slack-retry-num") or [""])[0]
        if verdict in ("done", "busy"):
            log.info("dropped a repeated delivery (%s, retry %s, %s by %s)", key.split(":", 1)[0], retry or "-",
                     verdict, owner)
            return BoltResponse(status=200, body="")
        if verdict == "taken":
            log.warning("took over a delivery (%s, retry %s) whose handler %s is gone", key.split(":", 1)[0],
                        retry or "-", owner)
        watcher = asyncio.ensure_future(claims.see_through(key, context))
        _watchers.add(watcher)
        watcher.add_done_callback(_watchers.discard)
        return await next()

    return drop


_watchers: set[asyncio.Future] = set()  # held, so that a running watcher is never collected
