"""Lane scheduling: one lane per run, fed from the event stream this process consumes, each lane working through its
items in order while the others go on; acks, retries, the run-card throttle, and taking over or leaving the stream.

Urgent work (error lines, a run's result, anything but routine log lines, progress and card edits) goes first, in
the channel (bot.ratelimit's two classes) and in its lane: a card edit steps aside for whatever is queued behind it,
and a lane holding log lines waits for its channel's turn before it puts the excerpt together, so that the lines that
came while it waited go out in the same message."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from bot import metrics, ops
from bot.logbatch import LogBatcher
from bot.ratelimit import ChannelBudget
from bot.slack import SlackGateway
from bot.stream import EventStream
from jobs.core import store
from jobs.core.domain import RunEvent

log = logging.getLogger("bot.notifier")  # one name for the whole notifier, whichever part logs

PROGRESS_INTERVAL_S = 5.0
LOG_INTERVAL_S = 20.0
# Entries held in memory at most (queued in lanes or batched); reading pauses above it.
MAX_INFLIGHT = 5000
# A lane with nothing to do for this long is dropped (its LogBatcher starts afresh if the run logs again).
IDLE_LANE_S = 600.0
STOP_FLUSH_S = 5.0
MAX_UNEXPECTED = 3
# Log and progress events that wait behind each other in a lane are rendered together: a lane that fell behind (its
# channel's budget is spent) catches up in one message instead of one message per event.
QUIET_KINDS = {"log", "progress"}
# Thread messages that the log lines waiting behind them may join (a run's start and notices: not its end, whose last
# lines go first): in a busy channel a lane gets one post a turn, and the run's first error lines would otherwise wait
# a whole turn more behind its "started".
JOINABLE_KINDS = {"started", "resumed", "notice", "cancelling"}
MAX_COALESCED = 1000
# Progress edits of cards share the channels' posting budget with the thread messages; while many runs are busy, all
# their cards together are edited at most about once per this many seconds, so that log excerpts and errors get most
# of the budget.
CARD_SHARE_S = 4.0

# A lane that waits for its channel's turn wakes this long before its slot to put its message together (reading the
# run, feeding the batcher: tens of ms, more on a busy event loop; a slot missed costs a turn).
HOLD_LEAD_S = 0.5
# Redis errors that mean "not reachable right now" (the clients have socket timeouts): tried again, like Slack's.
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
# Posts that are safe to make again (edits of a card in place; log excerpts, which at-least-once delivery may repeat).
# Every other post of an event (a result, a thread message, the loss curve) is recorded once made, under the event's
# stream entry, so that a process taking over a dead one's unacked entries does not post it a second time.
REPEATABLE = frozenset({"log excerpt", "card", "approval card"})
POSTED = store.PREFIX + ":notifier:posted:{}"
POSTED_TTL_S = 86_400

# One call to Slack, made by a lane; rendering produces a list of (what, call) pairs.
Post = Callable[[], Awaitable[Any]]


class Transient(Exception):
    """Slack or Redis could not be reached (or Slack kept rate-limiting); the work is tried again."""


@dataclass
class _Throttle:
    interval_s: float
    share_s: float = CARD_SHARE_S
    busy: int = 0                # runs with work waiting (set by the notifier's tick)
    last: dict[str, float] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)

    def due(self, run_id: str, now: float) -> bool:
        interval = max(self.interval_s, self.busy * self.share_s)
        return now - self.last.get(run_id, -1e18) >= interval


@dataclass
class _Item:
    kind: str                                   # "event" | "flush" | "card"
    entry_id: str = ""
    event: RunEvent | None = None
    force: bool = False                         # flush: everything pending, whatever the time (stopping)
    posts: list[tuple[str, Post]] | None = None  # rendered once; retried from `sent` after a transient failure
    sent: int = 0
    done: set[str] = field(default_factory=set)  # posts of it already made, by this process or a dead one
    hold: bool = False                          # its log lines wait in the batcher: ack later
    failures: int = 0
    absorbed: list[_Item] = field(default_factory=list)  # quiet items rendered together with this one
    has_error: bool | None = None               # log lines with an error among them (looked at once)

    @property
    def quiet(self) -> bool:
        """Log lines, progress or a routine flush: nothing whose own message must keep its place."""
        if self.kind == "flush":
            return not self.force
        return self.kind == "event" and self.event is not None and self.event.kind in QUIET_KINDS

    def urgent(self, batcher: LogBatcher) -> bool:
        """Work that goes ahead of routine posts: any event but log lines and progress, a final flush, and log
        lines with an error among them (as `batcher` tells errors)."""
        if self.kind == "card":
            return False
        if not self.quiet:
            return True
        if self.has_error is None:
            data = self.event.data if self.event is not None and self.event.kind == "log" else {}
            self.has_error = batcher.any_error(str(line) for line in data.get("lines") or [])
        return self.has_error


@dataclass
class _Lane:
    key: str                                    # the run id (or an op id)
    batcher: LogBatcher
    items: deque[_Item] = field(default_factory=deque)
    outbox: deque[str] = field(default_factory=deque)   # log excerpts rendered, not yet accepted by Slack
    held: list[str] = field(default_factory=list)       # entries whose lines are still in the batcher
    task: asyncio.Task | None = None
    retry_at: float = 0.0
    backoff: float = 0.5
    error: BaseException | None = None
    flush_queued: bool = False
    card_queued: bool = False
    last_active: float = 0.0
    channel: str = ""                           # the run's channel, once an item has rendered
    outbox_urgent: bool = False                 # the outbox holds error lines (or comes before urgent work)

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()

    def urgent(self) -> bool:
        """Whether anything the lane holds or has queued must go ahead of routine posts."""
        return (self.outbox_urgent or self.batcher.has_errors
                or any(it.urgent(self.batcher) for it in self.items))


class _StepAside(Exception):
    """A card edit waiting for a routine slot lets the lane's newer work go first."""


class Lanes:
    """The scheduling half of the Notifier: when each item is worked on. What an item makes Slack do comes from
    `_render` (the Renderer mixin) and each call goes out through `_send` (the Poster mixin)."""

    # Set by Notifier.__init__.
    gateway: SlackGateway
    stream: EventStream
    block_ms: int
    clock: Callable[[], float]
    tick_s: float
    max_inflight: int
    log_interval_s: float
    throttle: _Throttle
    lanes: dict[str, _Lane]
    _inflight: set[str]
    _unacked: list[str]
    _idle: list[str]
    _stop: asyncio.Event
    _stopping: bool
    _task: asyncio.Task | None
    # Provided by the other mixins (annotations only, so they do not shadow them in the MRO).
    _render: Callable[[_Lane, _Item], Awaitable[list[tuple[str, Post]]]]
    _send: Callable[[str, str, Post], Awaitable[None]]

    # ---- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> asyncio.Task:
        self._stop.clear()
        self._stopping = False
        self._task = asyncio.create_task(self.run(), name="tuneops-notifier")
        return self._task

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=self.block_ms / 1000 + STOP_FLUSH_S + 5)
            except asyncio.TimeoutError:
                self._task.cancel()
            self._task = None

    async def run(self) -> None:
        ticker = asyncio.create_task(self._ticker(), name="tuneops-notifier-tick")
        backoff = 0.5
        try:
            while not self._stop.is_set():
                try:
                    if len(self._inflight) >= self.max_inflight:
                        await asyncio.to_thread(self.stream.heartbeat)
                        await self._sleep(0.2)
                        continue
                    await self.step(wait=False)
                    backoff = 0.5
                except Transient as e:
                    log.warning("notifier: %s; trying again in %.1fs", e, backoff)
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
                except Exception:
                    log.exception("notifier: unexpected error; going on in %.1fs", backoff)
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
        finally:
            ticker.cancel()
            await self._shutdown()

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

    async def _ticker(self) -> None:
        while not self._stop.is_set():
            await self._sleep(self.tick_s)
            try:
                self.tick()
                await self._retry_acks()
                if self._idle:
                    idle, self._idle = self._idle, []
                    await asyncio.to_thread(self.stream.release, idle)
            except Exception:
                log.exception("notifier tick failed")

    async def _shutdown(self) -> None:
        """Post what the batchers hold (briefly), then leave: another process takes over what is still pending."""
        self._stopping = True
        for lane in self.lanes.values():
            if lane.batcher.pending or lane.outbox:
                lane.items.append(_Item("flush", force=True))
            self._kick(lane, force=True)
        busy = [lane.task for lane in self.lanes.values() if lane.busy]
        if busy:
            await asyncio.wait(busy, timeout=STOP_FLUSH_S)
        for lane in self.lanes.values():
            if lane.busy:
                lane.task.cancel()
        await self._retry_acks()
        try:
            await asyncio.to_thread(self.stream.leave)
        except redis.exceptions.RedisError:
            pass

    # ---- reading and dispatching ------------------------------------------------------------------------------

    async def step(self, wait: bool = True) -> int:
        """Read what is there for this process and hand it to the runs' lanes; returns the events read.

        With `wait` (tests, tools) it also waits until every lane has done its work, retrying lanes that failed
        at once, and raises Transient when one could not reach Slack or Redis.
        """
        room = max(1, min(100, self.max_inflight - len(self._inflight)))
        try:
            batch = await asyncio.to_thread(self.stream.read, room, set(self._inflight), self.block_ms)
        except REDIS_DOWN as e:
            raise Transient(f"Redis unreachable ({e})") from None
        metrics.observe_notifier_lag(batch)
        for entry_id, event in batch:
            self._inflight.add(entry_id)
            self._lane(event.run_id).items.append(_Item("event", entry_id, event))
        self.tick(retry_now=wait)
        if wait:
            await self.drain()
        return len(batch)

    def _lane(self, key: str) -> _Lane:
        lane = self.lanes.get(key)
        if lane is None:
            lane = _Lane(key, LogBatcher(interval_s=self.log_interval_s, redact=self.gateway.redactor),
                         last_active=self.clock())
            self.lanes[key] = lane
        return lane

    def tick(self, retry_now: bool = False) -> None:
        """Queue what is due (held log lines, throttled card edits), restart lanes, forget idle ones."""
        now = self.clock()
        self.throttle.busy = sum(1 for lane in self.lanes.values()
                                 if lane.items or lane.outbox or lane.batcher.pending or lane.busy)
        for key, lane in list(self.lanes.items()):
            if (lane.batcher.pending or lane.outbox) and not lane.flush_queued:
                lane.flush_queued = True
                lane.items.append(_Item("flush"))
            if key in self.throttle.dirty and self.throttle.due(key, now) and not lane.card_queued:
                lane.card_queued = True
                lane.items.append(_Item("card"))
            if lane.items:
                lane.last_active = now
                self._kick(lane, force=retry_now)
            elif (not lane.busy and not lane.held and not lane.batcher.pending and not lane.outbox
                  and now - lane.last_active > IDLE_LANE_S):
                del self.lanes[key]
                self._idle.append(key)

    def _kick(self, lane: _Lane, force: bool = False) -> None:
        if lane.busy or not lane.items:
            return
        if not force and self.clock() < lane.retry_at:
            return
        lane.task = asyncio.create_task(self._drive(lane), name=f"tuneops-lane-{lane.key}")

    async def drain(self) -> None:
        """Wait until no lane is working; raise Transient when a lane stopped on a failure it will retry."""
        while True:
            busy = [lane.task for lane in self.lanes.values() if lane.busy]
            if not busy:
                break
            await asyncio.gather(*busy, return_exceptions=True)
        for lane in self.lanes.values():
            if lane.items and lane.error is not None:
                raise Transient(str(lane.error))

    async def _drive(self, lane: _Lane) -> None:
        while lane.items and not (self._stopping and lane.items[0].kind != "flush"):
            item = lane.items[0]
            if item.kind == "card" and item.posts is None and len(lane.items) > 1:
                lane.items.rotate(-1)  # a card edit shows the latest state whenever it goes: it goes last
                continue
            try:
                await self._process(lane, item)
            except _StepAside:
                continue
            except Transient as e:
                lane.error = e
                lane.retry_at = self.clock() + lane.backoff
                log.warning("%s: %s; trying again in %.1fs", lane.key, e, lane.backoff)
                lane.backoff = min(lane.backoff * 2, 30.0)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                item.failures += 1
                if item.failures < MAX_UNEXPECTED:
                    log.exception("%s: rendering %s failed; trying again", lane.key, item.kind)
                    lane.retry_at = self.clock() + lane.backoff
                    return
                log.exception("%s: rendering %s failed %d times; dropped", lane.key, item.kind, item.failures)
                await self._ack([item.entry_id] if item.entry_id else [])
            lane.items.popleft()
            lane.error, lane.backoff = None, 0.5
            lane.last_active = self.clock()

    async def _process(self, lane: _Lane, item: _Item) -> None:
        budget = self.gateway.budget
        try:
            if item.posts is None:
                if budget is not None and self._will_post(lane, item):
                    await self._wait_turn(lane, item, budget)
                if (item.quiet or self._joinable(lane, item)) and not ops.is_op_id(lane.key):
                    self._coalesce(lane, item)
                try:
                    item.posts = await self._render(lane, item)
                except REDIS_DOWN as e:
                    raise Transient(f"Redis unreachable ({e})") from None
                if item.entry_id and any(what not in REPEATABLE for what, _ in item.posts):
                    item.done = await self._posted(item.entry_id)
            while item.sent < len(item.posts):
                what, post = item.posts[item.sent]
                if what not in item.done:
                    await self._send(lane.key, what, post)
                    if item.entry_id and what not in REPEATABLE:
                        await self._mark_posted(item.entry_id, what)
                item.sent += 1
        finally:
            if budget is not None:
                budget.release()  # a turn not used (nothing to post after all) is not carried to other work
        for it in (item, *item.absorbed):
            if it.kind == "flush":
                lane.flush_queued = False
            elif it.kind == "card":
                lane.card_queued = False
        done = []
        ids = [it.entry_id for it in (item, *item.absorbed) if it.entry_id]
        (lane.held if item.hold else done).extend(ids)
        if not lane.batcher.pending and not lane.outbox and lane.held:
            done += lane.held
            lane.held = []
        await self._ack(done)

    async def _posted(self, entry_id: str) -> set[str]:
        """What of an event's story was posted already: by a process that died before it acked the event, whose
        entries this one took over (bot.stream). Without this, a takeover would post the run's result twice."""
        try:
            return set(await asyncio.to_thread(self.stream.conn.smembers, POSTED.format(entry_id)))
        except REDIS_DOWN as e:
            raise Transient(f"Redis unreachable ({e})") from None

    async def _mark_posted(self, entry_id: str, what: str) -> None:
        key = POSTED.format(entry_id)

        def mark() -> None:
            with self.stream.conn.pipeline(transaction=True) as pipe:
                pipe.sadd(key, what).expire(key, POSTED_TTL_S).execute()

        try:
            await asyncio.to_thread(mark)
        except redis.exceptions.RedisError as e:  # posted all the same; only a takeover would repeat it
            log.warning("could not record that the %s of %s was posted: %s", what, entry_id, e)

    def _will_post(self, lane: _Lane, item: _Item) -> bool:
        """Whether a card edit or quiet item is about to post (an excerpt is due): only then does it wait for a turn,
        since a turn taken and left unused is a slot of the channel lost."""
        if item.kind == "card" or self._joinable(lane, item):
            return True
        if not item.quiet:
            return False
        if lane.outbox:
            return True
        quiet = [it for it in lane.items if it.quiet]  # the item and what may join it
        lines = any(it.event is not None and it.event.kind == "log" for it in quiet)
        errors = any(it.urgent(lane.batcher) for it in quiet)
        return lane.batcher.due(self.clock(), lines=lines, errors=errors)

    async def _wait_turn(self, lane: _Lane, item: _Item, budget: ChannelBudget) -> None:
        """Wait for the channel's turn before putting log lines or a card together, so that what arrives meanwhile
        goes out in the same message: urgently while the lane holds anything urgent, else routinely. A card edit
        steps aside (raises _StepAside, to the back of the lane) when other work comes in behind it."""
        if not lane.channel or ops.is_op_id(lane.key):
            return
        card = item.kind == "card"
        give_up = (lambda: len(lane.items) > 1) if card else (lambda: False)
        urgent = (lambda: False) if card else lane.urgent
        try:
            turn = await budget.hold(lane.channel, urgent, give_up, lead_s=HOLD_LEAD_S)
        except REDIS_DOWN as e:
            raise Transient(f"Redis unreachable ({e})") from None
        if not turn:
            lane.items.rotate(-1)
            raise _StepAside()

    @staticmethod
    def _joinable(lane: _Lane, item: _Item) -> bool:
        """A thread message at the lane's head with log lines queued behind it, which then go in the same post."""
        return (item.kind == "event" and item.event is not None and item.event.kind in JOINABLE_KINDS
                and not ops.is_op_id(lane.key)
                and any(it.kind == "event" and it.event is not None and it.event.kind == "log"
                        for it in list(lane.items)[1:2]))

    @staticmethod
    def _coalesce(lane: _Lane, item: _Item) -> None:
        """Take the quiet items queued behind `item` (the lane's head) into it, up to the first one that must keep
        its place; a card edit is stepped over and stays queued (it shows the latest state whenever it goes)."""
        behind = list(lane.items)[1:]
        kept: list[_Item] = []
        for i, it in enumerate(behind):
            if it.kind == "card":
                kept.append(it)
            elif it.quiet and len(item.absorbed) < MAX_COALESCED:
                item.absorbed.append(it)
            else:
                kept += behind[i:]
                break
        lane.items.clear()
        lane.items.extend([item, *kept])

    async def _ack(self, entry_ids: list[str]) -> None:
        if not entry_ids:
            return
        self._inflight.difference_update(entry_ids)
        try:
            await asyncio.to_thread(self.stream.ack, entry_ids)
        except redis.exceptions.RedisError as e:
            log.warning("could not ack %d event(s) (%s); trying again", len(entry_ids), e)
            self._unacked += entry_ids

    async def _retry_acks(self) -> None:
        ids, self._unacked = self._unacked, []
        await self._ack(ids)

