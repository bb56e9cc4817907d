"""Bot settings: every problem reported at once, one line each, with what to do; good values read as given."""

from __future__ import annotations

import sys

import pytest

from bot.settings import SLACK_API_URL, BotSettings
from jobs.core.settings import SettingsError

GOOD = {"SLACK_BOT_TOKEN": "xoxb-1-2-abc", "SLACK_SIGNING_SECRET": "sekret", "TUNEOPS_PYTHON": sys.executable}


def test_good_settings_with_defaults():
    s = BotSettings.from_env(GOOD)
    assert s.slack_api_url == SLACK_API_URL and not s.socket_mode
    assert s.policy.allowed_channels == frozenset() and s.policy.admins == frozenset()
    assert s.jobs.backend == "local"


def test_lists_urls_and_socket_mode():
    s = BotSettings.from_env({**GOOD, "SLACK_APP_TOKEN": "xapp-1-A-1-abc", "SLACK_API_URL": "http://127.0.0.1:9/api",
                              "TUNEOPS_ALLOWED_CHANNELS": " C0AAA, G0BBB ,", "TUNEOPS_ADMINS": "U0ADMIN,W0ORG",
                              "TUNEOPS_ALLOWED_USERS": "", "TUNEOPS_APPROVERS": "U0APP"})
    assert s.socket_mode
    assert s.slack_api_url == "http://127.0.0.1:9/api/"  # slack_sdk needs the trailing slash
    assert s.policy.allowed_channels == {"C0AAA", "G0BBB"}
    assert s.policy.admins == {"U0ADMIN", "W0ORG"} and s.policy.approvers == {"U0APP"}


def test_every_problem_is_reported_at_once():
    env = {"SLACK_BOT_TOKEN": "xoxp-user-token", "SLACK_APP_TOKEN": "app-token", "SLACK_API_URL": "ftp://x",
           "TUNEOPS_ALLOWED_USERS": "alice,U0BOB", "TUNEOPS_ALLOWED_CHANNELS": "#general",
           "TUNEOPS_BACKEND": "gpu-cloud", "TUNEOPS_MAX_RUNNING": "zero", "TUNEOPS_PYTHON": sys.executable}
    with pytest.raises(SettingsError) as e:
        BotSettings.from_env(env)
    problems = e.value.problems
    text = "\n".join(problems)
    for words in ("SLACK_BOT_TOKEN does not look like a bot token", "SLACK_SIGNING_SECRET is missing",
                  "SLACK_APP_TOKEN does not look like an app-level token", "SLACK_API_URL is not an http(s) URL",
                  "TUNEOPS_ALLOWED_USERS: 'alice' is not a Slack user ID",
                  "TUNEOPS_ALLOWED_CHANNELS: '#general' is not a Slack channel ID",
                  "TUNEOPS_BACKEND", "TUNEOPS_MAX_RUNNING"):
        assert words in text, words
    assert len(problems) == 8
    assert "xoxp-user-token" not in text  # a wrong token is still a secret


def test_missing_token_says_where_to_find_it():
    with pytest.raises(SettingsError) as e:
        BotSettings.from_env({"SLACK_SIGNING_SECRET": "x", "TUNEOPS_PYTHON": sys.executable})
    [problem] = e.value.problems
    assert "SLACK_BOT_TOKEN is missing" in problem and "OAuth & Permissions" in problem


def test_socket_mode_needs_no_signing_secret():
    s = BotSettings.from_env({"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_APP_TOKEN": "xapp-1-A-1",
                              "TUNEOPS_PYTHON": sys.executable})
    assert s.socket_mode and s.slack_signing_secret == ""
