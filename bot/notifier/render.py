"""Rendering: what a lane's item makes Slack do (the run card, log excerpts, a run's thread messages, deploy
requests), as the list of calls to make in order. The calls themselves are the Poster's."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from bot import blocks, ops
from bot.logbatch import omitted_marker
from bot.notifier.lanes import Post, _Item, _Lane, _Throttle
from bot.slack import SlackGateway
from bot.threads import Threads
from jobs.core.domain import Run, RunEvent
from jobs.core.settings import JobSettings
from jobs.runs import service

log = logging.getLogger("bot.notifier")  # one name for the whole notifier, whichever part logs

# Kinds that change what the card shows (besides "progress", which is throttled).
CARD_KINDS = {"queued", "state", "started", "succeeded", "failed", "cancelled", "timed_out"}
ENDED_KINDS = {"succeeded", "failed", "cancelled", "timed_out"}


class Renderer:
    """The rendering part of the Notifier. An item is rendered once, since rendering feeds the run's LogBatcher and
    outbox; after a transient failure the lane retries only the calls not yet made."""

    # Set by Notifier.__init__.
    settings: JobSettings
    gateway: SlackGateway
    threads: Threads
    clock: Callable[[], float]
    throttle: _Throttle
    # Provided by the Poster mixin (annotations only, so they do not shadow it in the MRO).
    _ts: Callable[[str], Awaitable[str]]
    _post_thread: Callable[..., Awaitable[None]]
    _post_outbox: Callable[[_Lane, Run], Awaitable[None]]
    _upload_chart: Callable[[Run, dict[str, Any]], Awaitable[None]]
    show_card: Callable[..., Awaitable[Run]]
    show_approval: Callable[[Run, str], Awaitable[None]]
    _post_deploy_result: Callable[[Run, str, dict[str, Any]], Awaitable[None]]

    async def _get_run(self, run_id: str) -> Run | None:
        return await asyncio.to_thread(service.get_run, self.settings, run_id)

    async def _lane_run(self, lane: _Lane) -> Run | None:
        """The lane's run, remembering its channel: the lane waits on that channel's turn before its next excerpt."""
        run = await self._get_run(lane.key)
        if run is not None:
            lane.channel = run.channel
        return run

    @staticmethod
    def _to_outbox(lane: _Lane, messages: list[str], urgent: bool) -> None:
        """Queue excerpts to post; with error lines among what went in, the outbox is posted as urgent."""
        if messages:
            lane.outbox.extend(messages)
            lane.outbox_urgent = lane.outbox_urgent or urgent

    def _card_later(self, lane: _Lane, run: Run, now: float) -> None:
        """A progress edit of the card: queued as a routine item of its own once its throttle allows (else left for
        the tick); it steps aside for the lane's other work (bot.notifier.lanes) and shows the latest numbers."""
        self.throttle.dirty.add(run.id)
        if self.throttle.due(run.id, now) and not lane.card_queued:
            lane.card_queued = True
            lane.items.append(_Item("card"))

    async def _render(self, lane: _Lane, item: _Item) -> list[tuple[str, Post]]:
        """What an item makes Slack do, as calls to make in order. Runs once per item; the calls are retried."""
        now = self.clock()
        if item.absorbed and item.quiet:
            return await self._render_quiet(lane, item, now)
        if item.kind == "flush":
            urgent = item.force or lane.batcher.has_errors
            self._to_outbox(lane, lane.batcher.flush(now, force=item.force), urgent)
            run = await self._lane_run(lane) if lane.outbox else None
            return [("log excerpt", lambda: self._post_outbox(lane, run))] if run else self._drop_outbox(lane)
        if item.kind == "card":
            self.throttle.dirty.discard(lane.key)
            run = await self._lane_run(lane)
            return [("card", lambda: self.show_card(run, urgent=False))] if run and await self._ts(run.id) else []
        assert item.event is not None
        return await self._render_event(lane, item, item.event, now)

    def _feed_absorbed(self, lane: _Lane, item: _Item, now: float, quiet: tuple[_Item, ...] = ()) -> bool:
        """Put the log lines of `quiet` and of the items `item` absorbed through the batcher, its excerpts in the
        outbox; True when progress was among them."""
        lines: list[str] = []
        progress = False
        urgent = lane.batcher.has_errors or any(it.urgent(lane.batcher) for it in (*quiet, *item.absorbed))
        for it in (*quiet, *item.absorbed):
            if it.kind == "event" and it.event.kind == "log":
                data = it.event.data
                if data.get("skipped"):
                    lines.append(omitted_marker(int(data["skipped"])))
                lines += [str(line) for line in data.get("lines") or []]
            elif it.kind == "event":
                progress = True
        self._to_outbox(lane, lane.batcher.feed(lines, now) if lines else lane.batcher.flush(now), urgent)
        item.hold = lane.batcher.pending > 0
        return progress

    async def _render_quiet(self, lane: _Lane, item: _Item, now: float) -> list[tuple[str, Post]]:
        """Log lines and progress of several items at once: the lines go through the batcher together, the card is
        edited once."""
        run = await self._lane_run(lane)
        if run is None:
            log.warning("events for unknown run %s dropped", lane.key)
            return []
        progress = self._feed_absorbed(lane, item, now, quiet=(item,))
        posts: list[tuple[str, Post]] = []
        if lane.outbox:
            posts.append(("log excerpt", lambda: self._post_outbox(lane, run)))
        if progress:
            if not await self._ts(run.id):
                posts.append(("card", lambda: self.show_card(run)))
            else:
                self._card_later(lane, run, now)
        return posts

    def _drop_outbox(self, lane: _Lane) -> list[tuple[str, Post]]:
        lane.outbox.clear()
        return []

    async def _render_event(self, lane: _Lane, item: _Item, event: RunEvent, now: float) -> list[tuple[str, Post]]:
        if ops.is_op_id(event.run_id):  # an Azure operation (pv-0001): its own root message and thread
            return [(f"{event.kind} message", lambda: ops.show_op_event(self.settings, self.gateway, self.threads,
                                                                        event))]
        run = await self._lane_run(lane)
        if run is None:
            log.warning("event %s for unknown run %s dropped", event.kind, event.run_id)
            return []
        kind, data = event.kind, event.data
        posts: list[tuple[str, Post]] = []
        shown = await self._ts(run.id)
        if kind == "progress":
            if not shown:
                posts.append(("card", lambda: self.show_card(run)))
            else:
                self._card_later(lane, run, now)
            return posts
        if kind == "log":
            lines = [str(line) for line in data.get("lines") or []]
            if data.get("skipped"):
                lines.insert(0, omitted_marker(int(data["skipped"])))
            urgent = lane.batcher.has_errors or item.urgent(lane.batcher)
            self._to_outbox(lane, lane.batcher.feed(lines, now), urgent)
            item.hold = lane.batcher.pending > 0
            if lane.outbox:
                posts.append(("log excerpt", lambda: self._post_outbox(lane, run)))
            return posts
        if kind in CARD_KINDS or not shown:  # a change of state is shown at once and urgently, unlike progress
            posts.append(("card", lambda: self.show_card(run)))
        if kind in ENDED_KINDS:
            # The last lines of the run go before the message that ends its story, as urgently.
            self._to_outbox(lane, lane.batcher.flush(now, force=True), True)
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
        elif kind == "overrun":
            message = blocks.render_overrun(run, data)
        elif kind == "approval":
            posts.append(("approval card", lambda: self.show_approval(run, str(data.get("approval", "")))))
        elif kind == "deploy":
            approval_id = str(data.get("approval", ""))
            posts.append(("approval card", lambda: self.show_approval(run, approval_id)))
            if data.get("state") in ("deployed", "failed", "undeployed"):
                posts.append(("deploy result", lambda: self._post_deploy_result(run, approval_id, data)))
        # eval and checkpoint are shown by the card (loss) and by `/finetune logs`; nothing to post for them.
        if message is not None and item.absorbed:
            # Log lines that waited behind the message (bot.notifier.lanes.JOINABLE_KINDS) go out with it.
            if self._feed_absorbed(lane, item, now):
                self._card_later(lane, run, now)
            posts.append((f"{kind} message", lambda: self._post_outbox(lane, run, lead=message)))
            posts.append(("log excerpt", lambda: self._post_outbox(lane, run)))
        elif message is not None:
            posts.append((f"{kind} message", lambda: self._post_thread(run, message, broadcast)))
        return posts
