"""The run config a run's trainer reads: built from the Run record, pure, shared by every backend.

Paths are relative to the workspace root (the trainer's working directory): the output goes to `runs/<run_id>`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from payload.config import TrainConfig

RUNS_DIR = "runs"
CONFIG_NAME = "run.json"
# Command flags -> run config keys.
PARAM_KEYS = {"epochs": "num_epochs", "lr": "learning_rate", "max_steps": "max_steps"}


def run_dir(run_id: str) -> str:
    return f"{RUNS_DIR}/{run_id}"


def config_path(run_id: str) -> str:
    return f"{run_dir(run_id)}/{CONFIG_NAME}"


def params_from_command(*, epochs: float | None = None, lr: float | None = None,
                        max_steps: int | None = None) -> dict[str, Any]:
    """The run's params in run config terms; only the ones that were given."""
    given = {"epochs": epochs, "lr": lr, "max_steps": max_steps}
    return {PARAM_KEYS[k]: v for k, v in given.items() if v is not None}


def build_train_config(run_id: str, model: str, dataset: str, params: Mapping[str, Any],
                       overrides: Mapping[str, Any] = {}) -> TrainConfig:
    """The config for one run. `overrides` (the deployment's defaults) come first; the run's own params win."""
    return TrainConfig.model_validate({
        **dict(overrides),
        **dict(params),
        "run_id": run_id,
        "base_model": model,
        "dataset": dataset,
        "output_dir": run_dir(run_id),
    })
