"""Cost through Slack: the bot over signed HTTP, a real worker and the story trainer, on the local backend given a
price (TUNEOPS_GPU_PRICES) so that its runs cost something. A run over TUNEOPS_RUN_BUDGET_USD waits for an
approver's click on the same buttons as a deploy request (four eyes), then runs and shows its actual GPU time and
cost; a rejected one is cancelled; `/finetune cost` adds up the month; a run past twice its estimate is told once."""

from __future__ import annotations

import json

import pytest

from bot.blocks import APPROVE_ACTION, REJECT_ACTION
from jobs.core import store
from jobs.core.domain import Run, RunEvent
from jobs.runs import service
from tests.bot.test_deploy import answer_of, buttons
from tests.conftest import ROOT, shown

pytestmark = pytest.mark.timeout(300)

STORY = {"PYTHONPATH": str(ROOT), "TUNEOPS_TRAIN_MODULE": "tests.standins.story_train"}


@pytest.fixture
def costed(request, bot_env):
    """Approvers (the requester among them, for four eyes), the story trainer, and the test's own settings."""
    bot_env.update(TUNEOPS_APPROVERS="U0ALICE,U0BOSS", **STORY, **getattr(request, "param", {}))
    return bot_env


async def run_of(bot, slack, run_id: str, predicate, timeout: float = 60) -> Run:
    run = await slack.until(lambda: (r := shown(bot.settings.jobs, service.get_run(bot.settings.jobs, run_id)))
                            and r.thread_ts and predicate(r) and r, timeout)
    assert run, service.get_run(bot.settings.jobs, run_id)
    return run


async def in_thread(slack, run: Run, predicate, timeout: float = 30):
    found = await slack.until(lambda: [m for m in slack.thread(run.channel, run.thread_ts) if predicate(m)], timeout)
    assert found, [m.text for m in slack.thread(run.channel, run.thread_ts)]
    return found


@pytest.mark.parametrize("costed", [{"TUNEOPS_RUN_BUDGET_USD": "5", "TUNEOPS_GPU_PRICES": '{"local": 3600}'}],
                         indirect=True, ids=["budget-5-usd"])
async def test_a_run_over_budget_waits_for_a_second_pair_of_eyes_then_runs_and_shows_what_it_cost(costed, bot,
                                                                                                    worker, slack):
    _, _, key = await bot.command("run --dataset datasets/chat.jsonl --max-steps 4")
    said = await answer_of(slack, key)
    assert "*ft-0001* waits for an approver before it joins the line" in said and "TUNEOPS_RUN_BUDGET_USD" in said
    run = await run_of(bot, slack, "ft-0001", lambda r: r.budget_approval.get("id"))
    assert run.held and run.state == "queued" and run.estimate["usd"] > 5

    # the card says why it waits; the approval card in its thread has the deploy request's buttons
    card = slack.messages["C0TRAIN"][run.card_ts]
    assert "Waiting for an approver" in json.dumps(card.blocks)
    [request] = await in_thread(slack, run, lambda m: m.text.startswith("Budget approval dp-0001 for ft-0001"))
    assert buttons(request) == {APPROVE_ACTION: "dp-0001", REJECT_ACTION: "dp-0001"}
    assert "~$" in json.dumps(request.blocks) and "$5.00" in json.dumps(request.blocks)

    # whoever asked cannot approve, approver or not; a non-approver decides nothing; the run stays out of line
    _, _, key = await bot.click(APPROVE_ACTION, "dp-0001", user="U0ALICE", message_ts=request.ts)
    assert "You asked for this run, so someone else has to approve it (four eyes)" in await answer_of(slack, key)
    _, _, key = await bot.click(APPROVE_ACTION, "dp-0001", user="U0BOB", message_ts=request.ts)
    assert "Only approvers may approve or reject a run over budget" in await answer_of(slack, key)
    assert service.get_run(bot.settings.jobs, "ft-0001").state == "queued"
    assert store.queued_ids(store.connect(bot.settings.jobs)) == []

    _, _, key = await bot.click(APPROVE_ACTION, "dp-0001", user="U0BOSS", message_ts=request.ts)
    assert "You approved dp-0001: ft-0001 joins the line now" in await answer_of(slack, key)
    run = await run_of(bot, slack, "ft-0001", lambda r: r.state.terminal)
    assert run.state == "succeeded" and run.budget_approval["decided_by"] == "U0BOSS"
    assert run.actual["gpu_s"] > 0 and run.actual["usd"] == pytest.approx(run.actual["gpu_s"], abs=0.06)  # $1 a second
    await in_thread(slack, run, lambda m: "finished" in m.text)
    [request] = await in_thread(slack, run, lambda m: m.text.startswith("Budget approval dp-0001")
                                and "Approved by <@U0BOSS>" in json.dumps(m.blocks))
    assert not buttons(request)

    # the card's last version: the estimate and the actual GPU time and cost
    def final_card():
        c = slack.messages["C0TRAIN"][run.card_ts]
        return c if "GPU time" in json.dumps(c.blocks) else None

    card = await slack.until(final_card, 30)
    assert card, slack.messages["C0TRAIN"][run.card_ts].blocks
    body = json.dumps(card.blocks)
    assert "*Estimate*" in body and ("over the estimate" in body or "under the estimate" in body)
    assert "Waiting for an approver" not in body

    # a second run over budget, rejected: cancelled without running
    _, _, key = await bot.command("run --dataset datasets/chat.jsonl --max-steps 4 --name again", user="U0BOB")
    assert "waits for an approver" in await answer_of(slack, key)
    second = await run_of(bot, slack, "ft-0002", lambda r: r.budget_approval.get("id"))
    [request] = await in_thread(slack, second, lambda m: m.text.startswith("Budget approval dp-0002"))
    _, _, key = await bot.click(REJECT_ACTION, "dp-0002", user="U0ALICE", message_ts=request.ts)
    assert "You rejected dp-0002; ft-0002 is cancelled without running" in await answer_of(slack, key)
    second = await run_of(bot, slack, "ft-0002", lambda r: r.state.terminal)
    assert second.state == "cancelled" and second.cancelled_by == "U0ALICE" and not second.gpu_periods
    await in_thread(slack, second, lambda m: "cancelled by <@U0ALICE>" in m.text)

    # the month so far, answered privately in the ack
    _, ack, _ = await bot.command("cost", user="U0BOB")
    answer = json.loads(ack)
    assert answer["response_type"] == "ephemeral"
    text = json.dumps(answer["blocks"])
    assert "over 1 run" in text and "*By person*" in text and "<@U0ALICE>" in text and "<@U0BOB>" not in text
    assert "`model-cache/tiny`" in text and "*ft-0001*" in text and "median error" in text
    assert f"${run.actual['usd']:,.2f}" in text


@pytest.mark.parametrize("costed", [{"STORY_STEP_S": "0.3"}], indirect=True, ids=["3s-run"])
async def test_a_run_past_twice_its_estimate_is_told_once_in_its_thread(costed, bot, worker, slack):
    _, _, key = await bot.command("run --dataset datasets/chat.jsonl --max-steps 10")
    assert "Queued *ft-0001*" in await answer_of(slack, key)

    def quick_estimate(r: Run):  # as if the team's runs had all been very quick: half a second
        r.estimate = {**r.estimate, "seconds": 0.5}
        return [RunEvent(r.id, "notice", {"text": "the estimate is half a second now"})]

    store.update_run(store.connect(bot.settings.jobs), "ft-0001", quick_estimate)
    run = await run_of(bot, slack, "ft-0001", lambda r: r.state.terminal)
    assert run.state == "succeeded" and run.overrun_warned
    await in_thread(slack, run, lambda m: "finished" in m.text)
    told = [m for m in slack.thread(run.channel, run.thread_ts) if "its estimate of" in m.text]
    assert len(told) == 1, [m.text for m in slack.thread(run.channel, run.thread_ts)]
    assert told[0].text.startswith("<@U0ALICE> ft-0001 has been running for") and "more than 2x" in told[0].text
    assert [e.kind for e in store.run_events(store.connect(bot.settings.jobs), "ft-0001")].count("overrun") == 1
