"""`/finetune`: parse, authorize, then hand over to the subcommand's handler, which acks first and works after.

Parse errors, refusals and help are answered in the ack itself (pure and instant); nothing else happens for them.
`list`, `status` and `cost` only read: they answer in the ack too when the store answers in time
(bot.listeners.support.answer_quickly), else on response_url after an empty ack.
"""

from __future__ import annotations

from typing import Any

from bot import blocks, grammar
from bot.auth import authorize
from bot.listeners.commands import (
    cancel,
    cost,
    deploy,
    list_runs,
    logs,
    provision,
    resume,
    run,
    secrets,
    status,
)
from bot.listeners.support import log_refusal
from bot.runtime import runtime_of

HANDLERS = {
    grammar.RunCommand: run.handle,
    grammar.Status: status.handle,
    grammar.ListRuns: list_runs.handle,
    grammar.Logs: logs.handle,
    grammar.Cancel: cancel.handle_cancel,
    grammar.Resume: resume.handle,
    grammar.Deploy: deploy.handle,
    grammar.Undeploy: deploy.handle_undeploy,
    grammar.Deployments: deploy.handle_deployments,
    grammar.Cost: cost.handle,
    grammar.SecretSet: secrets.handle_set,
    grammar.SecretList: secrets.handle_list,
    grammar.Provision: provision.handle,
}


async def finetune_command(ack, command: dict[str, Any], context) -> None:
    rt = runtime_of(context)
    user, channel = command.get("user_id", ""), command.get("channel_id", "")
    parsed = grammar.parse(command.get("text", ""))
    if isinstance(parsed, grammar.ParseError):
        await ack(**rt.gateway.clean(blocks.render_parse_error(parsed)))
        return
    refusal = authorize(parsed, user, channel, rt.settings.policy)
    if refusal is not None:
        log_refusal(f"/finetune {grammar.subcommand_of(parsed)}", user, channel, refusal.reason)
        await ack(**rt.gateway.clean(blocks.render_refusal(refusal.reason)))
        return
    if isinstance(parsed, grammar.Help):
        await ack(**rt.gateway.clean(blocks.render_help(parsed.topic)))
        return
    await HANDLERS[type(parsed)](ack, parsed, command, rt)
