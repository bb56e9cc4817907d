"""The run form's submission ("Fine-tune on this file"): check the fields with the `/finetune run` grammar, then fetch
and validate the file and queue the run. When that is done within the ack's budget, the answer is in the ack itself:
the validator's `file:line` errors under the field they concern (response_action errors), or the "queued" view.
A large file takes longer than Slack's 3 s: the modal then says it is checking, and shows the outcome when ready.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from slack_sdk.errors import SlackApiError

from bot import grammar, runform, words
from bot.auth import authorize
from bot.listeners.support import log_refusal, problem_answer, queue_run
from bot.runtime import BotRuntime, runtime_of
from jobs.core.errors import RunRejected

log = logging.getLogger(__name__)

# Slack waits 3 s for the ack, the network included: what is ready within 2 s goes in it.
ACK_BUDGET_S = 2.0


@dataclass(frozen=True)
class Outcome:
    view: dict[str, Any] | None = None         # the modal's next view: queued, or a problem of ours
    errors: dict[str, str] | None = None       # or errors under the fields (block id -> text)


async def run_submit(ack, body: dict[str, Any], view: dict[str, Any], context) -> None:
    rt = runtime_of(context)
    user = (body.get("user") or {}).get("id", "")
    form = runform.read_form(view)
    refusal = authorize(grammar.RunCommand(), user, form.channel, rt.settings.policy)
    if refusal is not None:
        log_refusal("the run form", user, form.channel, refusal.reason)
        await ack(response_action="update", view=rt.gateway.clean(runform.refused_view(refusal.reason)))
        return
    cmd = runform.to_command(form)
    if isinstance(cmd, dict):
        await ack(response_action="errors", errors=rt.gateway.clean(cmd))
        return
    view_id = view.get("id", "")
    work = asyncio.ensure_future(_queue(rt, cmd, form, user, view_id))
    done, _ = await asyncio.wait((work,), timeout=ACK_BUDGET_S)  # never cancels: a late outcome is still shown
    if done:
        outcome = work.result()
        if outcome.errors:
            await ack(response_action="errors", errors=rt.gateway.clean(outcome.errors))
        else:
            await ack(response_action="update", view=rt.gateway.clean(outcome.view))
        return
    name = next((o["text"]["text"] for o in _options(view) if o.get("value") == form.file_id), form.file_id)
    await ack(response_action="update", view=rt.gateway.clean(runform.checking_view(name)))
    outcome = await work
    later = outcome.view or runform.problem_view("\n".join((outcome.errors or {}).values()))
    try:
        await rt.gateway.update_view(view_id, later)
    except SlackApiError as e:  # closed meanwhile: the person sees the run's card, or nothing queued
        log.info("could not show the run form's outcome (%s) to %s", e.response.get("error"), user)


async def _queue(rt: BotRuntime, cmd: grammar.RunCommand, form: runform.RunForm, user: str, view_id: str) -> Outcome:
    try:
        # The view's id names the request: a repeated submission of this form finds the run it queued.
        run, position = await queue_run(rt, cmd, user=user, channel=form.channel, request_id=f"view:{view_id}",
                                        message_ts=form.message_ts)
    except RunRejected as e:
        text = words.refusal(e)
        return Outcome(errors={runform.block_of(text): runform.errors_text(text)})
    except Exception as e:
        answer = problem_answer(e, "queueing a run from the form")  # logs ours; says what to do
        return Outcome(view=runform.problem_view(answer["text"].removeprefix(":warning: ")))
    return Outcome(view=runform.queued_view(run, position))


def _options(view: dict[str, Any]) -> list[dict[str, Any]]:
    for block in view.get("blocks") or []:
        if block.get("block_id") == runform.FILE_BLOCK:
            return (block.get("element") or {}).get("options") or []
    return []
