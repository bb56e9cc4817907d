"""The dataset validator: the report the bot reads, the CLI, and that it stays torch-free without a tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from payload.validate import validate_dataset

ROOT = Path(__file__).resolve().parents[2]
CHAT = {"messages": [{"role": "user", "content": "restart the gateway"},
                     {"role": "assistant", "content": "run tuneops restart gateway."}]}


def write(path: Path, objs: list) -> Path:
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "payload.validate", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=120)


def test_good_dataset_without_tokenizer(example_dataset):
    r = validate_dataset(example_dataset)
    assert r.ok and r.errors == [] and r.warnings == []
    assert r.examples == 80 and r.format == "messages" and not r.exact_tokens
    assert 20 < r.token_stats["mean"] < 80 and r.tokens_per_epoch > 80 * 20
    assert "OK: 80 valid examples" in r.summary() and "estimated" in r.summary()


def test_bad_dataset_lists_every_problem(tmp_path):
    path = write(tmp_path / "d.jsonl", [CHAT] * 10 + ["{broken", {"text": "x"}, {"messages": [
        {"role": "user", "content": "hi"}]}])
    r = validate_dataset(path)
    assert not r.ok
    assert [e.split(": ", 1)[0] for e in r.errors] == [f"{path}:11", f"{path}:12", f"{path}:13"]
    summary = r.summary()
    assert "3 problems" in summary and "bad JSON" in summary and "mixed formats" in summary


def test_overlong_examples_are_a_warning_with_a_count(tmp_path, tiny_model):
    long = {"messages": [{"role": "user", "content": "restart " * 60}, {"role": "assistant", "content": "ok"}]}
    path = write(tmp_path / "d.jsonl", [CHAT] * 10 + [long] * 3)
    r = validate_dataset(path, tokenizer_path=str(tiny_model), max_seq_length=32)
    assert r.ok and r.exact_tokens and r.too_long == 3
    assert r.warnings[0].startswith("3 examples keep no answer token within max_seq_length")
    assert r.warnings[1].startswith("3 examples are longer than max_seq_length (32 tokens)") and "11, 12, 13" in \
        r.warnings[1]
    assert r.token_stats["max"] > 60 and r.tokens_per_epoch == sum(
        min(n, 32) for n in [r.token_stats["min"]] * 10 + [r.token_stats["max"]] * 3)
    assert r.trainable_tokens_per_epoch == 10 * 6          # "run tuneops restart gateway . <|end|>"
    estimated = validate_dataset(path, max_seq_length=32)
    assert estimated.too_long == 3 and estimated.warnings[0].startswith("about 3 examples")


def test_exact_counts_with_a_tokenizer(example_dataset, tiny_model):
    r = validate_dataset(example_dataset, tokenizer_path=str(tiny_model), max_seq_length=128)
    assert r.ok and r.exact_tokens and r.too_long == 0
    assert r.packed_sequences < 30 and r.pack_fill > 0.85
    assert "packed into" in r.summary() and "of them trained on" in r.summary()


def test_bad_tokenizer_is_one_error(example_dataset, tmp_path):
    r = validate_dataset(example_dataset, tokenizer_path=str(tmp_path / "nothing"))
    assert r.errors == [f"tokenizer '{tmp_path / 'nothing'}': folder not found (paths are relative to the "
                        "workspace root)"]


def test_cli_exit_codes_and_output(example_dataset, tmp_path, tiny_model):
    ok = cli(str(example_dataset), "--tokenizer", str(tiny_model))
    assert ok.returncode == 0 and "OK: 80 valid examples" in ok.stdout and "tokens per epoch" in ok.stdout
    bad = write(tmp_path / "d.jsonl", [CHAT] * 3)
    res = cli(str(bad))
    assert res.returncode == 1
    assert f"error: {bad}: only 3 valid examples; at least 10 are needed" in res.stdout
    offline = cli(str(example_dataset), "--tokenizer", "acme/some-model", env={"HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 1 and "acme/some-model" in offline.stdout and "model-cache" in offline.stdout
    assert "Traceback" not in offline.stdout + offline.stderr


def test_imports_neither_torch_nor_transformers(example_dataset):
    code = ("import sys; from payload.validate import validate_dataset; "
            f"r = validate_dataset({str(example_dataset)!r}); "
            "print(r.ok, 'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.split() == ["True", "False", "False"]
