"""What the listeners share: calling jobs.runs.service off the event loop, private answers, and turning failures into
messages a person can act on (never a stack trace)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from bot import blocks, grammar, words
from bot.outage import REDIS, UNREACHABLE
from bot.runtime import BotRuntime
from jobs import backends
from jobs.backends.protocol import PROVISION, SECRETS
from jobs.core.errors import BackendError, RunRejected

log = logging.getLogger("bot.listeners")
T = TypeVar("T")

# Every fact (runs, the event stream, approvals) lives in Redis: without it the bot can change nothing and say
# nothing true, so it says that, and what an operator looks at, instead of guessing.
STORE_DOWN = ("tuneops cannot reach its store; try again in a minute. Nothing was changed. If it persists, "
              "an operator checks that the Redis at REDIS_URL is running and reachable from the bot (and not out of "
              "memory), then runs `tuneops doctor`.")
OUR_FAULT = ("Something went wrong on tuneops' side ({what}); it is logged. `/finetune list` shows what state the "
             "runs are in; try again, or ask an admin to look at the bot's log.")


def unsupported(rt: BotRuntime, cmd: grammar.Provision | grammar.SecretSet | grammar.SecretList) -> str:
    """Why `provision` and `secret` do nothing on this bot's backend, as the person reads it; "" when they work."""
    capability = PROVISION if isinstance(cmd, grammar.Provision) else SECRETS
    backend = rt.settings.jobs.backend
    if backends.offers(rt.settings.jobs, capability):
        return ""
    if isinstance(cmd, grammar.Provision):
        configs = {"finetune": "infra/finetuning.config.json", "inference": "infra/inference.config.json",
                   "check": "infra/finetuning.config.json",
                   None: "infra/finetuning.config.json and infra/inference.config.json"}[cmd.target]
        need = f"`provision` needs TUNEOPS_BACKEND=aca and {configs} in the workspace"
    else:
        need = (f"`secret` stores values in Azure Key Vault and needs TUNEOPS_BACKEND=aca; with the {backend} backend, "
                "set HF_TOKEN or WANDB_API_KEY in the worker's environment instead")
    return f"{need}. This bot runs the `{backend}` backend."


async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """jobs.runs.service is synchronous (quick Redis calls): run it in a thread so the event loop keeps acking."""
    return await asyncio.to_thread(fn, *args, **kwargs)


def log_refusal(what: str, user: str, channel: str, reason: str) -> None:
    log.warning("refused %s for user %s in channel %s: %s", what, user, channel, reason)


async def answer(rt: BotRuntime, response_url: str, message: dict[str, Any]) -> None:
    await rt.gateway.respond(response_url, message)


@contextlib.asynccontextmanager
async def answering_errors(rt: BotRuntime, response_url: str, what: str) -> AsyncIterator[None]:
    """Whatever goes wrong inside becomes a private answer: a rejection says what to do, our errors are logged. An
    unreachable Redis is logged once per outage (bot.outage), not once per command."""
    try:
        yield
    except (RunRejected, BackendError) as e:  # a BackendError's message says what to do (Azure config, quota, roles)
        await answer(rt, response_url, blocks.render_problem(words.refusal(e)))
    except UNREACHABLE as e:  # Redis is gone (refused, reset) or hangs (the client's socket timeout ran out)
        REDIS.failed(e, what)
        await answer(rt, response_url, blocks.render_problem(STORE_DOWN))
    except Exception:
        log.exception("%s failed", what)
        await answer(rt, response_url, blocks.render_problem(OUR_FAULT.format(what=what)))
    else:
        REDIS.ok()
