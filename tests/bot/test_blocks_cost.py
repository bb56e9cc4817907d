"""Cost on the run card and in the thread, as pure renderings: the estimate, the actual, budget warnings, the budget
approval card, the overrun message and `/finetune cost`, every payload within Slack's limits and valid for slack_sdk's
Block Kit models."""

from __future__ import annotations

import json
import time

import pytest
from slack_sdk.models.blocks import Block

from bot import blocks as B
from bot.grammar import Cost, ParseError, parse
from jobs.core import cost
from jobs.core.domain import Run, RunState
from jobs.deploys.approval import RUN_KIND, Approval, ApprovalState
from tests.bot.test_blocks import assert_within_limits, buttons

ESTIMATE = {"tokens": 4_000_000, "tokens_per_s": 850.0, "throughput_from": "team", "team_runs": 3,
            "seconds": 4800.0, "size": "9b", "profile": "Consumption-GPU-NC24-A100", "gpus": 1,
            "usd_per_gpu_hour": 3.675, "usd": 4.9, "run_budget_usd": 4.0, "monthly_budget_usd": 1000.0,
            "month_spent_usd": 120.0}


def valid(msg: dict) -> dict:
    assert_within_limits(msg)
    for b in msg["blocks"]:
        Block.parse(b).validate_json()
    return msg


def make_run(**kw) -> Run:
    base = dict(id="ft-0007", requester="U0ALICE", channel="C0TRAIN", model="microsoft/Phi-3-mini-4k-instruct",
                dataset="datasets/chat.jsonl", estimate=dict(ESTIMATE))
    base.update(kw)
    return Run(**base)


def text_of(msg: dict) -> str:
    return json.dumps(msg, ensure_ascii=False)


def test_the_estimate_reads_as_people_say_it():
    assert B.format_estimate(ESTIMATE) == "~1 h 20 min, ~$4.90"
    assert B.format_estimate({**ESTIMATE, "seconds": 3600, "usd": 0.004}) == "~1 h, ~<$0.01"
    assert B.format_estimate({"seconds": 42.4, "usd": 0.0, "profile": "local"}) == "~42 s, no GPU bill (local)"
    assert B.format_estimate({"seconds": 725, "usd": None, "profile": "NC24-A100"}) == \
        "~12 min, no price for NC24-A100 (TUNEOPS_GPU_PRICES)"
    assert B.format_span(0.2) == "0 s" and B.format_span(3599) == "1 h" and B.format_span(None) == "—"


def test_the_card_shows_the_estimate_then_the_actual_gpu_time_and_cost():
    card = valid(B.render_run_card(make_run(), position=2))
    assert "*Estimate*\\n~1 h 20 min, ~$4.90" in text_of(card) and "number 2 in line" in text_of(card)
    run = make_run(state=RunState.SUCCEEDED, gpu_periods=[[0.0, 5520.0]],
                   actual={"gpu_s": 5520.0, "usd": 5.64, "error": 0.15})
    shown = text_of(valid(B.render_run_card(run)))
    assert "*GPU time*\\n1 h 32 min, $5.64 (15% over the estimate)" in shown and "~1 h 20 min, ~$4.90" in shown
    local = make_run(state=RunState.SUCCEEDED, estimate={"seconds": 40.0, "usd": 0.0, "profile": "local"},
                     actual={"gpu_s": 30.0, "usd": 0.0, "error": -0.25})
    assert "30 s, no GPU bill (25% under the estimate)" in text_of(valid(B.render_run_card(local)))
    assert "Estimate" not in text_of(B.render_run_card(make_run(estimate={})))  # runs from before estimates


@pytest.mark.parametrize("spent, warned", [(700.0, False), (800.0, True), (1200.0, True)])
def test_the_card_warns_past_80_percent_of_the_monthly_budget(spent, warned):
    shown = text_of(valid(B.render_run_card(make_run(estimate={**ESTIMATE, "month_spent_usd": spent}))))
    assert ("monthly budget" in shown) is warned
    if spent > 1000:
        assert "120%" in shown and "new runs need an approver" in shown


def test_a_held_run_says_which_budget_it_waits_on():
    run = make_run(budget_approval={"id": "dp-0003", "state": "pending", "reason": cost.RUN_BUDGET})
    card = text_of(valid(B.render_run_card(run, position=None)))
    assert "Waiting for an approver" in card and "above the run budget of $4.00 (TUNEOPS_RUN_BUDGET_USD)" in card
    assert "in line" not in card
    reply = text_of(valid(B.render_queued_reply(run, None)))
    assert "waits for an approver before it joins the line" in reply
    monthly = make_run(estimate={**ESTIMATE, "month_spent_usd": 1000.0},
                       budget_approval={"state": "pending", "reason": cost.MONTHLY_BUDGET})
    assert "past the monthly budget of $1,000.00 (TUNEOPS_MONTHLY_BUDGET_USD)" in text_of(B.render_run_card(monthly))


def budget_request(**kw) -> Approval:
    now = time.time()
    return Approval(**{**dict(id="dp-0003", run_id="ft-0007", requested_by="U0ALICE", channel="C0TRAIN",
                              target="a run", backend="aca", created_at=now, expires_at=now + 3600, kind=RUN_KIND,
                              reason=cost.RUN_BUDGET), **kw})


def test_the_budget_approval_card_has_the_deploy_buttons_while_pending():
    run = make_run(budget_approval={"id": "dp-0003", "state": "pending", "reason": cost.RUN_BUDGET})
    card = valid(B.render_approval_card(budget_request(), run))
    shown = text_of(card)
    assert card["text"].startswith("Budget approval dp-0003 for ft-0007: pending")
    assert "~1 h 20 min, ~$4.90" in shown and "$4.00" in shown and "850 tokens/s" in shown
    assert "this team's 3 finished runs" in shown and "Waiting for an approver other than <@U0ALICE>" in shown
    assert {b["action_id"]: b["value"] for b in buttons(card)} == {B.APPROVE_ACTION: "dp-0003",
                                                                   B.REJECT_ACTION: "dp-0003"}
    decided = budget_request(state=ApprovalState.APPROVED, decided_by="U0BOSS", decided_at=time.time())
    card = valid(B.render_approval_card(decided, run))
    assert not buttons(card) and "Approved by <@U0BOSS>" in text_of(card) and "joined the line" in text_of(card)
    rejected = budget_request(state=ApprovalState.REJECTED, decided_by="U0BOSS", decided_at=time.time())
    assert "cancelled without running" in text_of(valid(B.render_approval_card(rejected, run)))


def test_the_overrun_message_mentions_the_requester():
    msg = valid(B.render_overrun(make_run(state=RunState.RUNNING),
                                 {"running_s": 9700.0, "estimate_s": 4800.0, "factor": 2.0}))
    assert msg["text"].startswith("<@U0ALICE> ft-0007 has been running for 2 h 42 min, more than 2x its estimate")
    assert "/finetune cancel ft-0007" in text_of(msg) and "$9.90" in text_of(msg)


def test_the_cost_report():
    rows = [{"run": f"ft-{i:04d}", "requester": f"U0USER{i % 3}", "model": f"model-{i % 2}", "gpu_s": 600.0 * i,
             "usd": 0.6 * i, "error": 0.1 * (i % 4) - 0.1} for i in range(1, 40)]
    rows.append({"run": "ft-0100", "requester": "U9", "model": "m", "gpu_s": 60.0, "usd": 0.06, "running": True})
    msg = valid(B.render_cost_report(cost.month_report("2026-11", rows, monthly_budget=2000)))
    shown = text_of(msg)
    assert "GPU spend in 2026-11* (UTC) so far: $468.06 of the $2,000.00 monthly budget (23%)" in shown
    assert "*By person*" in shown and "<@U0USER0>" in shown and "*By model*" in shown and "`model-1`" in shown
    assert "*The biggest runs*\\n• *ft-0039*" in shown and "ft-0038" in shown and "ft-0037" in shown
    assert "median error +10% over 39 runs" in shown
    empty = valid(B.render_cost_report(cost.month_report("2026-11", [])))
    assert "No GPU time spent in 2026-11 yet" in empty["text"]


def test_cost_in_the_grammar_and_the_help():
    assert parse("cost") == Cost()
    bad = parse("cost everything")
    assert isinstance(bad, ParseError) and "`cost` takes no arguments" in bad.message
    assert "/finetune cost" in text_of(B.render_help())
