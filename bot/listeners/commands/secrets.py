"""`/finetune secret set NAME` (opens the secret form; the value never travels through a channel) and
`/finetune secret list` (names and dates, never values). Admins only: `bot.auth.authorize` has checked that."""

from __future__ import annotations

import logging
from typing import Any

from slack_sdk.errors import SlackApiError

from bot import blocks, grammar, secretform
from bot.listeners.support import answer, answering_errors, call, needs_aca
from bot.runtime import BotRuntime
from jobs.executor import BackendError

log = logging.getLogger(__name__)


def set_problem(name: str, workspace) -> str | None:
    """Why a form for `name` would be no use here (a name Key Vault cannot take, no vault configured); None when
    it would. Quick: the config is two small files."""
    from jobs.aca.config import load_aca_config
    from jobs.aca.resources import InvalidSecretName, secret_name

    try:
        secret_name(name)
    except InvalidSecretName as e:
        return str(e).replace(repr(name), f"`{blocks.escape(name)}`") + "."
    try:
        cfg = load_aca_config(workspace=workspace)
        cfg.require("Storing secrets", "key_vault_url")
    except BackendError as e:
        return str(e)
    return None


async def handle_set(ack, cmd: grammar.SecretSet, command: dict[str, Any], rt: BotRuntime) -> None:
    if rt.settings.jobs.backend != "aca":
        await ack(**rt.gateway.clean(blocks.render_problem(needs_aca(cmd, rt.settings.jobs.backend))))
        return
    problem = set_problem(cmd.name, rt.settings.jobs.workspace)
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
    if rt.settings.jobs.backend != "aca":
        await ack(**rt.gateway.clean(blocks.render_problem(needs_aca(cmd, rt.settings.jobs.backend))))
        return
    await ack()
    url = command["response_url"]
    async with answering_errors(rt, url, "listing the secrets"):
        from jobs.aca import api

        secrets = await call(api.list_secrets, rt.settings.jobs)
        await answer(rt, url, secretform.render_secret_list(secrets))
