"""`/finetune secret set NAME` (opens the secret form; the value never travels through a channel) and
`/finetune secret list` (names and dates, never values). Admins only: `bot.auth.authorize` has checked that."""

from __future__ import annotations

import logging
from typing import Any

from slack_sdk.errors import SlackApiError

from bot import blocks, grammar, secretform, words
from bot.listeners.support import answer, answering_errors, call, unsupported
from bot.runtime import BotRuntime
from jobs.backends import get_backend
from jobs.core.errors import BackendError

log = logging.getLogger(__name__)


def set_problem(name: str, settings) -> str | None:
    """Why a form for `name` would be no use here (a name the secret store cannot take, no store configured); None
    when it would. Quick: the config is two small files."""
    try:
        get_backend(settings).check_secret_name(name)
    except BackendError as e:
        return words.refusal(e).replace(repr(name), f"`{blocks.escape(name)}`")
    return None


async def handle_set(ack, cmd: grammar.SecretSet, command: dict[str, Any], rt: BotRuntime) -> None:
    why_not = unsupported(rt, cmd)
    if why_not:
        await ack(**rt.gateway.clean(blocks.render_problem(why_not)))
        return
    problem = set_problem(cmd.name, rt.settings.jobs)
    if problem:
        await ack(**rt.gateway.clean(blocks.render_problem(problem)))
        return
    await ack()
    # The trigger_id is good for 3 seconds: the form is opened right after the ack, before anything else.
    try:
        await rt.gateway.open_view(command.get("trigger_id", ""), secretform.secret_modal(cmd.name,
                                                                                           command["channel_id"]))
    except SlackApiError as e:
        log.warning("views.open for the secret form failed: %s", e.response.get("error"))
        await answer(rt, command["response_url"], blocks.render_problem(
            f"Slack did not open the form ({e.response.get('error', 'error')}). Run `/finetune secret set "
            f"{cmd.name}` again; the form must open within 3 seconds of the command."))


async def handle_list(ack, cmd: grammar.SecretList, command: dict[str, Any], rt: BotRuntime) -> None:
    why_not = unsupported(rt, cmd)
    if why_not:
        await ack(**rt.gateway.clean(blocks.render_problem(why_not)))
        return
    await ack()
    url = command["response_url"]
    async with answering_errors(rt, url, "listing the secrets"):
        secrets = await call(lambda: get_backend(rt.settings.jobs).list_secrets())
        await answer(rt, url, secretform.render_secret_list(secrets))
