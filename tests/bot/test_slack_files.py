"""Datasets from Slack files, end to end: the message shortcut "Fine-tune on this file" (its form, its submission) and
`/finetune run --dataset <Slack file>`, over signed HTTP against the Slack stand-in (files.info, the private download
with the bot token, views.open, message_action payloads), with a real Redis, and a real worker for a whole run. Every
bad case gets an answer that says what was wrong and what to do, and leaves nothing half-written in the workspace."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import aiohttp
import pytest
from slack_sdk.models.blocks import Block
from slack_sdk.models.views import View
from slack_sdk.web.async_client import AsyncWebClient

from bot import blocks, runform, slackfiles
from bot.grammar import ParseError, RunCommand, parse
from bot.slack import SlackGateway
from bot.standin.slack import (
    SlackStandIn,
    message_action_body,
    signed_headers,
    view_submission_body,
)
from jobs.core.domain import Run
from jobs.core.errors import RunRejected
from jobs.core.settings import JobSettings
from jobs.runs import service
from tests.bot.conftest import BOT_TOKEN, SIGNING_SECRET
from tests.conftest import shown

pytestmark = pytest.mark.timeout(240)

GOOD = (Path(__file__).resolve().parents[2] / "payload" / "examples" / "chat.jsonl").read_bytes()
# Line 2 is no JSON, line 3 has no usable fields: the validator names both, as file:line.
BAD = GOOD.splitlines(keepends=True)[0] + b"{not json\n" + b'{"foo": 1}\n' + b"".join(GOOD.splitlines(True)[1:])


def valid_message(msg: dict) -> dict:
    """Every block builds as slack_sdk's Block Kit model, whose validation raises on what Slack would refuse."""
    for b in msg.get("blocks", []):
        Block.parse(b).validate_json()
    return msg


def valid_view(view: dict) -> dict:
    View(**view).validate_json()
    for b in view.get("blocks", []):
        Block.parse(b).validate_json()
    return view


def slack_files(workspace: Path) -> list[str]:
    folder = workspace / "datasets" / "slack"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


async def command_answer(bot, slack, text: str, channel: str = "C0TRAIN") -> str:
    status, ack, key = await bot.command(text, channel=channel)
    assert status == 200, ack
    answers = await slack.until(lambda: slack.responses[key], 30)
    assert answers, ack
    for a in answers:
        valid_message(a)
    return json.dumps(answers[-1])


async def shortcut(bot, slack, message, *, user: str = "U0ALICE") -> tuple[int, str, str]:
    key = os.urandom(6).hex()
    body = message_action_body(callback_id=runform.SHORTCUT_ID, message=message, user_id=user,
                               response_url=slack.response_url(key))
    status, text = await bot.post(body, signed_headers(SIGNING_SECRET, body))
    return status, text, key


async def open_form(bot, slack, message) -> tuple[str, dict]:
    before = len(slack.calls_to("views.open"))
    status, _, key = await shortcut(bot, slack, message)
    assert status == 200
    call = await slack.until(lambda: slack.calls_to("views.open")[before:], 10)
    assert call, slack.responses[key]
    assert call[0].ok, call[0].response
    view = json.loads(call[0].params["view"]) if isinstance(call[0].params["view"], str) else call[0].params["view"]
    return call[0].response["view"]["id"], valid_view(view)


async def submit(bot, view_id: str, view: dict, **fields: str) -> dict:
    values = {runform.FILE_BLOCK: {runform.VALUE: {"type": "static_select", "selected_option": {
        "text": {"type": "plain_text", "text": "x"}, "value": fields.pop("file")}}}}
    blocks_of = {"model": runform.MODEL_BLOCK, "epochs": runform.EPOCHS_BLOCK, "lr": runform.LR_BLOCK,
                 "max_steps": runform.STEPS_BLOCK, "name": runform.NAME_BLOCK}
    for key, block in blocks_of.items():
        values[block] = {runform.VALUE: fields.get(key, "")}
    body = view_submission_body(view, view_id, values)
    status, text = await bot.post(body, signed_headers(SIGNING_SECRET, body))
    assert status == 200, text
    return json.loads(text) if text else {}


def run_of(bot, run_id: str) -> Run | None:
    return service.get_run(bot.settings.jobs, run_id)


# ---- the grammar: --dataset takes a Slack file ------------------------------------------------------------------

@pytest.mark.parametrize("value", [
    "F0123ABCDE",
    "https://standin.slack.com/files/U0ALICE/F0123ABCDE/train.jsonl",
    "<https://files.slack.com/files-pri/T0STANDIN-F0123ABCDE/download/train.jsonl|train.jsonl>",
])
def test_dataset_takes_a_slack_file_id_or_link(value):
    assert parse(f"run --dataset {value} --max-steps 3") == RunCommand(dataset_file="F0123ABCDE", max_steps=3)


@pytest.mark.parametrize("value,says", [
    ("https://standin.slack.com/archives/C0TRAIN/p1700000000000100", "link to a message, not to a file"),
    ("https://example.com/train.jsonl", "neither a path in the workspace nor a Slack file link"),
])
def test_dataset_refuses_links_that_are_no_slack_file(value, says):
    parsed = parse(f"run --dataset {value}")
    assert isinstance(parsed, ParseError) and says in parsed.message


def test_a_path_stays_a_path():
    assert parse("run --dataset datasets/F0123.jsonl") == RunCommand(dataset="datasets/F0123.jsonl")


# ---- pure checks of a file -------------------------------------------------------------------------------------

def file_object(**kw) -> dict:
    f = {"id": "F0123ABCDE", "name": "train.jsonl", "size": 100, "timestamp": 1700000000,
         "url_private_download": "https://files.slack.com/files-pri/T0-F0123ABCDE/download/train.jsonl",
         "permalink": "https://x.slack.com/files/U0/F0123ABCDE/train.jsonl", "channels": ["C0TRAIN"],
         "groups": [], "ims": [], "shares": {"public": {"C0TRAIN": [{"ts": "1700000000.000100"}]}}}
    f.update(kw)
    return f


@pytest.mark.parametrize("name", ["../../etc/cron.jsonl", "a/b.jsonl", "a\\b.jsonl", ".hidden.jsonl",
                                  "x\x00.jsonl", "new\nline.jsonl", "~root.jsonl", "a..jsonl"])
def test_a_name_with_path_tricks_is_refused_with_what_to_do(name):
    with pytest.raises(RunRejected, match="path characters.*Rename it to a plain name"):
        slackfiles.check_file(file_object(name=name), "C0TRAIN", 10**6)


def test_other_checks_say_what_was_wrong_and_what_to_do():
    with pytest.raises(RunRejected, match="`train.csv` is not a JSONL file.*Save it as .jsonl"):
        slackfiles.check_file(file_object(name="train.csv"), "C0TRAIN", 10**6)
    with pytest.raises(RunRejected, match="not shared in this channel.*share the file here"):
        slackfiles.check_file(file_object(), "C0OTHER", 10**6)
    with pytest.raises(RunRejected, match=r"is 312 MB.*up to 200 MB.*TUNEOPS_SLACK_FILE_MAX_MB"):
        slackfiles.check_file(file_object(size=312_000_000), "C0TRAIN", 200_000_000)
    with pytest.raises(RunRejected, match="stored outside Slack"):
        slackfiles.check_file(file_object(is_external=True), "C0TRAIN", 10**6)
    f = slackfiles.check_file(file_object(name="My data (v2) ünïcode.JSONL"), "C0TRAIN", 10**6)
    assert str(slackfiles.local_path(f)) == "datasets/slack/F0123ABCDE-My_data_v2_n_code.jsonl"
    assert f.shared_in == {"C0TRAIN": "1700000000.000100"}


# ---- the form and the card --------------------------------------------------------------------------------------

def test_the_form_has_the_configured_defaults_and_passes_slacks_models():
    settings = JobSettings(default_model="model-cache/tiny", train_overrides={"learning_rate": 2e-4})
    view = valid_view(runform.run_modal([("F0123ABCDE", "train.jsonl"), ("F0123ABCDF", "eval.jsonl")], "C0TRAIN",
                                        "1700000000.000100", runform.defaults(settings)))
    inputs = {b["block_id"]: b["element"] for b in view["blocks"] if b["type"] == "input"}
    assert inputs[runform.MODEL_BLOCK]["initial_value"] == "model-cache/tiny"
    assert inputs[runform.EPOCHS_BLOCK]["initial_value"] == "3"
    assert inputs[runform.LR_BLOCK]["initial_value"] == "0.0002"
    assert "initial_value" not in inputs[runform.STEPS_BLOCK]
    assert [o["value"] for o in inputs[runform.FILE_BLOCK]["options"]] == ["F0123ABCDE", "F0123ABCDF"]
    for v in (runform.checking_view("train.jsonl"), runform.problem_view("x" * 5000), runform.refused_view("no")):
        valid_view(v)


def test_the_forms_fields_go_through_the_one_grammar():
    form = runform.RunForm("F0123ABCDE", "C0TRAIN", "1.2", model="model-cache/tiny", epochs="many", lr="1e-4")
    assert list(runform.to_command(form)) == [runform.EPOCHS_BLOCK]
    form = runform.RunForm("F0123ABCDE", "C0TRAIN", "1.2", lr="5", max_steps="2.5")
    errors = runform.to_command(form)
    assert list(errors) == [runform.LR_BLOCK] and "at most 1" in errors[runform.LR_BLOCK]
    form = runform.RunForm("F0123ABCDE", "C0TRAIN", "1.2", name="bad name!")
    assert list(runform.to_command(form)) == [runform.NAME_BLOCK]
    form = runform.RunForm("F0123ABCDE", "C0TRAIN", "1.2", epochs="0.5", max_steps="7", name="v2")
    assert runform.to_command(form) == RunCommand(dataset_file="F0123ABCDE", epochs=0.5, max_steps=7, name="v2")


def test_the_card_links_the_source_message_and_shows_the_checksum():
    run = Run(id="ft-0001", requester="U0ALICE", channel="C0TRAIN", model="model-cache/tiny",
              dataset="datasets/slack/F0123ABCDE-train.jsonl", dataset_sha256="ab" * 32,
              dataset_source="https://standin.slack.com/archives/C0TRAIN/p1700000000000100")
    card = valid_message(blocks.render_run_card(run, position=1))
    text = json.dumps(card)
    assert "<https://standin.slack.com/archives/C0TRAIN/p1700000000000100|source message>" in text
    assert "sha256 `abababababab`" in text


# ---- the stand-in answers as Slack does ------------------------------------------------------------------------

async def test_standin_files_info_and_private_download_need_the_bot_token():
    with SlackStandIn(token=BOT_TOKEN) as slack:
        f, msg = slack.share_file("train.jsonl", GOOD)
        client = AsyncWebClient(token=BOT_TOKEN, base_url=slack.api_url)
        info = await client.files_info(file=f["id"])
        assert info["file"]["size"] == len(GOOD) and info["file"]["shares"]["public"]["C0TRAIN"][0]["ts"] == msg.ts
        link = await client.chat_getPermalink(channel="C0TRAIN", message_ts=msg.ts)
        assert link["permalink"] == f"https://standin.slack.com/archives/C0TRAIN/p{msg.ts.replace('.', '')}"
        async with aiohttp.ClientSession() as s:
            async with s.get(f["url_private_download"], headers={"Authorization": f"Bearer {BOT_TOKEN}"}) as r:
                assert r.status == 200 and await r.read() == GOOD
            for headers in ({}, {"Authorization": "Bearer xoxb-someone-else"}):
                async with s.get(f["url_private_download"], headers=headers) as r:
                    assert r.status == 200 and r.content_type == "text/html" and "Sign in" in await r.text()
        hidden, _ = slack.share_file("secret.jsonl", GOOD, visible=False)
        with pytest.raises(Exception, match="file_not_found"):
            await client.files_info(file=hidden["id"])
        slack.scopes.discard("files:read")
        with pytest.raises(Exception, match="missing_scope"):
            await client.files_info(file=f["id"])


async def test_the_bot_reads_the_sign_in_page_as_a_token_problem_and_keeps_nothing(tmp_path):
    with SlackStandIn(token=BOT_TOKEN) as slack:
        f, _ = slack.share_file("train.jsonl", GOOD)
        checked = slackfiles.check_file(f, "C0TRAIN", 10**6)
        gateway = SlackGateway(AsyncWebClient(token="xoxb-revoked-token", base_url=slack.api_url))
        dest = tmp_path / "datasets" / "slack" / "F-train.jsonl"
        with pytest.raises(RunRejected, match="sign-in page.*files:read scope.*SLACK_BOT_TOKEN"):
            await slackfiles._download(gateway, checked, dest, 10**6)
        await gateway.close()
        assert list(dest.parent.iterdir()) == []


# ---- /finetune run --dataset <Slack file> ----------------------------------------------------------------------

async def test_run_with_a_slack_file_link_fetches_it_once_and_records_checksum_and_source(bot, slack, workspace):
    f, msg = slack.share_file("support chat.jsonl", GOOD)
    link = f"https://standin.slack.com/files/U0ALICE/{f['id']}/support%20chat.jsonl"
    said = await command_answer(bot, slack, f"run --dataset {link} --max-steps 3")
    assert "Queued *ft-0001*" in said, said
    name = f"{f['id']}-support_chat.jsonl"
    assert slack_files(workspace) == [name]
    path = workspace / "datasets" / "slack" / name
    assert path.read_bytes() == GOOD and int(path.stat().st_mtime) == f["timestamp"]
    run = run_of(bot, "ft-0001")
    assert run.dataset == f"datasets/slack/{name}"
    assert run.dataset_sha256 == hashlib.sha256(GOOD).hexdigest()
    assert run.dataset_source == f"https://standin.slack.com/archives/C0TRAIN/p{msg.ts.replace('.', '')}"
    downloads = [c for c in slack.calls_to("download") if c.ok]
    assert len(downloads) == 1

    # the card in the channel links the message the file came with
    card = await slack.until(lambda: next((m for m in slack.root_messages("C0TRAIN") if "ft-0001" in m.text), None),
                             20)
    assert card is not None
    assert f"<{run.dataset_source}|source message>" in json.dumps(valid_message({"blocks": card.blocks}))

    # the same file again (by id this time): no second download, the same checksum
    said = await command_answer(bot, slack, f"run --dataset {f['id']} --max-steps 3")
    assert "Queued *ft-0002*" in said
    assert len([c for c in slack.calls_to("download") if c.ok]) == 1
    assert run_of(bot, "ft-0002").dataset_sha256 == run.dataset_sha256


async def test_run_with_a_slack_file_refuses_each_bad_case_clearly_and_leaves_nothing(bot, slack, workspace, bot_env):
    cases = []
    big, _ = slack.share_file("big.jsonl", GOOD, size=250_000_000)
    cases.append((big["id"], "C0TRAIN", r"is 250 MB; tuneops fetches datasets of up to 200 MB"))
    csv, _ = slack.share_file("train.csv", b"a,b\n1,2\n")
    cases.append((csv["id"], "C0TRAIN", "is not a JSONL file"))
    elsewhere, _ = slack.share_file("other.jsonl", GOOD, channel="C0OTHER")
    cases.append((elsewhere["id"], "C0TRAIN", "is not shared in this channel"))
    hidden, _ = slack.share_file("hidden.jsonl", GOOD, visible=False)
    cases.append((hidden["id"], "C0TRAIN", "tuneops cannot see the Slack file"))
    cases.append(("F0NOSUCHFILE", "C0TRAIN", "tuneops cannot see the Slack file"))
    tricky, _ = slack.share_file("../../model-cache/tiny/config.jsonl", GOOD)
    cases.append((tricky["id"], "C0TRAIN", "has path characters"))
    cut, _ = slack.share_file("cut.jsonl", GOOD, cut_after=100)
    cases.append((cut["id"], "C0TRAIN", "was cut short; nothing was kept"))
    liar, _ = slack.share_file("liar.jsonl", GOOD * 4, size=100)   # more bytes come than files.info said
    cases.append((liar["id"], "C0TRAIN", "nothing was kept"))
    bad, _ = slack.share_file("bad.jsonl", BAD)
    cases.append((bad["id"], "C0TRAIN", ":2:"))

    deleted, _ = slack.share_file("deleted.jsonl", GOOD)
    slack.files[deleted["id"]]["deleted"] = True
    cases.append((deleted["id"], "C0TRAIN", "was deleted. Share the dataset again"))

    for file_id, channel, says in cases:
        said = await command_answer(bot, slack, f"run --dataset {file_id}", channel=channel)
        assert says in said, (file_id, said)
        assert "Queued" not in said

    # the dataset validator's answer names each bad line as file:line
    said = await command_answer(bot, slack, f"run --dataset {bad['id']}")
    assert f"datasets/slack/{bad['id']}-bad.jsonl:2:" in said and f"{bad['id']}-bad.jsonl:3:" in said

    assert run_of(bot, "ft-0001") is None
    assert slack_files(workspace) == [f"{bad['id']}-bad.jsonl"]  # fetched whole (and refused by the validator)

    # without files:read, the bot says what an admin does
    slack.scopes.discard("files:read")
    said = await command_answer(bot, slack, f"run --dataset {bad['id']}")
    assert "lacks the files:read scope" in said and "reinstalls the app" in said


async def test_the_size_limit_is_checked_while_streaming(bot_env, slack, workspace, redis_url):
    from bot.settings import BotSettings

    settings = BotSettings.from_env({**bot_env, "TUNEOPS_SLACK_FILE_MAX_MB": "0.001"})
    assert settings.slack_file_max_bytes == 1000
    f, _ = slack.share_file("grows.jsonl", GOOD, size=900)  # files.info says 900 bytes; more come
    gateway = SlackGateway(AsyncWebClient(token=BOT_TOKEN, base_url=slack.api_url))
    with pytest.raises(RunRejected, match=r"larger than the 1 kB tuneops fetches.*TUNEOPS_SLACK_FILE_MAX_MB.*though "
                                          r"Slack said 900 B; nothing was kept"):
        await slackfiles.fetch(gateway, workspace, f["id"], "C0TRAIN", settings.slack_file_max_bytes)
    await gateway.close()
    assert slack_files(workspace) == []


def test_the_size_limit_is_a_setting_with_a_clear_problem_line(bot_env):
    from bot.settings import BotSettings
    from jobs.core.settings import SettingsError

    assert BotSettings.from_env(bot_env).slack_file_max_bytes == 200_000_000
    assert BotSettings.from_env({**bot_env, "TUNEOPS_SLACK_FILE_MAX_MB": "50"}).slack_file_max_bytes == 50_000_000
    for bad in ("lots", "0", "-5", "nan", "inf"):
        with pytest.raises(SettingsError, match="TUNEOPS_SLACK_FILE_MAX_MB=.* is not a size in MB"):
            BotSettings.from_env({**bot_env, "TUNEOPS_SLACK_FILE_MAX_MB": bad})


# ---- the message shortcut and its form --------------------------------------------------------------------------

async def test_the_shortcut_opens_the_form_and_queues_a_run_that_a_worker_trains(bot, slack, workspace, worker):
    f, msg = slack.share_file("train.jsonl", GOOD)
    view_id, view = await open_form(bot, slack, msg)
    assert json.loads(view["private_metadata"]) == {"channel": "C0TRAIN", "ts": msg.ts}
    # the prefetch started when the form opened
    assert await slack.until(lambda: [c for c in slack.calls_to("download") if c.ok], 10)

    ack = await submit(bot, view_id, view, file=f["id"], model="model-cache/tiny", epochs="1", lr="0.0002",
                       max_steps="2", name="from-slack")
    assert ack["response_action"] == "update", ack
    valid_view(ack["view"])
    assert "Queued *ft-0001 (from-slack)*" in json.dumps(ack["view"])
    assert len([c for c in slack.calls_to("download") if c.ok]) == 1  # the submission used the prefetched file
    run = run_of(bot, "ft-0001")
    assert run.params == {"num_epochs": 1.0, "learning_rate": 0.0002, "max_steps": 2}
    assert run.dataset_source.endswith(msg.ts.replace(".", "")) and run.dataset_sha256

    # a worker trains it; the card links the source message all along
    done = await slack.until(lambda: (r := shown(bot.settings.jobs, run_of(bot, "ft-0001"))) and r.state.terminal
                             and r, 200)
    assert done and done.state == "succeeded", run_of(bot, "ft-0001")
    card = await slack.until(lambda: (m := slack.messages["C0TRAIN"][done.card_ts]) and "succeeded" in m.text and m,
                             30)
    assert card, slack.messages["C0TRAIN"][done.card_ts].text
    assert "|source message>" in json.dumps(valid_message({"blocks": card.blocks}))


async def test_the_form_shows_the_validators_errors_inline_and_queues_nothing(bot, slack, workspace):
    f, msg = slack.share_file("bad.jsonl", BAD)
    view_id, view = await open_form(bot, slack, msg)
    ack = await submit(bot, view_id, view, file=f["id"], model="model-cache/tiny", epochs="3", lr="0.0001")
    assert ack["response_action"] == "errors", ack
    assert list(ack["errors"]) == [runform.FILE_BLOCK]
    assert f"{f['id']}-bad.jsonl:2:" in ack["errors"][runform.FILE_BLOCK]
    assert run_of(bot, "ft-0001") is None

    # a bad field is shown under its own field, before any download
    ack = await submit(bot, view_id, view, file=f["id"], model="model-cache/tiny", epochs="lots", lr="0.0001")
    assert ack == {"response_action": "errors", "errors": {runform.EPOCHS_BLOCK: ack["errors"][runform.EPOCHS_BLOCK]}}
    assert "`--epochs` takes a number" in ack["errors"][runform.EPOCHS_BLOCK]

    # an unknown model goes under the model
    good, msg2 = slack.share_file("good.jsonl", GOOD)
    view_id, view = await open_form(bot, slack, msg2)
    ack = await submit(bot, view_id, view, file=good["id"], model="model-cache/nope", epochs="1", lr="0.0001")
    assert ack["response_action"] == "errors" and list(ack["errors"]) == [runform.MODEL_BLOCK]


async def test_a_file_that_takes_longer_than_the_ack_shows_its_outcome_in_the_form_later(bot, slack, workspace):
    f, msg = slack.share_file("slow.jsonl", GOOD, slow_s=3.5)
    view_id, view = await open_form(bot, slack, msg)
    ack = await submit(bot, view_id, view, file=f["id"], model="model-cache/tiny", epochs="1", lr="0.0001")
    assert ack["response_action"] == "update" and "Downloading and checking `slow.jsonl`" in json.dumps(ack["view"])
    valid_view(ack["view"])
    done = await slack.until(lambda: "Queued" in json.dumps(slack.views.get(view_id)), 20)
    assert done, slack.views.get(view_id)
    valid_view(slack.views[view_id])
    assert run_of(bot, "ft-0001").dataset == f"datasets/slack/{f['id']}-slow.jsonl"

    # a bad file found late: the validator's file:line errors in the form, nothing queued
    f, msg = slack.share_file("slow-bad.jsonl", BAD, slow_s=3.5)
    view_id, view = await open_form(bot, slack, msg)
    ack = await submit(bot, view_id, view, file=f["id"], model="model-cache/tiny", epochs="1", lr="0.0001")
    assert ack["response_action"] == "update"
    done = await slack.until(lambda: "Run not queued" in json.dumps(slack.views.get(view_id)), 20)
    assert done and f"{f['id']}-slow-bad.jsonl:2:" in json.dumps(valid_view(slack.views[view_id]))
    assert run_of(bot, "ft-0002") is None


async def test_the_shortcut_answers_privately_without_a_jsonl_file_or_permission(bot, slack, bot_env):
    _, msg = slack.share_file("notes.txt", b"hello")
    status, _, key = await shortcut(bot, slack, msg)
    assert status == 200
    [answer] = await slack.until(lambda: slack.responses[key], 10)
    valid_message(answer)
    assert answer["response_type"] == "ephemeral"
    assert "no .jsonl file attached" in json.dumps(answer) and "`notes.txt`" in json.dumps(answer)
    assert not slack.calls_to("views.open")


@pytest.fixture
def restricted_env(bot_env):
    bot_env["TUNEOPS_ALLOWED_CHANNELS"] = "C0TRAIN"
    return bot_env


async def test_the_shortcut_is_refused_where_tuneops_is_not_enabled(restricted_env, bot, slack):
    _, msg = slack.share_file("train.jsonl", GOOD, channel="C0ELSE")
    status, _, key = await shortcut(bot, slack, msg)
    assert status == 200
    [answer] = await slack.until(lambda: slack.responses[key], 10)
    assert "not enabled in this channel" in json.dumps(valid_message(answer))
    assert not slack.calls_to("views.open")

    # a form for that channel (opened before the channel was taken off the list) is refused on submission too
    view = runform.run_modal([("F0123ABCDE", "train.jsonl")], "C0ELSE", msg.ts, runform.defaults(bot.settings.jobs))
    ack = await submit(bot, "V0FORM", view, file="F0123ABCDE", model="model-cache/tiny", epochs="1", lr="0.0001")
    assert ack["response_action"] == "update" and "not enabled in this channel" in json.dumps(valid_view(ack["view"]))
    assert not [c for c in slack.calls if c.method in ("files.info", "download")]
