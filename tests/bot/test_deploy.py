"""Deploy requests through Slack: the bot over signed HTTP, a real worker, the real trainer and the real inference
server. Four eyes (the person who asks cannot approve, non-approvers cannot decide), two approvals at once deploy
once, the local deploy serves a chat completion from the run's adapter, a second deploy serves it again on the same
endpoint, undeploy takes it down (for approvers, admins and who asked), and a request left alone expires."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from slack_sdk.models.blocks import Block

from bot.blocks import APPROVE_ACTION, DEPLOY_ACTION, REJECT_ACTION
from jobs.backends.local import inference as serving
from jobs.core import endpoints, store
from jobs.core.procs import pid_alive
from jobs.deploys import approval
from jobs.runs import service
from tests.conftest import ROOT, shown

pytestmark = pytest.mark.timeout(420)


@pytest.fixture
def approvers(request, bot_env):
    """Approvers, and the test's own settings (its parameter); listed before `bot` and `worker`."""
    bot_env.update(TUNEOPS_APPROVERS="U0APPROVER,U0BOSS,U0CAROL", **getattr(request, "param", {}))
    return bot_env


def buttons(msg) -> dict[str, str]:
    return {e["action_id"]: e["value"] for b in msg.blocks if b.get("type") == "actions" for e in b["elements"]}


async def answer_of(slack, key: str) -> str:
    got = await slack.until(lambda: slack.responses[key], 30)
    assert got, f"no answer on {key}"
    return json.dumps(got[-1])


async def succeeded_run(bot, slack, text: str, timeout: float = 300):
    _, _, key = await bot.command(text)
    assert await slack.until(lambda: slack.responses[key], 60)
    run = await slack.until(lambda: (r := shown(bot.settings.jobs, service.get_run(bot.settings.jobs, "ft-0001"))) and r.state.terminal and r,
                            timeout)
    assert run and run.state == "succeeded", service.get_run(bot.settings.jobs, "ft-0001")
    done = await slack.until(lambda: [m for m in slack.thread(run.channel, run.thread_ts) if "finished" in m.text],
                             30)
    assert done
    return run, done[0]


async def card_of(slack, run, request_id: str, predicate=lambda card: True):
    def find():
        for m in slack.thread(run.channel, run.thread_ts):
            if m.text.startswith(f"Deploy request {request_id} ") and predicate(m):
                return m
        return None

    card = await slack.until(find, 30)
    assert card, [m.text for m in slack.thread(run.channel, run.thread_ts)]
    return card


async def test_four_eyes_one_deploy_under_two_clicks_and_the_local_server_answers(approvers, bot, worker, slack,
                                                                                  workspace):
    run, done = await succeeded_run(bot, slack, "run --dataset datasets/chat.jsonl --max-steps 4")
    assert buttons(done)[DEPLOY_ACTION] == run.id

    # an approver asks for the deploy (with the Deploy button of the completion message)
    status, _, key = await bot.click(DEPLOY_ACTION, run.id, user="U0APPROVER", message_ts=done.ts)
    assert status == 200 and "Asked to deploy ft-0001 (dp-0001)" in await answer_of(slack, key)
    card = await card_of(slack, run, "dp-0001")
    assert buttons(card) == {APPROVE_ACTION: "dp-0001", REJECT_ACTION: "dp-0001"}
    shown = json.dumps(card.blocks)
    assert "local inference endpoint" in shown and "Eval loss" in shown and "<@U0APPROVER> asks" in shown
    assert "<@U0ALICE>" in shown  # whose run it is

    # whoever asked cannot approve, approver or not (four eyes); a non-approver decides nothing
    _, _, key = await bot.click(APPROVE_ACTION, "dp-0001", user="U0APPROVER", message_ts=card.ts)
    assert "someone else has to approve it (four eyes)" in await answer_of(slack, key)
    _, _, key = await bot.click(APPROVE_ACTION, "dp-0001", user="U0ALICE", message_ts=card.ts)
    assert "Only approvers may approve" in await answer_of(slack, key)
    _, _, key = await bot.click(REJECT_ACTION, "dp-0001", user="U0BOB", message_ts=card.ts)
    assert "Only approvers may approve or reject" in await answer_of(slack, key)
    _, _, key = await bot.command("deploy ft-0001", user="U0BOB")
    assert "already has a deploy request (dp-0001, pending" in await answer_of(slack, key)
    assert approval.get_approval(bot.settings.jobs, "dp-0001").state == "pending"

    # two approvers click at once: one approval, one deploy
    clicks = await asyncio.gather(*(bot.click(APPROVE_ACTION, "dp-0001", user=u, message_ts=card.ts)
                                    for u in ("U0BOSS", "U0CAROL")))
    answers = [await answer_of(slack, key) for _, _, key in clicks]
    assert sum("You approved dp-0001" in a for a in answers) == 1, answers
    assert sum("already approved by" in a for a in answers) == 1, answers

    deployed = await slack.until(lambda: [m for m in slack.thread(run.channel, run.thread_ts)
                                          if "is deployed" in m.text], 180)
    assert deployed, [m.text for m in slack.thread(run.channel, run.thread_ts)]
    req = approval.get_approval(bot.settings.jobs, "dp-0001")
    assert req.state == "deployed" and req.decided_by in ("U0BOSS", "U0CAROL") and req.url.startswith("http://")
    assert req.url in deployed[0].text and req.api_url == req.url + "/v1"
    for who in ("U0ALICE", "U0APPROVER", req.decided_by):
        assert f"<@{who}>" in deployed[0].text
    events = store.run_events(store.connect(bot.settings.jobs), run.id)
    assert [e.data["state"] for e in events if e.kind == "deploy"] == ["deploying", "deployed"]

    # the card shows the decision (who, when) and the result; the run record keeps them
    card = await card_of(slack, run, "dp-0001", lambda c: "Deployed" in json.dumps(c.blocks))
    shown = json.dumps(card.blocks)
    assert f"Approved by <@{req.decided_by}> <!date^{int(req.decided_at)}^" in shown
    assert APPROVE_ACTION not in shown
    [kept] = service.get_run(bot.settings.jobs, run.id).deployments
    assert kept["state"] == "deployed" and kept["decided_by"] == req.decided_by and kept["url"] == req.url

    # the server serves the run's adapter through the OpenAI-compatible API
    async with httpx.AsyncClient(timeout=120) as http:
        r = await http.post(f"{req.api_url}/chat/completions", json={
            "model": run.id, "messages": [{"role": "user", "content": "What is QLoRA?"}], "max_tokens": 8})
        assert r.status_code == 200, r.text
        reply = r.json()
        assert reply["model"] == run.id and isinstance(reply["choices"][0]["message"]["content"], str)
        assert run.id in [m["id"] for m in (await http.get(f"{req.api_url}/models")).json()["data"]]
    first = serving.endpoint(bot.settings.jobs, run.model)
    assert first is not None and first.url == req.url
    assert "--adapters" in open(f"/proc/{first.pid}/cmdline").read().replace("\0", " ")

    # a second deploy of the same run serves it again on the same endpoint: nothing restarts
    _, _, key = await bot.command("deploy ft-0001", user="U0BOB")
    assert "(dp-0002)" in await answer_of(slack, key)
    card2 = await card_of(slack, run, "dp-0002")
    _, _, key = await bot.click(APPROVE_ACTION, "dp-0002", user="U0BOSS", message_ts=card2.ts)
    assert "You approved dp-0002" in await answer_of(slack, key)
    assert await slack.until(lambda: approval.get_approval(bot.settings.jobs, "dp-0002").state == "deployed", 180)
    second = serving.endpoint(bot.settings.jobs, run.model)
    assert second.pid == first.pid and pid_alive(first.pid, first.start)
    async with httpx.AsyncClient(timeout=30) as http:
        assert (await http.get(f"{second.url}/healthz")).json()["status"] == "ok"
    assert [d["id"] for d in service.get_run(bot.settings.jobs, run.id).deployments] == ["dp-0001", "dp-0002"]

    # the list of deployments: the run once (its last request serving), its endpoint, who approved, requests served
    assert await slack.until(lambda: endpoints.served_here(workspace, run.model).get(run.id) == 1, 30), \
        "the server did not record the request it served"
    _, _, key = await bot.command("deployments", user="U0MALLORY")  # anyone may look
    listed = (await slack.until(lambda: slack.responses[key], 30))[-1]
    for block in listed["blocks"]:
        Block.parse(block).validate_json()  # slack_sdk's own Block Kit models
    shown = json.dumps(listed)
    assert shown.count("*ft-0001*") == 1 and f"<{req.url}|endpoint>" in shown and "`model-cache/tiny`" in shown
    assert "approved by <@U0BOSS> for <@U0BOB>" in shown and "1 request served" in shown, shown

    # undeploy: refused to someone who neither approves nor asked for it; done for who asked, and the thread says so
    _, _, key = await bot.command("undeploy ft-0001", user="U0MALLORY")
    assert "only approvers, admins or whoever asked for its deploy (dp-0002)" in await answer_of(slack, key)
    assert second.alive()
    _, _, key = await bot.command("undeploy ft-0001", user="U0BOB")
    said = await answer_of(slack, key)
    assert "ft-0001 is off its endpoint (dp-0002)" in said and "the endpoint stopped" in said, said
    assert await slack.until(lambda: not second.alive(), 30), "the endpoint was left running"
    told = await slack.until(lambda: [m for m in slack.thread(run.channel, run.thread_ts)
                                      if "is off its endpoint" in m.text], 30)
    assert told and "<@U0BOB>" in told[0].text
    card2 = await card_of(slack, run, "dp-0002", lambda c: "Taken off its endpoint" in json.dumps(c.blocks))
    assert card2
    assert {d["state"] for d in service.get_run(bot.settings.jobs, run.id).deployments} == {"undeployed"}
    _, _, key = await bot.command("undeploy ft-0001", user="U0BOSS")
    assert "ft-0001 is not deployed" in await answer_of(slack, key)
    _, _, key = await bot.command("deployments")
    assert "Nothing is deployed" in await answer_of(slack, key)


@pytest.mark.parametrize("approvers", [{"TUNEOPS_APPROVAL_TTL": "3s", "PYTHONPATH": str(ROOT),
                                        "TUNEOPS_TRAIN_MODULE": "tests.standins.story_train"}],
                         indirect=True, ids=["ttl-3s"])
async def test_an_expired_request_is_refused_and_the_card_says_so(approvers, bot, worker, slack):
    run, done = await succeeded_run(bot, slack, "run --dataset datasets/chat.jsonl --max-steps 4", timeout=60)
    _, _, key = await bot.command("deploy ft-0001", user="U0BOB")
    assert "(dp-0001)" in await answer_of(slack, key)
    card = await card_of(slack, run, "dp-0001")
    assert buttons(card)
    await asyncio.sleep(3.5)
    _, _, key = await bot.click(APPROVE_ACTION, "dp-0001", user="U0APPROVER", message_ts=card.ts)
    said = await answer_of(slack, key)
    assert "expired" in said and "/finetune deploy ft-0001" in said
    card = await card_of(slack, run, "dp-0001", lambda c: "Expired" in json.dumps(c.blocks))
    assert not buttons(card)
    assert approval.get_approval(bot.settings.jobs, "dp-0001").state == "expired"
    assert serving.endpoint(bot.settings.jobs, run.model) is None
    [kept] = service.get_run(bot.settings.jobs, run.id).deployments
    assert kept["state"] == "expired"
