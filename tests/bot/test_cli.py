"""The `tuneops` CLI and `tuneops doctor`: plain messages and exit codes, against real Redis and the Slack stand-in
(and, for `doctor --smoke`, the Azure stand-in)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bot.doctor import run_checks
from tests.azure.conftest import aca, standin  # noqa: F401  (fixtures: the Azure stand-in, the real SDK clients)
from tests.bot.conftest import BOT_TOKEN
from tests.conftest import ROOT, dead_port, free_port


def tuneops(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "TUNEOPS_", "REDIS_"))}
    return subprocess.run([sys.executable, "-m", "bot.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**clean, "PYTHONPATH": str(ROOT), **env}, timeout=timeout)


def by_name(checks) -> dict:
    return {c.name: c for c in checks}


def test_doctor_says_what_is_missing_and_fails(tmp_path):
    env = {"REDIS_URL": f"redis://127.0.0.1:{dead_port()}/0", "TUNEOPS_WORKSPACE": str(tmp_path / "nowhere"),
           "SLACK_API_URL": f"http://127.0.0.1:{dead_port()}/api/", "TUNEOPS_PYTHON": sys.executable}
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

    # The command takes a --port it cannot report back when given 0, so the free port may be taken before the bot
    # binds it: the bot then exits at once, and we try a fresh port (a bounded number of times).
    for _ in range(5):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "bot.cli", "bot", "--http", "--port", str(port), "--host",
                                 "127.0.0.1"], cwd=ROOT, env={**os.environ, **bot_env, "PYTHONPATH": str(ROOT)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        served = False
        try:
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                        served = r.status == 200 and "redis" in json.loads(r.read())
                        break
                except (OSError, ValueError):
                    time.sleep(0.2)
            served = served and proc.poll() is None  # answered by our bot, not by whoever took the port
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=20)
        if served:
            break
        if "address already in use" not in out.lower():
            pytest.fail(f"the bot did not serve: {out}")
    else:
        pytest.fail(f"the bot found no free port in 5 attempts: {out}")
    assert proc.returncode == 0, out
    assert BOT_TOKEN not in out


def test_help_names_the_four_commands():
    result = tuneops("--help", env={})
    assert result.returncode == 0
    for name in ("bot", "worker", "demo", "doctor"):
        assert name in result.stdout


# ---- tuneops doctor --smoke -------------------------------------------------------------------------------------------


@pytest.fixture
def aca_env(bot_env, aca, tmp_path, monkeypatch):
    """The CLI's environment on the ACA backend, pointing at the Azure stand-in (in this process: the CLI here uses
    the stand-in's static token that the `aca` fixture installed)."""
    env = {**bot_env, **aca.env, "TUNEOPS_BACKEND": "aca", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def test_doctor_smoke_prints_each_step_and_passes_only_when_the_check_does(aca_env, aca, capsys):
    from bot import cli
    from jobs.backends.aca.provision import provision_finetune
    from jobs.backends.aca.standin import ExecutionPlan, Fault, run_command

    provision_finetune(aca.clients)
    aca.standin.set_usage("SubscriptionConsumptionNCA100Gpus", 0, 0)
    aca.standin.plan_execution(ExecutionPlan(program=run_command()))
    assert cli.main(["doctor", "--smoke", "--log-wait", "1"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "Smoke check on the aca backend: one short execution; each step as it ends."
    assert any(line.startswith("[WARN   ] GPU quota: GPU quota: 0 A100") and "Runs will not start" in line
               for line in lines)
    for step in ("smoke job", "payload code", "start", "share", "Key Vault references", "payload import",
                 "Log Analytics"):
        assert any(line.startswith(f"[ok     ] {step}: ") for line in lines), (step, out)
    assert any(line.strip().startswith("logs: https://portal.azure.com/") for line in lines)
    assert lines[-1].startswith("Smoke check passed")

    aca.standin.inject(Fault("arm", path=r"/jobs/tuneops-ft-smoke/start$", method="POST", status=403,
                             code="AuthorizationFailed", message="no jobs/start/action"))
    assert cli.main(["doctor", "--smoke", "--log-wait", "1"]) == 1
    out = capsys.readouterr().out
    assert "[FAILED ] start: Could not start the smoke job tuneops-ft-smoke" in out
    assert out.splitlines()[-1].startswith("Smoke check failed at start: ") and "Traceback" not in out


def test_doctor_smoke_on_the_local_backend_says_there_is_no_azure_to_check(tmp_path):
    env = {"REDIS_URL": f"redis://127.0.0.1:{dead_port()}/0", "TUNEOPS_BACKEND": "local",
           "TUNEOPS_WORKSPACE": str(tmp_path), "TUNEOPS_PYTHON": sys.executable}
    result = tuneops("doctor", "--smoke", env=env)
    assert result.returncode == 1
    assert "[FAILED ] smoke check: the local backend has no Azure to check" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
