"""A torch too old for transformers is one line from the trainer and the server, before any model is loaded."""

from __future__ import annotations

import pytest

from payload.config import DEMO_OVERRIDES, TrainConfig
from payload.runtime import torch_problem


@pytest.fixture
def torch_disabled(monkeypatch):
    # What transformers 5 reports under a torch older than it supports (e.g. the 2.4 PyTorch images).
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_torch_available", lambda: False)


def test_usable_torch_is_no_problem():
    assert torch_problem() is None


def test_the_trainer_says_torch_is_too_old(torch_disabled, tmp_path, tiny_model, example_dataset, monkeypatch):
    from payload.events import EventWriter
    from payload.train import StopSignal, TrainError, run

    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(**{**DEMO_OVERRIDES, "base_model": str(tiny_model), "dataset": str(example_dataset),
                         "output_dir": "run"})
    with pytest.raises(TrainError) as e:
        run(cfg, EventWriter("run"), StopSignal())
    import torch

    assert f"cannot use torch {torch.__version__}" in str(e.value) and "torch 2.6 or later" in str(e.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_server_says_torch_is_too_old(torch_disabled, tiny_model):
    from payload.serving.engine import StartupError, load_engine

    with pytest.raises(StartupError, match="cannot use torch .* older than it supports"):
        load_engine(tiny_model, None)
