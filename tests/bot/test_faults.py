"""Faults that strike real processes mid-run (the soak's harness, bot.soak.harness, at a test's size): a bot SIGKILLed
and started again, Redis SIGKILLed and started again on its AOF, Slack answering 503 for a while. Each run's thread
must still tell the whole story once: exactly one completion message, no log line lost, nothing executed twice.

The bots run with a 3 s stream heartbeat instead of 30 s (the harness's `alive_ttl_ms`), so that the takeover of a
dead bot's consumer (heartbeat + one reap) happens within the test's time; `python -m bot.soak` measures it with the
real settings."""

from __future__ import annotations

import asyncio
import shutil
import time

import aiohttp
import pytest

from bot.soak import report
from bot.soak.harness import DATASET, Cluster
from bot.threads import KEY, RUN_CARD
from jobs.core.runconfig import run_dir
from tests.conftest import wait_for

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")]

CHANNEL = "C0FAULTS"
STEPS = 30
# At-least-once delivery: lines a killed bot posted but had not acked yet are posted again by the process that takes
# its events over; what a run can repeat that way is bounded by its lines (one a step). The soak prints the count.
MAX_REPEATED_LINES = STEPS


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path, bots=1, workers=1, max_running=2, step_s=0.12, alive_ttl_ms=3000, reap_every_s=0.5,
                extra_env={"TUNEOPS_LOG_INTERVAL": "1"})
    with c:
        yield c


def submit(cluster: Cluster, n: int) -> None:
    async def send():
        async with aiohttp.ClientSession() as session:
            for i in range(n):
                status, ack = await cluster.command(session, f"run --dataset {DATASET} --max-steps {STEPS} "
                                                    f"--name fault-{i}", user="U0ALICE", channel=CHANNEL,
                                                    key=f"fault-{i}")
                assert status == 200, ack

    asyncio.run(send())


def run_ids(n: int) -> list[str]:
    return [f"ft-{i:04d}" for i in range(1, n + 1)]


def thread_check(cluster: Cluster, run_id: str) -> report.ThreadCheck | None:
    ts = cluster.redis_client().get(KEY.format(kind=RUN_CARD, id=run_id))
    return report.check_thread(run_id, cluster.slack.thread(CHANNEL, ts)) if ts else None


def trainer_step(cluster: Cluster, run_id: str) -> int:
    steps, _ = report.trainer_times(cluster.workspace / run_dir(run_id))
    return max(steps, default=0)


def wait_threads_complete(cluster: Cluster, ids: list[str], timeout: float) -> dict[str, report.ThreadCheck]:
    def complete():
        checks = {i: thread_check(cluster, i) for i in ids}
        return checks if all(c and c.completions for c in checks.values()) else None

    wait_for(complete, timeout, "every run's completion message")
    # Anything posted twice (a repeat after a takeover) would land within a moment.
    time.sleep(2)
    return {i: thread_check(cluster, i) for i in ids}


def assert_whole_story(cluster: Cluster, checks: dict[str, report.ThreadCheck]) -> None:
    conn = cluster.redis_client()
    for run_id, check in checks.items():
        run = conn.get(f"tuneops:run:{run_id}")
        assert run and '"state": "succeeded"' in run, run
        assert check.completions == 1, f"{run_id}: {check.completions} completion messages"
        printed = report.printed_lines(cluster.workspace / run_dir(run_id))
        lost = sorted(printed - set(check.lines_seen))
        assert len(lost) <= check.omitted, f"{run_id}: lost log lines {lost[:5]} ({check.omitted} omitted)"
        ex = report.executions(cluster.workspace / run_dir(run_id))
        assert not ex.twice and ex.starts == 1, f"{run_id}: executed twice ({ex})"
        assert check.duplicate_lines <= MAX_REPEATED_LINES, f"{run_id}: {check.duplicate_lines} repeated lines"
    assert not cluster.unexpected_exits, [(e.name, e.code, e.log_tail) for e in cluster.unexpected_exits]


def test_a_bot_killed_mid_run_and_started_again_loses_nothing(cluster):
    submit(cluster, 2)
    ids = run_ids(2)
    # Mid-run: the trainer is past its first steps, so the bot holds log lines and card edits in flight.
    wait_for(lambda: trainer_step(cluster, ids[0]) >= 6, 30, "the first run to be training")
    bot = cluster.slot("bot", 0)
    killed_pid = cluster.kill_bot(0, down_s=1.0)
    killed_at = time.monotonic()
    wait_for(lambda: bot.alive() and bot.proc.pid != killed_pid, 15, "the bot to be started again")
    cluster.wait_bot(bot)

    def taken_over():
        names = [c["name"] for c in cluster.redis_client().xinfo_consumers("tuneops:events", "tuneops-bot")]
        return not any(f":{killed_pid}:" in n for n in names)

    # The new process takes over the dead one's stream consumer (its pending events and its runs) once the dead
    # one's heartbeat lapsed (3 s here) at its next reap (every 0.5 s); the rest of the bound is its restart.
    wait_for(taken_over, 20, "the dead bot's consumer to be taken over", interval=0.2)
    assert time.monotonic() - killed_at < 12
    checks = wait_threads_complete(cluster, ids, 45)
    assert_whole_story(cluster, checks)


def test_redis_killed_mid_run_and_restarted_on_its_aof_loses_nothing(cluster):
    submit(cluster, 2)
    ids = run_ids(2)
    wait_for(lambda: trainer_step(cluster, ids[0]) >= 6, 30, "the first run to be training")
    cluster.kill_redis()
    time.sleep(1.5)
    cluster.start_redis()
    checks = wait_threads_complete(cluster, ids, 45)
    assert_whole_story(cluster, checks)



def test_slack_answering_503_for_a_while_does_not_lose_the_completion_message(cluster):
    struck = []

    def strike_at_the_end(call):
        # The card's edit to "succeeded" comes first in the run's last item, then its last log lines and the
        # completion message: Slack's servers fail from that edit on, for a few seconds.
        if not struck and call.method == "chat.update" and "succeeded" in str(call.params.get("text", "")):
            struck.append(call.time)
            cluster.slack.fail_for(8, 503, methods={"chat.postMessage"})

    cluster.slack.on_call = strike_at_the_end
    submit(cluster, 1)
    [run_id] = run_ids(1)
    checks = wait_threads_complete(cluster, [run_id], 24)
    assert struck
    assert_whole_story(cluster, checks)


# ---- the soak's own arithmetic ----------------------------------------------------------------------------------

def test_a_seed_gives_the_same_fault_schedule():
    from bot.soak.driver import parse_faults, plan_faults

    counts = parse_faults("worker=3,bot,redis=1,slack429,slack5xx")
    a = plan_faults(7, counts, (10, 90), workers=3, bots=2)
    assert a == plan_faults(7, counts, (10, 90), workers=3, bots=2) != plan_faults(8, counts, (10, 90), workers=3,
                                                                                      bots=2)
    assert sorted(f.kind for f in a) == ["bot", "redis", "slack429", "slack5xx", "worker", "worker", "worker"]
    assert all(10 <= f.at <= 90 for f in a) and [f.at for f in a] == sorted(f.at for f in a)
    assert parse_faults("none") == {}
    with pytest.raises(ValueError):
        parse_faults("meteor=1")


def test_state_lag_counts_from_the_oldest_step_the_record_does_not_show():
    steps = {1: 100.0, 2: 101.0, 3: 102.0}
    assert report.state_lag(103.0, 3, False, steps, None) == 0.0
    assert report.state_lag(103.0, 1, False, steps, None) == 2.0
    assert report.state_lag(105.0, 3, False, steps, 104.0) == 1.0   # trainer done, record not terminal yet
    assert report.state_lag(105.0, 0, True, steps, 104.0) == 0.0


def test_executed_twice_is_read_from_the_trainers_own_record(tmp_path):
    import json

    def starts(*recs):
        (tmp_path / "trainer-starts.jsonl").write_text("".join(json.dumps({"event": "start", **r}) + "\n"
                                                               for r in recs))
        return report.executions(tmp_path)

    assert not starts({"attempt": 1}).twice
    resumed = starts({"attempt": 1}, {"attempt": 2, "resumed_from": 5})
    assert not resumed.twice and resumed.resumes == 1
    assert starts({"attempt": 1}, {"attempt": 1}).same_attempt
    assert starts({"attempt": 1}, {"attempt": 2, "concurrent": True}).twice
    assert starts({"attempt": 1}, {"attempt": 2, "after_done": True}).twice
