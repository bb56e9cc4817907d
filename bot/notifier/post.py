"""Posting: the calls to Slack that rendering asked for (thread messages, log excerpts, the loss chart, run and
approval cards posted once and then edited), and which Slack errors make a lane try again."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError, SlackClientError

from bot import blocks, threads
from bot.charts import render_loss_curve
from bot.notifier.lanes import REDIS_DOWN, Post, Transient, _Lane, _Throttle
from bot.slack import SlackGateway
from bot.threads import Threads
from jobs.core.domain import Run, RunState
from jobs.core.settings import JobSettings
from jobs.deploys import approval as approvals
from jobs.runs import service

log = logging.getLogger("bot.notifier")  # one name for the whole notifier, whichever part logs

# Cards remembered as last sent (to skip unchanged edits); the memory is cleared whole when it reaches this size.
SHOWN_CACHE = 10_000
# Log excerpts (one section each, bot.logbatch) posted together in one message: a busy channel gives a thread one post
# a turn, and error lines that need several sections (a backlog, long tracebacks) then take one turn, not several.
# Slack allows 50 blocks and 40,000 characters of text a message; three sections of 3,000 stay far below.
EXCERPTS_PER_MESSAGE = 3


class Poster:
    """The posting part of the Notifier: each method is one step a lane makes and, after a transient failure, makes
    again; so each is safe to repeat (a card already posted is edited, an excerpt leaves the outbox once sent)."""

    # Set by Notifier.__init__.
    settings: JobSettings
    gateway: SlackGateway
    threads: Threads
    clock: Callable[[], float]
    throttle: _Throttle
    _shown: dict[str, str]

    async def _send(self, key: str, what: str, post: Post) -> None:
        """One call to Slack. Refusals are logged and skipped (trying again would be refused again and hold up the
        thread); a rate limit that outlasted the gateway's retries, Slack's servers failing (5xx: slack_sdk's own
        ServerErrorRetryHandler retries those too) or no connection is tried again."""
        try:
            await post()
        except SlackApiError as e:
            status = e.response.status_code
            if status == 429:
                raise Transient(f"Slack kept rate-limiting {what}") from None
            if status >= 500:
                raise Transient(f"Slack answered {status} to {what} "
                                f"({e.response.get('error', 'no error code')})") from None
            log.error("Slack refused the %s of %s: %s", what, key, e.response.get("error", e.response.status_code))
        except (SlackClientError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise Transient(f"Slack unreachable ({type(e).__name__})") from None
        except REDIS_DOWN as e:
            raise Transient(f"Redis unreachable ({e})") from None

    async def _ts(self, run_id: str) -> str:
        """The ts of the run's card, the root of its thread; "" before the card is posted."""
        return await asyncio.to_thread(self.threads.get, threads.RUN_CARD, run_id)

    async def _post_thread(self, run: Run, message: dict[str, Any], broadcast: bool = False) -> None:
        thread_ts = await self._ts(run.id)
        if thread_ts:
            await self.gateway.post_message(run.channel, message, thread_ts=thread_ts, reply_broadcast=broadcast)

    async def _post_outbox(self, lane: _Lane, run: Run, lead: dict[str, Any] | None = None) -> None:
        """Post the log excerpts waiting for this run, oldest first; each leaves the outbox once Slack took it. With
        `lead` (a thread message), only that message and the first excerpts, in one post.

        Excerpts with error lines, or ahead of the lane's urgent work, are urgent posts; ordinary ones are routine
        (bot.ratelimit), so they never hold up another run's errors.
        """
        thread_ts = await self._ts(run.id)
        if not thread_ts:
            lane.outbox.clear()
        while lane.outbox or lead is not None:
            if not thread_ts:
                return
            n = min(len(lane.outbox), EXCERPTS_PER_MESSAGE)
            if lead is not None:
                message, first = {**lead, "blocks": list(lead["blocks"])}, 0
            else:
                message, first = blocks.render_log_excerpt(run, lane.outbox[0]), 1
            for excerpt in list(lane.outbox)[first:n]:
                message["blocks"] += blocks.render_log_excerpt(run, excerpt)["blocks"]
            await self.gateway.post_message(run.channel, message, thread_ts=thread_ts,
                                            urgent=lead is not None or lane.outbox_urgent or lane.urgent())
            for _ in range(n):
                lane.outbox.popleft()
            if lead is not None:
                return
        lane.outbox_urgent = False

    async def _upload_chart(self, run: Run, metrics: dict[str, Any]) -> None:
        thread_ts = await self._ts(run.id)
        if not thread_ts:
            return
        png = await asyncio.to_thread(render_loss_curve, (), run.id, metrics=metrics)
        if png is None:
            return  # no loss was logged: no chart rather than an empty one
        await self.gateway.upload_file(run.channel, png, f"{run.id}-loss.png", title=f"{run.id}: loss curve",
                                       thread_ts=thread_ts)

    async def show_card(self, run: Run, urgent: bool = True) -> Run:
        """Post the run's card (first time, recording where) or edit it in place; progress edits are routine
        (`urgent=False`), a change of state is not."""
        position = None
        if run.state is RunState.QUEUED:
            position = await asyncio.to_thread(service.queue_position, self.settings, run.id)
        card = blocks.render_run_card(run, position)
        await self._post_or_edit(run.id, run.channel, card, await self._ts(run.id),
                                 lambda ts: self.threads.set(threads.RUN_CARD, run.id, ts), urgent=urgent)
        self.throttle.last[run.id] = self.clock()
        self.throttle.dirty.discard(run.id)
        return run

    async def _post_or_edit(self, key: str, channel: str, card: dict[str, Any], ts: str,
                            record: Callable[[str], None], thread_ts: str | None = None,
                            urgent: bool = True) -> str | None:
        """Post a card the first time (recording its ts with `record`) or edit it in place; returns the new ts when
        it was posted. Several events often describe the same card (state, then started): an unchanged card is not
        sent again."""
        shown = json.dumps(card, sort_keys=True)
        posted = None
        if ts:
            if self._shown.get(key) != shown:
                await self.gateway.update_message(channel, ts, card, budgeted=True, urgent=urgent)
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
        approval.undeployed_by = str(data.get("by") or approval.undeployed_by)
        await self._post_thread(run, blocks.render_deploy_result(approval, run),
                                broadcast=approval.state is approvals.ApprovalState.FAILED)
