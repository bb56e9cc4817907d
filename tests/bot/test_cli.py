"""The `tuneops` CLI and `tuneops doctor`: plain messages and exit codes, against real Redis and the Slack stand-in."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bot.doctor import run_checks
from tests.bot.conftest import BOT_TOKEN
from tests.conftest import ROOT, free_port


def tuneops(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "TUNEOPS_", "REDIS_"))}
    return subprocess.run([sys.executable, "-m", "bot.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**clean, "PYTHONPATH": str(ROOT), **env}, timeout=timeout)


def by_name(checks) -> dict:
    return {c.name: c for c in checks}


def test_doctor_says_what_is_missing_and_fails(tmp_path):
    env = {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "TUNEOPS_WORKSPACE": str(tmp_path / "nowhere"),
           "SLACK_API_URL": f"http://127.0.0.1:{free_port()}/api/", "TUNEOPS_PYTHON": sys.executable}
    result = tuneops("doctor", env=env)
    assert result.returncode == 1
    out = result.stdout
    assert "[MISSING] configuration: SLACK_BOT_TOKEN is missing" in out
    assert "SLACK_SIGNING_SECRET is missing" in out
    assert "[MISSING] Redis: nothing answers at REDIS_URL" in out
    assert "[MISSING] Slack: cannot call auth.test without SLACK_BOT_TOKEN" in out
    assert "[MISSING] workspace:" in out and "does not exist" in out
    assert "Traceback" not in out + result.stderr


def test_doctor_with_everything_but_a_worker(bot_env, slack, workspace):
    checks = by_name(run_checks(bot_env))
    assert checks["configuration"].ok and checks["Redis"].ok
    assert checks["Slack"].ok and "T0STANDIN" in checks["Slack"].detail
    assert checks["workspace"].ok and checks["default model"].ok
    assert checks["trainer"].ok
    assert not checks["workers"].ok and "tuneops worker" in checks["workers"].detail


def test_doctor_reports_a_refused_token_and_a_missing_model(bot_env, slack, workspace):
    checks = by_name(run_checks({**bot_env, "SLACK_BOT_TOKEN": "xoxb-revoked-token",
                                 "TUNEOPS_DEFAULT_MODEL": "model-cache/absent"}))
    assert not checks["Slack"].ok and "invalid_auth" in checks["Slack"].detail
    assert not checks["default model"].ok and "model-cache/absent" in checks["default model"].detail


def test_doctor_passes_with_a_worker(bot_env, slack, workspace, worker):
    import time

    deadline = time.monotonic() + 60
    while True:
        checks = by_name(run_checks(bot_env))
        if checks["workers"].ok or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert all(c.ok for c in checks.values()), [c for c in checks.values() if not c.ok]


def test_bot_refuses_to_start_with_bad_settings():
    result = tuneops("bot", env={"SLACK_BOT_TOKEN": "not-a-token", "TUNEOPS_MAX_RUNNING": "-3",
                                 "TUNEOPS_PYTHON": sys.executable})
    assert result.returncode == 2
    assert "SLACK_BOT_TOKEN does not look like a bot token" in result.stderr
    assert "TUNEOPS_MAX_RUNNING" in result.stderr and "SLACK_SIGNING_SECRET is missing" in result.stderr
    assert "Traceback" not in result.stderr and "not-a-token" not in result.stderr


def test_bot_serves_http_and_stops_on_sigterm(bot_env, slack):
    import signal
    import time
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bot.cli", "bot", "--http", "--port", str(port), "--host",
                             "127.0.0.1"], cwd=ROOT, env={**os.environ, **bot_env, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail(f"the bot did not serve: {proc.stdout.read() if proc.poll() is not None else ''}")
                time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert BOT_TOKEN not in out


def test_help_names_the_four_commands():
    result = tuneops("--help", env={})
    assert result.returncode == 0
    for name in ("bot", "worker", "demo", "doctor"):
        assert name in result.stdout
