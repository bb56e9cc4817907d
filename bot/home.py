"""The Home tab: each person's view of tuneops, read from the store and published with views.publish when they open
it (app_home_opened) and, while runs change, again at most every TUNEOPS_HOME_REFRESH seconds.

Changes are noticed on the run event stream's newest entry, so every bot process sees them whichever process owns
the run; a per-person throttle key in Redis keeps all processes together to one refresh per interval, and a view
that shows nothing new is not published again. A click on the Home tab has no response_url: its answer is shown on
the person's Home view instead (`home_address`, used by bot.listeners.support.answer).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import redis.asyncio as aioredis
from slack_sdk.errors import SlackApiError

from bot.auth import check_person
from bot.home_view import HomeContent, MonthSpend, render_home, view_digest
from bot.outage import REDIS, UNREACHABLE
from bot.settings import BotSettings
from bot.slack import SlackGateway
from jobs.core import store
from jobs.core.domain import Run
from jobs.core.errors import BackendError
from jobs.core.settings import JobSettings
from jobs.deploys import approval, deploy
from jobs.runs import costs

log = logging.getLogger(__name__)

VIEWER_TTL_S = 8 * 3600   # a Home opened longer ago than this is refreshed again only when it is opened again
NOTICE_TTL_S = 300        # how long the answer to a click stays on the Home view
RECENT_RUNS = 200         # the newest runs read for "your runs" and the month's GPU time
TICK_S = 1.0              # how often the refresher looks for changes
# What is deployed is read from the servers' records (on the share with ACA): once for all the Home views published
# within this many seconds, not once for each.
DEPLOYED_TTL_S = 10.0
HOME_ADDRESS = "home:"    # where answers to a Home tab click go, in place of a response_url


def home_address(user: str) -> str:
    """The reply address of a click on `user`'s Home tab."""
    return HOME_ADDRESS + user


def home_user(address: str) -> str | None:
    """The person whose Home tab `address` (a response_url or a `home_address`) names; None for a response_url."""
    return address[len(HOME_ADDRESS):] if address.startswith(HOME_ADDRESS) else None


def month_spend(settings: JobSettings, now: float) -> MonthSpend:
    """This calendar month's spend as `/finetune cost` counts it (jobs.runs.costs: the runs' actual GPU time and the
    inference endpoints' replicas), against TUNEOPS_MONTHLY_BUDGET_USD."""
    report = costs.month_report(settings, now)
    return MonthSpend(gpu_s=report.total_gpu_s, usd=report.total_usd, budget_usd=report.monthly_budget_usd)


class HomeTab:
    """One bot process's Home tab publisher: `opened(user)` on app_home_opened, `answer(user, message)` for a click's
    answer; the refresher starts with the first opening and stops with `stop()`."""

    def __init__(self, settings: BotSettings, redis: aioredis.Redis, gateway: SlackGateway, tick_s: float = TICK_S):
        self.settings = settings
        self.redis = redis
        self.gateway = gateway
        self.tick_s = tick_s
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._seen: str | None = None     # the newest run event when the viewers were last marked behind
        self._behind: set[str] = set()    # viewers whose Home misses a change
        self._deployed: tuple[float, list[deploy.Deployment] | None] | None = None   # (when read, what)

    # ---- what a Home view shows ------------------------------------------------------------------------------------

    async def content(self, user: str) -> HomeContent:
        refusal = check_person(user, self.settings.policy)
        if refusal is not None:
            return HomeContent(user=user, refusal=refusal.reason)
        r = self.redis
        async with r.pipeline(transaction=False) as pipe:
            pipe.zrevrange(store.ALL_RUNS, 0, RECENT_RUNS - 1)
            pipe.zrange(store.QUEUED, 0, -1)
            pipe.smembers(store.ACTIVE)
            pipe.hgetall(store.HOME_KEY.format(user))
            recent_ids, queued_ids, active_ids, kept = await pipe.execute()
        wanted = list(dict.fromkeys([*recent_ids, *queued_ids, *active_ids]))
        raws = await r.mget([store.run_key(i) for i in wanted]) if wanted else []
        runs = {run.id: run for run in (Run.from_dict(json.loads(raw)) for raw in raws if raw)}
        approver = user in self.settings.policy.approvers
        now = time.time()
        requests, deployed, spend = await asyncio.gather(
            asyncio.to_thread(approval.pending_requests, self.settings.jobs) if approver else _nothing(),
            self._deployments(), asyncio.to_thread(month_spend, self.settings.jobs, now))
        notice = kept.get("notice", "") if float(kept.get("notice_until") or 0) > now else ""
        return HomeContent(
            user=user,
            mine=[runs[i] for i in recent_ids if i in runs and runs[i].requester == user],
            queued=[(n, runs[i]) for n, i in enumerate(queued_ids, 1) if i in runs],
            running=sorted((runs[i] for i in active_ids if i in runs),
                           key=lambda run: run.started_at or run.created_at),
            # A request the person made themselves waits for another approver (four eyes), not for them.
            requests=[(a, run) for a, run in requests if a.requested_by != user] if approver else None,
            deployed=deployed,
            spend=spend,
            notice=notice,
            updated_at=now,
        )

    async def _deployments(self) -> list[deploy.Deployment] | None:
        if self._deployed is None or time.monotonic() - self._deployed[0] > DEPLOYED_TTL_S:
            self._deployed = (time.monotonic(), await asyncio.to_thread(_deployed, self.settings.jobs))
        return self._deployed[1]

    # ---- publishing ------------------------------------------------------------------------------------------------

    async def publish(self, user: str, *, urgent: bool = True) -> bool:
        """Publish `user`'s Home view now; a routine refresh (`urgent=False`) only when it shows something new.
        True when it was published."""
        view = render_home(await self.content(user))
        digest = view_digest(view)
        key = store.HOME_KEY.format(user)
        if not urgent and await self.redis.hget(key, "digest") == digest:
            return False
        # Any publish starts the interval before the next refresh, in every process.
        await self.redis.set(store.HOME_NEXT.format(user), "1", px=int(self.settings.home_refresh_s * 1000))
        await self.gateway.publish_home(user, view, urgent=urgent)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, "digest", digest)
            pipe.expire(key, VIEWER_TTL_S)
            await pipe.execute()
        return True

    async def opened(self, user: str) -> None:
        """`user` opened the Home tab: show it now, and keep it fresh while they may be looking."""
        await self.redis.zadd(store.HOME_VIEWERS, {user: time.time()})
        self.start()
        await self.publish(user)

    async def answer(self, user: str, message: dict[str, Any]) -> None:
        """Show the answer to `user`'s click on the Home tab at the top of their Home view, with what it changed."""
        key = store.HOME_KEY.format(user)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping={"notice": message.get("text", ""), "notice_until": time.time() + NOTICE_TTL_S})
            pipe.expire(key, VIEWER_TTL_S)
            await pipe.execute()
        await self.publish(user)

    # ---- refreshing ------------------------------------------------------------------------------------------------

    def start(self) -> None:
        if not self._stopping and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._refresher(), name="home-refresher")

    async def stop(self) -> None:
        # The flag as well as the cancel: a client that turns a cancellation into an error of its own (a Redis
        # connection closed mid-read) would otherwise leave the loop running.
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _refresher(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.tick_s)
            try:
                await self.refresh()
            except UNREACHABLE as e:
                REDIS.failed(e, "refreshing Home tabs")
            except SlackApiError as e:
                log.warning("views.publish refused a Home tab refresh: %s", e.response.get("error"))
            except Exception:
                log.exception("refreshing Home tabs failed")

    async def refresh(self) -> list[str]:
        """One look: when runs changed since the last look, every recent viewer's Home is behind; each one behind
        whose interval is over is published again (if it shows something new). Returns those published."""
        now = time.time()
        newest = await self.redis.xrevrange(store.EVENT_STREAM, count=1)
        mark = newest[0][0] if newest else ""
        if mark != self._seen:
            self._seen = mark
            await self.redis.zremrangebyscore(store.HOME_VIEWERS, "-inf", now - VIEWER_TTL_S)
            self._behind |= set(await self.redis.zrangebyscore(store.HOME_VIEWERS, now - VIEWER_TTL_S, "+inf"))
        published = []
        for user in sorted(self._behind):
            claimed = await self.redis.set(store.HOME_NEXT.format(user), "1", nx=True,
                                           px=int(self.settings.home_refresh_s * 1000))
            if not claimed:
                continue  # published less than an interval ago (here or by another process): on a later look
            self._behind.discard(user)
            if await self.publish(user, urgent=False):
                published.append(user)
        return published


async def _nothing() -> None:
    return None


def _deployed(settings: JobSettings) -> list[deploy.Deployment] | None:
    """What is live; None when the backend cannot say now (its configuration, Azure): the Home view says so."""
    try:
        return deploy.deployments(settings)
    except BackendError as e:
        log.warning("reading the deployments for a Home tab: %s", e.reason)
        return None
