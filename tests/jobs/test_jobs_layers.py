"""The layers hold, checked by tools we did not write: import-linter's contracts (pyproject.toml), a cycle search over
grimp's import graph (function-local imports included), and plain searches of the source for what must not be there.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import grimp

from jobs.core.masking import mask, mask_lines, secret_values

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def test_import_linter_contracts_are_kept():
    out = subprocess.run([str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout and "7 kept" in out.stdout


def strongly_connected(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module (or a module importing itself)."""
    edges = {m: sorted(graph.find_modules_directly_imported_by(m) & modules) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges[v]:
                found.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for m in sorted(modules):
        if m not in index:
            visit(m)
    return found


def test_no_import_cycles_function_local_imports_included():
    graph = grimp.build_graph("bot", "jobs", "payload")
    modules = {m for m in graph.modules if m.split(".")[0] in ("bot", "jobs", "payload")}
    # A package's __init__ importing its own submodules is how packages work, not a cycle between concerns.
    assert strongly_connected(graph, modules) == []


def test_a_cycle_is_found_when_there_is_one(tmp_path, monkeypatch):
    pkg = tmp_path / "cyc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from cyc import b\n")
    (pkg / "b.py").write_text("from cyc import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = grimp.build_graph("cyc")
    assert strongly_connected(graph, set(graph.modules)) == [["cyc.a", "cyc.b"]]


def source_lines(folder: str, pattern: str) -> list[str]:
    hits = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(pattern, line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    return hits


def test_jobs_words_no_slack():
    assert source_lines("jobs", r"<@|/finetune") == []


def test_nothing_outside_tests_imports_tests():
    assert [h for f in ("bot", "jobs", "payload") for h in source_lines(f, r"\btests\.")] == []


def test_the_bot_names_no_backend_but_in_configuration_and_words():
    """Where the bot mentions aca, it is the name of a setting value in a sentence, never a branch or an import."""
    hits = [h for h in source_lines("bot", r"\baca\b") if not h.split(": ", 1)[0].startswith("bot/standin/")]
    assert [h for h in hits if re.search(r"==\s*[\"']aca|!=\s*[\"']aca|jobs\.backends\.aca|import .*aca", h)] == []


def test_what_the_bot_uses_loads_neither_torch_nor_slack():
    code = ("import sys, jobs.runs.service, jobs.core.store, jobs.runs.tasks, jobs.worker, jobs.core.settings, "
            "jobs.deploys.deploy, jobs.backends; "
            "print(sorted(m for m in ('torch', 'transformers', 'slack_sdk', 'bot') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_bot_and_jobs_mask_by_one_rule_set():
    from bot import redact
    from jobs.core import masking

    assert redact.Redactor is masking.Redactor and redact.secret_values_from_env is masking.secret_values_from_env
    env = {"HF_TOKEN": "hf_" + "x" * 34, "MY_PASSWORD": "correct-horse", "PATH": "/usr/bin:/bin"}
    assert set(secret_values(env)) == set(masking.secret_values_from_env(env).values()) == {env["HF_TOKEN"],
                                                                                           env["MY_PASSWORD"]}


def test_every_task_name_is_a_task():
    """Tasks are enqueued by dotted name (jobs.core.queue): each name must be a function the worker can import."""
    import importlib

    from jobs.backends.aca.ops import OP_TASK
    from jobs.core import queue

    for name in (*queue.TASKS, OP_TASK):
        module, _, func = name.rpartition(".")
        assert callable(getattr(importlib.import_module(module), func)), name


def test_known_secret_values_are_masked():
    env = {"HF_TOKEN": "hf_abcdefghijkl", "WANDB_API_KEY": "0123456789abcdef", "HOME": "/home/someone",
           "DB_PASSWORD": "short", "MY_SAS": "sv=2024&sig=abcdefgh", "TUNEOPS_STORAGE_KEY": "c3RvcmFnZWtleQ=="}
    secrets = secret_values(env)
    # The signature inside a SAS is a secret of its own (the one rule set, jobs.core.masking, for bot and jobs).
    assert set(secrets) == {"hf_abcdefghijkl", "0123456789abcdef", "sv=2024&sig=abcdefgh", "abcdefgh",
                            "c3RvcmFnZWtleQ=="}
    assert mask("login hf_abcdefghijkl at /home/someone", secrets) == "login *** at /home/someone"
    assert mask_lines(["a 0123456789abcdef b", "plain"], secrets) == ["a *** b", "plain"]
