"""The jobs side's configuration, read once from the environment and checked as a whole.

`JobSettings.from_env()` reports every missing or malformed variable at once, one line each, with what to do.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlparse

from pydantic import ValidationError

from jobs.core.cost import parse_price_overrides
from jobs.core.durations import describe_duration, parse_duration
from payload.config import TrainConfig

BACKENDS = ("local", "aca")
REDIS_SCHEMES = ("redis", "rediss", "unix")
# Keys of the run config that a run itself decides; overriding them from the environment would break the run.
_NOT_OVERRIDABLE = frozenset({"run_id", "base_model", "dataset", "output_dir"})


class SettingsError(ValueError):
    """One line per problem: the variable, what is wrong with it, and what to do."""
    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("tuneops is not configured correctly:\n" + "\n".join(f"- {p}" for p in self.problems))


@dataclass(frozen=True)
class JobSettings:
    redis_url: str = "redis://localhost:6379/0"
    backend: str = "local"
    workspace: Path = Path("workspace")
    max_running: int = 2
    default_model: str = "model-cache/tiny"
    monitor_interval_s: float = 2.0
    python: str = sys.executable
    # Additions to the agreed contract: the trainer module the local backend runs, and run-config keys set for every
    # run (for example a small `save_steps` on a CPU box), as TUNEOPS_TRAIN_OVERRIDES='{"save_steps": 10}'.
    train_module: str = "payload.train"
    train_overrides: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    # The run thread and deploys: the local backend's time limit per attempt (ACA's replicaTimeout is the seed's
    # 10800 s), automatic resumes after a timeout, how long a deploy request waits for an approver, and where a
    # local deploy serves (port 0: a free one).
    run_timeout_s: float = 10800.0
    auto_resume: int = 0
    approval_ttl_s: float = 86400.0
    serve_port: int = 0
    serve_host: str = "127.0.0.1"
    # Cost (jobs.core.cost): a run estimated above `run_budget_usd` waits for an approver, and so does every run once
    # the month's spend is past `monthly_budget_usd` (None: no such budget); prices per GPU-hour that replace the
    # shipped table's, by GPU profile.
    run_budget_usd: float | None = None
    monthly_budget_usd: float | None = None
    gpu_prices: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> JobSettings:
        problems: list[str] = []

        def text(name: str, default: str) -> str:
            value = env.get(name, "").strip()
            return value or default

        redis_url = text("REDIS_URL", cls.redis_url)
        parsed = urlparse(redis_url)
        if parsed.scheme not in REDIS_SCHEMES or (parsed.scheme != "unix" and not parsed.hostname):
            problems.append(
                f"REDIS_URL={redact_url(redis_url)!r} is not a Redis URL: use redis://HOST:PORT/DB (or rediss://, unix://)")

        backend = text("TUNEOPS_BACKEND", cls.backend).lower()
        if backend not in BACKENDS:
            problems.append(f"TUNEOPS_BACKEND={backend!r} is not a backend: use 'local' (a process on this machine) "
                            "or 'aca' (Azure Container Apps jobs)")

        workspace = Path(text("TUNEOPS_WORKSPACE", str(cls.workspace))).expanduser()
        if workspace.exists() and not workspace.is_dir():
            problems.append(f"TUNEOPS_WORKSPACE={str(workspace)!r} is a file: point it at a folder (it is created "
                            "when missing)")

        max_running = _number(env, "TUNEOPS_MAX_RUNNING", cls.max_running, int, 1, float("inf"), problems,
                              "is not a whole number of at least 1: set it to how many GPU runs may go at once "
                              "(default 2)")

        default_model = text("TUNEOPS_DEFAULT_MODEL", cls.default_model)
        if default_model.startswith("/") or ".." in Path(default_model).parts:
            problems.append(f"TUNEOPS_DEFAULT_MODEL={default_model!r} leads outside the workspace: give a folder "
                            "relative to the workspace (model-cache/NAME) or a hub id (org/name)")

        monitor_interval_s = _number(env, "TUNEOPS_MONITOR_INTERVAL", cls.monitor_interval_s, float, 0.1, 600,
                                     problems, "is not a number between 0.1 and 600: set it to how many seconds pass "
                                     "between two looks at a running run (default 2)")

        python = text("TUNEOPS_PYTHON", cls.python)
        if not Path(python).is_file():
            problems.append(f"TUNEOPS_PYTHON={python!r} does not exist: give the path of the Python interpreter that "
                            "has the payload installed")

        train_module = text("TUNEOPS_TRAIN_MODULE", cls.train_module)
        if not all(part.isidentifier() for part in train_module.split(".")):
            problems.append(f"TUNEOPS_TRAIN_MODULE={train_module!r} is not a Python module name: give a dotted "
                            "name like payload.train")

        overrides: dict[str, Any] = {}
        raw = env.get("TUNEOPS_TRAIN_OVERRIDES", "").strip()
        if raw:
            overrides, problem = _parse_overrides(raw)
            if problem:
                problems.append(problem)

        run_timeout_s = duration_setting(env, "TUNEOPS_RUN_TIMEOUT_S", cls.run_timeout_s, problems,
                                         "how long one attempt of a local run may take (default 10800, like ACA's "
                                         "replicaTimeout)")
        approval_ttl_s = duration_setting(env, "TUNEOPS_APPROVAL_TTL", cls.approval_ttl_s, problems,
                                          "how long a deploy request waits for an approver (default 24h)")
        auto_resume = _whole(env, "TUNEOPS_AUTO_RESUME", cls.auto_resume, 0, 100, problems,
                             "how many times a timed-out run is resumed by itself (default 0: never)")
        serve_port = _whole(env, "TUNEOPS_SERVE_PORT", cls.serve_port, 0, 65535, problems,
                            "the port of the local inference server (default 0: a free port)")
        serve_host = text("TUNEOPS_SERVE_HOST", cls.serve_host)
        run_budget_usd = _number(env, "TUNEOPS_RUN_BUDGET_USD", None, _usd, 0, float("inf"), problems,
                                 "is not an amount of US dollars: set it to the most one run may be estimated to cost "
                                 "without an approver's click, like 25 or 12.50 (unset: no limit)")
        monthly_budget_usd = _number(env, "TUNEOPS_MONTHLY_BUDGET_USD", None, _usd, 0, float("inf"), problems,
                                     "is not an amount of US dollars: set it to the team's GPU budget for a calendar "
                                     "month, like 1000 (unset: no limit)")
        gpu_prices: dict[str, float] = {}
        try:
            gpu_prices = parse_price_overrides(env.get("TUNEOPS_GPU_PRICES", ""))
        except ValueError as e:
            problems.append(f"TUNEOPS_GPU_PRICES {e}: give a JSON object like '{{\"Consumption-GPU-NC24-A100\": 3.4}}' "
                            "(USD per GPU-hour by workload profile type) or the path of a JSON file holding one")

        if problems:
            raise SettingsError(problems)
        return cls(
            redis_url=redis_url,
            backend=backend,
            workspace=workspace.resolve(),
            max_running=max_running,
            default_model=default_model,
            monitor_interval_s=monitor_interval_s,
            python=python,
            train_module=train_module,
            train_overrides=MappingProxyType(overrides),
            run_timeout_s=run_timeout_s,
            auto_resume=auto_resume,
            approval_ttl_s=approval_ttl_s,
            serve_port=serve_port,
            serve_host=serve_host,
            run_budget_usd=run_budget_usd,
            monthly_budget_usd=monthly_budget_usd,
            gpu_prices=MappingProxyType(gpu_prices),
        )


def duration_setting(env: Mapping[str, str], name: str, default: float, problems: list[str], what: str,
                     lo: float = 0.0, hi: float = float("inf")) -> float:
    """A duration variable (seconds, or 24h / 30m / 1h30m) between `lo` and `hi`; a problem line when it is not."""
    bounds = f" from {describe_duration(lo)} to {describe_duration(hi)}" if hi != float("inf") else ""
    return _number(env, name, default, parse_duration, lo, hi, problems,
                   f"is not a duration{bounds}: set it to {what}, in seconds or like 24h, 30m, 1h30m")


def _number(env: Mapping[str, str], name: str, default, kind, lo: float, hi: float, problems: list[str],
            problem: str):
    """`kind(value)` of a variable between `lo` and `hi`, the default when it is unset; `problem` (what is wrong and
    what to do) goes to `problems` when it is not such a number."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
        if lo <= value <= hi:
            return value
    except ValueError:
        pass
    problems.append(f"{name}={raw!r} {problem}")
    return default


def _usd(raw: str) -> float:
    """'25', '12.50' or '$1,000' as a number of dollars."""
    value = float(raw.strip().lstrip("$").replace(",", ""))
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(raw)
    return value


def _whole(env: Mapping[str, str], name: str, default: int, lo: int, hi: int, problems: list[str], what: str) -> int:
    return _number(env, name, default, int, lo, hi, problems,
                   f"is not a whole number from {lo} to {hi}: set it to {what}")


def redact_url(url: str) -> str:
    """The URL with its password replaced, for messages and logs."""
    parsed = urlparse(url)
    if not parsed.password:
        return url
    netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@", 1)
    return parsed._replace(netloc=netloc).geturl()


def _parse_overrides(raw: str) -> tuple[dict[str, Any], str]:
    """Check TUNEOPS_TRAIN_OVERRIDES against the run config's own schema; return (overrides, problem or "")."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        return {}, f"TUNEOPS_TRAIN_OVERRIDES is not valid JSON ({e.msg} at column {e.colno}): give an object like " \
                   "'{\"save_steps\": 10}'"
    if not isinstance(data, dict):
        return {}, "TUNEOPS_TRAIN_OVERRIDES must be a JSON object like '{\"save_steps\": 10}'"
    fixed = sorted(_NOT_OVERRIDABLE & data.keys())
    if fixed:
        return {}, f"TUNEOPS_TRAIN_OVERRIDES may not set {', '.join(fixed)}: each run decides those"
    unknown = sorted(k for k in data if k not in TrainConfig.model_fields)
    if unknown:
        return {}, f"TUNEOPS_TRAIN_OVERRIDES has unknown keys {', '.join(unknown)}: use run config keys like " \
                   "save_steps, lora_r, max_seq_length"

    try:
        TrainConfig.model_validate({"base_model": "m", "dataset": "d", "output_dir": "o", **data})
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(x) for x in first["loc"])
        return {}, f"TUNEOPS_TRAIN_OVERRIDES has a bad value for {key}: {first['msg']}"
    return data, ""


# The settings of this process: the worker sets them once (forked job processes inherit them); a task or an
# enqueue that finds none reads the environment.
_current: JobSettings | None = None


def configure(settings: JobSettings | None) -> None:
    global _current
    _current = settings


def current_settings() -> JobSettings:
    global _current
    if _current is None:
        _current = JobSettings.from_env()
    return _current
