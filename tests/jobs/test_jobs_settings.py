"""JobSettings.from_env: defaults, values, and one line per problem for everything wrong at once."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from jobs.core.settings import JobSettings, SettingsError, redact_url


def test_defaults_from_an_empty_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = JobSettings.from_env({})
    assert s.redis_url == "redis://localhost:6379/0"
    assert s.backend == "local"
    assert s.workspace == (tmp_path / "workspace").resolve()  # resolved: every process agrees on it
    assert s.max_running == 2
    assert s.default_model == "model-cache/tiny"
    assert s.monitor_interval_s == 2.0
    assert s.python == sys.executable
    assert s.train_module == "payload.train" and dict(s.train_overrides) == {}


def test_values_are_read(tmp_path):
    s = JobSettings.from_env({
        "REDIS_URL": "redis://redis.internal:6380/3",
        "TUNEOPS_BACKEND": "ACA",
        "TUNEOPS_WORKSPACE": str(tmp_path),
        "TUNEOPS_MAX_RUNNING": "5",
        "TUNEOPS_DEFAULT_MODEL": "microsoft/Phi-3-mini-4k-instruct",
        "TUNEOPS_MONITOR_INTERVAL": "0.5",
        "TUNEOPS_TRAIN_OVERRIDES": '{"save_steps": 10, "lora_r": 8}',
    })
    assert (s.redis_url, s.backend, s.workspace, s.max_running) == ("redis://redis.internal:6380/3", "aca",
                                                                       tmp_path, 5)
    assert s.default_model == "microsoft/Phi-3-mini-4k-instruct" and s.monitor_interval_s == 0.5
    assert dict(s.train_overrides) == {"save_steps": 10, "lora_r": 8}


def test_every_problem_is_reported_at_once_one_line_each(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    env = {
        "REDIS_URL": "http://:hunter2@localhost",
        "TUNEOPS_BACKEND": "k8s",
        "TUNEOPS_WORKSPACE": str(a_file),
        "TUNEOPS_MAX_RUNNING": "0",
        "TUNEOPS_DEFAULT_MODEL": "../elsewhere",
        "TUNEOPS_MONITOR_INTERVAL": "soon",
        "TUNEOPS_PYTHON": str(tmp_path / "no-python"),
        "TUNEOPS_TRAIN_MODULE": "payload/train.py",
        "TUNEOPS_TRAIN_OVERRIDES": "{save_steps: 10}",
    }
    with pytest.raises(SettingsError) as e:
        JobSettings.from_env(env)
    problems = e.value.problems
    assert len(problems) == len(env)
    for name, problem in zip(env, problems):
        assert problem.startswith(name), (name, problem)
        assert ":" in problem  # and then what to do
    assert str(e.value).count("\n") == len(env)
    assert "hunter2" not in str(e.value)


@pytest.mark.parametrize("raw,fragment", [
    ("[1, 2]", "must be a JSON object"),
    ('{"output_dir": "x"}', "may not set output_dir"),
    ('{"save_every": 3}', "unknown keys save_every"),
    ('{"lora_r": 0}', "bad value for lora_r"),
])
def test_train_overrides_are_checked_against_the_run_config(raw, fragment):
    with pytest.raises(SettingsError, match=fragment):
        JobSettings.from_env({"TUNEOPS_TRAIN_OVERRIDES": raw})


@pytest.mark.parametrize("raw", ["-1", "2.5", "lots"])
def test_max_running_must_be_a_positive_whole_number(raw):
    with pytest.raises(SettingsError, match="TUNEOPS_MAX_RUNNING"):
        JobSettings.from_env({"TUNEOPS_MAX_RUNNING": raw})


def test_redact_url_hides_only_the_password():
    assert redact_url("redis://user:s3cret@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"


def test_settings_are_frozen():
    s = JobSettings(workspace=Path("/w"))
    with pytest.raises(AttributeError):
        s.max_running = 3  # type: ignore[misc]
