"""The thread's Block Kit builders, pure: buttons by run state, samples and limits in the completion message, the
approval card in every state, the deploy result, and log excerpts from the batcher within Slack's limits."""

from __future__ import annotations

import json
import time

from bot import blocks
from bot.blocks import (
    APPROVE_ACTION,
    DEPLOY_ACTION,
    LOGS_ACTION,
    REJECT_ACTION,
    RESUME_ACTION,
)
from bot.logbatch import LogBatcher
from bot.standin.slack import _check_message
from jobs.core.domain import Run, RunState
from jobs.deploys.approval import Approval, ApprovalState
from jobs.runs import service


def run_in(state: RunState, **kw) -> Run:
    return Run(id="ft-0042", requester="U0ALICE", channel="C0TRAIN", model="model-cache/tiny",
               dataset="datasets/chat.jsonl", state=state, **kw)


def actions(message) -> list[str]:
    return [e["action_id"] for b in message["blocks"] if b["type"] == "actions" for e in b["elements"]]


def within_limits(message) -> None:
    assert _check_message({"text": message["text"], "blocks": json.dumps(message["blocks"])}) is None
    for b in message["blocks"]:
        for f in b.get("fields", []):
            assert len(f["text"]) <= 2000


def test_buttons_follow_what_can_be_done_with_the_run():
    done = run_in(RunState.SUCCEEDED, adapter_path="runs/ft-0042/adapter")
    assert actions(blocks.render_succeeded(done, {}, done.adapter_path)) == [DEPLOY_ACTION, LOGS_ACTION]
    assert actions(blocks.render_timed_out(run_in(RunState.TIMED_OUT), 0)) == [RESUME_ACTION, LOGS_ACTION]
    failed = blocks.render_failed(run_in(RunState.FAILED, last_checkpoint_step=40), "exit 1", [])
    assert actions(failed) == [RESUME_ACTION, LOGS_ACTION] and "checkpoint of step 40" in json.dumps(failed)
    # With no checkpoint a resume starts over, which the service allows: the button follows the service's one rule.
    early = blocks.render_failed(run_in(RunState.FAILED), "bad config", [])
    assert actions(early) == [RESUME_ACTION, LOGS_ACTION] and "no checkpoint was saved" in json.dumps(early)
    assert actions(blocks.render_cancelled(run_in(RunState.CANCELLED, last_checkpoint_step=2), "U0BOB")) == [
        RESUME_ACTION, LOGS_ACTION]
    for state in RunState:
        run = run_in(state)
        assert blocks.resumable(run) is service.can_resume(run)
        if state.terminal and state is not RunState.SUCCEEDED:
            assert (RESUME_ACTION in actions({"blocks": [blocks.run_actions(run)]})) is service.can_resume(run) is True


def test_the_completion_shows_two_samples_escaped_and_stays_within_limits():
    run = run_in(RunState.SUCCEEDED, adapter_path="runs/ft-0042/adapter")
    huge = "<!channel> " + "word " * 5000
    metrics = {"last_loss": 1.2, "first_loss": 3.4, "eval_loss": 1.5, "base_eval_loss": 2.9, "eval_examples": 8,
               "tokens_per_s": 12345.6, "generations": [{"prompt": huge, "base": huge, "fine_tuned": huge}] * 10}
    msg = blocks.render_succeeded(run, metrics, run.adapter_path)
    within_limits(msg)
    shown = json.dumps(msg, ensure_ascii=False)
    assert shown.count("*Sample ") == 2 and "<!channel>" not in shown and "&lt;!channel&gt;" in shown
    assert "1.5000 (base model 2.9000)" in shown and "12,346 tokens/s" in shown and "3.4000 → 1.2000" in shown


def request(state: ApprovalState, **kw) -> Approval:
    now = 1_800_000_000.0
    fields = dict(id="dp-0007", run_id="ft-0042", requested_by="U0BOB", channel="C0TRAIN",
                  target="the local inference server (payload.serve) on 127.0.0.1 (a free port)", backend="local",
                  created_at=now, expires_at=now + 86400, state=state)
    return Approval(**{**fields, **kw})


def test_the_approval_card_in_every_state():
    run = run_in(RunState.SUCCEEDED, adapter_path="runs/ft-0042/adapter",
                 metrics={"first_loss": 3.0, "last_loss": 1.0, "eval_loss": 1.4, "base_eval_loss": 2.2, "steps": 40,
                          "generations": [{"prompt": "Hi", "base": "Hi hi", "fine_tuned": "Hello there"}]})
    pending = blocks.render_approval_card(request(ApprovalState.PENDING), run)
    within_limits(pending)
    shown = json.dumps(pending)
    assert actions(pending) == [APPROVE_ACTION, REJECT_ACTION]
    assert "<@U0BOB> asks to deploy" in shown and "requested by <@U0ALICE>" in shown and "127.0.0.1" in shown
    assert "1.4000 (base model 2.2000)" in shown and "Hello there" in shown
    assert "<!date^1800086400^" in shown  # the expiry, in each reader's time zone
    approve = next(e for b in pending["blocks"] if b["type"] == "actions" for e in b["elements"])
    assert approve["style"] == "primary" and approve["confirm"]["confirm"]["text"] == "Approve and deploy"

    decided = dict(decided_by="U0CAROL", decided_at=1_800_000_100.0)
    lines = {
        ApprovalState.APPROVED: "Approved by <@U0CAROL> <!date^1800000100^",
        ApprovalState.REJECTED: "Rejected by <@U0CAROL> <!date^1800000100^",
        ApprovalState.EXPIRED: "Expired <!date^",
        ApprovalState.DEPLOYING: "Deploying",
        ApprovalState.DEPLOYED: "<http://127.0.0.1:7860|chat UI>",
        ApprovalState.FAILED: "The deploy failed: port taken",
    }
    for state, expected in lines.items():
        card = blocks.render_approval_card(request(state, url="http://127.0.0.1:7860",
                                                   api_url="http://127.0.0.1:7860/v1", error="port taken",
                                                   finished_at=1_800_000_200.0, **decided), run)
        within_limits(card)
        assert expected in json.dumps(card), state
        assert actions(card) == [], state


def test_the_deploy_result_mentions_who_asked_decided_and_ran():
    run = run_in(RunState.SUCCEEDED, adapter_path="runs/ft-0042/adapter")
    ok = blocks.render_deploy_result(request(ApprovalState.DEPLOYED, decided_by="U0CAROL",
                                             url="http://host:7860", api_url="http://host:7860/v1"), run)
    within_limits(ok)
    assert all(f"<@{u}>" in ok["text"] for u in ("U0ALICE", "U0BOB", "U0CAROL"))
    assert "http://host:7860/v1/chat/completions" in json.dumps(ok) and '"model\\": \\"ft-0042\\"' in json.dumps(ok)
    bad = blocks.render_deploy_result(request(ApprovalState.FAILED, decided_by="U0CAROL",
                                              error="payload.serve exited with code 2: <bad> & worse"), run)
    within_limits(bad)
    assert "exited with code 2: &lt;bad&gt; &amp; worse" in bad["text"] and "/finetune deploy ft-0042" in json.dumps(bad)


def test_log_excerpts_of_a_flood_stay_within_slacks_limits():
    batcher = LogBatcher(interval_s=20)
    now = time.monotonic()
    out = batcher.feed([f"line {i} " + "x" * (i % 700) for i in range(10_000)], now)
    out += batcher.flush(now + 21)
    assert out
    for excerpt in out:
        msg = blocks.render_log_excerpt(run_in(RunState.RUNNING), excerpt)
        within_limits(msg)
        assert msg["blocks"][0]["text"]["text"] == excerpt  # never cut again: the batcher made it fit
