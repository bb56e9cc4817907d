"""What the Slack-and-Azure tests share: the bot over signed HTTP on the ACA backend, the Azure stand-in with the real
SDK clients (tests.azure.conftest), a real worker whose only difference from production is its static token, and
what Slack POSTs when someone submits a modal. Test modules import the fixtures from here."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from bot.standin.slack import view_submission_body  # noqa: F401  (used by the importing test modules)
from tests.azure import standin_worker
from tests.azure.conftest import aca, standin  # noqa: F401  (fixtures used by the importing test modules)
from tests.conftest import ROOT

ADMIN = "U0ALICE"


@pytest.fixture
def bot_env(bot_env, aca, tmp_path, monkeypatch):  # noqa: F811  (extends tests/bot/conftest.py's bot_env)
    """The bot's and worker's environment on the ACA backend, pointing at the Azure stand-in; U0ALICE is an admin."""
    cache = str(tmp_path / "cache")
    monkeypatch.setenv("XDG_CACHE_HOME", cache)  # the sync's hash cache, in this process too
    return {**bot_env, **aca.env, "TUNEOPS_BACKEND": "aca", "TUNEOPS_ADMINS": ADMIN, "XDG_CACHE_HOME": cache}


@pytest.fixture
def aca_worker(bot_env, tmp_path):
    """A real worker (RQ with its scheduler, forked job processes) on the ACA backend; its log is at `.log`."""
    proc = standin_worker.start({**os.environ, **bot_env, "PYTHONPATH": str(ROOT)}, tmp_path / "aca-worker.log")
    proc.log = tmp_path / "aca-worker.log"
    yield proc
    standin_worker.stop(proc)


def opened_view(call) -> tuple[str, dict[str, Any]]:
    """(view id, view) of a recorded views.open call."""
    view = call.params["view"]
    return call.response["view"]["id"], json.loads(view) if isinstance(view, str) else view


def worker_log(proc) -> str:
    return Path(proc.log).read_text(errors="replace")
