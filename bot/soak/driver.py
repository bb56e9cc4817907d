"""The chaos soak: many runs through the real processes while faults strike on a seeded schedule; prints what held.

`python -m bot.soak [--runs 100] [--seed 1] [--faults worker=3,bot=1,redis=1,slack429=1,slack5xx=1]`. It starts a
`bot.soak.harness.Cluster` (Redis with AOF, 3 workers, 2 bots behind one address, the Slack stand-in), sends signed
`/finetune run` commands spread over a few channels, and meanwhile SIGKILLs workers, one bot and Redis (restarted on
its AOF) and makes the stand-in answer 429 and 5xx for a while. A sampler looks at Redis every second: how far each
run record lags behind its trainer, and when a killed bot's stream consumer is taken over. At the end it reads the
threads and the run folders (bot.soak.report) and prints the figures, each with its goal. Exit code 0 when every
goal is met.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis

from bot import threads
from bot.soak import report
from bot.soak.harness import DATASET, Cluster
from bot.stream import ALIVE_TTL_MS, GROUP, REAP_EVERY_S
from jobs.core import store
from jobs.core.runconfig import run_dir

FAULT_KINDS = ("worker", "bot", "redis", "slack429", "slack5xx")
DEFAULT_FAULTS = "worker=3,bot=1,redis=1,slack429=1,slack5xx=1"
STORE_DOWN = "cannot reach its store"        # bot.listeners.support.STORE_DOWN: "try again in a minute"
RUN_ID_RE = re.compile(r"\bft-\d+\b")
TERMINAL = {"succeeded", "failed", "cancelled", "timed_out"}
# With every command sent, no Slack call at all for this long means what is missing will not come by itself
# (longer than a dead bot's takeover, which the sampler waits for separately).
QUIET_S = 45.0


@dataclass(frozen=True)
class Fault:
    at: float          # seconds after the first command
    kind: str
    target: int = 0    # which worker or bot
    seconds: float = 0.0  # how long it lasts (down time, or the stand-in's window)
    status: int = 0    # slack5xx: 500 or 503


def parse_faults(text: str) -> dict[str, int]:
    """`worker=3,bot=1,redis` -> counts per kind; "none" or "" -> no faults."""
    counts: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if part == "none":
            continue
        kind, _, n = part.partition("=")
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}: use {', '.join(FAULT_KINDS)} (or none)")
        counts[kind] = int(n or 1)
    return counts


def plan_faults(seed: int, counts: dict[str, int], window: tuple[float, float], *, workers: int,
                bots: int) -> list[Fault]:
    """The fault schedule: each fault at a time drawn uniformly in `window`, from one seeded RNG, so that a seed
    gives the same schedule every time."""
    rng = random.Random(seed)
    lo, hi = window
    out = []
    for kind in FAULT_KINDS:
        for _ in range(counts.get(kind, 0)):
            at = round(rng.uniform(lo, hi), 1)
            if kind == "worker":
                out.append(Fault(at, kind, rng.randrange(workers), round(rng.uniform(0.5, 3.0), 1)))
            elif kind == "bot":
                out.append(Fault(at, kind, rng.randrange(bots), round(rng.uniform(1.0, 4.0), 1)))
            elif kind == "redis":
                out.append(Fault(at, kind, 0, round(rng.uniform(1.0, 4.0), 1)))
            elif kind == "slack429":
                out.append(Fault(at, kind, 0, round(rng.uniform(5.0, 12.0), 1)))
            else:
                out.append(Fault(at, kind, 0, round(rng.uniform(3.0, 8.0), 1), rng.choice((500, 503))))
    return sorted(out, key=lambda f: f.at)


@dataclass
class Soak:
    cluster: Cluster
    runs: int
    steps: int
    channels: int
    submit_every_s: float
    deadline_s: float
    faults: list[Fault]
    quiet: bool = False
    t0: float = 0.0
    submitted: dict[int, str] = field(default_factory=dict)      # command number -> its latest response_url key
    resubmits: int = 0
    refused: dict[int, str] = field(default_factory=dict)        # command number -> a final refusal's text
    ack_failures: int = 0
    fault_log: list[dict[str, Any]] = field(default_factory=list)
    max_lag: float = 0.0
    max_lag_run: str = ""
    lags: list[float] = field(default_factory=list)
    takeovers: list[dict[str, Any]] = field(default_factory=list)
    sampler_misses: int = 0
    _pending_takeover: dict[int, float] = field(default_factory=dict)   # dead bot pid -> when it was killed
    _stop: threading.Event = field(default_factory=threading.Event)

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"{time.time() - self.t0:7.1f}s  {text}", flush=True)

    # ---- sending the commands -------------------------------------------------------------------------------------

    def channel(self, i: int) -> str:
        return f"C0SOAK{i % self.channels:02d}"

    async def submit(self, session: aiohttp.ClientSession, i: int, attempt: int = 0) -> None:
        key = f"soak-{i:03d}-{attempt}"
        self.submitted[i] = key
        text = f"run --dataset {DATASET} --max-steps {self.steps} --name soak-{i:03d}"
        status, _ = await self.cluster.command(session, text, user=f"U0SOAK{i % 7}", channel=self.channel(i),
                                               key=key)
        if status != 200:
            self.ack_failures += 1
            self.say(f"command {i}: no ack after Slack's retries ({status})")

    async def submit_all(self, session: aiohttp.ClientSession) -> None:
        tasks = []
        for i in range(self.runs):
            tasks.append(asyncio.create_task(self.submit(session, i)))
            await asyncio.sleep(self.submit_every_s)
        await asyncio.gather(*tasks)

    async def answer_refusals(self, session: aiohttp.ClientSession) -> None:
        """A person told "cannot reach its store; try again in a minute" sends the command again; the soak does so
        after a few seconds. Other refusals are final and reported."""
        slack = self.cluster.slack
        retried: set[str] = set()
        while not self._stop.is_set():
            for i, key in list(self.submitted.items()):
                if key in retried:
                    continue
                answers = slack.responses.get(key) or []
                texts = " ".join(json.dumps(a) for a in answers)
                if STORE_DOWN in texts:
                    retried.add(key)
                    self.resubmits += 1
                    self.say(f"command {i}: the bot could not reach Redis; sending it again")
                    await asyncio.sleep(3)
                    asyncio.create_task(self.submit(session, i, int(key.rsplit("-", 1)[1]) + 1))
                elif answers and not RUN_ID_RE.search(texts) and "Checking" not in texts:
                    self.refused[i] = texts[:300]
            await asyncio.sleep(1)

    # ---- faults ---------------------------------------------------------------------------------------------------

    async def strike(self) -> None:
        for fault in self.faults:
            await asyncio.sleep(max(0.0, self.t0 + fault.at - time.time()))
            await asyncio.to_thread(self.apply, fault)

    def apply(self, fault: Fault) -> None:
        c = self.cluster
        entry: dict[str, Any] = {**asdict(fault), "t": round(time.time() - self.t0, 1)}
        if fault.kind == "worker":
            entry["pid"] = c.kill_worker(fault.target, fault.seconds)
        elif fault.kind == "bot":
            pid = c.kill_bot(fault.target, fault.seconds)
            entry["pid"] = pid
            self._pending_takeover[pid] = time.time()
        elif fault.kind == "redis":
            entry["pid"] = c.kill_redis()
            time.sleep(fault.seconds)
            c.start_redis()
        elif fault.kind == "slack429":
            c.slack.fail_for(fault.seconds, 429, retry_after=2)
        else:
            c.slack.fail_for(fault.seconds, fault.status)
        self.fault_log.append(entry)
        what = {"worker": f"SIGKILLed worker-{fault.target} (down {fault.seconds}s)",
                "bot": f"SIGKILLed bot-{fault.target} (restarted after {fault.seconds}s)",
                "redis": f"SIGKILLed Redis; restarted it on its AOF after {fault.seconds}s",
                "slack429": f"Slack answers 429 (Retry-After 2) for {fault.seconds}s",
                "slack5xx": f"Slack answers {fault.status} for {fault.seconds}s"}[fault.kind]
        self.say("fault: " + what)

    # ---- the sampler ------------------------------------------------------------------------------------------------

    def sample_forever(self) -> None:
        conn = None
        while not self._stop.wait(1.0):
            try:
                conn = conn or self.cluster.redis_client()
                self.sample(conn, time.time())
            except redis.RedisError:
                self.sampler_misses += 1
                conn = None

    def sample(self, conn: redis.Redis, now: float) -> None:
        ids = conn.zrange(store.ALL_RUNS, 0, -1)
        ws = self.cluster.workspace
        for raw in conn.mget([store.run_key(i) for i in ids]) if ids else []:
            if not raw:
                continue
            run = json.loads(raw)
            if run["state"] in TERMINAL:
                continue
            steps, done = report.trainer_times(ws / run_dir(run["id"]))
            lag = report.state_lag(now, int(run.get("step") or 0), False, steps, done)
            self.lags.append(lag)
            if lag > self.max_lag:
                self.max_lag, self.max_lag_run = lag, run["id"]
        if self._pending_takeover:
            try:
                names = [c["name"] for c in conn.xinfo_consumers(store.EVENT_STREAM, GROUP)]
            except redis.ResponseError:
                names = []
            for pid, killed in list(self._pending_takeover.items()):
                if not any(f":{pid}:" in n for n in names):
                    del self._pending_takeover[pid]
                    self.takeovers.append({"pid": pid, "seconds": round(now - killed, 1)})
                    self.say(f"the stream consumer of the killed bot (pid {pid}) was taken over after "
                             f"{now - killed:.1f}s")

    # ---- waiting for the end ----------------------------------------------------------------------------------------

    def settled(self, conn: redis.Redis) -> bool:
        """Every command has its run, every run ended and its thread has its completion message, no bot's consumer is
        left to take over and no event is pending."""
        runs = self.runs_by_name(conn)
        if len(runs) + len(self.refused) < self.runs or self._pending_takeover:
            return False
        for run in runs.values():
            if run["state"] not in TERMINAL:
                return False
            check = self.thread_of(conn, run)
            if check is None or check.completions < 1:
                return False
        pending = conn.xpending(store.EVENT_STREAM, GROUP)
        return int(pending.get("pending") or 0) == 0

    def runs_by_name(self, conn: redis.Redis) -> dict[str, dict[str, Any]]:
        ids = conn.zrange(store.ALL_RUNS, 0, -1)
        out: dict[str, dict[str, Any]] = {}
        for raw in conn.mget([store.run_key(i) for i in ids]) if ids else []:
            if raw:
                run = json.loads(raw)
                out.setdefault(run.get("name") or run["id"], run)
        return out

    def all_runs(self, conn: redis.Redis) -> list[dict[str, Any]]:
        ids = conn.zrange(store.ALL_RUNS, 0, -1)
        return [json.loads(raw) for raw in (conn.mget([store.run_key(i) for i in ids]) if ids else []) if raw]

    def thread_of(self, conn: redis.Redis, run: dict[str, Any]) -> report.ThreadCheck | None:
        ts = conn.get(threads.KEY.format(kind=threads.RUN_CARD, id=run["id"]))
        if not ts:
            return None
        return report.check_thread(run["id"], self.cluster.slack.thread(run["channel"], ts))

    async def wait_settled(self) -> bool:
        """Until everything settled (True), or the deadline, or nothing at all happened for QUIET_S while something
        is still missing (False: it will not come by itself)."""
        deadline = self.t0 + self.deadline_s
        conn = self.cluster.redis_client()
        last_note, calls, changed = 0.0, -1, time.time()
        while time.time() < deadline:
            try:
                if self.settled(conn):
                    return True
                if len(self.cluster.slack.calls) != calls or self._pending_takeover:
                    calls, changed = len(self.cluster.slack.calls), time.time()
                elif time.time() - changed > QUIET_S and len(self.submitted) == self.runs:
                    self.say(f"nothing happened for {QUIET_S:.0f}s and something is still missing; stopping")
                    return False
                if time.time() - last_note > 15:
                    last_note = time.time()
                    runs = self.runs_by_name(conn)
                    ended = sum(1 for r in runs.values() if r["state"] in TERMINAL)
                    self.say(f"{len(runs)} runs, {ended} ended")
            except redis.RedisError:
                conn = self.cluster.redis_client()
            await asyncio.sleep(1)
        return False

    async def run(self) -> bool:
        self.t0 = time.time()
        sampler = threading.Thread(target=self.sample_forever, name="soak-sampler", daemon=True)
        sampler.start()
        async with aiohttp.ClientSession() as session:
            refusals = asyncio.create_task(self.answer_refusals(session))
            striker = asyncio.create_task(self.strike())
            await self.submit_all(session)
            self.say(f"all {self.runs} commands sent")
            ok = await self.wait_settled()
            await asyncio.sleep(3)   # anything repeated late lands now
            striker.cancel()
            self._stop.set()
            refusals.cancel()
        sampler.join(5)
        return ok

    # ---- the figures -------------------------------------------------------------------------------------------------

    def figures(self, settled: bool) -> dict[str, Any]:
        c = self.cluster
        conn = c.redis_client()
        runs = [r for r in self.all_runs(conn) if str(r.get("name", "")).startswith("soak-")]
        names = Counter(r["name"] for r in runs)
        post_times = {call.response.get("ts"): call.time for call in c.slack.calls_to("chat.postMessage")
                      if call.ok}
        finished, failed, unfinished, twice, resumes, one_completion = [], [], [], [], 0, 0
        duplicate_lines, lost_lines, omitted, runs_with_dups, cards = 0, 0, 0, 0, 0
        completion_delay = 0.0
        not_one: list[str] = []
        no_started: list[str] = []
        details: dict[str, dict[str, Any]] = {}
        for run in runs:
            d = c.workspace / run_dir(run["id"])
            if run["state"] == "succeeded":
                finished.append(run["id"])
            elif run["state"] in TERMINAL:
                failed.append(f"{run['id']} {run['state']}: {run.get('error') or '(no reason)'}")
            else:
                unfinished.append(f"{run['id']} {run['state']}")
            ex = report.executions(d)
            resumes += ex.resumes
            if ex.twice:
                twice.append(run["id"])
            cards += sum(1 for m in c.slack.root_messages(run["channel"]) if run["id"] in m.text)
            check = self.thread_of(conn, run)
            if check is None:
                not_one.append(f"{run['id']} ({run['channel']}): no card, so no thread")
                continue
            one_completion += check.completions == 1
            if check.started < 1:
                no_started.append(run["id"])
            if check.completions != 1:
                not_one.append(f"{run['id']} ({run['channel']}): {check.completions} completion messages")
            duplicate_lines += check.duplicate_lines
            runs_with_dups += check.duplicate_lines > 0
            omitted += check.omitted
            # Batching may leave lines out on purpose, and says how many ("... N lines omitted").
            missing = sorted(report.printed_lines(d) - set(check.lines_seen))
            lost = max(0, len(missing) - check.omitted)
            lost_lines += lost
            if lost or check.duplicate_lines or check.completions != 1:
                details[run["id"]] = {"completions": check.completions, "started": check.started,
                                      "duplicate_lines": check.duplicate_lines, "lost_lines": lost,
                                      "missing": missing[:10], "omitted": check.omitted,
                                      "repeated": [k for k, n in check.lines_seen.items() if n > 1][:10]}
            _, done = report.trainer_times(d)
            ends = [post_times.get(m.ts) for m in c.slack.thread(run["channel"], conn.get(
                threads.KEY.format(kind=threads.RUN_CARD, id=run["id"])))
                    if report.completion_re(run["id"]).search(m.text)]
            if done and ends and ends[0]:
                completion_delay = max(completion_delay, ends[0] - done)
        made = {int(r["name"].split("-")[1]) for r in runs}
        # What the bot answered to the commands that made no run (a lost submission, or a refusal).
        without_run = {i: [json.dumps(a)[:200] for a in c.slack.responses.get(key, [])]
                       for i, key in self.submitted.items() if i not in made}
        rates = report.call_rates(c.slack.calls)
        errors = report.slack_errors(c.slack.calls, self.t0)
        lags = sorted(self.lags)
        return {
            "settled": settled,
            "wall_s": round(time.time() - self.t0, 1),
            "commands": self.runs, "resubmitted_after_store_down": self.resubmits, "refused": self.refused,
            "no_ack": self.ack_failures, "commands_without_run": without_run,
            "submitted": len(names), "runs_created": len(runs),
            "duplicate_runs": {n: k for n, k in names.items() if k > 1},
            "finished": len(finished), "failed": failed, "unfinished": unfinished,
            "executed_twice": twice, "resumed_attempts": resumes,
            "threads_with_one_completion": one_completion, "threads_not_one_completion": not_one,
            "threads_without_started_message": no_started, "cards": cards,
            "duplicate_log_lines": duplicate_lines, "runs_with_duplicate_lines": runs_with_dups,
            "lost_log_lines": lost_lines, "omitted_log_lines": omitted,
            "max_state_lag_s": round(self.max_lag, 1), "max_state_lag_run": self.max_lag_run,
            "p95_state_lag_s": round(lags[int(0.95 * (len(lags) - 1))], 1) if lags else 0.0,
            "max_completion_delay_s": round(completion_delay, 1),
            "slack": {**rates, **errors},
            "takeovers": self.takeovers, "takeover_bound_s": ALIVE_TTL_MS / 1000 + REAP_EVERY_S,
            "faults": self.fault_log,
            "unexpected_exits": [{"name": e.name, "pid": e.pid, "code": e.code,
                                  "t": round(e.at - self.t0, 1), "log_tail": e.log_tail}
                                 for e in c.unexpected_exits],
            "sampler_misses": self.sampler_misses,
            "runs_with_problems": details,
        }


def print_figures(f: dict[str, Any]) -> bool:
    """Print the figures with their goals; True when every goal is met."""
    n = f["commands"]
    goals = [
        ("runs submitted / finished / failed", f"{f['submitted']} / {f['finished']} / {len(f['failed'])}",
         f"{n} / {n} / 0", f["submitted"] == n and f["finished"] == n and not f["failed"]),
        ("runs executed twice", str(len(f["executed_twice"])), "0", not f["executed_twice"]),
        ("threads with exactly one completion message", str(f["threads_with_one_completion"]), str(n),
         f["threads_with_one_completion"] == n),
        ("commands that made no run", str(len(f["commands_without_run"])), "0", not f["commands_without_run"]),
        ("runs created for one command more than once", str(len(f["duplicate_runs"])), "0", not f["duplicate_runs"]),
        ("run cards posted", str(f["cards"]), str(n), f["cards"] == n),
        ("lost log lines", str(f["lost_log_lines"]), "0", f["lost_log_lines"] == 0),
        ("threads without their 'started' message", str(len(f["threads_without_started_message"])), "0",
         not f["threads_without_started_message"]),
    ]
    ok = all(g[3] for g in goals) and f["settled"]
    print()
    print(f"tuneops chaos soak: {n} runs in {f['wall_s']:.0f}s" + ("" if f["settled"] else
                                                                    " (NOT settled by the deadline)"))
    for what, value, goal, met in goals:
        print(f"  {'ok ' if met else 'BAD'} {what}: {value}   (goal {goal})")
    s = f["slack"]
    lines = [
        (f"duplicate log lines in threads: {f['duplicate_log_lines']} in {f['runs_with_duplicate_lines']} runs "
         f"(at-least-once delivery repeats what was posted but not acked; {f['omitted_log_lines']} lines omitted "
         "by batching)"),
        (f"longest time a run's state lagged behind its trainer: {f['max_state_lag_s']}s "
         f"({f['max_state_lag_run'] or '-'}; p95 {f['p95_state_lag_s']}s; sampled every second)"),
        (f"longest time from a trainer's end to its completion message: {f['max_completion_delay_s']}s"),
        (f"Slack calls per second per channel (chat.postMessage + chat.update): busiest second {s['max_per_s']}, "
         f"chat.postMessage alone {s['max_posts_per_s']}, mean {s['mean_per_s']} over {s['channels']} channels"),
        (f"429s received: {s['429_injected'] + s['429_rate_limit']} ({s['429_injected']} injected, "
         f"{s['429_rate_limit']} from the stand-in's 1/s per-channel limit"
         + "".join(f"{'; at' if i == 0 else ','} {w['t']}s ({w['after_last_post_s']}s after the channel's last post)"
                   for i, w in enumerate(s['429_rate_limit_when']))
         + f"); 5xx received: {s['5xx_injected']}; {s['calls']} Web API calls in all"),
        ("dead bot's consumer taken over after: " + (", ".join(f"{t['seconds']}s" for t in f["takeovers"]) or "-")
         + f" (bound: heartbeat {f['takeover_bound_s'] - REAP_EVERY_S:.0f}s + reap every {REAP_EVERY_S:.0f}s = "
         f"{f['takeover_bound_s']:.0f}s)"),
        (f"later attempts of a run (resumes tuneops recorded): {f['resumed_attempts']}; commands sent again after "
         f"'cannot reach its store': {f['resubmitted_after_store_down']}; commands without an ack: {f['no_ack']}"),
        (f"processes that exited on their own (restarted by the harness): {len(f['unexpected_exits'])}"),
    ]
    for line in lines:
        print("  " + line)
    for fault in f["faults"]:
        print(f"  fault at {fault['t']:6.1f}s: {fault['kind']} {fault.get('target', '')} "
              f"({fault['seconds']}s{', ' + str(fault['status']) if fault.get('status') else ''})")
    for e in f["unexpected_exits"]:
        print(f"  exit: {e['name']} (pid {e['pid']}) exited with {e['code']} at {e['t']}s; its log ends:")
        for line in e["log_tail"].splitlines()[-4:]:
            print("      " + line)
    for what in ("failed", "unfinished", "executed_twice", "threads_not_one_completion",
                 "threads_without_started_message"):
        for item in f[what][:10]:
            print(f"  {what}: {item}")
    for i, answers in list(f["commands_without_run"].items())[:5]:
        print(f"  command {i} made no run; the bot answered: {answers or 'nothing'}")
    return ok


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bot.soak", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=100, help="runs to submit (default 100)")
    p.add_argument("--seed", type=int, default=1, help="seed of the fault schedule (default 1)")
    p.add_argument("--faults", default=DEFAULT_FAULTS,
                   help=f"faults and how many of each, or none (default {DEFAULT_FAULTS})")
    p.add_argument("--bots", type=int, default=2, help="bot processes behind the one address (default 2)")
    p.add_argument("--workers", type=int, default=3, help="RQ workers (default 3)")
    p.add_argument("--channels", type=int, default=10, help="channels the runs are spread over (default 10)")
    p.add_argument("--steps", type=int, default=20, help="training steps a run (default 20)")
    p.add_argument("--step-s", type=float, default=0.1, help="the stand-in trainer's seconds a step (default 0.1)")
    p.add_argument("--max-running", type=int, default=6, help="TUNEOPS_MAX_RUNNING (default 6)")
    p.add_argument("--submit-every", type=float, default=1.0, help="seconds between two commands (default 1)")
    p.add_argument("--deadline", type=float, default=0, help="seconds the soak may take (default: 60 + 8 a run)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    p.add_argument("--keep", action="store_true", help="keep the soak's folder (logs, workspace, AOF)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        counts = parse_faults(args.faults)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    span = max(20.0, args.runs * args.submit_every)
    faults = plan_faults(args.seed, counts, (0.1 * span, 0.9 * span), workers=args.workers, bots=args.bots)
    root = Path(tempfile.mkdtemp(prefix="tuneops-soak-"))
    print(f"tuneops chaos soak: {args.runs} runs, {args.bots} bots, {args.workers} workers, seed {args.seed}, "
          f"faults {args.faults or 'none'}; folder {root}", flush=True)
    cluster = Cluster(root, bots=args.bots, workers=args.workers, max_running=args.max_running,
                      step_s=args.step_s)
    ok = False
    try:
        with cluster:
            soak = Soak(cluster, args.runs, args.steps, args.channels, args.submit_every,
                        args.deadline or 60 + 8 * args.runs, faults)
            settled = asyncio.run(soak.run())
            figures = soak.figures(settled)
        ok = print_figures(figures)
        if args.json:
            args.json.write_text(json.dumps(figures, indent=1, default=str))
    finally:
        if args.keep or not ok:
            print(f"kept {root} (logs/, workspace/runs/)")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1

