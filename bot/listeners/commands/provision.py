"""`/finetune provision [finetune|inference]` (admins only): queue the provisioning as Azure operations; each op's
steps and result go into a thread of its own in this channel (bot.ops), and this answer says which ops they are."""

from __future__ import annotations

from typing import Any

from bot import blocks, grammar
from bot.listeners.support import answer, answering_errors, call, needs_aca
from bot.ops import describe_op
from bot.runtime import BotRuntime


def provision_targets(target: str | None, has_app: bool) -> tuple[list[str], str]:
    """What to provision for `provision [target]`, and a note on what is left out (no app configured); pure."""
    if target is not None:
        return [target], ""
    if has_app:
        return ["finetune", "inference"], ""
    return ["finetune"], ("The inference app is left out: infra/inference.config.json has no ACA_APP_NAME (add it "
                          "to provision the app too).")


def _queue(settings, target: str | None, user: str, channel: str) -> tuple[list[str], list[str], str]:
    from jobs.aca import api
    from jobs.aca.config import load_aca_config

    cfg = load_aca_config(workspace=settings.workspace)  # a missing or broken config is said now, not in a thread
    kinds, note = provision_targets(target, bool(cfg.app_name))
    return kinds, [api.enqueue_provision(settings, kind, user, channel) for kind in kinds], note


async def handle(ack, cmd: grammar.Provision, command: dict[str, Any], rt: BotRuntime) -> None:
    if rt.settings.jobs.backend != "aca":
        await ack(**rt.gateway.clean(blocks.render_problem(needs_aca(cmd, rt.settings.jobs.backend))))
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
