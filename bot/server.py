"""Runs the bot: HTTP mode (Bolt's aiohttp adapter on POST /slack/events, plus GET /healthz) or Socket Mode, with the
notifier alongside in the same event loop."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
import uuid

import aiohttp
from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.async_app import AsyncApp
from slack_sdk.errors import SlackApiError, SlackClientError

from bot import metrics
from bot.app import build_app
from bot.notifier import Notifier
from bot.runtime import BotRuntime
from bot.settings import BotSettings
from jobs.core.logs import request_id_var

log = logging.getLogger(__name__)

EVENTS_PATH = "/slack/events"


def build_web_app(app: AsyncApp, runtime: BotRuntime, *, notifier: Notifier | None = None) -> web.Application:
    """The aiohttp application: Slack's endpoint, a health check and the Prometheus metrics; starts and stops the
    notifier with itself."""
    store_metrics = metrics.store_registry(runtime.settings.jobs)

    async def slack_events(request: web.Request) -> web.Response:
        received = time.perf_counter()
        # Each log line of this request (and of the tasks it starts) carries this id (TUNEOPS_LOG_FORMAT=json).
        request_id_var.set(request.headers.get("X-Slack-Request-Timestamp", "") + "-" + uuid.uuid4().hex[:8])
        bolt_request = await to_bolt_request(request)
        bolt_response = await app.async_dispatch(bolt_request)
        metrics.observe_ack(bolt_request.raw_body, received)
        return await to_aiohttp_response(bolt_response)

    async def prometheus(request: web.Request) -> web.Response:
        body = await asyncio.to_thread(metrics.render, store_metrics)
        return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})

    async def healthz(request: web.Request) -> web.Response:
        try:
            await asyncio.wait_for(runtime.redis.ping(), timeout=2)
        except Exception as e:  # any failure to reach Redis means this bot cannot do its work
            return web.json_response({"ok": False, "redis": f"unreachable ({type(e).__name__})"}, status=503)
        return web.json_response({"ok": True, "redis": "ok"})

    web_app = web.Application()
    web_app.router.add_post(EVENTS_PATH, slack_events)
    web_app.router.add_get("/healthz", healthz)
    web_app.router.add_get("/metrics", prometheus)

    async def lifecycle(_: web.Application):
        if notifier is not None:
            notifier.start()
        yield
        if notifier is not None:
            await notifier.stop()
        await runtime.close()

    web_app.cleanup_ctx.append(lifecycle)
    return web_app


def make_bot(settings: BotSettings, *, notify: bool = True) -> tuple[AsyncApp, BotRuntime, Notifier | None]:
    app, runtime = build_app(settings)
    notifier = Notifier(settings.jobs, runtime.gateway, log_interval_s=settings.log_interval_s) if notify else None
    return app, runtime, notifier


class StartupError(Exception):
    """Slack refused a token at start: the message says which and what to do."""


async def preflight(settings: BotSettings, app: AsyncApp) -> None:
    """Check the tokens once at start, so that a wrong one ends the bot with a clear message instead of retries."""
    try:
        await app.client.auth_test()
        if settings.socket_mode:
            await app.client.apps_connections_open(app_token=settings.slack_app_token)
    except SlackApiError as e:
        which = "SLACK_APP_TOKEN" if "apps.connections.open" in str(e) else "SLACK_BOT_TOKEN"
        raise StartupError(f"Slack refused {which} ({e.response.get('error', e.response.status_code)}): copy it "
                           "again from the Slack app's settings (see .env.example), then restart.") from None
    except (SlackClientError, aiohttp.ClientError, OSError) as e:
        # Slack may be briefly unreachable; the bot can still start and Bolt retries on the first request.
        log.warning("could not reach Slack at %s to check the token (%s); starting anyway",
                    settings.slack_api_url, type(e).__name__)


def run_http(settings: BotSettings, host: str = "0.0.0.0", port: int = 3000) -> None:
    app, runtime, notifier = make_bot(settings)
    asyncio.run(preflight(settings, app))
    log.info("tuneops bot listening on http://%s:%d%s", host, port, EVENTS_PATH)
    # Everything loaded so far lives as long as the process: keep it out of the collector's full passes, which
    # would otherwise walk every imported module's objects and stall acks by tens of milliseconds now and then.
    gc.collect()
    gc.freeze()
    web.run_app(build_web_app(app, runtime, notifier=notifier), host=host, port=port, print=None,
                access_log=None)


def run_socket_mode(settings: BotSettings) -> None:
    # Socket Mode's client loads only for a bot that uses it
    from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

    async def main() -> None:
        app, runtime, notifier = make_bot(settings)
        handler = AsyncSocketModeHandler(app, settings.slack_app_token)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await preflight(settings, app)
            notifier.start()
            # connect_async retries by itself while Slack is unreachable; a stop must not wait for it.
            connecting = asyncio.create_task(handler.connect_async())
            await stop.wait()
            connecting.cancel()
        finally:
            await handler.close_async()
            await notifier.stop()
            await runtime.close()

    asyncio.run(main())
