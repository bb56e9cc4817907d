"""Approve and Reject on a deploy request's card, and on a run's budget approval card. Only approvers
(TUNEOPS_APPROVERS) decide, never the person who asked for the deploy or the run (four eyes); everyone else gets the
reason privately. The decision itself is one transaction in jobs.deploys.approval (two clicks at once deploy once);
the card is edited by the notifier when the decision is recorded."""

from __future__ import annotations

from bot import blocks, words
from bot.blocks import APPROVE_ACTION
from bot.listeners.actions.clicks import Click, button_listener
from bot.listeners.support import answer, answering_errors, call, log_refusal
from bot.runtime import BotRuntime
from jobs.core.errors import RunRejected
from jobs.deploys import approval
from jobs.runs import service


async def gone(rt: BotRuntime, approval_id: str) -> str | None:
    """Why a click on a deploy request's card cannot be decided because the request or its run no longer exists (what
    to do included); None when both are there. `approval.decide` checks again, atomically."""
    req = await call(approval.get_approval, rt.settings.jobs, approval_id)
    if req is None:
        return (f"There is no deploy request {approval_id} any more. `/finetune deploy RUN` asks for a new one; "
                "`/finetune list` shows the runs there are.")
    if await call(service.get_run, rt.settings.jobs, req.run_id) is None:
        return (f"The run {req.run_id} of {approval_id} no longer exists, so there is nothing to deploy. "
                "`/finetune list` shows the runs there are.")
    return None


async def decide(rt: BotRuntime, click: Click) -> None:
    approve = click.action_id == APPROVE_ACTION
    async with answering_errors(rt, click.response_url, f"deciding on {click.value}"):
        why = await gone(rt, click.value)
        if why is not None:
            await answer(rt, click.response_url, blocks.render_problem(why))
            return
        try:
            decided = await call(approval.decide, rt.settings.jobs, click.value, click.user, approve,
                                 rt.settings.policy.approvers)
        except RunRejected as e:
            said = words.refusal(e)
            log_refusal(f"{'approve' if approve else 'reject'} {click.value}", click.user, click.channel, said)
            await answer(rt, click.response_url, blocks.render_refusal(said))
            return
        if decided.kind == approval.RUN_KIND:
            text = (f":white_check_mark: You approved {decided.id}: {decided.run_id} joins the line now." if approve
                    else f":no_entry: You rejected {decided.id}; {decided.run_id} is cancelled without running.")
        elif approve:
            text = (f":white_check_mark: You approved {decided.id}: deploying {decided.run_id} now. The card and the "
                    "run's thread say when it serves.")
        else:
            text = f":no_entry: You rejected {decided.id}; {decided.run_id} is not deployed."
        await answer(rt, click.response_url, blocks.render_info(text))


deploy_decision = button_listener("deploy decision", approval.APPROVAL_ID_RE, "/finetune deploy RUN", decide)
