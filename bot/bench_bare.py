"""The floor for `python -m bot.bench`: a bare Bolt AsyncApp on aiohttp that checks the signature and acks
`/finetune` with a constant, nothing else. The benchmark runs it beside tuneops' bot, on the same machine and the same
Slack stand-in, so the ratio of the two says what tuneops' own ack path costs.

`python -m bot.bench_bare --port N`, with SLACK_BOT_TOKEN, SLACK_SIGNING_SECRET and SLACK_API_URL in the environment.
"""

from __future__ import annotations

import argparse
import logging
import os

from slack_bolt.async_app import AsyncApp
from slack_sdk.web.async_client import AsyncWebClient


def build(token: str, signing_secret: str, api_url: str) -> AsyncApp:
    app = AsyncApp(signing_secret=signing_secret,
                   client=AsyncWebClient(token=token, base_url=api_url.rstrip("/") + "/"))

    @app.command("/finetune")
    async def ack_constant(ack) -> None:
        await ack("ok")

    return app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bot.bench_bare", description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    app = build(os.environ["SLACK_BOT_TOKEN"], os.environ["SLACK_SIGNING_SECRET"], os.environ["SLACK_API_URL"])
    app.start(port=args.port, path="/slack/events", host=args.host)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
