"""The `tuneops` command line: `bot [--http --port N]`, `worker`, `demo`, `doctor [--smoke]`.

Configuration problems end the command with one line per problem and exit code 2, never a stack trace.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from bot.redact import redactor
from bot.settings import BotSettings
from jobs.core.logs import setup_logging
from jobs.core.settings import JobSettings, SettingsError


def _settings_or_exit(kind: str):
    try:
        if kind == "bot":
            return BotSettings.from_env()
        return JobSettings.from_env()
    except SettingsError as e:
        print(str(e), file=sys.stderr)
        print("See .env.example for every variable; `tuneops doctor` checks them all.", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_bot(args: argparse.Namespace) -> int:
    from bot import (
        server,  # slack-bolt and aiohttp's server load only for `tuneops bot`
    )

    settings = _settings_or_exit("bot")
    if (args.http or not settings.socket_mode) and not settings.slack_signing_secret:
        print("SLACK_SIGNING_SECRET is missing: HTTP mode needs it to check that requests come from Slack (Basic "
              "Information > Signing Secret).", file=sys.stderr)
        return 2
    try:
        if settings.socket_mode and not args.http:
            server.run_socket_mode(settings)
        else:
            server.run_http(settings, host=args.host, port=args.port)
    except server.StartupError as e:
        print(str(e), file=sys.stderr)
        return 2
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    # The worker is the top of jobs/, which the bot does not import: this process becomes `python -m jobs.worker`.
    _settings_or_exit("jobs")  # a bad configuration is said here, in the CLI's words
    argv = [sys.executable, "-m", "jobs.worker"] + (["--burst"] if args.burst else [])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)
    return 0  # not reached


def cmd_demo(args: argparse.Namespace) -> int:
    from bot.demo import (
        main as demo_main,  # the demo trains a model: torch loads only for `tuneops demo`
    )

    return demo_main(max_steps=args.max_steps, keep=args.keep)


def cmd_doctor(args: argparse.Namespace) -> int:
    from bot.doctor import (
        main as doctor_main,  # the Slack client and RQ load only for `tuneops doctor`
    )

    return doctor_main(smoke_check=args.smoke, log_wait_s=args.log_wait)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneops", description="A Slack bot that runs QLoRA fine-tuning for a team.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{bot,worker,demo,doctor}")

    p = sub.add_parser("bot", help="run the Slack bot (Socket Mode when SLACK_APP_TOKEN is set, else HTTP)")
    p.add_argument("--http", action="store_true", help="serve HTTP even when SLACK_APP_TOKEN is set")
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "3000")), help="HTTP port (default 3000)")
    p.add_argument("--host", default="0.0.0.0", help="HTTP address to listen on (default 0.0.0.0)")
    p.set_defaults(func=cmd_bot)

    p = sub.add_parser("worker", help="run an RQ worker (with the scheduler) for the run queue")
    p.add_argument("--burst", action="store_true", help="stop when the queue is empty")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("demo", help="a full run in a local stand-in for Slack: no Slack or Azure account needed")
    p.add_argument("--max-steps", type=int, default=200, help="training steps of the demo run (default 200)")
    p.add_argument("--keep", action="store_true", help="keep the demo workspace folder")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("doctor", help="check the configuration, Redis, Slack and the backend")
    p.add_argument("--smoke", action="store_true",
                   help="instead, run the smoke check: one short CPU execution on Azure that proves the share, the "
                        "Key Vault references, the payload import and the logs (exit code 0 only when it passes)")
    p.add_argument("--log-wait", type=float, default=None, metavar="SECONDS",
                   help="with --smoke: how long to wait for the check's line in Log Analytics, which lags by "
                        "minutes (default 300)")
    p.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    _redact_logs()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


def _redact_logs() -> None:
    """A token leaked into a log line is as bad as one in Slack: every log record goes through the redactor."""
    class RedactingFilter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
                record.exc_info, record.exc_text = None, None
            record.msg, record.args = redactor(text), ()
            return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())


if __name__ == "__main__":
    sys.exit(main())
