"""Socket Mode: with SLACK_APP_TOKEN set, `tuneops bot` connects out over a WebSocket (to the stand-in) and answers
slash commands there, with the same listeners and the same notifier as in HTTP mode."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from bot.standin.slack import slash_command_payload
from jobs.runs import service
from tests.conftest import ROOT, shown


@pytest.fixture
def socket_bot(bot_env, slack):
    env = {**os.environ, **bot_env, "SLACK_APP_TOKEN": slack.app_token, "SLACK_SIGNING_SECRET": "",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "bot.cli", "bot"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if not slack.wait_for(slack.socket_connected, 60):
        proc.kill()
        pytest.fail(f"the bot did not connect: {proc.communicate(timeout=10)[0][-2000:]}")
    yield proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_socket_mode_answers_commands_and_runs_the_notifier(socket_bot, slack, bot_env):
    from jobs.core.settings import JobSettings

    envelope = slack.push_envelope("slash_commands", slash_command_payload(
        "help", response_url=slack.response_url("h")))
    ack = slack.wait_for(lambda: slack.socket_acks.get(envelope), 30)
    assert ack and "/finetune run [--model M]" in json.dumps(ack["payload"])

    envelope = slack.push_envelope("slash_commands", slash_command_payload(
        "run --dataset datasets/chat.jsonl --max-steps 2", response_url=slack.response_url("r")))
    ack = slack.wait_for(lambda: slack.socket_acks.get(envelope), 30)
    assert ack and "Checking" in json.dumps(ack["payload"])
    assert slack.wait_for(lambda: slack.responses["r"], 30)
    assert "Queued *ft-0001*" in json.dumps(slack.responses["r"])
    card = slack.wait_for(lambda: slack.root_messages("C0TRAIN"), 30)
    assert card and "ft-0001: queued" in card[0].text
    settings = JobSettings.from_env(bot_env)
    # the card's ts is recorded right after Slack accepted the card
    assert slack.wait_for(lambda: shown(settings, service.get_run(settings, "ft-0001")).card_ts == card[0].ts, 30)

    socket_bot.send_signal(signal.SIGTERM)
    out, _ = socket_bot.communicate(timeout=30)
    assert socket_bot.returncode == 0, out[-2000:]
    assert "Traceback" not in out


def test_a_wrong_app_token_ends_the_bot_with_a_clear_message(bot_env, slack):
    env = {**os.environ, **bot_env, "SLACK_APP_TOKEN": "xapp-1-wrong", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "bot.cli", "bot"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "Slack refused SLACK_APP_TOKEN (invalid_auth)" in result.stderr
    assert "xapp-1-wrong" not in result.stdout + result.stderr and "Traceback" not in result.stderr
    assert not slack.socket_connected()


def test_a_wrong_bot_token_ends_the_http_bot_with_a_clear_message(bot_env, slack):
    env = {**os.environ, **bot_env, "SLACK_BOT_TOKEN": "xoxb-revoked-1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "bot.cli", "bot", "--http", "--port", "0"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "Slack refused SLACK_BOT_TOKEN (invalid_auth)" in result.stderr
