"""The message shortcut "Fine-tune on this file": ack, then open the run form for the message's .jsonl attachment
(the trigger_id is good for 3 seconds, so the form opens before anything slow), then start fetching the file so that
the form's submission finds it in the workspace. A person who may not run, or a message without a .jsonl file, gets a
private answer instead of a form.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from slack_sdk.errors import SlackApiError

from bot import blocks, grammar, runform, slackfiles
from bot.auth import authorize
from bot.listeners.support import answer, log_refusal
from bot.runtime import BotRuntime, runtime_of
from jobs.core.errors import RunRejected

log = logging.getLogger(__name__)

_prefetches: set[asyncio.Future] = set()   # held here so that a running prefetch is not garbage-collected


async def finetune_file(ack, shortcut: dict[str, Any], context) -> None:
    await ack()
    rt = runtime_of(context)
    user = (shortcut.get("user") or {}).get("id", "")
    channel = (shortcut.get("channel") or {}).get("id", "")
    message = shortcut.get("message") or {}
    url = shortcut.get("response_url", "")
    refusal = authorize(grammar.RunCommand(), user, channel, rt.settings.policy)
    if refusal is not None:
        log_refusal("the shortcut Fine-tune on this file", user, channel, refusal.reason)
        await answer(rt, url, blocks.render_refusal(refusal.reason))
        return
    files, others = runform.jsonl_files(message)
    if not files:
        has = f" (it has {', '.join(f'`{blocks.escape(n)}`' for n in others[:5])})" if others else ""
        await answer(rt, url, blocks.render_problem(
            f"This message has no .jsonl file attached{has}. Use the shortcut on a message with a JSON Lines dataset "
            "(one JSON object per line, named *.jsonl), or `/finetune run --dataset PATH` for a file in the "
            "workspace."))
        return
    view = runform.run_modal(files, channel, message.get("ts", ""), runform.defaults(rt.settings.jobs))
    try:
        await rt.gateway.open_view(shortcut.get("trigger_id", ""), view)
    except SlackApiError as e:
        log.warning("views.open for the run form failed: %s", e.response.get("error"))
        await answer(rt, url, blocks.render_problem(
            f"Slack did not open the form ({e.response.get('error', 'error')}). Use the shortcut again."))
        return
    prefetch = asyncio.ensure_future(_prefetch(rt, files[0][0], channel, message.get("ts", "")))
    _prefetches.add(prefetch)
    prefetch.add_done_callback(_prefetches.discard)


async def _prefetch(rt: BotRuntime, file_id: str, channel: str, message_ts: str) -> None:
    """Fetch the file while the person fills in the form. Its problems are told on submission, which asks again."""
    try:
        await slackfiles.fetch(rt.gateway, rt.settings.jobs.workspace, file_id, channel,
                               rt.settings.slack_file_max_bytes, message_ts=message_ts)
    except RunRejected as e:
        log.info("prefetch of Slack file %s: %s", file_id, e)
    except Exception:
        log.exception("prefetch of Slack file %s failed", file_id)
