"""What the Slack-and-Azure tests share: the bot over signed HTTP on the ACA backend, the Azure stand-in with the real
SDK clients (tests.azure.conftest), a real worker whose only difference from production is its static token, and
what Slack POSTs when someone submits a modal. Test modules import the fixtures from here."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.azure import standin_worker
from tests.azure.conftest import aca, standin  # noqa: F401  (fixtures used by the importing test modules)
from tests.conftest import ROOT

ADMIN = "U0ALICE"


def view_submission_body(view: dict[str, Any], view_id: str, values: dict[str, dict[str, str]], *,
                         user_id: str = ADMIN, team_id: str = "T0STANDIN") -> str:
    """The form-encoded body of a modal submission (payload=<json>), as Slack POSTs it: the view as it was opened,
    with what was typed in `state.values` (block_id -> action_id -> text)."""
    state = {"values": {block: {action: {"type": "plain_text_input", "value": text}
                                for action, text in actions.items()} for block, actions in values.items()}}
    payload = {
        "type": "view_submission",
        "team": {"id": team_id, "domain": "standin"},
        "user": {"id": user_id, "username": user_id.lower(), "name": user_id.lower(), "team_id": team_id},
        "api_app_id": "A0TUNEOPS",
        "token": "deprecated-verification-token",
        "trigger_id": f"{int(time.time())}.{uuid.uuid4().int % 10**12}.{uuid.uuid4().hex}",
        "view": {
            "id": view_id, "team_id": team_id, "type": "modal", "blocks": view.get("blocks", []),
            "private_metadata": view.get("private_metadata", ""), "callback_id": view.get("callback_id", ""),
            "state": state, "hash": uuid.uuid4().hex[:16], "title": view.get("title"), "close": view.get("close"),
            "submit": view.get("submit"), "clear_on_close": False, "notify_on_close": False,
            "previous_view_id": None, "root_view_id": view_id, "app_id": "A0TUNEOPS", "external_id": "",
            "app_installed_team_id": team_id, "bot_id": "B0TUNEOPS",
        },
        "response_urls": [],
        "is_enterprise_install": False,
        "enterprise": None,
    }
    return urlencode({"payload": json.dumps(payload)})


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
