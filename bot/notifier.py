"""The notifier: renders run events from jobs/ into Slack, the run card in the channel and the story in its thread.

It reads the one event stream as a consumer group member and acks an event only after Slack accepted what it
caused, so a bot that crashes mid-way gets the event again. Progress edits of a card are throttled per run; state
changes go out at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field

import aiohttp
import redis
from slack_sdk.errors import SlackApiError, SlackClientError

from bot import blocks, ops
from bot.slack import SlackGateway
from jobs import service, store
from jobs.domain import Run, RunEvent, RunState
from jobs.settings import JobSettings

log = logging.getLogger(__name__)

GROUP = "tuneops-bot"
PROGRESS_INTERVAL_S = 5.0
SHOWN_CACHE = 10_000
# Kinds that change what the card shows (besides "progress", which is throttled).
CARD_KINDS = {"queued", "state", "started", "succeeded", "failed", "cancelled", "timed_out"}
_USER_ID_PREFIXES = ("U", "W")


class Transient(Exception):
    """Slack or Redis could not be reached; the event stays pending and is tried again."""


@dataclass
class _Throttle:
    interval_s: float
    last: dict[str, float] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)

    def due(self, run_id: str, now: float) -> bool:
        return now - self.last.get(run_id, -1e18) >= self.interval_s


class Notifier:
    def __init__(self, settings: JobSettings, gateway: SlackGateway, *, consumer: str = "notifier",
                 progress_interval_s: float = PROGRESS_INTERVAL_S, block_ms: int = 1000,
                 clock=time.monotonic):
        self.settings = settings
        self.gateway = gateway
        self.consumer = consumer
        self.block_ms = block_ms
        self.clock = clock
        self.throttle = _Throttle(progress_interval_s)
        self._shown: dict[str, str] = {}  # run id -> the card last sent to Slack
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> asyncio.Task:
        self._stop.clear()
        self._task = asyncio.create_task(self.run(), name="tuneops-notifier")
        return self._task

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=self.block_ms / 1000 + 5)
            except asyncio.TimeoutError:
                self._task.cancel()
            self._task = None

    async def run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                await self.step()
                backoff = 0.5
            except Transient as e:
                log.warning("notifier: %s; trying again in %.1fs", e, backoff)
                await self._sleep(backoff)
                backoff = min(backoff * 2, 30.0)
            except Exception:
                log.exception("notifier: unexpected error; going on in %.1fs", backoff)
                await self._sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

    async def step(self) -> int:
        """Read one batch, render it, ack what Slack accepted, flush throttled cards; returns events handled."""
        conn = store.connect(self.settings)
        try:
            batch = await asyncio.to_thread(store.read_events, conn, GROUP, self.consumer, 100, self.block_ms)
        except redis.exceptions.ConnectionError as e:
            raise Transient(f"Redis unreachable ({e})") from None
        done = 0
        for entry_id, event in batch:
            # An event that failed transiently stops the batch: later events of the same run must not overtake it.
            await self.handle(event)
            await asyncio.to_thread(store.ack_event, conn, GROUP, entry_id)
            done += 1
        await self.flush()
        return done

    # ---- rendering ----------------------------------------------------------------------------------------------

    async def handle(self, event: RunEvent) -> None:
        """Render one event. Raises Transient when it should be tried again; drops (logs) what never will work."""
        try:
            await self._handle(event)
        except SlackApiError as e:
            # Slack understood and refused (channel_not_found, not_in_channel, invalid_blocks, ...): retrying
            # would refuse again and hold up every later event. Logged with what an admin needs to fix it.
            log.error("Slack refused the %s message of %s: %s", event.kind, event.run_id,
                      e.response.get("error", e.response.status_code))
        except (SlackClientError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise Transient(f"Slack unreachable ({type(e).__name__})") from None
        except redis.exceptions.ConnectionError as e:
            raise Transient(f"Redis unreachable ({e})") from None

    async def _handle(self, event: RunEvent) -> None:
        if ops.is_op_id(event.run_id):  # an Azure operation (pv-0001): its own root message and thread
            await ops.show_op_event(self.settings, self.gateway, event)
            return
        run = await asyncio.to_thread(service.get_run, self.settings, event.run_id)
        if run is None:
            log.warning("event %s for unknown run %s dropped", event.kind, event.run_id)
            return
        kind, data = event.kind, event.data
        if kind == "progress":
            await self.progress(run)
            return
        if kind in CARD_KINDS or not run.card_ts:
            run = await self.show_card(run)
        if not run.thread_ts:
            return
        message = None
        broadcast = False
        if kind == "started":
            message = blocks.render_started(run, str(data.get("execution_id", "")), data.get("links") or {})
        elif kind == "succeeded":
            message = blocks.render_succeeded(run, data.get("metrics") or run.metrics,
                                              str(data.get("adapter") or run.adapter_path))
        elif kind == "failed":
            message = blocks.render_failed(run, str(data.get("error") or run.error), list(data.get("log_tail") or []))
            broadcast = True
        elif kind == "cancelled":
            message = blocks.render_cancelled(run, str(data.get("by") or run.cancelled_by))
        elif kind == "timed_out":
            message = blocks.render_timed_out(run, data.get("checkpoint_step") or run.last_checkpoint_step)
        elif kind == "notice":
            message = blocks.render_notice(run, str(data.get("text", "")))
        # eval, checkpoint and log are shown by the card (loss) and by `/finetune logs`; nothing to post for them.
        if message is not None:
            await self.gateway.post_message(run.channel, message, thread_ts=run.thread_ts, reply_broadcast=broadcast)

    async def show_card(self, run: Run) -> Run:
        """Post the run's card (first time) or edit it in place; returns the run with its thread recorded."""
        position = None
        if run.state is RunState.QUEUED:
            position = await asyncio.to_thread(service.queue_position, self.settings, run.id)
        card = blocks.render_run_card(run, position)
        shown = json.dumps(card, sort_keys=True)
        if run.card_ts:
            # Several events of one batch often describe the same card (state, then started): edit it once.
            if self._shown.get(run.id) != shown:
                await self.gateway.update_message(run.channel, run.card_ts, card)
        else:
            ts = await self.gateway.post_message(run.channel, card)
            await asyncio.to_thread(service.set_thread, self.settings, run.id, run.channel, ts)
            run.thread_ts = run.card_ts = ts
        if len(self._shown) >= SHOWN_CACHE:
            self._shown.clear()
        self._shown[run.id] = shown
        self.throttle.last[run.id] = self.clock()
        self.throttle.dirty.discard(run.id)
        return run

    async def progress(self, run: Run) -> None:
        if not run.card_ts or self.throttle.due(run.id, self.clock()):
            await self.show_card(run)
        else:
            self.throttle.dirty.add(run.id)

    async def flush(self) -> None:
        """Edit the cards whose progress was held back, once their interval has passed."""
        now = self.clock()
        for run_id in sorted(self.throttle.dirty):
            if not self.throttle.due(run_id, now):
                continue
            run = await asyncio.to_thread(service.get_run, self.settings, run_id)
            self.throttle.dirty.discard(run_id)
            if run is None or not run.card_ts:
                continue
            try:
                await self.show_card(run)
            except SlackApiError as e:
                log.error("Slack refused the card edit of %s: %s", run_id, e.response.get("error"))
            except (SlackClientError, aiohttp.ClientError, asyncio.TimeoutError, OSError):
                self.throttle.dirty.add(run_id)  # the next flush tries again
