"""Every environment variable the code reads is documented: in docs/configuration.md, and with its default in
.env.example. Found by scanning the sources for the names, so a new variable without docs fails here."""

from __future__ import annotations

import re

from tests.conftest import ROOT

# Set by tuneops on each ACA execution (documented as such), not settings a person gives.
SET_BY_TUNEOPS = {"TUNEOPS_RUN_ID", "TUNEOPS_ATTEMPT", "TUNEOPS_CONFIG", "TUNEOPS_SMOKE_ID"}
# Names the redactor knows as secrets wherever they appear; tuneops itself never reads them.
REDACTION_ONLY = {"SLACK_CLIENT_SECRET", "SLACK_USER_TOKEN"}
NAME = re.compile(r"""["']((?:TUNEOPS|SLACK|REDIS)_[A-Z0-9_]*[A-Z0-9])["']""")


def names_in_code() -> set[str]:
    found: set[str] = set()
    for part in ("bot", "jobs", "payload"):
        for path in (ROOT / part).rglob("*.py"):
            found |= set(NAME.findall(path.read_text(encoding="utf-8")))
    return found - REDACTION_ONLY


def test_every_variable_is_documented():
    names = names_in_code()
    assert {"SLACK_BOT_TOKEN", "TUNEOPS_BACKEND", "TUNEOPS_INFRA_DIR", "TUNEOPS_SERVE_API_KEY"} <= names
    docs = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    example = (ROOT / ".env.example").read_text(encoding="utf-8")
    assert not sorted(n for n in names if f"`{n}`" not in docs), "missing from docs/configuration.md"
    in_example = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=", example, re.M))
    assert not sorted(names - SET_BY_TUNEOPS - in_example), "missing from .env.example"
