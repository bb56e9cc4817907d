"""A run's cost estimate as the service makes it before queueing (the dataset's tokens, this team's measured
throughput, the backend's GPU profile and its price), the month's spend the budgets are held against, and the month's
report the bot shows. The arithmetic is jobs.core.cost's; this reads what it needs from the store and the
workspace."""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from jobs.backends import get_backend
from jobs.core import cost, store
from jobs.core.cost import Estimate, GpuProfile
from jobs.core.errors import BackendError
from jobs.core.settings import JobSettings
from payload.config import TrainConfig

log = logging.getLogger(__name__)


def gpu_profile(settings: JobSettings) -> GpuProfile:
    """The backend's GPU profile; when its configuration cannot be read now, an unpriced one named after it (the
    run's start will say what is wrong)."""
    try:
        return get_backend(settings).gpu_profile()
    except (BackendError, ValueError) as e:
        log.warning("no GPU profile for the cost estimate: %s", e)
        return GpuProfile(settings.backend, 1, "")


def model_size(workspace: Path, model_ref: str) -> str:
    """The size class of a model: from its config.json when the workspace has it, else from its name."""
    config = Path(workspace) / model_ref / "config.json"
    params = None
    try:
        params = cost.params_from_config(json.loads(config.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        pass
    return cost.size_class(params if params is not None else cost.params_from_name(model_ref))


def estimate_run(settings: JobSettings, conn: redis.Redis, model_ref: str, config: TrainConfig, report,
                 now: float | None = None) -> Estimate:
    """The estimate of a run of `config` on a dataset the validator reported on (`report`), with the budgets and
    the month's spend as they are now."""
    now = time.time() if now is None else now
    profile = gpu_profile(settings)
    size = model_size(settings.workspace, model_ref)
    tokens = cost.plan_tokens(report.tokens_per_epoch, report.examples, config.num_epochs, config.max_steps,
                              config.micro_batch_size, config.gradient_accumulation_steps, config.max_seq_length,
                              config.packing)
    team = store.team_throughputs(conn, size, profile.name)
    est = cost.estimate(tokens, size, profile, team, cost.price_of(profile.name, settings.gpu_prices), now)
    est.run_budget_usd, est.monthly_budget_usd = settings.run_budget_usd, settings.monthly_budget_usd
    est.month_spent_usd = round(month_spent(conn, now, settings), 2)
    return est


def _month_start(now: float) -> float:
    d = datetime.fromtimestamp(now, UTC)
    return datetime(d.year, d.month, 1, tzinfo=UTC).timestamp()


def _running_entries(conn: redis.Redis, now: float) -> list[dict[str, Any]]:
    """What the runs running now have spent this month in their current attempt (not yet in the ledger)."""
    since = _month_start(now)
    out = []
    for run in store.load_runs(conn, sorted(store.active_ids(conn))):
        open_periods = [[max(start, since), None] for start, end in run.gpu_periods if end is None and start]
        seconds = cost.gpu_seconds(open_periods, now)
        if seconds > 0:
            out.append({"run": run.id, "requester": run.requester, "model": run.model, "gpu_s": round(seconds, 1),
                        "usd": cost.cost_usd(seconds, run.estimate.get("usd_per_gpu_hour"),
                                             int(run.estimate.get("gpus") or 1)) or 0.0, "running": True})
    return out


INFERENCE = "inference endpoints"   # the "person" and "run" of the endpoints' entry in the month's spend
_inference_cache: dict[str, tuple[float, dict[str, Any] | None]] = {}
INFERENCE_CACHE_S = 60.0


def inference_entry(settings: JobSettings, now: float) -> dict[str, Any] | None:
    """What the inference endpoints' server processes cost this month (their uptime from the servers' records,
    priced at the app's profile), as one entry of the month's spend; None when they ran none. Read at most once a
    minute per process (it lists the share on ACA); a backend that cannot say counts nothing, with a warning."""
    cached = _inference_cache.get(settings.backend)
    if cached is not None and now - cached[0] < INFERENCE_CACHE_S:
        return cached[1]
    try:
        profile, periods = get_backend(settings).inference_usage()
    except (BackendError, ValueError) as e:
        log.warning("the inference endpoints' GPU time is left out of the month's spend: %s", e)
        return None
    since = _month_start(now)
    seconds = cost.gpu_seconds([[max(start, since), min(end, now)] for start, end in periods])
    price = cost.price_of(profile.name, settings.gpu_prices)
    entry = None if seconds <= 0 else {
        "run": INFERENCE, "requester": INFERENCE, "model": INFERENCE, "gpu_s": round(seconds, 1), "inference": True,
        "usd": cost.cost_usd(seconds, price.usd_per_gpu_hour if price else None, profile.gpus) or 0.0}
    _inference_cache[settings.backend] = (now, entry)
    return entry


def month_entries(conn: redis.Redis, now: float, settings: JobSettings | None = None) -> list[dict[str, Any]]:
    """This month's spend, one entry a run: the ledger of ended attempts plus the running ones' time so far; with
    `settings`, one more for the inference endpoints' replicas."""
    merged: dict[str, dict[str, Any]] = {e["run"]: dict(e) for e in store.month_ledger(conn, cost.month_of(now))}
    for entry in _running_entries(conn, now):
        known = merged.get(entry["run"])
        if known is None:
            merged[entry["run"]] = entry
        else:
            known["gpu_s"] = round(known["gpu_s"] + entry["gpu_s"], 1)
            known["usd"] = round(float(known.get("usd") or 0) + entry["usd"], 4)
            known["running"] = True
    inference = inference_entry(settings, now) if settings is not None else None
    return list(merged.values()) + ([inference] if inference else [])


def month_spent(conn: redis.Redis, now: float | None = None, settings: JobSettings | None = None) -> float:
    """The team's spend this calendar month (UTC), in USD, from the actual GPU time of its runs (and, with
    `settings`, of its inference endpoints' replicas)."""
    now = time.time() if now is None else now
    return sum(float(e.get("usd") or 0.0) for e in month_entries(conn, now, settings))


def month_report(settings: JobSettings, now: float | None = None) -> cost.MonthReport:
    """The month so far by person and by model, its biggest runs, the estimates' median error."""
    now = time.time() if now is None else now
    conn = store.connect(settings)
    return cost.month_report(cost.month_of(now), month_entries(conn, now, settings), settings.monthly_budget_usd)

