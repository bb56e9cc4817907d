"""Azure operations in Slack (provisioning, the smoke check, a secret's job reference, deploys; ids like pv-0001): the
op's root message in its channel and the story of its steps in that message's thread, rendered from the op's RunEvents.
A step may carry a status (ok, warn, fail, info) and links (the smoke check's execution and logs), shown with it.

The builders are pure; `show_op_event` is what the notifier calls for an event whose run id is an op id.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from bot import threads, words
from bot.blocks import (
    Message,
    context,
    escape,
    mention,
    message,
    render_links,
    section,
    truncate,
)
from bot.slack import SlackGateway
from jobs.core import store
from jobs.core.domain import RunEvent

log = logging.getLogger(__name__)

OP_PREFIX = "pv-"

_WHAT = {
    "finetune": "provisioning the fine-tuning job",
    "inference": "provisioning the inference app",
    "smoke": "a smoke check of the Azure set-up (one short CPU execution of the job's twin)",
}
# A step's status as an emoji; a notice without one is a plain step.
_STEP = {"ok": ":white_check_mark:", "warn": ":warning:", "fail": ":x:", "info": ":small_blue_diamond:"}
_STATE = {
    "queued": ":hourglass_flowing_sand: queued",
    "running": ":arrows_counterclockwise: running",
    "succeeded": ":white_check_mark: done",
    "failed": ":x: failed",
}


def is_op_id(run_id: str) -> bool:
    return run_id.startswith(OP_PREFIX)


def describe_op(kind: str, target: str = "") -> str:
    """What an op does, in words: "provisioning the fine-tuning job", "adding HF_TOKEN to the job's secrets"."""
    if kind == "secret":
        return f"adding the Key Vault secret {target} to the job's secret references"
    if kind == "deploy":
        return f"deploying the adapter of {target} to the inference app"
    return _WHAT.get(kind, f"the Azure operation {kind}")


def render_op_root(op) -> Message:
    """The op's root message in the channel (edited as its state changes); its thread carries the steps."""
    what = describe_op(op.kind, op.target)
    head = f":gear: *{escape(op.id)}*: {escape(what)}, asked by {mention(op.requester)}"
    blocks = [section(head), context(_STATE.get(op.state, escape(op.state)))]
    if op.state in ("succeeded", "failed") and op.result:
        blocks[-1] = context(f"{_STATE[op.state]}: {escape(truncate(op.result, 1500))}")
    return message(f"{op.id}: {what} ({op.state})", blocks)


def render_op_notice(op, text: str, step: str = "", status: str = "", links: dict[str, str] | None = None,
                     hint: dict[str, str] | None = None) -> Message:
    """One step in the op's thread: its status, its name in bold (unless the text begins with it), the text with the
    command that helps, and its links."""
    text = truncate(str(text), 2000)
    icon = _STEP.get(status, _STEP["info"])
    named = bool(step) and not (text.startswith(step) and text[len(step):len(step) + 1] in (":", " "))
    head = f"*{escape(step)}*: " if named else ""
    blocks = [section(f"{icon} {head}{words.with_hint(escape(text), hint)}")]
    if links:
        blocks.append(context(render_links(links)))
    plain = f"{step}: {text}" if named else text
    return message(f"{op.id}: {plain}", blocks)


def render_op_succeeded(op, data: dict[str, Any]) -> Message:
    summary = str(data.get("text") or op.result or "done")
    head = f":white_check_mark: {mention(op.requester)} {op.id} is done: {escape(truncate(summary, 2500))}"
    blocks = [section(head)]
    links = data.get("links") or {}
    if links:
        blocks.append(context(render_links(links)))
    return message(f"{mention(op.requester)} {op.id} is done: {truncate(summary, 2500)}", blocks)


def render_op_failed(op, data: dict[str, Any]) -> Message:
    error = str(data.get("error") or op.result or "no reason given")
    said = words.with_hint(escape(truncate(error, 2500)), data.get("hint"))
    head = f":x: {mention(op.requester)} {op.id} failed: {said}"
    blocks = [section(head)]
    after = {
        "finetune": "Provisioning is idempotent: once the cause is fixed, `/finetune provision finetune` again.",
        "inference": "Provisioning is idempotent: once the cause is fixed, `/finetune provision inference` again.",
        "secret": f"The value of {escape(op.target)} is stored in Key Vault; once the cause is fixed, "
                  "`/finetune provision finetune` adds the job's reference to it.",
        "smoke": "The smoke check changes nothing a run uses: once the cause is fixed, `/finetune provision check` "
                 "again.",
    }.get(op.kind)
    if after:
        blocks.append(context(after))
    return message(f"{mention(op.requester)} {op.id} failed: {truncate(error, 2500)}", blocks)


def render_op_event(op, event: RunEvent) -> Message | None:
    """The thread message for one of the op's events; None for kinds an op does not tell."""
    if event.kind == "notice":
        return render_op_notice(op, event.data.get("text", ""), str(event.data.get("step") or ""),
                                str(event.data.get("status") or ""), event.data.get("links") or None,
                                event.data.get("hint") or None)
    if event.kind == "succeeded":
        return render_op_succeeded(op, event.data)
    if event.kind == "failed":
        return render_op_failed(op, event.data)
    return None


async def show_op_event(settings, gateway: SlackGateway, posted: threads.Threads, event: RunEvent) -> None:
    """Render one op event: post the op's root message the first time (and record its thread), write the event into
    the thread, and edit the root when the op has ended. Slack and Redis errors propagate to the notifier, which
    knows which of them are worth retrying."""
    op = await asyncio.to_thread(lambda: store.load_op(store.connect(settings), event.run_id))
    if op is None or not op.channel:
        log.warning("event %s for unknown operation %s dropped", event.kind, event.run_id)
        return
    thread_ts = await asyncio.to_thread(posted.get, threads.OP_ROOT, op.id)
    if not thread_ts:
        thread_ts = await gateway.post_message(op.channel, render_op_root(op))
        await asyncio.to_thread(posted.set, threads.OP_ROOT, op.id, thread_ts)
    reply = render_op_event(op, event)
    if reply is not None:
        await gateway.post_message(op.channel, reply, thread_ts=thread_ts)
    if event.kind in ("succeeded", "failed"):
        await gateway.update_message(op.channel, thread_ts, render_op_root(op))
