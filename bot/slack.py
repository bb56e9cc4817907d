"""The Slack gateway: the one wrapper every message to Slack goes through.

It redacts secrets from all text and blocks (bot.redact), waits on the per-channel posting budget (bot.ratelimit)
before channel messages (urgent ones ahead of routine ones), and honours a 429's Retry-After. Handlers and the
notifier never call the Web API directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from bot import metrics
from bot.ratelimit import ChannelBudget
from bot.redact import Redactor
from bot.redact import redactor as default_redactor

log = logging.getLogger(__name__)

MAX_RATE_LIMIT_RETRIES = 5


class SlackGateway:
    def __init__(self, client: AsyncWebClient, budget: ChannelBudget | None = None,
                 redactor: Redactor = default_redactor, max_retries: int = MAX_RATE_LIMIT_RETRIES,
                 app_budget: ChannelBudget | None = None):
        self.client = client
        self.budget = budget
        self.app_budget = app_budget  # per-method limits of the whole app (views.publish), keyed by the method
        self.redactor = redactor
        self.max_retries = max_retries
        self._session: aiohttp.ClientSession | None = None  # keep-alive connections for response_url answers

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def clean(self, message: dict[str, Any]) -> dict[str, Any]:
        """The message with every string redacted: for what handlers return in an ack."""
        return self.redactor.redact_obj(message)

    async def _call(self, method: str, channel: str | None, budgeted: bool, /, urgent: bool = True,
                    budget: ChannelBudget | None = None, **kwargs: Any) -> Any:
        """Call `method` with kwargs; `channel` is the one whose posting budget applies when `budgeted`, in the
        urgent or the routine class (bot.ratelimit). `budget`: another budget than the channels' one, where
        `channel` is the key within it."""
        api = getattr(self.client, method)
        budget = budget or self.budget
        for attempt in range(self.max_retries + 1):
            if budgeted and channel and budget is not None:
                await budget.acquire(channel, urgent=urgent)
            metrics.SLACK_CALLS.labels(method).inc()
            try:
                return await api(**kwargs)
            except SlackApiError as e:
                if e.response.status_code == 429:
                    metrics.SLACK_RATE_LIMITED.labels(method).inc()
                if e.response.status_code != 429 or attempt == self.max_retries:
                    raise
                retry_after = _retry_after(e.response.headers)
                log.info("Slack rate-limited %s in %s; waiting %.1fs", method, channel or "-", retry_after)
                if channel and budget is not None:
                    # Every process sharing the budget now holds back from this channel, not just this caller.
                    await budget.penalize(channel, retry_after)
                if not (budgeted and channel and budget is not None):
                    await asyncio.sleep(retry_after)
        raise AssertionError("unreachable")

    async def post_message(self, channel: str, message: dict[str, Any], *, thread_ts: str | None = None,
                           reply_broadcast: bool = False, urgent: bool = True) -> str:
        """Post into a channel (or a thread); returns the message's ts. Routine posts (`urgent=False`: ordinary log
        excerpts) let every urgent one in the channel go first."""
        body = self.clean(message)
        kwargs: dict[str, Any] = {"channel": channel, **body}
        if thread_ts:
            kwargs["thread_ts"] = thread_ts
            if reply_broadcast:
                kwargs["reply_broadcast"] = True
        resp = await self._call("chat_postMessage", channel, True, urgent=urgent, **kwargs)
        return resp["ts"]

    async def update_message(self, channel: str, ts: str, message: dict[str, Any], *, budgeted: bool = False,
                             urgent: bool = True) -> None:
        """Edit a message; `budgeted` edits (the notifier's card updates) wait on the channel's budget too, progress
        edits as routine ones (`urgent=False`)."""
        await self._call("chat_update", channel, budgeted, urgent=urgent, channel=channel, ts=ts,
                         **self.clean(message))

    async def post_ephemeral(self, channel: str, user: str, message: dict[str, Any]) -> None:
        await self._call("chat_postEphemeral", channel, False, channel=channel, user=user, **self.clean(message))

    async def respond(self, response_url: str, message: dict[str, Any], *, replace_original: bool = False) -> bool:
        """Answer through a command's or a button's response_url, privately. False when Slack refused it (logged)."""
        body = {"response_type": "ephemeral", "replace_original": replace_original, **self.clean(message)}
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        resp = await AsyncWebhookClient(response_url, session=self._session).send_dict(body)
        if resp.status_code != 200:
            log.warning("response_url answered %s: %s", resp.status_code, self.redactor(str(resp.body))[:200])
            return False
        return True

    async def open_view(self, trigger_id: str, view: dict[str, Any]) -> str:
        resp = await self._call("views_open", None, False, trigger_id=trigger_id, view=self.clean(view))
        return resp["view"]["id"]

    async def update_view(self, view_id: str, view: dict[str, Any]) -> None:
        await self._call("views_update", None, False, view_id=view_id, view=self.clean(view))

    async def publish_home(self, user: str, view: dict[str, Any], *, urgent: bool = True) -> None:
        """Publish a person's Home tab (views.publish), within the app's Tier 4 budget for the method; a refresh
        nobody waits for is routine (`urgent=False`)."""
        await self._call("views_publish", "views.publish", True, urgent=urgent, budget=self.app_budget,
                         user_id=user, view=self.clean(view))

    async def upload_file(self, channel: str, content: bytes, filename: str, *, title: str = "",
                          thread_ts: str | None = None, initial_comment: str = "") -> str:
        """Share a file in a channel or thread (files.getUploadURLExternal, upload, files.completeUploadExternal)."""
        kwargs: dict[str, Any] = {"channel": channel, "content": content, "filename": filename,
                                  "title": self.redactor(title or filename)}
        if thread_ts:
            kwargs["thread_ts"] = thread_ts
        if initial_comment:
            kwargs["initial_comment"] = self.redactor(initial_comment)
        resp = await self._call("files_upload_v2", channel, True, **kwargs)
        if self.budget is not None:
            # files_upload_v2 makes two Web API calls in one slot: the channel rests one more slot after it.
            await self.budget.penalize(channel, self.budget.interval_s)
        return resp["file"]["id"]

    async def file_info(self, file_id: str) -> dict[str, Any]:
        """files.info's `file` object (scope files:read); SlackApiError when Slack refuses (file_not_found, ...)."""
        resp = await self._call("files_info", None, False, file=file_id)
        return dict(resp["file"])

    async def permalink(self, channel: str, ts: str) -> str:
        resp = await self._call("chat_getPermalink", None, False, channel=channel, message_ts=ts)
        return str(resp["permalink"])

    @contextlib.asynccontextmanager
    async def download(self, url: str) -> AsyncIterator[aiohttp.ClientResponse]:
        """GET a file's url_private_download with the bot token (Slack wants it as `Authorization: Bearer`), as a
        response to stream from. Only for URLs that files.info gave: the token goes with the request."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)  # big files take their time
        async with self._session.get(url, headers={"Authorization": f"Bearer {self.client.token}"},
                                     timeout=timeout) as resp:
            yield resp

    async def auth_test(self) -> dict[str, Any]:
        resp = await self._call("auth_test", None, False)
        return dict(resp.data)


def _retry_after(headers: Any) -> float:
    value = None
    for key in ("Retry-After", "retry-after"):
        if headers and key in headers:
            value = headers[key]
            break
    if isinstance(value, list):
        value = value[0] if value else None
    try:
        return max(float(value), 0.0)
    except (TypeError, ValueError):
        return 1.0
