"""The benchmark script runs end to end and reports what it promises (figures are printed, not asserted on)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_reports_each_variant(tmp_path, tiny_model):
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, "-m", "payload.bench", "--model", str(tiny_model), "--variants", "baseline,packed",
         "--steps", "2", "--warmup", "1", "--repeats", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "packed vs baseline:" in res.stdout and "tokens/s" in res.stdout
    results = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    base, packed = results["baseline"], results["packed"]
    assert base["collator"] == "PaddedCollator" and base["compute_dtype"] == "fp32" and base["gradient_checkpointing"]
    assert packed["collator"] == "PackedRowsCollator" and packed["pack_capacity"] == base["longest_example"] * 4
    # the shipped chats padded into batches of 8 waste about a fifth; packed rows, a few per cent
    assert base["padding_waste"] > 0.1 and packed["padding_waste"] < base["padding_waste"] / 2
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0 for r in (base, packed))


def test_bench_rejects_unknown_variants():
    res = subprocess.run([sys.executable, "-m", "payload.bench", "--variants", "turbo"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.strip() == "error: unknown variant(s) turbo"
