"""What GET /metrics shows, in Prometheus' text format: the bot's own counters (Slack Web API calls and 429s, ack
latency, notifier lag) and, read from Redis at scrape time, the runs, the queue, deploy requests and the counters the
workers keep (jobs.core.metrics). Every scrape reads a bounded amount: indexes, active runs, recent deploy requests.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from rq import Queue
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry

from bot.grammar import SUBCOMMANDS
from jobs.core import metrics as job_metrics
from jobs.core import queue, store
from jobs.core.domain import RunEvent, RunState
from jobs.core.settings import JobSettings

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Deploy requests are read newest first, this many at most: a request lapses within TUNEOPS_APPROVAL_TTL anyway.
RECENT_APPROVALS = 200

# The bot process's own metrics, in a registry of their own (so that nothing else a library registers leaks in).
REGISTRY = CollectorRegistry()
SLACK_CALLS = Counter("tuneops_slack_api_calls", "Slack Web API calls made by the bot, by method",
                      ["method"], registry=REGISTRY)
SLACK_RATE_LIMITED = Counter("tuneops_slack_rate_limited", "Slack Web API calls answered 429, by method",
                             ["method"], registry=REGISTRY)
ACK_SECONDS = Histogram("tuneops_ack_seconds", "Time from receiving a Slack request to answering it (the ack), by "
                        "/finetune subcommand (interactions: 'interaction')", ["subcommand"], registry=REGISTRY,
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 3.0, 5.0))
NOTIFIER_LAG = Gauge("tuneops_notifier_lag_seconds", "Age of the oldest run event in the notifier's last read "
                     "(0 when it found nothing new)", registry=REGISTRY)


# The `type`s of an interaction's payload (Bolt parses `payload=` into the body); events and anything else are 'other'.
INTERACTIONS = frozenset({"block_actions", "view_submission", "view_closed", "shortcut", "message_action",
                          "block_suggestion", "interactive_message", "dialog_submission"})


def subcommand_of(body: Mapping[str, Any]) -> str:
    """The label for a request's parsed body (Bolt's `request.body`): the /finetune subcommand, 'interaction' for
    buttons and modals, else 'other'."""
    if "command" not in body:
        return "interaction" if body.get("type") in INTERACTIONS else "other"
    words = str(body.get("text") or "").split(maxsplit=1)
    sub = words[0].lower() if words else "help"
    return sub if sub in SUBCOMMANDS else "other"


def observe_ack(body: Mapping[str, Any], started: float) -> None:
    ACK_SECONDS.labels(subcommand_of(body)).observe(time.perf_counter() - started)


def observe_notifier_lag(batch: Iterable[tuple[str, RunEvent]]) -> None:
    stamps = [event.ts for _, event in batch if event.ts]
    NOTIFIER_LAG.set(max(0.0, time.time() - min(stamps)) if stamps else 0.0)


class StoreCollector(Collector):
    """Reads runs, the queue and the workers' counters from Redis at each scrape."""

    def __init__(self, settings: JobSettings):
        self.settings = settings

    def collect(self):
        conn = store.connect(self.settings)
        now = time.time()
        yield from self._runs(conn, now)
        yield from self._rq()
        yield from self._approvals(conn, now)
        yield from self._counters(conn)

    def _runs(self, conn, now: float):
        with conn.pipeline(transaction=False) as pipe:
            pipe.zcard(store.QUEUED)
            pipe.zrange(store.QUEUED, 0, 0, withscores=True)
            pipe.smembers(store.ACTIVE)
            queued, oldest, active = pipe.execute()
        by_state = {str(s): 0 for s in (RunState.QUEUED, RunState.PREPARING, RunState.RUNNING)}
        by_state[str(RunState.QUEUED)] = queued
        for run in store.load_runs(conn, sorted(active)):
            if run.state.active:
                by_state[str(run.state)] += 1
        runs = GaugeMetricFamily("tuneops_runs", "Runs waiting or holding a GPU slot, by state (ended runs: "
                                 "tuneops_runs_finished_total)", labels=["state"])
        for state, n in by_state.items():
            runs.add_metric([state], n)
        yield runs
        yield GaugeMetricFamily("tuneops_queue_length", "Runs waiting in line for a GPU slot", value=queued)
        yield GaugeMetricFamily("tuneops_queue_oldest_age_seconds", "How long the first run in line has waited "
                                "(0 when none waits)", value=max(0.0, now - oldest[0][1]) if oldest else 0.0)

    def _rq(self):
        rq_conn = queue.rq_connection(self.settings)
        q = Queue(queue.QUEUE_NAME, connection=rq_conn)
        jobs = GaugeMetricFamily("tuneops_rq_jobs", "Jobs of the RQ queue 'tuneops', by RQ registry",
                                 labels=["queue", "state"])
        jobs.add_metric([q.name, "queued"], q.count)
        jobs.add_metric([q.name, "started"], StartedJobRegistry(queue=q).count)
        jobs.add_metric([q.name, "scheduled"], ScheduledJobRegistry(queue=q).count)
        jobs.add_metric([q.name, "failed"], FailedJobRegistry(queue=q).count)
        yield jobs

    def _approvals(self, conn, now: float):
        last = int(conn.get(store.APPROVAL_SEQ) or 0)
        ids = [f"dp-{n:04d}" for n in range(last, max(0, last - RECENT_APPROVALS), -1)]
        counts = {"pending": 0, "approved": 0, "deploying": 0}
        for raw in conn.mget([store.APPROVAL_KEY.format(i) for i in ids]) if ids else []:
            if not raw:
                continue
            try:
                d = json.loads(raw)
            except ValueError:
                continue
            state = d.get("state")
            if state == "pending" and float(d.get("expires_at") or 0) <= now:
                continue  # lapsed: nobody can approve it any more
            if state in counts:
                counts[state] += 1
        family = GaugeMetricFamily("tuneops_deploy_requests", "Deploy requests not finished yet (of the newest "
                                   f"{RECENT_APPROVALS}), by state", labels=["state"])
        for state, n in counts.items():
            family.add_metric([state], n)
        yield family

    def _counters(self, conn):
        values = job_metrics.read_counters(conn)
        for name, (help_text, labels) in job_metrics.COUNTERS.items():
            family = CounterMetricFamily(f"tuneops_{name}", help_text, labels=list(labels))
            for label_values, value in sorted(values.get(name, {}).items()):
                family.add_metric(list(label_values), value)
            yield family


def store_registry(settings: JobSettings) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(settings))
    return registry


def render(store_metrics: CollectorRegistry) -> bytes:
    """The whole scrape: the bot's metrics, then the store's (blocking: run it in a thread)."""
    try:
        from_store = generate_latest(store_metrics)
    except Exception:  # Redis down: the bot's own metrics still tell something
        log.exception("could not read the store's metrics")
        from_store = b""
    return generate_latest(REGISTRY) + from_store
