"""Gradient checkpointing decided from a measured step: what the config says wins, "auto" measures the heaviest
micro-batch and leaves no trace of it, and the run says what it decided in its start event and metrics."""

from __future__ import annotations

import json

import pytest

from payload import data, memory
from payload.config import TrainConfig
from payload.events import EVENTS_FILE, read_events
from tests.payload.test_train import RUN, train, workspace


@pytest.fixture(scope="module")
def lora_model(tiny_model):
    import torch

    from payload.train import add_lora, load_model

    cfg = TrainConfig(base_model=str(tiny_model), dataset="x.jsonl", output_dir="out", lora_r=8, lora_alpha=8)
    return add_lora(cfg, load_model(cfg, str(tiny_model), True, "cpu", torch.float32, "sdpa"))


@pytest.fixture(scope="module")
def heaviest(tiny_model):
    from transformers import AutoTokenizer

    from payload.tinymodel import example_dataset_path

    tok = AutoTokenizer.from_pretrained(tiny_model)
    examples = data.tokenize_records(data.read_records(example_dataset_path()).records, tok, 256)
    packs = data.build_packs(examples, 128)
    return memory.heaviest_batch(packs, 2, data.PackedRowsCollator(0))


def _never():
    raise AssertionError("the heaviest batch is measured only for 'auto'")


@pytest.mark.parametrize("setting", [True, False])
def test_the_configs_true_or_false_is_taken_without_measuring(lora_model, setting):
    import contextlib

    d = memory.decide(setting, lora_model, _never, "cpu", contextlib.nullcontext())
    assert d.on is setting and d.setting == "config" and d.step_peak_mb is None
    assert d.reason == f"gradient_checkpointing is {str(setting).lower()} in the config"


@pytest.mark.parametrize("limit_mb, on", [(None, False), ("1", True)])
def test_auto_measures_the_heaviest_step_against_the_limit(lora_model, heaviest, monkeypatch, limit_mb, on):
    import contextlib

    import torch

    if limit_mb:
        monkeypatch.setenv(memory.LIMIT_ENV, limit_mb)
    else:
        monkeypatch.delenv(memory.LIMIT_ENV, raising=False)
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    d = memory.decide("auto", lora_model, lambda: heaviest, "cpu", contextlib.nullcontext())
    assert d.on is on and d.setting == "auto"
    assert d.step_peak_mb > 0 and (d.limit_mb == 1.0 if limit_mb else d.limit_mb > 100)
    assert ("over 80% of 1 MB" in d.reason) if on else ("within 80% of" in d.reason)
    # The measured step leaves nothing behind: no gradient, the random generator where it was.
    assert all(p.grad is None for p in lora_model.parameters())
    assert torch.equal(torch.rand(3), expected_next)
    assert d.as_event()["on"] is on and json.dumps(d.as_event())


def test_the_cpu_limit_is_what_the_process_may_still_have(monkeypatch):
    monkeypatch.delenv(memory.LIMIT_ENV, raising=False)
    free = memory.limit_mb("cpu")
    assert 0 < free
    monkeypatch.setenv(memory.LIMIT_ENV, "512")
    assert memory.limit_mb("cpu") == min(512.0, free)


def test_a_step_that_runs_out_of_memory_while_measured_turns_it_on():
    """The edge of the world here is the device running out of memory: a module that raises torch's error."""
    import contextlib

    import torch

    class Exhausted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, **batch):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    d = memory.decide("auto", Exhausted(), lambda: {"input_ids": torch.ones(1, 4, dtype=torch.long)}, "cpu",
                      contextlib.nullcontext())
    assert d.on and d.reason == "the heaviest micro-batch ran out of memory without it"


def test_the_peak_meter_sees_a_step_that_came_after_its_reset():
    meter = memory.PeakMeter("cpu")
    meter.reset()
    before = meter.peak_mb()
    block = bytearray(200 * 2**20)
    block[::4096] = b"x" * len(block[::4096])        # touch every page: resident
    assert meter.peak_mb() >= before + 190
    del block


def _start_and_metrics(ws):
    evs = read_events(ws / RUN / EVENTS_FILE)[0]
    return evs[0], json.loads((ws / RUN / "metrics.json").read_text()), [e for e in evs if e["type"] == "step"]


def test_a_run_says_what_it_decided_and_auto_off_trains_as_false_does(tmp_path, tiny_model, example_dataset):
    """"auto" on a machine with memory to spare turns checkpointing off and trains step for step as a config that
    says false; under a 1 MB limit it turns it on, and says why in the start event and the metrics."""
    runs = {}
    for name, setting, extra_env in (("auto", "auto", {}), ("false", False, {}),
                                     ("tight", "auto", {memory.LIMIT_ENV: "1"})):
        ws = workspace(tmp_path / name, tiny_model, example_dataset, gradient_checkpointing=setting, max_steps=6,
                       num_epochs=1, save_steps=100, eval_split=0.0, eval_generations=0)
        res = train(ws, extra_env=extra_env)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = _start_and_metrics(ws)
    (auto, auto_m, auto_steps), (false, _, false_steps), (tight, tight_m, _) = runs["auto"], runs["false"], \
        runs["tight"]
    assert auto["type"] == "start" and auto["gradient_checkpointing"]["on"] is False
    assert auto["gradient_checkpointing"]["setting"] == "auto"
    assert "within 80%" in auto["gradient_checkpointing"]["reason"]
    assert auto["chunked_loss"] is True and auto_m["gradient_checkpointing"] == auto["gradient_checkpointing"]
    assert false["gradient_checkpointing"] == {"on": False, "setting": "config", "step_peak_mb": None,
                                               "limit_mb": None,
                                               "reason": "gradient_checkpointing is false in the config"}
    assert [s["loss"] for s in auto_steps] == [s["loss"] for s in false_steps]
    assert auto_m["gradient_checkpointing_applied"] is False and tight_m["gradient_checkpointing_applied"] is True
    assert tight["gradient_checkpointing"]["on"] is True and tight["gradient_checkpointing"]["limit_mb"] == 1.0
    assert "over 80% of 1 MB" in tight_m["gradient_checkpointing"]["reason"]
