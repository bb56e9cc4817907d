"""jobs/ stays below bot/ and away from Slack, and what the bot imports of it loads no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from jobs.masking import mask, mask_lines, secret_values

JOBS = Path(__file__).resolve().parents[2] / "jobs"
FORBIDDEN = ("slack_sdk", "slack_bolt", "bot")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_jobs_never_imports_slack_or_bot():
    files = sorted(JOBS.rglob("*.py"))
    assert files
    offenders = {str(f.relative_to(JOBS)): sorted(m for m in imported_modules(f) if m.split(".")[0] in FORBIDDEN)
                 for f in files}
    assert {f: m for f, m in offenders.items() if m} == {}


def test_what_the_bot_uses_loads_neither_torch_nor_slack():
    code = ("import sys, jobs.service, jobs.store, jobs.tasks, jobs.worker, jobs.settings; "
            "print(sorted(m for m in ('torch', 'transformers', 'slack_sdk', 'bot') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_known_secret_values_are_masked():
    env = {"HF_TOKEN": "hf_abcdefghijkl", "WANDB_API_KEY": "0123456789abcdef", "HOME": "/home/someone",
           "DB_PASSWORD": "short", "MY_SAS": "sv=2024&sig=abcdefgh", "TUNEOPS_STORAGE_KEY": "c3RvcmFnZWtleQ=="}
    secrets = secret_values(env)
    assert set(secrets) == {"hf_abcdefghijkl", "0123456789abcdef", "sv=2024&sig=abcdefgh", "c3RvcmFnZWtleQ=="}
    assert mask("login hf_abcdefghijkl at /home/someone", secrets) == "login *** at /home/someone"
    assert mask_lines(["a 0123456789abcdef b", "plain"], secrets) == ["a *** b", "plain"]
