"""The floor for `python -m bot.bench`: a bare Bolt AsyncApp on aiohttp that checks the signature and acks
`/finetune` with a constant, nothing else. The benchmark runs it beside tuneops' bot, on the same machine and the same
Slack stand-in, so the ratio of the two says what tuneops' own ack path costs.

`python -m bot.bench_bare --port N`, with SLACK_BOT_TOKEN, SLACK_SIGNING_SECRET and SLACK_API_URL in the environment.
Port 0 (the default) takes a free port; a line on stdout says which, as `tuneops bot` logs it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

from aiohttp import web
from slack_bolt.async_app import AsyncApp
from slack_sdk.web.async_client import AsyncWebClient


def build(token: str, signing_secret: str, api_url: str) -> AsyncApp:
    app = AsyncApp(signing_secret=signing_secret,
                   client=AsyncWebClient(token=token, base_url=api_url.rstrip("/") + "/"))

    @app.command("/finetune")
    async def ack_constant(ack) -> None:
        await ack("ok")

    return app


async def serve(app: AsyncApp, host: str, port: int) -> None:
    # Bolt's own aiohttp server (what `app.start()` runs), on a site that can bind port 0 and say which it got.
    runner = web.AppRunner(app.server(port=port, path="/slack/events", host=host).web_app, access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, host, port).start()
        print(f"bare Bolt app listening on http://{host}:{runner.addresses[0][1]}/slack/events", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bot.bench_bare", description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    app = build(os.environ["SLACK_BOT_TOKEN"], os.environ["SLACK_SIGNING_SECRET"], os.environ["SLACK_API_URL"])
    asyncio.run(serve(app, args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
