"""The notifier: renders run events from jobs/ into Slack: the run card in the channel, and the run's story in its
thread (log excerpts, the completion with its loss curve, failures, timeouts, deploy requests and their results).

Events come from the one stream through `bot.stream` (one consumer per process; each run's events reach the one
process that owns the run, in order). Each run has a lane here: its events are handled one after another, while
lanes of other runs go on meanwhile, so a channel waiting on its posting budget holds up nobody else. An event is
acked once Slack accepted what it caused; log lines held by a run's LogBatcher keep their events pending until they
are posted, so a bot that dies mid-way gets them again. Progress edits of a card are throttled per run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import redis
from slack_sdk.errors import SlackApiError, SlackClientError

from bot import blocks, ops, threads
from bot.charts import render_loss_curve
from bot.logbatch import LogBatcher, omitted_marker
from bot.slack import SlackGateway
from bot.stream import GROUP, EventStream
from jobs.core import store
from jobs.core.domain import Run, RunEvent, RunState
from jobs.core.settings import JobSettings
from jobs.deploys import approval as approvals
from jobs.runs import service

log = logging.getLogger(__name__)

__all__ = ["GROUP", "Notifier", "Transient"]

PROGRESS_INTERVAL_S = 5.0
LOG_INTERVAL_S = 20.0
SHOWN_CACHE = 10_000
# Kinds that change what the card shows (besides "progress", which is throttled).
CARD_KINDS = {"queued", "state", "started", "succeeded", "failed", "cancelled", "timed_out"}
ENDED_KINDS = {"succeeded", "failed", "cancelled", "timed_out"}
# Entries held in memory at most (queued in lanes or batched); reading pauses above it.
MAX_INFLIGHT = 5000
# A lane with nothing to do for this long is dropped (its LogBatcher starts afresh if the run logs again).
IDLE_LANE_S = 600.0
STOP_FLUSH_S = 5.0
MAX_UNEXPECTED = 3
# Log and progress events that wait behind each other in a lane are rendered together: a lane that fell behind (its
# channel's budget is spent) catches up in one message instead of one message per event.
QUIET_KINDS = {"log", "progress"}
MAX_COALESCED = 1000
# Progress edits of cards share the channels' posting budget with the thread messages; while many runs are busy, all
# their cards together are edited at most about once per this many seconds, so that log excerpts and errors get most
# of the budget.
CARD_SHARE_S = 4.0

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
    hold: bool = False                          # its log lines wait in the batcher: ack later
    failures: int = 0
    absorbed: list[_Item] = field(default_factory=list)  # quiet items rendered together with this one

    @property
    def quiet(self) -> bool:
        """Log lines, progress or a routine flush: nothing whose own message must keep its place."""
        if self.kind == "flush":
            return not self.force
        return self.kind == "event" and self.event is not None and self.event.kind in QUIET_KINDS


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

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()


class Notifier:
    def __init__(self, settings: JobSettings, gateway: SlackGateway, *, consumer: str | None = None,
                 progress_interval_s: float = PROGRESS_INTERVAL_S, log_interval_s: float = LOG_INTERVAL_S,
                 block_ms: int = 1000, clock=time.monotonic, tick_s: float = 1.0, max_inflight: int = MAX_INFLIGHT):
        self.settings = settings
        self.threads = threads.Threads(settings)
        self.gateway = gateway
        self.stream = EventStream(store.connect(settings), consumer)
        self.consumer = self.stream.name
        self.block_ms = block_ms
        self.clock = clock
        self.tick_s = tick_s
        self.max_inflight = max_inflight
        self.log_interval_s = log_interval_s
        self.throttle = _Throttle(progress_interval_s)
        self.lanes: dict[str, _Lane] = {}
        self._inflight: set[str] = set()
        self._unacked: list[str] = []
        self._idle: list[str] = []  # runs whose lanes were dropped: this process lets go of them
        self._shown: dict[str, str] = {}  # run id / approval id -> the message last sent to Slack
        self._stop = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task | None = None

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
        except redis.exceptions.ConnectionError as e:
            raise Transient(f"Redis unreachable ({e})") from None
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
            try:
                await self._process(lane, item)
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
        if item.posts is None and item.quiet and not ops.is_op_id(lane.key):
            while len(lane.items) > 1 and lane.items[1].quiet and len(item.absorbed) < MAX_COALESCED:
                item.absorbed.append(lane.items[1])
                del lane.items[1]
        if item.posts is None:
            try:
                item.posts = await self._render(lane, item)
            except redis.exceptions.ConnectionError as e:
                raise Transient(f"Redis unreachable ({e})") from None
        while item.sent < len(item.posts):
            what, post = item.posts[item.sent]
            await self._send(lane.key, what, post)
            item.sent += 1
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

    async def _send(self, key: str, what: str, post: Post) -> None:
        """One call to Slack. Refusals are logged and skipped (trying again would be refused again and hold up the
        thread); a rate limit that outlasted the gateway's retries, or no connection, is tried again."""
        try:
            await post()
        except SlackApiError as e:
            if e.response.status_code == 429:
                raise Transient(f"Slack kept rate-limiting {what}") from None
            log.error("Slack refused the %s of %s: %s", what, key, e.response.get("error", e.response.status_code))
        except (SlackClientError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise Transient(f"Slack unreachable ({type(e).__name__})") from None
        except redis.exceptions.ConnectionError as e:
            raise Transient(f"Redis unreachable ({e})") from None

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

    # ---- rendering ----------------------------------------------------------------------------------------------

    async def _get_run(self, run_id: str) -> Run | None:
        return await asyncio.to_thread(service.get_run, self.settings, run_id)

    async def _render(self, lane: _Lane, item: _Item) -> list[tuple[str, Post]]:
        """What an item makes Slack do, as calls to make in order. Runs once per item; the calls are retried."""
        now = self.clock()
        if item.absorbed:
            return await self._render_quiet(lane, item, now)
        if item.kind == "flush":
            lane.outbox.extend(lane.batcher.flush(now, force=item.force))
            run = await self._get_run(lane.key) if lane.outbox else None
            return [("log excerpt", lambda: self._post_outbox(lane, run))] if run else self._drop_outbox(lane)
        if item.kind == "card":
            self.throttle.dirty.discard(lane.key)
            run = await self._get_run(lane.key)
            return [("card", lambda: self.show_card(run))] if run and await self._ts(run.id) else []
        assert item.event is not None
        return await self._render_event(lane, item, item.event, now)

    async def _render_quiet(self, lane: _Lane, item: _Item, now: float) -> list[tuple[str, Post]]:
        """Log lines and progress of several items at once: the lines go through the batcher together, the card is
        edited once."""
        lines: list[str] = []
        progress = False
        for it in (item, *item.absorbed):
            if it.kind == "event" and it.event.kind == "log":
                data = it.event.data
                if data.get("skipped"):
                    lines.append(omitted_marker(int(data["skipped"])))
                lines += [str(line) for line in data.get("lines") or []]
            elif it.kind == "event":
                progress = True
        run = await self._get_run(lane.key)
        if run is None:
            log.warning("events for unknown run %s dropped", lane.key)
            return []
        lane.outbox.extend(lane.batcher.feed(lines, now) if lines else lane.batcher.flush(now))
        item.hold = lane.batcher.pending > 0
        posts: list[tuple[str, Post]] = []
        if lane.outbox:
            posts.append(("log excerpt", lambda: self._post_outbox(lane, run)))
        if progress:
            if not await self._ts(run.id) or self.throttle.due(run.id, now):
                posts.append(("card", lambda: self.show_card(run)))
            else:
                self.throttle.dirty.add(run.id)
        return posts

    def _drop_outbox(self, lane: _Lane) -> list[tuple[str, Post]]:
        lane.outbox.clear()
        return []

    async def _render_event(self, lane: _Lane, item: _Item, event: RunEvent, now: float) -> list[tuple[str, Post]]:
        if ops.is_op_id(event.run_id):  # an Azure operation (pv-0001): its own root message and thread
            return [(f"{event.kind} message", lambda: ops.show_op_event(self.settings, self.gateway, self.threads,
                                                                        event))]
        run = await self._get_run(event.run_id)
        if run is None:
            log.warning("event %s for unknown run %s dropped", event.kind, event.run_id)
            return []
        kind, data = event.kind, event.data
        posts: list[tuple[str, Post]] = []
        shown = await self._ts(run.id)
        if kind == "progress":
            if not shown or self.throttle.due(run.id, now):
                posts.append(("card", lambda: self.show_card(run)))
            else:
                self.throttle.dirty.add(run.id)
            return posts
        if kind == "log":
            lines = [str(line) for line in data.get("lines") or []]
            if data.get("skipped"):
                lines.insert(0, omitted_marker(int(data["skipped"])))
            lane.outbox.extend(lane.batcher.feed(lines, now))
            item.hold = lane.batcher.pending > 0
            if lane.outbox:
                posts.append(("log excerpt", lambda: self._post_outbox(lane, run)))
            return posts
        if kind in CARD_KINDS or not shown:
            posts.append(("card", lambda: self.show_card(run)))
        if kind in ENDED_KINDS:
            # The last lines of the run go before the message that ends its story.
            lane.outbox.extend(lane.batcher.flush(now, force=True))
            if lane.outbox:
                posts.append(("log excerpt", lambda: self._post_outbox(lane, run)))
        message = None
        broadcast = False
        if kind == "started":
            message = blocks.render_started(run, str(data.get("execution_id", "")), data.get("links") or {})
        elif kind == "succeeded":
            metrics = data.get("metrics") or run.metrics
            message = blocks.render_succeeded(run, metrics, str(data.get("adapter") or run.adapter_path))
            posts.append(("completion message", lambda: self._post_thread(run, message)))
            posts.append(("loss curve", lambda: self._upload_chart(run, metrics)))
            return posts
        elif kind == "failed":
            message = blocks.render_failed(run, str(data.get("error") or run.error), list(data.get("log_tail") or []),
                                           data.get("hint") or run.error_hint)
            broadcast = True
        elif kind == "cancelled":
            message = blocks.render_cancelled(run, str(data.get("by") or run.cancelled_by))
        elif kind == "timed_out":
            message = blocks.render_timed_out(run, data.get("checkpoint_step") or run.last_checkpoint_step)
        elif kind == "cancelling":
            message = blocks.render_cancelling(run, str(data.get("by", "")))
        elif kind == "resumed":
            message = blocks.render_resumed(run, data)
        elif kind == "notice":
            message = blocks.render_notice(run, str(data.get("text", "")))
        elif kind == "approval":
            posts.append(("approval card", lambda: self.show_approval(run, str(data.get("approval", "")))))
        elif kind == "deploy":
            approval_id = str(data.get("approval", ""))
            posts.append(("approval card", lambda: self.show_approval(run, approval_id)))
            if data.get("state") in ("deployed", "failed"):
                posts.append(("deploy result", lambda: self._post_deploy_result(run, approval_id, data)))
        # eval and checkpoint are shown by the card (loss) and by `/finetune logs`; nothing to post for them.
        if message is not None:
            posts.append((f"{kind} message", lambda: self._post_thread(run, message, broadcast)))
        return posts

    async def _ts(self, run_id: str) -> str:
        """The ts of the run's card, the root of its thread; "" before the card is posted."""
        return await asyncio.to_thread(self.threads.get, threads.RUN_CARD, run_id)

    async def _post_thread(self, run: Run, message: dict[str, Any], broadcast: bool = False) -> None:
        thread_ts = await self._ts(run.id)
        if thread_ts:
            await self.gateway.post_message(run.channel, message, thread_ts=thread_ts, reply_broadcast=broadcast)

    async def _post_outbox(self, lane: _Lane, run: Run) -> None:
        """Post the log excerpts waiting for this run, oldest first; each leaves the outbox once Slack took it."""
        thread_ts = await self._ts(run.id)
        while lane.outbox:
            if not thread_ts:
                lane.outbox.clear()
                return
            await self.gateway.post_message(run.channel, blocks.render_log_excerpt(run, lane.outbox[0]),
                                            thread_ts=thread_ts)
            lane.outbox.popleft()

    async def _upload_chart(self, run: Run, metrics: dict[str, Any]) -> None:
        thread_ts = await self._ts(run.id)
        if not thread_ts:
            return
        png = await asyncio.to_thread(render_loss_curve, (), run.id, metrics=metrics)
        if png is None:
            return  # no loss was logged: no chart rather than an empty one
        await self.gateway.upload_file(run.channel, png, f"{run.id}-loss.png", title=f"{run.id}: loss curve",
                                       thread_ts=thread_ts)

    async def show_card(self, run: Run) -> Run:
        """Post the run's card (first time, recording where) or edit it in place."""
        position = None
        if run.state is RunState.QUEUED:
            position = await asyncio.to_thread(service.queue_position, self.settings, run.id)
        card = blocks.render_run_card(run, position)
        await self._post_or_edit(run.id, run.channel, card, await self._ts(run.id),
                                 lambda ts: self.threads.set(threads.RUN_CARD, run.id, ts))
        self.throttle.last[run.id] = self.clock()
        self.throttle.dirty.discard(run.id)
        return run

    async def _post_or_edit(self, key: str, channel: str, card: dict[str, Any], ts: str,
                            record: Callable[[str], None], thread_ts: str | None = None) -> str | None:
        """Post a card the first time (recording its ts with `record`) or edit it in place; returns the new ts when
        it was posted. Several events often describe the same card (state, then started): an unchanged card is not
        sent again."""
        shown = json.dumps(card, sort_keys=True)
        posted = None
        if ts:
            if self._shown.get(key) != shown:
                await self.gateway.update_message(channel, ts, card, budgeted=True)
        else:
            posted = await self.gateway.post_message(channel, card, thread_ts=thread_ts)
            await asyncio.to_thread(record, posted)
        if len(self._shown) >= SHOWN_CACHE:
            self._shown.clear()
        self._shown[key] = shown
        return posted

    async def show_approval(self, run: Run, approval_id: str) -> None:
        """Post a deploy request's card in the run's thread (first time) or edit it to show the latest decision."""
        approval = await asyncio.to_thread(approvals.get_approval, self.settings, approval_id)
        thread_ts = await self._ts(run.id)
        if approval is None or not thread_ts:
            log.warning("%s: no deploy request %s or no thread to show it in", run.id, approval_id)
            return
        card = blocks.render_approval_card(approval, run)
        card_ts = await asyncio.to_thread(self.threads.get, threads.APPROVAL_CARD, approval.id)
        await self._post_or_edit(approval.id, run.channel, card, card_ts,
                                 lambda ts: self.threads.set(threads.APPROVAL_CARD, approval.id, ts),
                                 thread_ts=thread_ts)

    async def _post_deploy_result(self, run: Run, approval_id: str, data: dict[str, Any]) -> None:
        approval = await asyncio.to_thread(approvals.get_approval, self.settings, approval_id)
        if approval is None:
            return
        # The event's own outcome, whatever the request says by now.
        approval.state = approvals.ApprovalState(data.get("state", approval.state))
        approval.url, approval.api_url = str(data.get("url") or ""), str(data.get("api_url") or "")
        approval.error = str(data.get("error") or "")
        approval.error_hint = dict(data.get("hint") or {})
        await self._post_thread(run, blocks.render_deploy_result(approval, run),
                                broadcast=approval.state is approvals.ApprovalState.FAILED)
