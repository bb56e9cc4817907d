"""Block Kit builders: what the card and the thread messages say, and that they stay within Slack's limits."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from bot import blocks as B
from bot.grammar import USAGE, parse
from jobs.core.domain import Run, RunState


def make_run(**kw) -> Run:
    base = dict(id="ft-0007", requester="U0ALICE", channel="C0TRAIN", model="model-cache/tiny",
                dataset="datasets/chat.jsonl", params={"max_steps": 40, "lr": 0.0002})
    base.update(kw)
    return Run(**base)


def all_text(msg: dict) -> str:
    return json.dumps(msg, ensure_ascii=False)


def assert_within_limits(msg: dict) -> None:
    assert set(msg) >= {"text", "blocks"}
    assert len(msg["blocks"]) <= B.MAX_BLOCKS
    assert len(msg["text"]) <= B.MAX_TEXT
    for block in msg["blocks"]:
        if block["type"] == "section" and "text" in block:
            assert len(block["text"]["text"]) <= B.MAX_SECTION
        for f in block.get("fields", []):
            assert len(f["text"]) <= 2000
        if block["type"] == "context":
            for el in block["elements"]:
                assert len(el["text"]) <= B.MAX_SECTION


def buttons(msg: dict) -> list[dict]:
    return [el for b in msg["blocks"] if b["type"] == "actions" for el in b["elements"]]


def test_queued_card_shows_who_what_place_in_line_and_a_cancel_button():
    card = B.render_run_card(make_run(), position=3)
    text = all_text(card)
    assert "<@U0ALICE>" in text and "model-cache/tiny" in text and "datasets/chat.jsonl" in text
    assert "number 3 in line" in text and "queued" in text
    [button] = buttons(card)
    assert button["action_id"] == B.CANCEL_ACTION == "run_cancel" and button["value"] == "ft-0007"
    assert "step" not in card["blocks"][-2].get("text", {}).get("text", "")  # no progress line before training
    assert_within_limits(card)


def test_running_card_shows_progress_bar_step_loss_and_eta():
    run = make_run(state=RunState.RUNNING, step=10, total_steps=40, loss=1.23456, eta_s=125)
    text = all_text(B.render_run_card(run))
    assert "█████░░░░░░░░░░░░░░░ 25%" in text
    assert "step 10/40" in text and "loss 1.2346" in text and "ETA 2m 05s" in text
    assert "in line" not in text


def test_finished_card_has_no_cancel_button_and_says_the_outcome():
    done = make_run(state=RunState.SUCCEEDED, step=40, total_steps=40, loss=0.5, adapter_path="runs/ft-0007/adapter")
    card = B.render_run_card(done)
    assert buttons(card) == []
    assert "runs/ft-0007/adapter" in all_text(card) and "ETA" not in all_text(card)
    cancelled = B.render_run_card(make_run(state=RunState.CANCELLED, cancelled_by="U0BOB"))
    assert "Cancelled by <@U0BOB>" in all_text(cancelled) and buttons(cancelled) == []


def test_card_links_the_wandb_run_the_trainer_announced():
    """A W&B run online: the trainer's link event (jobs.runs.progress) puts its address among the card's links."""
    from jobs.runs.progress import apply_progress
    from payload.events import make_event

    url = "https://wandb.ai/my-team/tuneops/runs/abc123xy"
    run = make_run(state=RunState.RUNNING, step=3, total_steps=40,
                   links={"job": "https://portal.azure.com/#job", "execution": "https://portal.azure.com/#exec"})
    apply_progress(run, [make_event("link", name="wandb", url=url)], [])
    (context,) = [b for b in B.render_run_card(run)["blocks"] if b["type"] == "context" and ":link:" in all_text(b)]
    assert context["elements"][0]["text"] == (":link: <https://portal.azure.com/#job|ACA job>  ·  "
                                              f"<https://portal.azure.com/#exec|execution>  ·  <{url}|W&amp;B run>")
    done = B.render_run_card(make_run(state=RunState.SUCCEEDED, links={"wandb": url}))
    assert f"<{url}|W&amp;B run>" in all_text(done)
    assert ":link:" not in all_text(B.render_run_card(make_run(state=RunState.RUNNING)))  # offline: no link


def test_user_text_cannot_mention_or_link():
    card = B.render_run_card(make_run(dataset="datasets/<!channel>.jsonl", name="x"))
    assert "<!channel>" not in all_text(card) and "&lt;!channel&gt;" in all_text(card)


def test_progress_bar_edges():
    assert B.progress_bar(0, 0) == "░" * 20
    assert B.progress_bar(50, 40).startswith("█" * 20) and B.progress_bar(50, 40).endswith("100%")
    assert B.format_duration(3725) == "1h 02m" and B.format_duration(None) == "—" and B.format_duration(9) == "9s"


def test_succeeded_mentions_requester_with_loss_evals_and_adapter():
    run = make_run(state=RunState.SUCCEEDED, step=40, total_steps=40, started_at=100.0, finished_at=190.0)
    msg = B.render_succeeded(run, {"train_loss": 0.6, "first_loss": 2.5, "last_loss": 0.4321, "eval_loss": 0.9876,
                                   "base_eval_loss": 2.4, "eval_examples": 8, "steps": 40, "total_steps": 40},
                             "runs/ft-0007/adapter")
    text = all_text(msg)
    assert msg["text"].startswith("<@U0ALICE> ft-0007 finished: final loss 0.4321")
    assert "2.5000 → 0.4321" in text and "Eval loss on 8 held-out examples" in text
    assert "0.9876 (base model 2.4000)" in text and "40/40" in text
    assert "runs/ft-0007/adapter" in text and "1m 30s" in text
    assert_within_limits(msg)


def test_failed_keeps_the_last_20_log_lines_in_a_code_block_within_limits():
    lines = [f"line {i} " + "x" * 300 for i in range(200)] + ["```oops```", "Traceback: the real error"]
    msg = B.render_failed(make_run(state=RunState.FAILED), "exit code 1", lines)
    text = all_text(msg)
    assert "<@U0ALICE>" in msg["text"] and "exit code 1" in text
    assert "Traceback: the real error" in text and "line 199" in text
    assert "line 150" not in text  # only the tail
    code = [b["text"]["text"] for b in msg["blocks"] if b["type"] == "section" and "```" in b["text"]["text"]][0]
    assert code.count("```") == 2  # a fence inside the log does not end the block early
    assert_within_limits(msg)


def test_cancelled_and_timed_out_say_by_whom_and_what_next():
    assert "cancelled by <@U0BOB>" in B.render_cancelled(make_run(), "U0BOB")["text"]
    msg = B.render_timed_out(make_run(), 300)
    assert "step 300" in msg["text"] and "/finetune resume ft-0007" in all_text(msg)


def test_parse_error_reply_shows_message_and_usage():
    err = parse("logs")
    msg = B.render_parse_error(err)
    assert "needs a run id" in msg["text"] and USAGE["logs"] in msg["text"]


def test_help_lists_every_subcommand():
    text = all_text(B.render_help())
    for usage in USAGE.values():
        assert json.dumps(usage)[1:-1] in text
    assert "logs RUN" in B.render_help("logs")["text"]
    assert set(B.HELP_LINES) == set(USAGE)  # every subcommand has its help line, `/finetune help X` for each
    assert "undeploy RUN" in B.render_help("undeploy")["text"] and "requests served" in B.render_help("deployments")[
        "text"]


def test_a_thousand_runs_still_fit_in_one_message():
    runs = [make_run(id=f"ft-{i:04d}", name="n" * 60, state=RunState.RUNNING, step=i, total_steps=2000)
            for i in range(1000)]
    msg = B.render_run_list(runs)
    assert_within_limits(msg)
    assert "ft-0000" in all_text(msg)


def test_empty_list_says_how_to_start():
    assert "/finetune run" in B.render_run_list([])["text"]


def test_status_reply_has_no_buttons_and_tells_running_time():
    run = make_run(state=RunState.RUNNING, started_at=0.0, updated_at=65.0, step=3, total_steps=9,
                   execution_id="ft-0007-1", last_checkpoint_step=2)
    msg = B.render_status(run)
    assert buttons(msg) == []
    text = all_text(msg)
    assert "1m 05s" in text and "step 2" in text and "ft-0007-1" in text


def test_logs_reply():
    assert "no log lines yet" in B.render_logs(make_run(), [])["text"]
    msg = B.render_logs(make_run(), ["a", "b"])
    assert "```\na\nb\n```" in all_text(msg).replace("\\n", "\n")


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=5000), st.lists(st.text(max_size=1000), max_size=60), st.text(max_size=100))
def test_any_content_stays_within_limits(error, lines, name):
    run = make_run(state=RunState.FAILED, error=error, name=name, dataset=error[:300] or "d")
    for msg in (B.render_failed(run, error, lines), B.render_run_card(run), B.render_status(run),
                B.render_notice(run, error), B.render_logs(run, lines), B.render_problem(error)):
        assert_within_limits(msg)


def test_the_deployments_list_stays_within_block_kits_limits_and_says_what_it_cut():
    from slack_sdk.models.blocks import Block

    from jobs.deploys.deploy import Deployment

    rows = [Deployment(f"ft-{i:04d}", f"bot-{i}" if i % 2 else "", "Qwen/Qwen2.5-0.5B-Instruct",
                       f"https://infer-{i}.example", 1_764_000_000.0 + i, "U0BOSS", "U0ALICE", f"dp-{i:04d}",
                       None if i == 3 else i) for i in range(1, 61)]
    msg = B.render_deployments(rows)
    assert len(msg["blocks"]) <= 50
    for block in msg["blocks"]:
        Block.parse(block).validate_json()
    shown = json.dumps(msg["blocks"])
    assert "and 20 more" in shown and "*ft-0040*" in shown and "*ft-0041*" not in shown
    assert "*ft-0001* (bot-1)" in shown and "*ft-0002* on" in shown and "requests served: unknown" in shown
    assert "1 request served" in shown and "2 requests served" in shown
    empty = B.render_deployments([])
    assert "Nothing is deployed" in empty["text"]
