"""The GPU check script: its plan fits a short GPU loan, and its dry run (CPU, tiny) passes every step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from payload.gpucheck import make_plan, train_problems

ROOT = Path(__file__).resolve().parents[2]

GOOD = {"device": "cuda", "steps": 30, "last_loss": 3.2, "attention": "flash_attention_2",
        "quantization": {"quant_types": ["nf4"], "double_quant": True, "compute_dtype": "bf16"}}


def test_the_gpu_plan_fits_in_ten_minutes_and_measures_packing_dtype_and_the_peer():
    plan = make_plan(gpu=True, trl_installed=True)
    assert sum(plan.timeouts.values()) <= 540      # plus the model build (about a minute): under 10 minutes
    assert {"baseline", "baseline-bf16", "packed-ga", "trl", "trl-no-gc"} <= set(plan.bench_variants)
    assert plan.hidden >= 2048 and plan.layers >= 16 and plan.hidden // plan.heads <= 256   # ~0.7B, flash-attn heads
    assert "trl" not in make_plan(gpu=True, trl_installed=False).bench_variants


def test_train_problems_name_what_is_not_the_gpu_path():
    plan = make_plan(gpu=True, trl_installed=True)
    assert train_problems(plan, GOOD, flash_installed=True) == []
    wrong = {**GOOD, "device": "cpu", "attention": "sdpa",
             "quantization": {"quant_types": ["fp4"], "double_quant": False, "compute_dtype": "fp32"}}
    problems = " | ".join(train_problems(plan, wrong, flash_installed=True))
    assert "not cuda" in problems and "not bf16" in problems and "NF4" in problems and "flash_attn" in problems
    assert train_problems(plan, {**GOOD, "attention": "sdpa"}, flash_installed=False) == []
    dry = make_plan(gpu=False, trl_installed=True)
    assert train_problems(dry, {**GOOD, "device": "cpu", "attention": "sdpa",
                                "quantization": {**GOOD["quantization"], "compute_dtype": "fp32"}}, False) == []


def test_dry_run_passes_every_step(tmp_path):
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "payload.gpucheck", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=240, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = {s["step"]: s for s in summary["steps"]}
    assert list(steps) == ["environment", "model", "train", "serve", "bench"] and summary["ok"] and not summary["gpu"]
    assert steps["train"]["device"] == "cpu" and steps["train"]["quantization"]["quant_types"] == ["nf4"]
    assert steps["serve"]["models"][0] and "gpucheck" in steps["serve"]["models"]
    assert steps["serve"]["completion_tokens"] == summary["plan"]["max_tokens"]
    assert set(steps["bench"]["bench"]) == set(summary["plan"]["bench_variants"])
    assert "all steps passed" in res.stdout
    print(f"dry run: {time.monotonic() - t0:.1f} s")
