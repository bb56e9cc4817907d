"""The benchmark: its pure parts, and a run end to end of each side (figures are printed, not asserted on)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from payload.bench import (
    VARIANTS,
    comparisons,
    default_variants,
    format_table,
    pack_capacity,
    summarize,
    synthetic_chats,
)
from payload.bench_peer import trl_layout

ROOT = Path(__file__).resolve().parents[2]


def bench(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "payload.bench", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_synthetic_chats_are_deterministic_long_and_in_the_vocabulary():
    words = ["alpha", "beta", "gamma"]
    chats = synthetic_chats(50, 20, 400, words, seed=3)
    assert chats == synthetic_chats(50, 20, 400, words, seed=3) != synthetic_chats(50, 20, 400, words, seed=4)
    lengths = [sum(len(m["content"].split()) for m in c["messages"]) for c in chats]
    assert all(20 <= n <= 400 for n in lengths) and max(lengths) - min(lengths) > 200
    assert {w for c in chats for m in c["messages"] for w in m["content"].split()} <= set(words)
    assert all([m["role"] for m in c["messages"]] == ["user", "assistant"] for c in chats)


def test_default_variants_follow_the_hardware_and_trl():
    ours = ["baseline", "packed", "packed-ga", "packed-ga-gc"]
    assert default_variants(gpu=False, trl_installed=False) == ours
    assert default_variants(gpu=False, trl_installed=True) == ours + ["trl", "trl-no-gc"]
    assert default_variants(gpu=True, trl_installed=True) == list(VARIANTS)
    # packing and dtype measured apart on a GPU: a padded bf16 baseline beside the padded fp32 one
    assert VARIANTS["baseline-bf16"]["compute_dtype"] == "bf16" and not VARIANTS["baseline-bf16"]["packing"]


def test_trl_takes_one_pack_a_micro_batch_without_varlen_attention():
    assert trl_layout("sdpa", 4) == (1, 4)
    assert trl_layout("flash_attention_2", 4) == (4, 1)


def test_pack_capacity_is_the_baselines_token_budget():
    assert pack_capacity({"micro_batch_size": 8, "pack_rows": 2}, 400) == 1600
    assert pack_capacity({"micro_batch_size": 1, "pack_rows": 4}, 400) == 400


def fake(variant: str, speed: float, peak: float = 800.0, loss: float = 4.5, **kw) -> dict:
    return {"variant": variant, "trainer": VARIANTS[variant]["trainer"], "tokens_per_s": speed, "peak_memory_mb": peak,
            "final_loss": loss, "padding_waste": 0.02, "compute_dtype": "fp32", "attention": "sdpa",
            "collator": "C", "micro_batch": 2, "grad_accum": 1, "pack_capacity": 1600, "pack_fill": 0.97,
            "gradient_checkpointing": True, "lora_dtype": None, **kw}


def test_summarize_keeps_min_and_median_of_the_rounds():
    s = summarize([fake("packed", 900, peak=700, loss=4.0), fake("packed", 1200, peak=720, loss=4.2),
                   fake("packed", 1000, peak=710, loss=4.1)])
    assert (s["tokens_per_s"], s["tokens_per_s_min"], s["tokens_per_s_max"]) == (1000, 900, 1200)
    assert s["peak_memory_mb"] == 710 and s["final_loss"] == 4.1 and s["rounds"] == 3
    assert s["all_tokens_per_s"] == [900, 1200, 1000]


def test_table_and_comparisons_put_tuneops_beside_trls_best():
    results = [summarize([fake("baseline", 500, peak=900)]), summarize([fake("packed-ga", 1500, peak=800)]),
               summarize([fake("packed-ga-gc", 1200, peak=600)]),
               summarize([fake("trl", 800, peak=700, grad_accum=2, micro_batch=1, lora_dtype="float32")]),
               summarize([fake("trl-no-gc", 1000, peak=850, gradient_checkpointing=False)])]
    table = format_table(results)
    line = next(line for line in table.splitlines() if line.startswith("packed-ga "))
    assert "1,500" in line and "3.00x" in line and "1.50x" in line       # against the baseline and TRL's fastest
    assert "micro-batch 1 x grad accum 2" in table and "LoRA weights float32" in table
    lines = comparisons(results)
    assert lines[0].startswith("packed-ga vs baseline: 3.00x tokens/s")
    assert lines[1].startswith("packed-ga (the trainer's defaults) vs trl-no-gc (TRL's best here): 1.50x tokens/s")
    assert "800 vs 850 MB (0.94x)" in lines[1]
    assert lines[2].startswith("packed-ga-gc vs trl (checkpointing on both sides): 1.50x tokens/s")
    assert lines[3] == "goal >= 1.5x TRL's best at no more peak memory: met (1.50x tokens/s at 0.94x the memory)"
    # too slow, or more memory than TRL's best: missed
    slower = [summarize([fake("packed-ga", 1400, peak=800)]), results[4]]
    assert comparisons(slower)[-1] == ("goal >= 1.5x TRL's best at no more peak memory: missed "
                                       "(1.40x tokens/s at 0.94x the memory)")
    heavier = [summarize([fake("packed-ga", 1600, peak=900)]), results[4]]
    assert comparisons(heavier)[-1].startswith("goal >= 1.5x TRL's best at no more peak memory: missed (1.60x")


def test_bench_reports_each_variant(tmp_path, tiny_model, example_dataset):
    out = tmp_path / "bench.json"
    res = bench("--model", str(tiny_model), "--data", str(example_dataset), "--variants", "baseline,packed",
                "--steps", "2", "--warmup", "1", "--repeats", "1", "--json", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "packed vs baseline:" in res.stdout and "tokens/s" in res.stdout
    results = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    base, packed = results["baseline"], results["packed"]
    assert base["collator"] == "PaddedCollator" and base["compute_dtype"] == "fp32" and base["gradient_checkpointing"]
    assert packed["collator"] == "PackedRowsCollator" and packed["pack_capacity"] == base["longest_example"] * 4
    # the trainer's defaults: checkpointing decided from a measured step (off here, memory to spare), chunked loss
    assert packed["checkpointing_setting"] == "auto" and packed["gradient_checkpointing"] is False
    assert "within 80%" in packed["checkpointing_reason"] and packed["chunked_loss"] is True
    # the shipped chats padded into batches of 8 waste about a fifth; packed rows, a few per cent
    assert base["padding_waste"] > 0.1 and packed["padding_waste"] < base["padding_waste"] / 2
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0 for r in (base, packed))


def test_bench_runs_tuneops_and_trl_side_by_side(tmp_path, tiny_model, example_dataset):
    pytest.importorskip("trl")
    out = tmp_path / "bench.json"
    res = bench("--model", str(tiny_model), "--data", str(example_dataset), "--variants", "packed-ga,trl",
                "--steps", "2", "--warmup", "1", "--repeats", "1", "--json", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "packed-ga (the trainer's defaults) vs trl (TRL's best here):" in res.stdout
    assert "goal >= 1.5x TRL's best" in res.stdout
    results = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    ours, peer = results["packed-ga"], results["trl"]
    # same tokens, packs, dtype and steps; TRL packs padding-free, one pack a micro-batch on the CPU
    assert peer["trainer"] == "trl" and peer["collator"].endswith("(padding-free)")
    assert (peer["micro_batch"], peer["grad_accum"]) == (ours["micro_batch"], ours["grad_accum"]) == (1, 2)
    assert peer["compute_dtype"] == ours["compute_dtype"] == "fp32" and peer["lora_dtype"] == "float32"
    assert (ours["attention"], peer["attention"]) == ("sdpa_per_example", "sdpa")
    assert peer["pack_capacity"] == ours["pack_capacity"] and peer["examples"] == ours["examples"]
    assert peer["padding_waste"] == 0.0
    for r in (ours, peer):
        assert r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0 and math.isfinite(r["final_loss"])
        assert r["timed_steps"] == 2 and r["rounds"] == 1


def test_bench_rejects_unknown_variants():
    res = bench("--variants", "turbo", timeout=60)
    assert res.returncode == 2 and res.stderr.strip() == "error: unknown variant(s) turbo"
