"""The Bolt app over real HTTP with Slack-signed requests: signatures, retries, refusals, bad input, private answers.

No worker runs here: a queued run stays queued, which is all these tests need.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import signal
import time

import aiohttp
import pytest

from bot.standin.slack import Message, signed_headers, slash_command_body
from jobs.core import store
from jobs.runs import service
from tests.bot.conftest import SIGNING_SECRET
from tests.conftest import shown, start_redis_server


def runs(bot) -> list:
    return service.list_runs(bot.settings.jobs)


async def answers(slack, key: str, n: int = 1, timeout: float = 30.0) -> list[dict]:
    got = await slack.until(lambda: len(slack.responses[key]) >= n and slack.responses[key], timeout)
    assert got, f"no answer on response_url {key}; calls: {[c.method for c in slack.calls]}"
    return list(got)


def text_of(payload: dict | str) -> str:
    return json.dumps(payload, ensure_ascii=False) if not isinstance(payload, str) else payload


def in_ack(ack: str) -> str:
    """The private answer a read-only command (`list`, `status`) got in its ack."""
    payload = json.loads(ack)
    assert payload["response_type"] == "ephemeral" and payload["blocks"], payload
    return text_of(payload)


async def test_healthz(bot):
    async with aiohttp.ClientSession() as s:
        async with s.get(bot.url + "/healthz") as r:
            assert r.status == 200 and (await r.json())["redis"] == "ok"


async def test_the_bot_is_warm_before_it_listens(bot, caplog):
    """By the time the port is open (and /healthz answers), the claim scripts are in Redis and one signed `help` went
    through the whole Bolt app (accepted: no warning), without claiming a delivery or counting as an ack."""
    from bot import middleware

    said = [r.getMessage() for r in caplog.get_records("setup") if r.name == "bot.server"]
    assert not any("warm-up" in m for m in said), said  # the warm-up's `help` was answered 200
    conn = store.connect(bot.settings.jobs)
    shas = [middleware.ScriptBatch(None, src).sha for src in (middleware._CLAIM, middleware._RENEW, middleware._FINISH)]
    assert conn.script_exists(*shas) == [True, True, True]
    assert not conn.keys(store.DELIVERY_KEY.format("*"))
    status, ack, _ = await bot.command("help")
    assert status == 200 and "tuneops help" in ack


@pytest.mark.parametrize("case", ["missing", "wrong", "stale"])
async def test_bad_signatures_get_401_and_start_nothing(bot, slack, case):
    body = slash_command_body("run --dataset datasets/chat.jsonl", response_url=slack.response_url("sig"))
    if case == "missing":
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
    elif case == "wrong":
        headers = signed_headers("not-the-signing-secret", body)
    else:
        headers = signed_headers(SIGNING_SECRET, body, timestamp=int(time.time()) - 5 * 60 - 30)
    status, _ = await bot.post(body, headers)
    assert status == 401
    # and a correctly signed copy of the same body is accepted, so the 401s were about the signature. Its answer is
    # also the sign that the bot has handled what came before it: by then the refused copy would have acted too.
    status, _ = await bot.post(body, signed_headers(SIGNING_SECRET, body))
    assert status == 200
    await answers(slack, "sig")
    assert len(slack.responses["sig"]) == 1 and [r.id for r in runs(bot)] == ["ft-0001"]


async def test_a_retried_delivery_starts_one_run(bot, slack):
    key = "retry"
    body = slash_command_body("run --dataset datasets/chat.jsonl --max-steps 2", response_url=slack.response_url(key),
                              trigger_id="1111.2222.abcdef")
    first = await bot.post(body, signed_headers(SIGNING_SECRET, body))
    again = await bot.post(body, signed_headers(SIGNING_SECRET, body, retry_num=1))
    third = await bot.post(body, signed_headers(SIGNING_SECRET, body, retry_num=2))
    assert first[0] == again[0] == third[0] == 200
    assert "Checking" in first[1] and again[1] == "" and third[1] == ""  # retries are acked at once, with nothing
    [queued] = await answers(slack, key)
    assert "Queued *ft-0001*" in text_of(queued)
    # A later, different command: once it is answered and carded, the bot and its notifier have handled everything
    # the retries could have started.
    _, _, later = await bot.command("run --dataset datasets/chat.jsonl --max-steps 2")
    assert "Queued *ft-0002*" in text_of((await answers(slack, later))[0])
    assert sorted(r.id for r in runs(bot)) == ["ft-0001", "ft-0002"]
    assert len(slack.responses[key]) == 1
    # the notifier posts exactly one card for each
    assert await slack.until(lambda: len(slack.root_messages("C0TRAIN")) >= 2, 10)
    assert len(slack.root_messages("C0TRAIN")) == 2


async def test_a_refused_user_and_a_refused_channel(redis_url, bot_env, slack, caplog):

    bot_env.update(TUNEOPS_ALLOWED_CHANNELS="C0TRAIN", TUNEOPS_ALLOWED_USERS="U0ALICE")
    async for bot in _serve(bot_env, slack):
        caplog.set_level(logging.WARNING, logger="bot.listeners")
        status, ack, _ = await bot.command("run --dataset datasets/chat.jsonl", user="U0MALLORY")
        assert status == 200
        assert "not on the list of people" in ack and "TUNEOPS_ALLOWED_USERS" in ack
        status, ack, _ = await bot.command("list", channel="C0RANDOM")
        assert status == 200
        assert "not enabled in this channel" in ack and "<#C0TRAIN>" in ack
        assert runs(bot) == []
        refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert any("U0MALLORY" in m and "run" in m for m in refusals)
        assert any("C0RANDOM" in m and "list" in m for m in refusals)
        # the allowed person in the allowed channel gets through
        status, ack, key = await bot.command("list")
        assert "No runs yet" in in_ack(ack)


async def _serve(env, slack):
    """The `bot` fixture's work for a test that changes the environment first."""
    from aiohttp import web

    from bot.server import build_web_app, make_bot
    from bot.settings import BotSettings
    from tests.bot.conftest import BotClient, site_url

    settings = BotSettings.from_env(env)
    app, runtime, notifier = make_bot(settings)
    runner = web.AppRunner(build_web_app(app, runtime, notifier=notifier), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    client = BotClient(site_url(runner), slack)
    client.settings = settings
    try:
        yield client
    finally:
        await runner.cleanup()


async def test_a_malformed_dataset_is_refused_before_queueing_with_file_and_line(bot, slack, workspace):
    good = (workspace / "datasets" / "chat.jsonl").read_text().splitlines()
    bad = [good[0], "{not json", json.dumps({"messages": []}), good[1], json.dumps({"colour": "blue"})]
    (workspace / "datasets" / "bad.jsonl").write_text("\n".join(bad) + "\n")
    status, ack, key = await bot.command("run --dataset datasets/bad.jsonl")
    assert status == 200 and "Checking `datasets/bad.jsonl`" in ack
    reply = text_of((await answers(slack, key))[0])
    assert "datasets/bad.jsonl:2" in reply and "datasets/bad.jsonl:3" in reply and "datasets/bad.jsonl:5" in reply
    assert str(workspace) not in reply  # paths as the person knows them, not the server's
    assert runs(bot) == []
    assert store.run_events(store.connect(bot.settings.jobs)) == []
    assert slack.calls_to("chat.postMessage") == []


@pytest.mark.parametrize("text, expected", [
    ("frobnicate", ["is not a /finetune subcommand", "Usage: `/finetune help | run"]),
    ("run --epochs lots", ["`--epochs` takes a number", "Usage: `/finetune run"]),
    ("run --dataset ../../etc/passwd", ["leaves the workspace"]),
    ("cancel", ["`cancel` needs a run id"]),
    ("logs 42", ["`42` is not a run id"]),
    ("x" * 1200, ["1,200 characters"]),
    ("help", ["/finetune run [--model M]", "/finetune logs RUN"]),
])
async def test_bad_input_and_help_are_answered_in_the_ack(bot, slack, text, expected):
    status, ack, key = await bot.command(text)
    assert status == 200
    payload = json.loads(ack)
    for words in expected:
        assert words in text_of(payload), text_of(payload)
    assert "Traceback" not in ack
    assert runs(bot) == []


async def test_rejections_from_the_service_are_answered_privately(bot, slack):
    # no --dataset; an unknown run for each command that takes one; a missing model
    _, _, key = await bot.command("run")
    assert "needs a dataset" in text_of((await answers(slack, key))[0])
    _, _, key = await bot.command("run --dataset datasets/nope.jsonl")
    assert "datasets/nope.jsonl not found" in text_of((await answers(slack, key))[0])
    _, _, key = await bot.command("run --dataset datasets/chat.jsonl --model model-cache/huge")
    assert "not found" in text_of((await answers(slack, key))[0])
    _, ack, _ = await bot.command("status ft-0099")
    assert "There is no run ft-0099" in in_ack(ack)
    for text in ("logs ft-0099", "cancel ft-0099", "resume ft-0099"):
        _, _, key = await bot.command(text)
        assert "There is no run ft-0099" in text_of((await answers(slack, key))[0]), text
    assert runs(bot) == []


async def test_status_list_and_cancel_of_a_queued_run(bot, slack):
    _, _, key = await bot.command("run --dataset datasets/chat.jsonl --name first")
    await answers(slack, key)
    _, _, key = await bot.command("run --dataset datasets/chat.jsonl --max-steps 3", user="U0BOB")
    await answers(slack, key)
    _, ack, _ = await bot.command("list")
    listing = in_ack(ack)
    assert "ft-0002" in listing and "ft-0001 (first)" in listing and "#2 in line" in listing
    _, ack, _ = await bot.command("status ft-0002")
    status = in_ack(ack)
    assert "number 2 in line" in status and "max steps 3" in status and "run_cancel" not in status
    _, ack, _ = await bot.command("status")
    status = in_ack(ack)
    assert "Queued and running" in status and status.index("ft-0001") < status.index("ft-0002")  # oldest first
    # Bob may not cancel Alice's run; Alice may
    _, _, key = await bot.command("cancel ft-0001", user="U0BOB")
    assert "only they or an admin" in text_of((await answers(slack, key))[0])
    _, _, key = await bot.command("cancel ft-0001")
    assert "Cancelling ft-0001" in text_of((await answers(slack, key))[0])
    assert service.get_run(bot.settings.jobs, "ft-0001").state == "cancelled"
    # the thread says by whom, and the card lost its Cancel button
    run = shown(bot.settings.jobs, service.get_run(bot.settings.jobs, "ft-0001"))

    def cancelled_reply():
        run_now = shown(bot.settings.jobs, service.get_run(bot.settings.jobs, "ft-0001"))
        if not run_now.thread_ts:
            return None
        return [m for m in slack.thread("C0TRAIN", run_now.thread_ts) if "cancelled by <@U0ALICE>" in m.text]

    assert await slack.until(cancelled_reply, 10)
    run = shown(bot.settings.jobs, service.get_run(bot.settings.jobs, "ft-0001"))
    card = slack.messages["C0TRAIN"][run.card_ts]
    assert "run_cancel" not in text_of(card.blocks) and "cancelled" in card.text
    _, _, key = await bot.command("cancel ft-0001")
    assert "already been cancelled" in text_of((await answers(slack, key))[0])


async def test_commands_of_later_features_say_what_they_need(bot, slack):
    # deploy works on the local backend too, but needs approvers; none is configured here
    status, ack, key = await bot.command("deploy ft-0001")
    assert status == 200 and "TUNEOPS_APPROVERS" in text_of((await answers(slack, key))[0])
    # provision and secrets are for admins; none is configured here
    status, ack, _ = await bot.command("provision")
    assert "none is configured" in ack


async def test_provision_for_an_admin_says_what_it_needs(redis_url, bot_env, slack):
    bot_env.update(TUNEOPS_ADMINS="U0ADMIN")
    async for bot in _serve(bot_env, slack):
        _, ack, _ = await bot.command("provision inference", user="U0ADMIN")
        assert "provision` needs TUNEOPS_BACKEND=aca and infra/inference.config.json" in ack
        _, ack, _ = await bot.command("secret set HF_TOKEN", user="U0ADMIN")
        assert "Key Vault" in ack


async def test_secrets_in_replies_are_redacted(bot, slack, workspace):
    token = "hf_" + "A1b2C3d4E5" * 4
    (workspace / "datasets" / "leak.jsonl").write_text(f'{{"text": "{token}"\n')
    _, _, key = await bot.command("run --dataset datasets/leak.jsonl")
    reply = text_of((await answers(slack, key))[0])
    assert "leak.jsonl:1" in reply
    assert token not in json.dumps([c.params for c in slack.calls] + [c.response for c in slack.calls])


async def test_a_mention_gets_a_pointer_in_its_thread_once(bot, slack):
    root = "1700000000.000100"
    slack.messages["C0TRAIN"][root] = Message("C0TRAIN", root, "@tuneops how?", [])
    body = json.dumps({"type": "event_callback", "team_id": "T0STANDIN", "api_app_id": "A0TUNEOPS",
                        "event_id": "Ev0001", "event_time": 1700000000,
                        "event": {"type": "app_mention", "user": "U0ALICE", "channel": "C0TRAIN", "ts": root,
                                  "text": "<@U0TUNEOPS> how?"}})
    for retry in (None, 1):  # Slack retries an event it thinks was not received
        headers = signed_headers(SIGNING_SECRET, body, retry_num=retry, content_type="application/json")
        status, _ = await bot.post(body, headers)
        assert status == 200
    replies = await slack.until(lambda: slack.thread("C0TRAIN", root), 10)
    assert replies and "/finetune run --dataset" in replies[0].text
    # A later mention, answered, is the sign that the bot has handled the retry too: it added nothing.
    later = "1700000000.000200"
    slack.messages["C0TRAIN"][later] = Message("C0TRAIN", later, "@tuneops again?", [])
    body = body.replace("Ev0001", "Ev0002").replace(root, later)
    status, _ = await bot.post(body, signed_headers(SIGNING_SECRET, body, content_type="application/json"))
    assert status == 200
    assert await slack.until(lambda: slack.thread("C0TRAIN", later), 10)
    assert len(slack.thread("C0TRAIN", root)) == 1


@pytest.mark.parametrize("status", [429, 503])
async def test_a_slack_incident_at_start_is_not_called_a_bad_token(bot_env, slack, status, caplog):
    """Slack answering 429 or 5xx to auth.test says nothing of the token: the bot starts. A refused token does not."""
    from bot.server import StartupError, make_bot, preflight
    from bot.settings import BotSettings

    settings = BotSettings.from_env(bot_env)
    app, runtime, _ = make_bot(settings, notify=False)
    try:
        slack.fail_for(30, status, methods={"auth.test"})
        with caplog.at_level(logging.WARNING, logger="bot.server"):
            await preflight(settings, app)
        assert f"Slack answered {status} to the token check" in caplog.text
        slack.clear_faults()
        await preflight(settings, app)  # the good token passes
        app.client.token = "xoxb-not-the-right-one"
        with pytest.raises(StartupError, match="Slack refused SLACK_BOT_TOKEN"):
            await preflight(settings, app)
    finally:
        await runtime.close()


async def test_list_and_status_are_answered_in_the_ack_redacted(bot, slack):
    _, _, key = await bot.command("run --dataset datasets/chat.jsonl --name first")
    await answers(slack, key)
    token = "hf_" + "A1b2C3d4E5" * 4  # a name that holds a secret (an edited record; the grammar would refuse it)
    conn = store.connect(bot.settings.jobs)
    record = json.loads(conn.get(store.run_key("ft-0001")))
    conn.set(store.run_key("ft-0001"), json.dumps({**record, "name": token}))
    keys = []
    for text in ("list", "status", "status ft-0001"):
        status, ack, key = await bot.command(text)
        keys.append(key)
        said = in_ack(ack)
        assert status == 200 and "ft-0001" in said, (text, said)
        assert token not in ack and "***" in said, (text, said)
    # A later command's answer on response_url: by then any answer of the earlier ones would have come too.
    _, _, later = await bot.command("cancel ft-0001")
    await answers(slack, later)
    assert not any(slack.responses[k] for k in keys)


async def test_a_read_slower_than_the_ack_budget_is_answered_on_response_url(bot, slack, monkeypatch):
    from bot.listeners import support

    monkeypatch.setattr(support, "ACK_BUDGET_S", 0.0)  # every read is late: acked empty, answered after
    for text, expected in (("list", "No runs yet"), ("status ft-0099", "There is no run ft-0099"),
                           ("status", "Nothing is queued or running")):
        status, ack, key = await bot.command(text)
        assert status == 200 and ack == "", (text, ack)
        [said] = await answers(slack, key)
        assert expected in text_of(said) and said["response_type"] == "ephemeral", (text, said)


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test's own, so that it can be stopped (SIGSTOP) without touching the session's."""
    proc, port = start_redis_server(shutil.which("redis-server"), tmp_path)
    yield proc, f"redis://127.0.0.1:{port}/0"
    proc.send_signal(signal.SIGCONT)
    proc.kill()
    proc.wait(10)


async def quick_answer(bot, slack, text: str) -> tuple[float, str, str]:
    """(seconds from sending the command to its answer, where the answer came: "ack" or "response_url", its text)."""
    start = time.monotonic()
    status, ack, key = await asyncio.wait_for(bot.command(text), 10)  # Slack itself gives up after 3 s
    assert status == 200, (text, status, ack)
    if ack:
        return time.monotonic() - start, "ack", in_ack(ack)
    [said] = await answers(slack, key, timeout=10)
    return time.monotonic() - start, "response_url", text_of(said)


async def test_a_stopped_redis_still_gets_list_and_status_answered_within_3_s(own_redis, bot_env, slack, monkeypatch):
    from bot.listeners import support

    proc, url = own_redis
    async for bot in _serve({**bot_env, "REDIS_URL": url}, slack):
        _, where, said = await quick_answer(bot, slack, "list")
        assert where == "ack" and "No runs yet" in said, (where, said)
        proc.send_signal(signal.SIGSTOP)  # accepts connections (the kernel does), answers nothing
        try:
            for text in ("list", "status", "status ft-0001"):
                elapsed, where, said = await quick_answer(bot, slack, text)
                assert "cannot reach its store" in said and "REDIS_URL" in said, (text, where, said)
                assert elapsed < 2.5, f"`/finetune {text}` answered after {elapsed:.1f} s ({where})"
                # The bot's Redis socket timeout ends the read before the ack's budget does: the answer is the ack.
                assert where == "ack", (text, elapsed)
        finally:
            proc.send_signal(signal.SIGCONT)
        # A read that outlasts the budget and then succeeds: acked at once, its answer follows on response_url.
        monkeypatch.setattr(support, "ACK_BUDGET_S", 0.2)
        proc.send_signal(signal.SIGSTOP)
        asyncio.get_running_loop().call_later(0.6, proc.send_signal, signal.SIGCONT)
        elapsed, where, said = await quick_answer(bot, slack, "list")
        assert where == "response_url" and "No runs yet" in said and elapsed < 2.5, (where, elapsed, said)
        monkeypatch.undo()
        elapsed, where, said = await quick_answer(bot, slack, "list")
        assert where == "ack" and "No runs yet" in said, (where, said)


async def test_a_failing_read_is_answered_in_the_ack_and_logged(bot, slack, monkeypatch):
    from bot.listeners import support
    from bot.listeners.commands import list_runs

    async def broken(r, limit):
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(list_runs, "recent_runs", broken)
    logged = []
    monkeypatch.setattr(support.log, "error", lambda msg, *args, **kw: logged.append((msg % args, kw.get("exc_info"))))
    status, ack, key = await bot.command("list")
    said = in_ack(ack)
    assert status == 200 and "went wrong on tuneops' side (listing the runs)" in said and "a bug" not in said
    assert [(m, type(e).__name__) for m, e in logged] == [("listing the runs failed", "RuntimeError")]


async def test_a_retried_read_only_command_is_answered_again(bot, slack):
    """Slack retries only when it missed the ack, which held the answer: a retried `list` gets it again, and is not
    claimed (reading twice changes nothing)."""
    body = slash_command_body("list", response_url=slack.response_url("again"), trigger_id="7777.8888.cafe")
    for retry in (None, 1, 2):
        status, ack = await bot.post(body, signed_headers(SIGNING_SECRET, body, retry_num=retry))
        assert status == 200 and "No runs yet" in in_ack(ack), (retry, ack)
    assert not store.connect(bot.settings.jobs).keys(store.DELIVERY_KEY.format("*"))
