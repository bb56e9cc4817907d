"""Ack latency benchmark: `python -m bot.bench [--round 400] [--rounds 3] [--clients 20] [--text "list"]`.

Starts a private redis-server and the Slack stand-in, then, one after the other on the same machine, a bare Bolt
AsyncApp that acks `/finetune` with a constant (`bot.bench_bare`: the floor) and `tuneops bot --http`, each as a fresh
process. Each gets rounds of signed slash commands at POST /slack/events from concurrent clients: the first round
right after the process says it is ready (cold), the others warm. It prints ack latency p50/p99 per round for both,
commands per second, and the ratios of tuneops to the bare app.
Goals on 2 CPU cores: warm p99 <= 1.3x the bare app's, cold p99 <= 1.5x; warm p99 <= 50 ms and >= 200 commands/s
(Slack gives up after 3,000 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import aiohttp
import redis

from bot.demo import REPO_ROOT, DemoError, _free_port, _stop
from bot.standin import slack as standin


def start_private_redis(stack: ExitStack, tmp: Path) -> str:

    exe = shutil.which("redis-server")
    if exe is None:
        raise DemoError("redis-server is not installed: apt-get install redis-server")
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    stack.callback(_stop, proc, "redis-server")
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.05)
    raise DemoError("redis-server did not start")


async def wait_ready(url: str, proc: subprocess.Popen, path: str, *, any_answer: bool = False,
                     timeout: float = 60) -> None:
    """Until GET `path` answers 200 (or, with `any_answer`, answers at all: the bare app has no /healthz)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise DemoError(f"the app exited with {proc.returncode}")
            try:
                async with s.get(url + path) as r:
                    await r.read()
                    if any_answer or r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise DemoError("the app did not become ready")


async def fire(url: str, requests: list[tuple[bytes, dict[str, str]]], clients: int,
               rate: float | None = None) -> tuple[list[float], float, int]:
    """Send every request, `clients` at a time over keep-alive connections; (latencies in s, wall s, failures).

    Without `rate` each client sends its next command as soon as the last is acked (the most the bot can take).
    With `rate`, command i is due at i/rate seconds and its latency counts from then, so a bot that falls behind is
    charged for the wait too.
    """

    latencies: list[float] = []
    failures = 0
    queue: asyncio.Queue = asyncio.Queue()
    for i, item in enumerate(requests):
        queue.put_nowait((i, *item))
    start = 0.0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal failures
        while True:
            try:
                i, body, headers = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.perf_counter()
            if rate:
                due = start + i / rate
                if due > t0:
                    await asyncio.sleep(due - t0)
                t0 = due
            async with session.post(url + "/slack/events", data=body, headers=headers) as r:
                await r.read()
                ok = r.status == 200
            latencies.append(time.perf_counter() - t0)
            failures += 0 if ok else 1

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        wall = time.perf_counter() - start
    return latencies, wall, failures


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(q * (len(ordered) - 1)))))
    return ordered[k]


def round_stats(latencies: list[float], wall: float, failures: int) -> dict:
    ms = [x * 1000 for x in latencies]
    return {"p50_ms": round(percentile(ms, 0.50), 1), "p99_ms": round(percentile(ms, 0.99), 1),
            "max_ms": round(max(ms), 1), "commands_per_s": round(len(ms) / wall, 1), "non_200": failures}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bot.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--round", type=int, default=400, help="commands per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per app; the first is cold")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--text", default="list", help="the /finetune text to send (default: list)")
    ap.add_argument("--rate", type=float, help="offer this many commands/s in all instead of as many as acked")
    ap.add_argument("--no-baseline", action="store_true", help="measure tuneops only, not the bare Bolt app")
    ap.add_argument("--profile", metavar="FILE", help="run the bot under cProfile and write its stats to FILE")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="tuneops-bench-"))
    results: dict[str, list[dict]] = {}
    answered = 0
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, True)
        try:
            redis_url = start_private_redis(stack, tmp)
            token = "xoxb-bench-" + secrets.token_hex(8)
            slack = standin.SlackStandIn(token=token).start()
            stack.callback(slack.stop)
            ws = tmp / "workspace"
            (ws / "datasets").mkdir(parents=True)
            # payload.tinymodel loads torch: only when the benchmark builds its workspace
            from payload.tinymodel import example_dataset_path

            shutil.copy(example_dataset_path(), ws / "datasets" / "chat.jsonl")
            # No worker runs here: a `run` only has to be checked and queued, so the default model's folder is
            # enough (nothing loads it).
            (ws / "model-cache" / "tiny").mkdir(parents=True)
            secret = secrets.token_hex(16)
            env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "SLACK_BOT_TOKEN": token,
                   "SLACK_SIGNING_SECRET": secret, "SLACK_API_URL": slack.api_url, "SLACK_APP_TOKEN": "",
                   "REDIS_URL": redis_url, "TUNEOPS_WORKSPACE": str(ws), "TUNEOPS_PYTHON": sys.executable}

            def make(n: int) -> list[tuple[bytes, dict[str, str]]]:
                out = []
                for i in range(n):
                    body = standin.slash_command_body(args.text, response_url=slack.response_url(f"b{i}"),
                                                      user_id="U0BENCH", channel_id="C0BENCH")
                    out.append((body.encode(), standin.signed_headers(secret, body)))
                return out

            def answers() -> int:
                return sum(len(v) for v in slack.responses.values())

            for kind in (() if args.no_baseline else ("bare",)) + ("tuneops",):
                port = _free_port()
                if kind == "bare":
                    cmd = [sys.executable, "-m", "bot.bench_bare", "--port", str(port)]
                else:
                    profile = ["-m", "cProfile", "-o", str(Path(args.profile).resolve())] if args.profile else []
                    cmd = [sys.executable, *profile, "-m", "bot.cli", "bot", "--http", "--host", "127.0.0.1",
                           "--port", str(port)]
                with open(tmp / f"{kind}.log", "wb") as log:
                    proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
                url = f"http://127.0.0.1:{port}"
                try:
                    # Ready as each says it: tuneops' /healthz, the bare app's listening socket.
                    asyncio.run(wait_ready(url, proc, "/healthz") if kind == "tuneops" else
                                wait_ready(url, proc, "/slack/events", any_answer=True))
                    rounds = []
                    for _ in range(args.rounds):
                        before = answers()
                        rounds.append(round_stats(*asyncio.run(fire(url, make(args.round), args.clients, args.rate))))
                        if kind == "tuneops":
                            # The work after each ack (a Redis read, an answer on response_url) ends before the next
                            # round, so that a round measures acks, not the backlog of the last one.
                            slack.wait_for(lambda: answers() >= before + args.round, 60)
                            answered += answers() - before
                    results[kind] = rounds
                finally:
                    _stop(proc, kind, True)
        except DemoError as e:
            print(f"The benchmark cannot run: {e}", file=sys.stderr)
            return 1

    def warm(kind: str, key: str) -> float:
        rows = results[kind][1:] or results[kind]
        return max(r[key] for r in rows) if key.endswith("ms") else min(r[key] for r in rows)

    paced = f", offered at {args.rate:g}/s" if args.rate else ", each as soon as the last was acked"
    print(f"{args.rounds} rounds of {args.round} signed `/finetune {args.text}` from {args.clients} concurrent "
          f"clients{paced} ({os.cpu_count()} CPUs); round 1 is cold (right after the process said it was ready):")
    for kind, rounds in results.items():
        name = "bare Bolt app" if kind == "bare" else "tuneops"
        for i, r in enumerate(rounds, 1):
            print(f"  {name:13} round {i}: ack p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, max {r['max_ms']} ms; "
                  f"{r['commands_per_s']} commands/s; {r['non_200']} not 200")
    print(f"  tuneops answered {answered} commands on response_url after their acks")
    summary = {"round": args.round, "rounds": args.rounds, "clients": args.clients, "text": args.text,
               "cpus": os.cpu_count(), "offered_rate": args.rate, "results": results}
    t_warm, t_rate = warm("tuneops", "p99_ms"), warm("tuneops", "commands_per_s")
    kept_up = t_rate >= 200 or bool(args.rate and args.rate >= 200 and t_rate >= 0.98 * args.rate)
    goals = {"warm p99 <= 50 ms, >= 200 commands/s": t_warm <= 50 and kept_up}
    if "bare" in results:
        warm_ratio = t_warm / max(warm("bare", "p99_ms"), 0.1)
        cold_ratio = results["tuneops"][0]["p99_ms"] / max(results["bare"][0]["p99_ms"], 0.1)
        summary.update(warm_p99_ratio=round(warm_ratio, 2), cold_p99_ratio=round(cold_ratio, 2))
        print(f"  p99 ratio tuneops / bare app: warm {warm_ratio:.2f} (worst warm round of each), "
              f"cold {cold_ratio:.2f} (round 1 of each)")
        goals["warm p99 <= 1.3x the bare app"] = warm_ratio <= 1.3
        goals["cold p99 <= 1.5x the bare app"] = cold_ratio <= 1.5
    for goal, met in goals.items():
        print(f"  goal ({goal}): {'met' if met else 'NOT met'}")
    summary["goals"] = goals
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
