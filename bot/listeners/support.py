"""What the listeners share: calling jobs.runs.service off the event loop, private answers (in the ack when they are
ready in time), and turning failures into messages a person can act on (never a stack trace)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from bot import blocks, grammar, slackfiles, words
from bot.home import home_user
from bot.outage import REDIS, UNREACHABLE
from bot.runtime import SOCKET_TIMEOUT_S, BotRuntime
from jobs import backends
from jobs.backends.protocol import PROVISION, SECRETS
from jobs.core.domain import Run
from jobs.core.errors import BackendError, RunRejected
from jobs.deploys import approval
from jobs.runs import service

log = logging.getLogger("bot.listeners")
T = TypeVar("T")

# A read-only command's answer (`list`, `status`) that is ready within this much after the command reached its
# listener goes in the ack itself: no second HTTP request to response_url, for the bot or for Slack. Longer than the
# bot's Redis socket timeout, so that a Redis that hangs is answered in the ack too (STORE_DOWN); a read slower still
# (two calls that each nearly time out) is acked empty then and answered on response_url once ready.
ACK_BUDGET_S = SOCKET_TIMEOUT_S + 0.5

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


async def queue_run(rt: BotRuntime, cmd: grammar.RunCommand, *, user: str, channel: str, request_id: str | None,
                    message_ts: str = "") -> tuple[Run, int | None]:
    """Queue the run `cmd` asks for (fetching its dataset from Slack first when it names a Slack file, from the
    message `message_ts` when known); the run and its place in line. Refusals raise RunRejected."""
    dataset, source = cmd.dataset, ""
    if cmd.dataset_file:
        fetched = await slackfiles.fetch(rt.gateway, rt.settings.jobs.workspace, cmd.dataset_file, channel,
                                         rt.settings.slack_file_max_bytes, message_ts=message_ts)
        dataset, source = fetched.path, fetched.source
    run = await call(service.submit_run, rt.settings.jobs, requester=user, channel=channel, model=cmd.model,
                     dataset=dataset, epochs=cmd.epochs, lr=cmd.lr, max_steps=cmd.max_steps, name=cmd.name,
                     request_id=request_id, dataset_source=source)
    if run.held:  # over a budget: its approval card goes into its thread (idempotent, as the run is)
        await call(approval.request_budget_approval, rt.settings.jobs, run.id)
    return run, await call(service.queue_position, rt.settings.jobs, run.id)


def log_refusal(what: str, user: str, channel: str, reason: str) -> None:
    log.warning("refused %s for user %s in channel %s: %s", what, user, channel, reason)


async def answer(rt: BotRuntime, response_url: str, message: dict[str, Any]) -> None:
    """Answer privately: on response_url, or on the person's Home view for a click there (bot.home.home_address)."""
    user = home_user(response_url)
    if user is not None:
        await rt.home.answer(user, message)
        return
    await rt.gateway.respond(response_url, message)


def problem_answer(error: Exception, what: str) -> dict[str, Any]:
    """The private answer to a failure while doing `what`: a rejection says what to do, our errors are logged. An
    unreachable Redis is logged once per outage (bot.outage), not once per command."""
    if isinstance(error, (RunRejected, BackendError)):  # a BackendError's message says what to do (Azure config, ...)
        return blocks.render_problem(words.refusal(error))
    if isinstance(error, UNREACHABLE):  # Redis is gone (refused, reset) or hangs (the client's socket timeout ran out)
        REDIS.failed(error, what)
        return blocks.render_problem(STORE_DOWN)
    log.error("%s failed", what, exc_info=error)
    return blocks.render_problem(OUR_FAULT.format(what=what))


@contextlib.asynccontextmanager
async def answering_errors(rt: BotRuntime, response_url: str, what: str) -> AsyncIterator[None]:
    """Whatever goes wrong inside becomes a private answer on response_url (see `problem_answer`)."""
    try:
        yield
    except Exception as e:
        await answer(rt, response_url, problem_answer(e, what))
    else:
        REDIS.ok()


async def answer_quickly(ack, rt: BotRuntime, response_url: str, what: str,
                         compose: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    """Answer a read-only command privately with what `compose` makes (it reads the store with the runtime's async
    client and renders), or with `problem_answer` when it raises: in the ack when that is ready within ACK_BUDGET_S,
    else on response_url after an empty ack. `compose` runs once either way, to its end; it only reads."""
    work = asyncio.ensure_future(compose())
    done, _ = await asyncio.wait((work,), timeout=ACK_BUDGET_S)  # waits, never cancels: a late answer is still used
    if done:
        await ack(response_type="ephemeral", **rt.gateway.clean(await _outcome(work, what)))
        return
    await ack()
    await answer(rt, response_url, await _outcome(work, what))


async def _outcome(work: asyncio.Future, what: str) -> dict[str, Any]:
    try:
        message = await work
    except Exception as e:
        return problem_answer(e, what)
    REDIS.ok()
    return message
