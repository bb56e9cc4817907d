"""What a run costs: the estimate made before it is queued, its actual GPU time and cost, the budget rules, and the
month's spend report. Pure: the figures come in as arguments, nothing is read here.

Time = a start-up allowance + tokens to train / tokens per second, the throughput of this team's finished runs of
the same model size on the same GPU profile (the median of their metrics.json `tokens_per_s_median`), else a shipped
default. Cost = time x the profile's price per GPU-hour x its GPUs. Prices: `PRICES` below, overridden per profile
by TUNEOPS_GPU_PRICES.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class GpuProfile:
    """Where a run trains, as far as its bill goes: the profile (ACA workload profile type, or "local"), the GPUs of
    one replica or node, and the GPU model ("A100", "T4"; "cpu" for a local process)."""

    name: str
    gpus: int = 1
    gpu_model: str = ""


LOCAL_PROFILE = GpuProfile("local", 1, "cpu")


@dataclass(frozen=True)
class Price:
    usd_per_gpu_hour: float
    region: str
    listed: str       # the date of the list price used
    note: str = ""


# Pay-as-you-go list prices per GPU-hour, rounded; check them against https://azure.microsoft.com/pricing/calculator/
# for your region and agreement, and override with TUNEOPS_GPU_PRICES. Serverless GPU profiles are billed per
# GPU-second while a replica runs; a dedicated profile bills its nodes (the NCads A100 v4 VM prices are used, per GPU;
# the dedicated plan's management fee is left out).
PRICES: dict[str, Price] = {
    "Consumption-GPU-NC24-A100": Price(3.60, "eastus", "2025-06-01", "serverless GPU, A100 80GB, per GPU-second"),
    "Consumption-GPU-NC8as-T4": Price(0.95, "eastus", "2025-06-01", "serverless GPU, T4, per GPU-second"),
    "NC24-A100": Price(3.67, "eastus", "2025-06-01", "dedicated, 1 x A100 (NC24ads A100 v4)"),
    "NC48-A100": Price(3.67, "eastus", "2025-06-01", "dedicated, 2 x A100 (NC48ads A100 v4)"),
    "NC96-A100": Price(3.67, "eastus", "2025-06-01", "dedicated, 4 x A100 (NC96ads A100 v4)"),
    "local": Price(0.0, "", "", "a process on the worker's machine: no GPU bill"),
}

# Tokens per second of QLoRA training (NF4, bf16, LoRA on all linear layers, packing) by model size and GPU model:
# rough figures to start with. After a team's first finished run of a size on a profile, its own runs' measured
# median replaces them.
DEFAULT_TOKENS_PER_S: dict[str, dict[str, float]] = {
    "A100": {"tiny": 60000, "1b": 12000, "4b": 5000, "9b": 2800, "20b": 1300, "40b": 650, "80b": 300},
    "T4": {"tiny": 12000, "1b": 1800, "4b": 700, "9b": 350, "20b": 120, "40b": 50, "80b": 20},
    "cpu": {"tiny": 1500, "1b": 40, "4b": 10, "9b": 4, "20b": 2, "40b": 1, "80b": 0.5},
}
FALLBACK_TOKENS_PER_S = DEFAULT_TOKENS_PER_S["A100"]
# Seconds an attempt runs before it trains, by GPU model: the container's start, the imports, loading and quantizing
# the model (a tiny model on a CPU: the imports alone). Added to every estimate.
STARTUP_S: dict[str, float] = {"A100": 180.0, "T4": 180.0, "cpu": 30.0}
FALLBACK_STARTUP_S = 180.0
# Size classes by the number of parameters (upper bounds).
SIZE_CLASSES = (("tiny", 0.2e9), ("1b", 1.5e9), ("4b", 4.5e9), ("9b", 9.5e9), ("20b", 21e9), ("40b", 41e9),
                ("80b", float("inf")))
UNKNOWN_SIZE = "9b"   # a model whose size cannot be told is costed as a 7-9B one, the usual QLoRA case
WARN_SHARE = 0.8      # past this share of the monthly budget the card warns
OVERRUN_FACTOR = 2.0  # a run past this many times its estimated time gets one thread message

_SIZE_IN_NAME = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s*([bm])(?![a-z])", re.IGNORECASE)


# Prices ---------------------------------------------------------------------------------------------------------------

def parse_price_overrides(raw: str) -> dict[str, float]:
    """TUNEOPS_GPU_PRICES: a JSON object of profile -> USD per GPU-hour, or the path of a JSON file holding one.
    Raises ValueError with what is wrong."""
    text = raw.strip()
    if not text:
        return {}
    if not text.startswith(("{", "[")):
        path = Path(text).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"cannot read the price file {str(path)!r} ({e.strerror or e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"is not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, dict):
        raise ValueError("must be a JSON object of profile -> USD per GPU-hour")
    out: dict[str, float] = {}
    for name, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"has a bad price for {name!r}: {value!r} (give USD per GPU-hour, a number >= 0)")
        out[str(name)] = float(value)
    return out


def price_of(profile: str, overrides: Mapping[str, float] | None = None) -> Price | None:
    """The price of a profile (names compared case-insensitively): an override, else the shipped table, else None."""
    key = profile.strip().lower()
    for name, usd in (overrides or {}).items():
        if name.lower() == key:
            return Price(usd, "", "", "TUNEOPS_GPU_PRICES")
    return next((p for name, p in PRICES.items() if name.lower() == key), None)


# Model size -----------------------------------------------------------------------------------------------------------

def params_from_config(config: Mapping[str, Any]) -> int | None:
    """About how many parameters a decoder-only model of this config.json has (embeddings, attention with grouped
    KV heads, a gated MLP); None when the config lacks the figures."""
    try:
        hidden = int(config["hidden_size"])
        layers = int(config["num_hidden_layers"])
        vocab = int(config.get("vocab_size") or 32000)
        inter = int(config.get("intermediate_size") or 4 * hidden)
        heads = int(config.get("num_attention_heads") or 1)
        kv = int(config.get("num_key_value_heads") or heads)
    except (KeyError, TypeError, ValueError):
        return None
    head_dim = hidden // max(heads, 1)
    attention = 2 * hidden * hidden + 2 * hidden * kv * head_dim
    mlp = 3 * hidden * inter
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return layers * (attention + mlp) + embeddings


def params_from_name(name: str) -> int | None:
    """'meta-llama/Llama-3.1-8B-Instruct' -> 8e9, 'Qwen2.5-0.5B' -> 5e8; None when the name says no size."""
    found = _SIZE_IN_NAME.findall(name.replace("_", "-"))
    if not found:
        return None
    number, unit = found[-1]
    return int(float(number) * (1e9 if unit.lower() == "b" else 1e6))


def size_class(params: int | None) -> str:
    if params is None:
        return UNKNOWN_SIZE
    return next(name for name, bound in SIZE_CLASSES if params <= bound)


# The estimate ---------------------------------------------------------------------------------------------------------

def plan_tokens(tokens_per_epoch: int, examples: int, epochs: float, max_steps: int, micro_batch: int,
                grad_accum: int, max_seq_length: int, packing: bool) -> int:
    """Tokens the run will train on: the epochs' tokens, or fewer when max steps stop it first."""
    full = tokens_per_epoch * epochs
    if max_steps <= 0 or tokens_per_epoch <= 0:
        return int(round(full))
    sequences = math.ceil(tokens_per_epoch / max_seq_length) if packing else examples
    per_step = tokens_per_epoch / max(math.ceil(max(sequences, 1) / (micro_batch * grad_accum)), 1)
    return int(round(min(full, max_steps * per_step)))


@dataclass
class Estimate:
    """The estimate recorded on the run (`Run.estimate`) before it is queued."""

    tokens: int
    tokens_per_s: float
    throughput_from: str            # "team" (this team's finished runs) or "defaults"
    team_runs: int                  # how many of this team's runs the throughput comes from
    seconds: float
    size: str
    profile: str
    gpus: int
    usd_per_gpu_hour: float | None  # None: no price known for the profile
    usd: float | None
    price_region: str = ""
    price_listed: str = ""
    # The budgets when it was made, and the month's spend then (the card warns from these).
    run_budget_usd: float | None = None
    monthly_budget_usd: float | None = None
    month_spent_usd: float = 0.0
    made_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def throughput(size: str, profile: GpuProfile, team: Iterable[float]) -> tuple[float, str, int]:
    """Tokens/s for a size on a profile: the median of this team's finished runs, else the defaults of its GPU."""
    measured = [float(v) for v in team if v and v > 0]
    if measured:
        return statistics.median(measured), "team", len(measured)
    table = DEFAULT_TOKENS_PER_S.get(profile.gpu_model, FALLBACK_TOKENS_PER_S)
    return float(table.get(size, table[UNKNOWN_SIZE])), "defaults", 0


def estimate(tokens: int, size: str, profile: GpuProfile, team: Iterable[float], price: Price | None,
             now: float = 0.0) -> Estimate:
    rate, source, runs = throughput(size, profile, team)
    seconds = STARTUP_S.get(profile.gpu_model, FALLBACK_STARTUP_S) + (tokens / rate if rate > 0 else 0.0)
    usd = None if price is None else cost_usd(seconds, price.usd_per_gpu_hour, profile.gpus)
    return Estimate(tokens=int(tokens), tokens_per_s=round(rate, 1), throughput_from=source, team_runs=runs,
                    seconds=round(seconds, 1), size=size, profile=profile.name, gpus=profile.gpus,
                    usd_per_gpu_hour=None if price is None else price.usd_per_gpu_hour, usd=usd,
                    price_region=price.region if price else "", price_listed=price.listed if price else "",
                    made_at=now)


def cost_usd(seconds: float, usd_per_gpu_hour: float | None, gpus: int) -> float | None:
    if usd_per_gpu_hour is None:
        return None
    return round(seconds / 3600 * usd_per_gpu_hour * max(gpus, 1), 4)


# Budgets --------------------------------------------------------------------------------------------------------------

RUN_BUDGET = "run_budget"
MONTHLY_BUDGET = "monthly_budget"


def approval_reason(estimated_usd: float | None, month_spent_usd: float, run_budget: float | None,
                    monthly_budget: float | None) -> str | None:
    """Why a run needs an approver's click before it may queue (RUN_BUDGET: its estimate is above the run budget;
    MONTHLY_BUDGET: the month's spend is past the monthly budget), or None. A run with no known price passes."""
    if run_budget is not None and estimated_usd is not None and estimated_usd > run_budget:
        return RUN_BUDGET
    if monthly_budget is not None and month_spent_usd >= monthly_budget and (estimated_usd or 0) > 0:
        return MONTHLY_BUDGET
    return None


def month_share(spent_usd: float, monthly_budget: float | None) -> float | None:
    """The share of the monthly budget spent (1.0 = all of it); None without a budget."""
    if not monthly_budget:
        return None
    return spent_usd / monthly_budget


# Actuals --------------------------------------------------------------------------------------------------------------

def gpu_seconds(periods: Iterable[list[float | None]], now: float | None = None) -> float:
    """The time spent running, over the attempts' [start, end] periods; an open one counts up to `now`."""
    total = 0.0
    for start, end in periods:
        stop = end if end is not None else now
        if start is not None and stop is not None and stop > start:
            total += stop - start
    return total


def estimate_error(estimated_s: float | None, actual_s: float) -> float | None:
    """(actual - estimated) / estimated: 0.25 means it took a quarter longer than estimated."""
    if not estimated_s or estimated_s <= 0:
        return None
    return round((actual_s - estimated_s) / estimated_s, 4)


def actual(estimate_: Mapping[str, Any], periods: Iterable[list[float | None]]) -> dict[str, Any]:
    """What the run recorded as its actual cost once it ended (`Run.actual`)."""
    seconds = gpu_seconds(periods)
    return {"gpu_s": round(seconds, 1),
            "usd": cost_usd(seconds, estimate_.get("usd_per_gpu_hour"), int(estimate_.get("gpus") or 1)),
            "error": estimate_error(estimate_.get("seconds"), seconds)}


def overran(estimated_s: float | None, running_s: float, factor: float = OVERRUN_FACTOR) -> bool:
    return bool(estimated_s) and estimated_s > 0 and running_s > factor * estimated_s


# The month ------------------------------------------------------------------------------------------------------------

def month_of(ts: float) -> str:
    """The calendar month (UTC) of a moment: '2026-11'."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m")


def spend_by_month(periods: Iterable[list[float | None]]) -> dict[str, float]:
    """GPU seconds of closed periods by the month in which each ended."""
    out: dict[str, float] = {}
    for start, end in periods:
        if start is not None and end is not None and end > start:
            key = month_of(end)
            out[key] = out.get(key, 0.0) + (end - start)
    return out


def ledger_entries(run_id: str, requester: str, model: str, estimate_: Mapping[str, Any],
                   periods: list[list[float | None]], finished_at: float | None) -> dict[str, dict[str, Any]]:
    """The month ledger's entries of an ended run: one per month it spent GPU time in; the entry of the month it
    finished in also carries its estimate and the estimate's error."""
    out: dict[str, dict[str, Any]] = {}
    final = month_of(finished_at) if finished_at else None
    by_month = spend_by_month(periods)
    total = sum(by_month.values())
    for month, seconds in by_month.items():
        entry: dict[str, Any] = {
            "run": run_id, "requester": requester, "model": model, "gpu_s": round(seconds, 1),
            "usd": cost_usd(seconds, estimate_.get("usd_per_gpu_hour"), int(estimate_.get("gpus") or 1)) or 0.0,
        }
        if month == final:
            entry.update(estimate_s=estimate_.get("seconds"), estimate_usd=estimate_.get("usd"),
                         error=estimate_error(estimate_.get("seconds"), total))
        out[month] = entry
    return out


@dataclass
class MonthReport:
    month: str
    total_usd: float = 0.0
    total_gpu_s: float = 0.0
    runs: int = 0
    by_person: list[tuple[str, float, float]] = field(default_factory=list)   # (who, usd, gpu seconds), most first
    by_model: list[tuple[str, float, float]] = field(default_factory=list)
    biggest: list[dict[str, Any]] = field(default_factory=list)               # the three biggest runs' entries
    median_error: float | None = None
    errors_counted: int = 0
    monthly_budget_usd: float | None = None


def month_report(month: str, entries: Iterable[Mapping[str, Any]], monthly_budget: float | None = None,
                 biggest: int = 3) -> MonthReport:
    """The month so far from its ledger entries (and those of runs still running, with their time so far)."""
    rows = list(entries)
    runs = [r for r in rows if not r.get("inference")]  # the endpoints' replicas count in the totals, not as a run
    report = MonthReport(month=month, monthly_budget_usd=monthly_budget, runs=len({r["run"] for r in runs}))
    people: dict[str, list[float]] = {}
    models: dict[str, list[float]] = {}
    for r in rows:
        usd, secs = float(r.get("usd") or 0.0), float(r.get("gpu_s") or 0.0)
        report.total_usd += usd
        report.total_gpu_s += secs
        for table, key in ((people, r.get("requester", "")), (models, r.get("model", ""))):
            acc = table.setdefault(str(key), [0.0, 0.0])
            acc[0] += usd
            acc[1] += secs

    def ranked(table: dict[str, list[float]]) -> list[tuple[str, float, float]]:
        return sorted(((k, round(v[0], 2), v[1]) for k, v in table.items()), key=lambda t: (-t[1], -t[2], t[0]))

    report.by_person, report.by_model = ranked(people), ranked(models)
    report.biggest = sorted(runs, key=lambda r: (-float(r.get("usd") or 0), -float(r.get("gpu_s") or 0),
                                                 str(r.get("run"))))[:biggest]
    errors = [float(r["error"]) for r in rows if r.get("error") is not None]
    if errors:
        report.median_error, report.errors_counted = statistics.median(errors), len(errors)
    report.total_usd = round(report.total_usd, 2)
    return report
