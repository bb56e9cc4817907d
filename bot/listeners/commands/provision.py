"""`/finetune provision [finetune|inference|check]` (admins only): queue the provisioning, or the smoke check of the
set-up (`check`: one short CPU execution that proves the share, the secrets, the payload and the logs), as Azure
operations; each op's steps and result go into a thread of its own in this channel (bot.ops), and this answer says
which ops they are."""

from __future__ import annotations

from typing import Any

from bot import blocks, grammar
from bot.listeners.support import answer, answering_errors, call, unsupported
from bot.ops import describe_op
from bot.runtime import BotRuntime
from jobs.backends import get_backend


def _queue(settings, target: str | None, user: str, channel: str) -> tuple[list[str], list[str], str]:
    backend = get_backend(settings)  # a missing or broken config is said now, not in a thread
    kinds, note = backend.provision_targets(target)
    return kinds, [backend.enqueue_provision(kind, user, channel) for kind in kinds], note


async def handle(ack, cmd: grammar.Provision, command: dict[str, Any], rt: BotRuntime) -> None:
    why_not = unsupported(rt, cmd)
    if why_not:
        await ack(**rt.gateway.clean(blocks.render_problem(why_not)))
        return
    await ack()
    url, user, channel = command["response_url"], command["user_id"], command["channel_id"]
    async with answering_errors(rt, url, "queueing the provisioning"):
        kinds, op_ids, note = await call(_queue, rt.settings.jobs, cmd.target, user, channel)
        lines = [f"• *{op_id}*: {describe_op(kind)}" for kind, op_id in zip(kinds, op_ids)]
        text = (":inbox_tray: Queued:\n" + "\n".join(lines) + "\nEach one's steps and result go into its own "
                "thread in this channel; a second provisioning of the same resource waits for the first.")
        body = [blocks.section(text)] + ([blocks.context(blocks.escape(note))] if note else [])
        await answer(rt, url, blocks.message(text, body))
