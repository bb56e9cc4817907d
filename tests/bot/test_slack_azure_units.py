"""The pure parts of the Slack side of the Azure backend: `--grep` in the grammar, the log answer, the op thread
messages, what `provision` queues, the secret form's checks, and the portal links on the card."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from bot import blocks, grammar, ops, secretform
from jobs.backends.aca.ops import Op, provision_targets
from jobs.backends.aca.secrets import check_secret
from jobs.backends.logtext import grep_lines
from jobs.core.domain import Run, RunEvent, RunState


@pytest.mark.parametrize("text, expected", [
    ("logs ft-0001 --grep OOM", grammar.Logs("ft-0001", 20, "OOM")),
    ('logs ft-0001 --grep "out of memory" --tail 5', grammar.Logs("ft-0001", 5, "out of memory")),
    ("logs --grep=loss ft-0042", grammar.Logs("ft-0042", 20, "loss")),
])
def test_logs_takes_grep(text, expected):
    assert grammar.parse(text) == expected


@pytest.mark.parametrize("text, said", [
    ("logs ft-0001 --grep", "`--grep` needs a value"),
    ('logs ft-0001 --grep "   "', "one line of at most 200"),
    (f"logs ft-0001 --grep {'x' * 201}", "one line of at most 200"),
    ("logs ft-0001 --grep a --grep b", "given twice"),
])
def test_bad_grep_says_what_to_do(text, said):
    err = grammar.parse(text)
    assert isinstance(err, grammar.ParseError) and said in err.message and "[--grep TEXT]" in err.usage


def test_grep_keeps_the_newest_matching_lines():
    lines = ["step 1 loss 2.0", "saving", "step 2 LOSS 1.0", "step 3 loss 0.5"]
    assert grep_lines(lines, "loss", 2) == ["step 2 LOSS 1.0", "step 3 loss 0.5"]
    assert grep_lines(lines, None, 1) == ["step 3 loss 0.5"]
    assert grep_lines(lines, "nothing", 5) == []


def make_run(**kw) -> Run:
    return Run(**{"id": "ft-0007", "requester": "U0ALICE", "channel": "C1", "model": "m", "dataset": "d", **kw})


def test_the_log_answer_says_where_from_and_stays_within_slack_limits():
    run = make_run(state=RunState.RUNNING)
    lines = [f"line {i} " + "x" * 300 for i in range(200)] + ["```fence inside"]
    msg = blocks.render_logs(run, lines, source="Log Analytics", note="Log Analytics lags", grep="line")
    head, code, note = msg["blocks"]
    assert "holding `line`" in head["text"]["text"] and "from Log Analytics" in head["text"]["text"]
    shown = code["text"]["text"].count("\n") - 1
    assert 0 < shown < len(lines) and head["text"]["text"].startswith(f"The last {shown} (all that fit) of 201 ")
    assert len(code["text"]["text"]) <= blocks.MAX_SECTION and code["text"]["text"].endswith("```")
    assert "fence inside" in code["text"]["text"] and code["text"]["text"].count("```") == 2
    assert note["elements"][0]["text"] == "Log Analytics lags"
    empty = blocks.render_logs(run, [], grep="a`b<c>")
    assert empty["text"] == "No log lines of ft-0007 holding `a'b&lt;c&gt;`."


def test_the_card_carries_the_portal_links():
    links = {"job": "https://portal.azure.com/#resource/j/overview", "logs": "https://portal.azure.com/#blade/q"}
    card = json.dumps(blocks.render_run_card(make_run(state=RunState.RUNNING, links=links)))
    assert "<https://portal.azure.com/#resource/j/overview|ACA job>" in card and "|logs (Log Analytics)>" in card
    assert ":link:" not in json.dumps(blocks.render_run_card(make_run()))


def op(**kw) -> Op:
    return Op(**{"id": "pv-0003", "kind": "finetune", "requester": "U0ALICE", "channel": "C1", **kw})


def test_op_messages():
    root = ops.render_op_root(op(state="queued"))
    assert root["text"] == "pv-0003: provisioning the fine-tuning job (queued)"
    assert "asked by <@U0ALICE>" in json.dumps(root)
    done = ops.render_op_root(op(state="succeeded", result="Created the ACA job j."))
    assert "done: Created the ACA job j." in json.dumps(done)
    secret = ops.render_op_root(op(kind="secret", target="HF_TOKEN"))
    assert "adding the Key Vault secret HF_TOKEN" in secret["text"]

    notice = ops.render_op_event(op(), RunEvent("pv-0003", "notice", {"text": "reading <the> job"}))
    assert notice["blocks"][0]["text"]["text"] == ":small_blue_diamond: reading &lt;the&gt; job"
    ok = ops.render_op_event(op(), RunEvent("pv-0003", "succeeded", {"text": "Updated.", "links": {"job": "https://x"}}))
    assert ok["text"] == "<@U0ALICE> pv-0003 is done: Updated." and "<https://x|ACA job>" in json.dumps(ok)
    failed = ops.render_op_event(op(kind="secret", target="HF_TOKEN"),
                                 RunEvent("pv-0003", "failed", {"error": "quota", "log_tail": []}))
    assert failed["text"] == "<@U0ALICE> pv-0003 failed: quota"
    assert "value of HF_TOKEN is stored in Key Vault" in json.dumps(failed)
    assert ops.render_op_event(op(), RunEvent("pv-0003", "progress", {})) is None
    assert ops.is_op_id("pv-0001") and not ops.is_op_id("ft-0001")


def test_provision_targets():
    assert provision_targets("inference", False) == (["inference"], "")
    assert provision_targets(None, True) == (["finetune", "inference"], "")
    kinds, note = provision_targets(None, False)
    assert kinds == ["finetune"] and "ACA_APP_NAME" in note


@pytest.mark.parametrize("name, value, wrong", [
    ("HF_TOKEN", "s3cr3t-Value", set()),
    ("", "s3cr3t-Value", {secretform.NAME_BLOCK}),
    ("hf-token", "s3cr3t-Value", {secretform.NAME_BLOCK}),
    ("X", "s3cr3t-Value", {secretform.NAME_BLOCK}),
    ("HF_TOKEN", "", {secretform.VALUE_BLOCK}),
    ("HF_TOKEN", "s3cr3t-Value\n", {secretform.VALUE_BLOCK}),
    ("1X", "  ", {secretform.NAME_BLOCK, secretform.VALUE_BLOCK}),
])
def test_form_errors(name, value, wrong):
    # The aca backend's own value check (pure), as the form's submit handler gets it from the backend.
    backend = SimpleNamespace(check_secret=check_secret)
    errors = secretform.form_errors(secretform.SecretForm(name, value, "C1"), backend)
    assert set(errors) == wrong
    assert all(value.strip() not in e for e in errors.values() if value.strip())


def test_the_form_reads_what_slack_sends():
    view = secretform.secret_modal("HF_TOKEN", "C0TRAIN")
    view["state"] = {"values": {secretform.NAME_BLOCK: {"name": {"type": "plain_text_input", "value": " HF_TOKEN "}},
                                secretform.VALUE_BLOCK: {"value": {"type": "plain_text_input", "value": None}}}}
    assert secretform.read_form(view) == secretform.SecretForm("HF_TOKEN", "", "C0TRAIN")
    assert secretform.read_form({"private_metadata": "not json"}) == secretform.SecretForm("", "", "")
    assert len(view["title"]["text"]) <= 24 and len(view["submit"]["text"]) <= 24  # Slack's limits for modals
