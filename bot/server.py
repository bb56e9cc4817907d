"""Runs the bot: HTTP mode (Bolt's aiohttp adapter on POST /slack/events, plus GET /healthz) or Socket Mode, with the
notifier alongside in the same event loop."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import hmac
import logging
import os
import random
import signal
import time
from urllib.parse import urlencode

import aiohttp
import redis
from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.async_app import AsyncApp
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_sdk.errors import SlackApiError, SlackClientError

from bot import metrics
from bot.app import build_app
from bot.middleware import load_scripts
from bot.notifier import Notifier
from bot.outage import REDIS, UNREACHABLE
from bot.runtime import BotRuntime
from bot.settings import BotSettings
from jobs import backends
from jobs.core import store
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
        # (random, not uuid4: no system call for each request)
        request_id_var.set(f"{request.headers.get('X-Slack-Request-Timestamp', '')}-{random.getrandbits(32):08x}")
        bolt_request = await to_bolt_request(request)
        bolt_response = await app.async_dispatch(bolt_request)
        metrics.observe_ack(bolt_request.body, received)
        return await to_aiohttp_response(bolt_response)

    async def prometheus(request: web.Request) -> web.Response:
        body = await asyncio.to_thread(metrics.render, store_metrics)
        return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})

    async def healthz(request: web.Request) -> web.Response:
        try:
            async with asyncio.timeout(2):
                await runtime.redis.ping()
        except (*UNREACHABLE, TimeoutError) as e:
            REDIS.failed(e, "answering /healthz")
            return web.json_response({"ok": False, "redis": f"unreachable ({type(e).__name__})"}, status=503)
        except Exception as e:  # any other failure to reach Redis means this bot cannot do its work either
            return web.json_response({"ok": False, "redis": f"unreachable ({type(e).__name__})"}, status=503)
        REDIS.ok()
        return web.json_response({"ok": True, "redis": "ok"})

    web_app = web.Application()
    web_app.router.add_post(EVENTS_PATH, slack_events)
    web_app.router.add_get("/healthz", healthz)
    web_app.router.add_get("/metrics", prometheus)

    async def lifecycle(_: web.Application):
        # Before the site listens (aiohttp starts the app first), so that /healthz says ready only when warm.
        await warm_up(app, runtime)
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
        status = getattr(e.response, "status_code", 200)
        if status == 429 or status >= 500:
            # Slack is rate-limiting or failing, which says nothing about the token: a bot restarted during a Slack
            # incident starts (and Bolt's calls retry) rather than exiting with advice to replace a good token.
            log.warning("Slack answered %s to the token check (%s); starting anyway", status,
                        e.response.get("error", "no error code"))
            return
        which = "SLACK_APP_TOKEN" if "apps.connections.open" in str(e) else "SLACK_BOT_TOKEN"
        raise StartupError(f"Slack refused {which} ({e.response.get('error', e.response.status_code)}): copy it "
                           "again from the Slack app's settings (see .env.example), then restart.") from None
    except (SlackClientError, aiohttp.ClientError, OSError) as e:
        # Slack may be briefly unreachable; the bot can still start and Bolt retries on the first request.
        log.warning("could not reach Slack at %s to check the token (%s); starting anyway",
                    settings.slack_api_url, type(e).__name__)


def run_http(settings: BotSettings, host: str = "0.0.0.0", port: int = 3000) -> None:
    """Serve until SIGINT or SIGTERM. Port 0 takes a free port; the log line says which."""
    app, runtime, notifier = make_bot(settings)

    async def main() -> None:
        await preflight(settings, app)
        runner = web.AppRunner(build_web_app(app, runtime, notifier=notifier), access_log=None)
        await runner.setup()  # warms up (see warm_up) before anything listens
        # Everything loaded so far lives as long as the process: keep it out of the collector's full passes, which
        # would otherwise walk every imported module's objects and stall acks by tens of milliseconds now and then.
        gc.collect()
        gc.freeze()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
            bound = runner.addresses[0]
            log.info("tuneops bot listening on http://%s:%d%s", host, bound[1], EVENTS_PATH)
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(main())


# How many async Redis connections the warm-up opens: as many as a burst of 20 commands at once claims.
WARM_CONNECTIONS = 20


async def warm_up(app: AsyncApp, runtime: BotRuntime) -> None:
    """Do now what the first commands would otherwise do while Slack waits for their acks: open pooled Redis
    connections (the async client's and, from the default executor's threads, jobs.core.store's), load the delivery
    claim's Lua scripts, load the backend, and dispatch one signed `/finetune help` through the whole Bolt app
    (its middleware, listener matching, argument injection, our grammar and blocks). Takes a few tens of ms. A Redis
    that is down is noted (/healthz then says 503) and does not stop the start."""
    started = time.perf_counter()
    jobs = runtime.settings.jobs
    try:
        async with asyncio.timeout(5):
            await asyncio.gather(*(runtime.redis.ping() for _ in range(WARM_CONNECTIONS)))
            await load_scripts(runtime.redis)
            threads = min(32, (os.cpu_count() or 1) + 4)  # the default executor's size, as asyncio makes it
            await asyncio.gather(*(asyncio.to_thread(_ping_store, jobs) for _ in range(threads)))
    except (*UNREACHABLE, TimeoutError) as e:
        REDIS.failed(e, "warming up")
    except redis.RedisError as e:  # e.g. a Redis that refuses scripts: the first claims say it again
        log.warning("could not warm up the Redis connections: %s", e)
    try:
        await asyncio.to_thread(backends.get_backend, jobs)
    except Exception as e:  # the first command that needs it says what is wrong, in words
        log.debug("the backend did not load while warming up: %s", e)
    settings = runtime.settings
    # The request as the bot's mode receives one: signed over HTTP, unsigned over Socket Mode's own connection.
    request = _synthetic_command(settings.slack_signing_secret, "help", socket_mode=settings.socket_mode)
    response = await app.async_dispatch(request)
    if response.status != 200:
        log.warning("the warm-up's `/finetune help` was answered %s: %s", response.status, str(response.body)[:200])
    log.info("warmed up in %.0f ms", (time.perf_counter() - started) * 1000)


def _ping_store(settings) -> None:
    store.connect(settings).ping()


def _synthetic_command(signing_secret: str, text: str, *, socket_mode: bool = False) -> AsyncBoltRequest:
    """A slash command as Slack sends one, without a trigger_id (so that it claims no delivery) or a response_url (so
    that nothing can answer it anywhere): signed, or as it comes over Socket Mode."""
    fields = {"command": "/finetune", "text": text, "user_id": "U0WARMUP", "channel_id": "C0WARMUP",
              "team_id": "T0WARMUP", "api_app_id": "A0WARMUP", "response_url": ""}
    if socket_mode:
        return AsyncBoltRequest(body=fields, mode="socket_mode")
    body = urlencode(fields)
    ts = str(int(time.time()))
    signature = "v0=" + hmac.new(signing_secret.encode(), f"v0:{ts}:{body}".encode(), hashlib.sha256).hexdigest()
    return AsyncBoltRequest(body=body, headers={"content-type": "application/x-www-form-urlencoded",
                                                "x-slack-request-timestamp": ts, "x-slack-signature": signature})


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
            await warm_up(app, runtime)
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
