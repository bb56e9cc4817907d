"""Bolt middleware: hands listeners the runtime, and drops Slack's retried deliveries once the first one was handled
(of what may not run twice: read-only commands are answered each time).

Runs after Bolt's own signature check, so an unsigned request can never claim a delivery. It is a plain
AsyncMiddleware (not a function middleware), so that no per-request argument injection runs for it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import redis
from slack_bolt.context.ack.async_ack import AsyncAck
from slack_bolt.middleware.async_middleware import AsyncMiddleware
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_bolt.response import BoltResponse

from bot.metrics import subcommand_of
from bot.outage import REDIS, UNREACHABLE
from bot.runtime import CONTEXT_KEY, BotRuntime
from bot.stream import consumer_name
from jobs.core import store

log = logging.getLogger(__name__)

DONE_TTL_S = 3600     # Slack gives up retrying long before this
LEASE_MS = 5000       # how long a claim outlives its holder's last renewal; Slack's first retry comes after ~3 s
RENEW_EVERY_S = 1.5
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


async def load_scripts(r) -> None:
    """Load the claim scripts into Redis now, so that the first claims need no NOSCRIPT round trip."""
    for script in (_CLAIM, _RENEW, _FINISH):
        await r.script_load(script)


# Subcommands that change nothing and answer in their ack: their deliveries are not claimed. Slack retries a command
# only when the ack did not reach it in time, and the ack held the answer, so a retry is answered again rather than
# dropped; running one twice is harmless; and each spares two Redis round trips (the claim, its end).
UNCLAIMED_SUBCOMMANDS = frozenset({"help", "list", "status", "cost"})


def delivery_key(body: dict[str, Any]) -> str | None:
    """What identifies one delivery across Slack's retries: a command's trigger_id, an event's event_id; None for a
    delivery that is not claimed."""
    if body.get("command") and body.get("trigger_id"):
        if subcommand_of(body) in UNCLAIMED_SUBCOMMANDS:
            return None
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


def _looked_at(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


class ScriptBatch:
    """Calls of one Lua script made in the same turn of the event loop, sent to Redis together in one pipeline, each
    caller getting its own result (or error). A burst of requests costs one round trip instead of one each, and a
    single request waits one turn of the loop more, nothing else.

    EVALSHA itself, not redis-py's Script in a pipeline, which would ask SCRIPT EXISTS before every batch: the scripts
    are loaded at the start (bot.server.warm_up), and again here when Redis lost them (a restart)."""

    def __init__(self, r, script: str):
        self.redis = r
        self.script = script
        self.sha = hashlib.sha1(script.encode()).hexdigest()
        self._calls: list[tuple[list, list]] | None = None  # the calls of the batch being gathered
        self._results: asyncio.Future | None = None  # its pipeline's results

    async def __call__(self, *, keys: list, args: list) -> Any:
        if self._calls is None or self._results.done():  # done: its task ended before it took the calls (cancelled)
            self._calls = []
            self._results = asyncio.ensure_future(self._send())
            # Its callers may all be gone (cancelled by the ack's deadline) when it fails: the failure is theirs, and
            # looked at here so that asyncio does not log it as "never retrieved" at exit.
            self._results.add_done_callback(_looked_at)
        mine = len(self._calls)
        self._calls.append((keys, args))
        result = (await asyncio.shield(self._results))[mine]  # a cancelled caller must not cancel the others'
        if isinstance(result, Exception):
            raise result
        return result

    async def _send(self) -> list:
        await asyncio.sleep(0)  # one turn of the loop: the other calls made in this one join the batch
        calls, self._calls = self._calls or [], None
        for attempt in (1, 2):
            async with self.redis.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    pipe.evalsha(self.sha, len(keys), *keys, *args)
                results = await pipe.execute(raise_on_error=False)
            if attempt == 1 and any(isinstance(r, redis.exceptions.NoScriptError) for r in results):
                await self.redis.script_load(self.script)
                continue
            return results
        raise AssertionError("unreachable")


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
        # A burst of commands claims (and finishes) its deliveries in one pipeline each, not a round trip each.
        self._claim_batch = ScriptBatch(self.redis, _CLAIM)
        self._finish_batch = ScriptBatch(self.redis, _FINISH)

    async def claim(self, key: str) -> tuple[str, str]:
        """("claimed" | "taken", previous owner) when this process is to handle the delivery, else ("done" |
        "busy", owner)."""
        rkey = store.DELIVERY_KEY.format(key)
        verdict, owner = await self._claim_batch(keys=[rkey], args=[self.me, LEASE_MS, DONE_TTL_S, ""])
        if verdict == "busy" and process_gone(owner):
            # Only the owner judged dead is displaced: if a third delivery took it over meanwhile, it stays busy.
            verdict, owner = await self._claim(keys=[rkey], args=[self.me, LEASE_MS, DONE_TTL_S, owner])
        return verdict, owner

    async def renew(self, key: str) -> bool:
        return bool(await self._renew(keys=[store.DELIVERY_KEY.format(key)], args=[self.me, LEASE_MS]))

    async def finish(self, key: str, handled: bool) -> None:
        await self._finish_batch(keys=[store.DELIVERY_KEY.format(key)],
                                 args=[self.me, "done" if handled else "release", DONE_TTL_S])

    async def see_through(self, key: str, ack: WatchedAck) -> None:
        """Hold the claim while the delivery's listener runs, then mark it done once the listener acked, or let it go
        when the listener failed before its ack (or never acked), so that Slack's retry is processed.

        Bolt runs the listener after every middleware returned; its ack (or Bolt's 500 when it raised) is set on
        `ack`, which wakes this watcher: nothing polls."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HANDLER_TIMEOUT_S
        handled = False
        try:
            while ack.response is None:
                left = deadline - loop.time()
                if left <= 0:
                    log.info("a delivery (%s) was not acked within %.0f s: letting a retry have it",
                             key.split(":", 1)[0], HANDLER_TIMEOUT_S)
                    break
                try:
                    async with asyncio.timeout(min(RENEW_EVERY_S, left)):
                        await ack.answered.wait()
                except TimeoutError:
                    if loop.time() < deadline and not await self.renew(key):
                        log.warning("lost the claim of a delivery (%s) before its ack", key.split(":", 1)[0])
                        return
            else:
                handled = ack.response.status < 500
            await self.finish(key, handled)
        except UNREACHABLE as e:
            REDIS.failed(e, "keeping the claim of a delivery")
        except Exception:
            log.warning("could not keep the claim of a delivery (%s)", key.split(":", 1)[0], exc_info=True)


class WatchedAck(AsyncAck):
    """Bolt's ack, which also says when it was given: the listener's `await ack(...)` and Bolt's own error response
    both set `response`, and that sets `answered`."""

    def __init__(self):
        self.answered = asyncio.Event()
        super().__init__()

    @property
    def response(self) -> BoltResponse | None:
        return self._response

    @response.setter
    def response(self, value: BoltResponse | None) -> None:
        self._response = value
        if value is not None:
            self.answered.set()


class DeliveryMiddleware(AsyncMiddleware):
    """Puts the runtime into the context, and claims each delivery before its listener runs (see DeliveryClaims)."""

    def __init__(self, runtime: BotRuntime, claims: DeliveryClaims | None = None):
        self.runtime = runtime
        self.claims = claims or DeliveryClaims(runtime)

    async def async_process(self, *, req: AsyncBoltRequest, resp: BoltResponse,
                            next: Callable[[], Awaitable[BoltResponse]]) -> BoltResponse | None:
        context = req.context
        context[CONTEXT_KEY] = self.runtime
        key = delivery_key(req.body)
        if key is None:
            await next()
            return resp
        try:
            async with asyncio.timeout(CLAIM_DEADLINE_S):
                verdict, owner = await self.claims.claim(key)
        except (*UNREACHABLE, TimeoutError) as e:
            # Without Redis nothing can start, so the command cannot run twice: let it through unclaimed, and its
            # listener answers that the store is unreachable, within Slack's 3 s.
            REDIS.failed(e, "claiming a delivery (handled unclaimed)")
            await next()
            return resp
        except redis.RedisError as e:
            log.warning("cannot claim a delivery (%s): Redis answered %s; handling it unclaimed",
                        key.split(":", 1)[0], e)
            await next()
            return resp
        REDIS.ok()
        if verdict in ("done", "busy"):
            retry = (req.headers.get("x-slack-retry-num") or [""])[0]
            log.info("dropped a repeated delivery (%s, retry %s, %s by %s)", key.split(":", 1)[0], retry or "-",
                     verdict, owner)
            return BoltResponse(status=200, body="")
        if verdict == "taken":
            retry = (req.headers.get("x-slack-retry-num") or [""])[0]
            log.warning("took over a delivery (%s, retry %s) whose handler %s is gone", key.split(":", 1)[0],
                        retry or "-", owner)
        ack = context.get("ack")
        if not isinstance(ack, WatchedAck):
            ack = context["ack"] = WatchedAck()
        watcher = asyncio.ensure_future(self.claims.see_through(key, ack))
        _watchers.add(watcher)
        watcher.add_done_callback(_watchers.discard)
        await next()
        return resp


_watchers: set[asyncio.Future] = set()  # held, so that a running watcher is never collected
