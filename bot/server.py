"""Runs the bot: HTTP mode (Bolt's aiohttp adapter on POST /slack/events, plus GET /healthz) or Socket Mode, with the
notifier alongside in the same event loop."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.async_app import AsyncApp

from bot.app import build_app
from bot.notifier import Notifier
from bot.runtime import BotRuntime
from bot.settings import BotSettings

log = logging.getLogger(__name__)

EVENTS_PATH = "/slack/events"


def build_web_app(app: AsyncApp, runtime: BotRuntime, *, notifier: Notifier | None = None) -> web.Application:
    """The aiohttp application: Slack's endpoint and a health check; starts and stops the notifier with itself."""

    async def slack_events(request: web.Request) -> web.Response:
        bolt_response = await app.async_dispatch(await to_bolt_request(request))
        return await to_aiohttp_response(bolt_response)

    async def healthz(request: web.Request) -> web.Response:
        try:
            await asyncio.wait_for(runtime.redis.ping(), timeout=2)
        except Exception as e:  # any failure to reach Redis means this bot cannot do its work
            return web.json_response({"ok": False, "redis": f"unreachable ({type(e).__name__})"}, status=503)
        return web.json_response({"ok": True, "redis": "ok"})

    web_app = web.Application()
    web_app.router.add_post(EVENTS_PATH, slack_events)
    web_app.router.add_get("/healthz", healthz)

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
    notifier = Notifier(settings.jobs, runtime.gateway) if notify else None
    return app, runtime, notifier


def run_http(settings: BotSettings, host: str = "0.0.0.0", port: int = 3000) -> None:
    app, runtime, notifier = make_bot(settings)
    log.info("tuneops bot listening on http://%s:%d%s", host, port, EVENTS_PATH)
    web.run_app(build_web_app(app, runtime, notifier=notifier), host=host, port=port, print=None,
                access_log=None)


def run_socket_mode(settings: BotSettings) -> None:
    from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

    async def main() -> None:
        app, runtime, notifier = make_bot(settings)
        handler = AsyncSocketModeHandler(app, settings.slack_app_token)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        notifier.start()
        await handler.connect_async()
        log.info("tuneops bot connected in Socket Mode")
        try:
            await stop.wait()
        finally:
            await handler.close_async()
            await notifier.stop()
            await runtime.close()

    asyncio.run(main())
