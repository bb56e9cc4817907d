"""Counters that workers keep in Redis so that the bot's GET /metrics (bot.metrics) shows every process's counts.

Each counter is a hash (store.METRICS_KEY) whose fields are its label values joined by "|". Counting never fails a
task: a Redis error here is logged and the count is lost.
"""

from __future__ import annotations

import logging
import time

import redis

from jobs.core import store
from jobs.core.domain import Run, RunEvent, RunState

log = logging.getLogger(__name__)

# name -> (help, label names); bot.metrics exposes each as tuneops_<name>_total.
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "runs_started": ("Runs that began running (each attempt)", ("backend",)),
    "runs_finished": ("Runs that ended, by their final state", ("backend", "state")),
    "runs_failed": ("Runs that ended failed", ("backend",)),
    "gpu_seconds": ("GPU-seconds used by runs, from running to their end", ("backend",)),
    "azure_errors": ("Azure API calls that failed after the SDK's retries, by Azure's error code", ("code",)),
}
# When each run's current attempt began running: the start of its GPU clock.
RUNNING_SINCE = store.METRICS_KEY.format("running_since")
# A run whose record does not say how many GPUs it has (its estimate's `gpus`: the profile's) counts as one.
GPUS_PER_RUN = 1


def counter_key(name: str) -> str:
    return store.METRICS_KEY.format(name)


def incr(conn: redis.Redis, name: str, labels: tuple[str, ...], amount: float = 1.0) -> None:
    """Add `amount` to counter `name` (one of COUNTERS) for these label values."""
    try:
        conn.hincrbyfloat(counter_key(name), "|".join(labels), amount)
    except redis.RedisError as e:
        log.warning("could not count %s%s: %s", name, labels, e)


def count_run_changes(conn: redis.Redis, changed: tuple[Run, list[RunEvent]] | None) -> None:
    """Count what a committed store.update_run did: runs started, finished, failed, and GPU-seconds at each end."""
    if not changed:
        return
    run, events = changed
    moves = [e for e in events if e.kind == "state"]
    if not moves:
        return
    backend = run.backend or "unknown"
    try:
        for event in moves:
            state = RunState(event.data["state"])
            if state is RunState.RUNNING:
                conn.hset(RUNNING_SINCE, run.id, repr(event.ts))
                incr(conn, "runs_started", (backend,))
            elif state.terminal:
                incr(conn, "runs_finished", (backend, str(state)))
                if state is RunState.FAILED:
                    incr(conn, "runs_failed", (backend,))
                since = conn.hget(RUNNING_SINCE, run.id)
                if since is not None:
                    conn.hdel(RUNNING_SINCE, run.id)
                    end = run.finished_at or event.ts or time.time()
                    incr(conn, "gpu_seconds", (backend,), max(0.0, end - float(since)) * _gpus(run))
    except (redis.RedisError, ValueError, KeyError) as e:
        log.warning("%s: could not count its state change: %s", run.id, e)


def _gpus(run: Run) -> int:
    """The GPUs a run trains on: its profile's (recorded with its estimate: several under torchrun), else one."""
    try:
        return max(1, int(run.estimate.get("gpus") or GPUS_PER_RUN))
    except (TypeError, ValueError):
        return GPUS_PER_RUN


def count_azure_error(code: str) -> None:
    """Count an Azure failure by its error code (or the exception's name), in the current settings' Redis."""
    from jobs.core.settings import SettingsError, current_settings  # read from the environment on first use

    try:
        conn = store.connect(current_settings())
    except SettingsError as e:  # the error itself is what matters to the caller
        log.debug("azure error not counted: %s", e)
        return
    incr(conn, "azure_errors", (code or "unknown",))


def read_counters(conn: redis.Redis) -> dict[str, dict[tuple[str, ...], float]]:
    """Every counter's values by label values, in one round trip."""
    with conn.pipeline(transaction=False) as pipe:
        for name in COUNTERS:
            pipe.hgetall(counter_key(name))
        replies = pipe.execute()
    out: dict[str, dict[tuple[str, ...], float]] = {}
    for (name, (_, labels)), values in zip(COUNTERS.items(), replies):
        out[name] = {}
        for field, value in (values or {}).items():
            parts = tuple(field.split("|"))
            if len(parts) == len(labels):
                out[name][parts] = float(value)
    return out
