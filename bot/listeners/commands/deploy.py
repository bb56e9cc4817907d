"""`/finetune deploy RUN` and the Deploy button of a finished run: ask for a deploy, which an approver other than
the person asking must approve (the card with Approve / Reject goes into the run's thread). `/finetune undeploy RUN`
takes a deployed run's adapter off its endpoint; `/finetune deployments` lists what is live.

Anyone who may use tuneops here may ask; jobs.deploys.approval refuses a run that did not succeed or already has a request.
"""

from __future__ import annotations

from typing import Any

from bot import blocks
from bot.grammar import Deploy, Deployments, Undeploy
from bot.listeners.support import answer, answering_errors, call
from bot.runtime import BotRuntime
from jobs.deploys import approval, deploy

NO_APPROVERS = ("Deploys need an approver, and none is configured: an admin sets TUNEOPS_APPROVERS to the Slack user "
                "IDs of the people who may approve them (at least one besides whoever asks), then restarts the bot.")


async def handle(ack, cmd: Deploy, command: dict[str, Any], rt: BotRuntime) -> None:
    await ack()
    await request(rt, cmd.run_id, command["user_id"], command["channel_id"], command["response_url"])


async def request(rt: BotRuntime, run_id: str, user: str, channel: str, response_url: str) -> None:
    """Shared by the command and the Deploy button."""
    async with answering_errors(rt, response_url, f"asking to deploy {run_id}"):
        approvers = rt.settings.policy.approvers
        if not approvers:
            await answer(rt, response_url, blocks.render_problem(NO_APPROVERS))
            return
        req = await call(approval.request_deploy, rt.settings.jobs, run_id, requested_by=user, channel=channel)
        others = approvers - {user}
        who = ("an approver other than you" if others else
               "an approver other than you, and none is configured: ask an admin to add one to TUNEOPS_APPROVERS")
        await answer(rt, response_url, blocks.render_info(
            f":shield: Asked to deploy {run_id} ({req.id}): its card is in the run's thread and waits for {who}. "
            f"It expires {blocks.slack_date(req.expires_at)}."))


async def handle_undeploy(ack, cmd: Undeploy, command: dict[str, Any], rt: BotRuntime) -> None:
    """`/finetune undeploy RUN`: take the run's adapter off its endpoint. Approvers and admins may, and so may whoever
    asked for that deploy (jobs.deploys.deploy.undeploy says who may and why not); the run's thread is told."""
    await ack()
    user, response_url = command["user_id"], command["response_url"]
    async with answering_errors(rt, response_url, f"taking {cmd.run_id} off its endpoint"):
        policy = rt.settings.policy
        taken, stopped = await call(deploy.undeploy, rt.settings.jobs, cmd.run_id, user, policy.approvers,
                                    policy.admins)
        after = " Nothing else was served there, so the endpoint stopped." if stopped else ""
        await answer(rt, response_url, blocks.render_info(
            f":wastebasket: {cmd.run_id} is off its endpoint ({taken.id}); the run's thread says so.{after}"))


async def handle_deployments(ack, cmd: Deployments, command: dict[str, Any], rt: BotRuntime) -> None:
    """`/finetune deployments`: every adapter live, with its endpoint and the requests it served (from the servers'
    records: asking never wakes an endpoint that scaled to zero)."""
    await ack()
    response_url = command["response_url"]
    async with answering_errors(rt, response_url, "listing the deployments"):
        rows = await call(deploy.deployments, rt.settings.jobs)
        await answer(rt, response_url, blocks.render_deployments(rows))
