"""GET /metrics over real HTTP from a running bot: the runs, the queue, the workers' counters and the bot's own, as a
Prometheus server would scrape them; RQ's own `rq info` on tuneops' queue; JSON log lines with the run id."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobs.runs import service
from tests.conftest import ROOT, shown

pytestmark = pytest.mark.timeout(420)


@pytest.fixture
def bot_env(bot_env):
    return {**bot_env, "TUNEOPS_LOG_FORMAT": "json"}


async def scrape(bot) -> dict[str, dict[tuple, float]]:
    """Samples by name, each keyed by its sorted label pairs."""
    async with aiohttp.ClientSession() as s, s.get(bot.url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(samples, name: str, **labels) -> float:
    return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


async def test_metrics_show_a_finished_run_and_the_bots_own_counts(bot, slack, worker, workspace):
    before = await scrape(bot)
    status, _, key = await bot.command("run --dataset datasets/chat.jsonl --max-steps 2 --name metrics")
    assert status == 200
    assert await slack.until(lambda: slack.responses[key], 60)

    def ended():
        run = shown(bot.settings.jobs, service.get_run(bot.settings.jobs, "ft-0001"))
        return run if run is not None and run.state.terminal else None

    run = await slack.until(ended, 300)
    assert run and run.state == "succeeded", run
    status, ack, _ = await bot.command("status ft-0001")
    assert status == 200 and "succeeded" in ack  # answered in the ack
    assert await slack.until(lambda: slack.calls_to("chat.update"), 30)

    after = await scrape(bot)
    assert value(after, "tuneops_runs", state="queued") == 0
    assert value(after, "tuneops_runs", state="running") == 0
    assert value(after, "tuneops_queue_length") == 0
    assert value(after, "tuneops_queue_oldest_age_seconds") == 0
    assert value(after, "tuneops_runs_started_total", backend="local") == 1
    assert value(after, "tuneops_runs_finished_total", backend="local", state="succeeded") == 1
    assert value(after, "tuneops_runs_failed_total", backend="local") == 0
    assert 0 < value(after, "tuneops_gpu_seconds_total", backend="local") < 300
    assert value(after, "tuneops_deploy_requests", state="pending") == 0
    assert ("queue", "tuneops") in {p for labels in after["tuneops_rq_jobs"] for p in labels}

    def delta(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # one ack observed per command sent, under its subcommand
    assert delta("tuneops_ack_seconds_count", subcommand="run") == 1
    assert delta("tuneops_ack_seconds_count", subcommand="status") == 1
    assert delta("tuneops_ack_seconds_bucket", subcommand="run", le="+Inf") == 1
    assert delta("tuneops_slack_api_calls_total", method="chat_postMessage") > 0
    assert delta("tuneops_slack_api_calls_total", method="chat_update") > 0
    assert "tuneops_notifier_lag_seconds" in after

    # the worker logged JSON lines, those about the run with its id
    lines = (workspace.parent / "worker-0.log").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    assert records and all({"ts", "level", "logger", "message"} <= r.keys() for r in records)
    assert any(r.get("run_id") == "ft-0001" for r in records)


async def test_queue_gauges_and_counters_from_another_process(bot, bot_env):
    # No worker: the run waits in line, and its admit job waits in RQ's queue.
    status, _, _ = await bot.command("run --dataset datasets/chat.jsonl --max-steps 2")
    assert status == 200
    run = None
    for _ in range(100):
        run = service.get_run(bot.settings.jobs, "ft-0001")
        if run:
            break
        await asyncio.sleep(0.05)
    assert run is not None and run.state == "queued"

    # a worker-side counter, counted in a process of its own
    code = "from jobs.core import metrics; metrics.count_azure_error('ManagedEnvironmentGpuQuota')"
    await asyncio.to_thread(subprocess.run, [sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60,
                            env={**os.environ, **bot_env, "PYTHONPATH": str(ROOT)})

    samples = await scrape(bot)
    assert value(samples, "tuneops_runs", state="queued") == 1
    assert value(samples, "tuneops_queue_length") == 1
    assert value(samples, "tuneops_queue_oldest_age_seconds") > 0
    assert value(samples, "tuneops_rq_jobs", queue="tuneops", state="queued") >= 1
    assert value(samples, "tuneops_azure_errors_total", code="ManagedEnvironmentGpuQuota") == 1

    # RQ's own tool reads tuneops' queue at the same Redis URL
    rq = Path(sys.executable).parent / "rq"
    out = await asyncio.to_thread(subprocess.run, [str(rq), "info", "--url", bot_env["REDIS_URL"], "tuneops"],
                                  check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "tuneops" in out.stdout and "1 queues" in out.stdout

