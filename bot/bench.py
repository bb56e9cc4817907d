"""Ack latency benchmark: `python -m bot.bench [--round 400] [--rounds 4] [--starts 3] [--clients 20] [--text list]`.

Starts a private redis-server and the Slack stand-in, then, one after the other on the same machine, a bare Bolt
AsyncApp that acks `/finetune` with a constant (`bot.bench_bare`: the floor) and `tuneops bot --http`, each as a fresh
process, `--starts` times each (alternating, so that a change in the machine's load falls on both). Each process gets
rounds of signed slash commands at POST /slack/events from concurrent clients: the first round right after the process
says it is ready (cold), the others warm. It prints ack latency p50/p99 per round with the machine's load average,
commands per second, and the ratios of tuneops to the bare app: of the medians of the cold rounds' p99 and of the warm
rounds' p99 (a median, so that one round disturbed by another process on the machine does not decide). tuneops
answers `list` and `status` in the ack itself when its store answers in time; what it answers on response_url after
an ack is awaited after each round.
Goals on 2 CPU cores: warm p99 <= 1.3x the bare app's, cold p99 <= 1.5x; warm p99 <= 50 ms and >= 200 commands/s
(Slack gives up after 3,000 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import aiohttp

from bot.demo import REPO_ROOT, DemoError, start_private_redis, stop_process
from bot.standin import slack as standin

LISTENING = re.compile(r"listening on http://[^\s/]+:(\d+)/")


def listening_port(log: Path, proc: subprocess.Popen, timeout: float = 60) -> int:
    """The port a server started on port 0 says it took (its log line `listening on http://HOST:PORT/...`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = LISTENING.search(log.read_text(errors="replace"))
        if found:
            return int(found.group(1))
        if proc.poll() is not None:
            raise DemoError(f"the app exited with {proc.returncode}: {log.read_text(errors='replace')[-500:]}")
        time.sleep(0.05)
    raise DemoError("the app did not say which port it listens on")


class StandInProcess:
    """The Slack stand-in (bot.standin.slack) in a process of its own, as Slack's servers are: in the benchmark's
    process it would take the GIL from the clients that time the acks, and only while tuneops (whose answers it
    receives) is measured, not the bare app."""

    def __init__(self, token: str):
        self.conn, child = multiprocessing.get_context("spawn").Pipe()
        self.proc = multiprocessing.get_context("spawn").Process(target=_serve_standin, args=(token, child),
                                                                 daemon=True)
        self.proc.start()
        if not self.conn.poll(60):
            raise DemoError("the Slack stand-in did not start")
        self.api_url, self.base_url = self.conn.recv()

    def response_url(self, key: str) -> str:
        return f"{self.base_url}/response/{key}"

    def answers(self) -> int:
        """How many answers came on response_urls so far."""
        self.conn.send("answers")
        return self.conn.recv()

    def wait_for_answers(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.answers() >= n:
                return True
            time.sleep(0.05)
        return False

    def settle(self, quiet: float = 0.25, timeout: float = 60) -> None:
        """Until no answer came for `quiet` seconds: a command acked with a note (`run`'s "Checking...") is answered on
        response_url too, so the acks' bodies alone do not say how many answers are still to come."""
        deadline = time.monotonic() + timeout
        last, since = self.answers(), time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - since < quiet:
            time.sleep(0.05)
            now = self.answers()
            if now != last:
                last, since = now, time.monotonic()

    def stop(self) -> None:
        try:
            self.conn.send("stop")
        except OSError:
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


def _serve_standin(token: str, conn) -> None:
    slack = standin.SlackStandIn(token=token).start()
    conn.send((slack.api_url, slack.base_url))
    try:
        while conn.recv() == "answers":
            conn.send(sum(len(v) for v in slack.responses.values()))
    except EOFError:
        pass
    finally:
        slack.stop()


def load() -> str:
    """The machine's load averages (1, 5, 15 min), as `uptime` says them: other work skews latencies."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


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
               rate: float | None = None) -> tuple[list[float], float, int, int]:
    """Send every request, `clients` at a time over keep-alive connections; (latencies in s, wall s, failures, acks
    with a body: commands answered in the ack itself).

    Without `rate` each client sends its next command as soon as the last is acked (the most the bot can take).
    With `rate`, command i is due at i/rate seconds and its latency counts from then, so a bot that falls behind is
    charged for the wait too.
    """

    latencies: list[float] = []
    failures = in_ack = 0
    queue: asyncio.Queue = asyncio.Queue()
    for i, item in enumerate(requests):
        queue.put_nowait((i, *item))
    start = 0.0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal failures, in_ack
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
                answered = bool(await r.read())
                ok = r.status == 200
            latencies.append(time.perf_counter() - t0)
            failures += 0 if ok else 1
            in_ack += 1 if ok and answered else 0

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        wall = time.perf_counter() - start
    return latencies, wall, failures, in_ack


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
    ap.add_argument("--rounds", type=int, default=4, help="rounds per process; the first is cold")
    ap.add_argument("--starts", type=int, default=3, help="fresh processes of each app, one after the other")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--text", default="list", help="the /finetune text to send (default: list)")
    ap.add_argument("--rate", type=float, help="offer this many commands/s in all instead of as many as acked")
    ap.add_argument("--no-baseline", action="store_true", help="measure tuneops only, not the bare Bolt app")
    ap.add_argument("--profile", metavar="FILE", help="run the bot under cProfile and write its stats to FILE "
                    "(of its first start)")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="tuneops-bench-"))
    results: dict[str, list[list[dict]]] = {}  # kind -> one list of rounds per start
    answered = answered_in_ack = 0
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, True)
        try:
            redis_url = start_private_redis(stack, tmp)
            token = "xoxb-bench-" + secrets.token_hex(8)
            slack = StandInProcess(token)
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

            kinds = (() if args.no_baseline else ("bare",)) + ("tuneops",)
            for start in range(args.starts):
                for kind in kinds:
                    if kind == "bare":
                        cmd = [sys.executable, "-m", "bot.bench_bare", "--port", "0"]
                    else:
                        profile = (["-m", "cProfile", "-o", str(Path(args.profile).resolve())]
                                   if args.profile and start == 0 else [])
                        cmd = [sys.executable, *profile, "-m", "bot.cli", "bot", "--http", "--host", "127.0.0.1",
                               "--port", "0"]
                    log_path = tmp / f"{kind}-{start}.log"
                    with open(log_path, "wb") as log:
                        proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)
                    try:
                        url = f"http://127.0.0.1:{listening_port(log_path, proc)}"
                        # Ready as each says it: tuneops' /healthz, the bare app's listening socket.
                        asyncio.run(wait_ready(url, proc, "/healthz") if kind == "tuneops" else
                                    wait_ready(url, proc, "/slack/events", any_answer=True))
                        rounds = []
                        for _ in range(args.rounds):
                            before, requests, load_before = slack.answers(), make(args.round), load()
                            *measured, in_ack = asyncio.run(fire(url, requests, args.clients, args.rate))
                            stats = round_stats(*measured)
                            stats["load"] = load_before
                            if kind == "tuneops":
                                # The work after each ack (an answer on response_url, for commands not answered in
                                # their ack) ends before the next round, so that a round measures acks, not the
                                # backlog of the last one.
                                slack.wait_for_answers(before + args.round - in_ack, 60)
                                slack.settle()
                                answered += slack.answers() - before
                                answered_in_ack += in_ack
                            rounds.append(stats)
                        results.setdefault(kind, []).append(rounds)
                    finally:
                        stop_process(proc, group=True)
        except DemoError as e:
            print(f"The benchmark cannot run: {e}", file=sys.stderr)
            return 1

    def cold(kind: str, key: str) -> float:
        return round(statistics.median(rounds[0][key] for rounds in results[kind]), 1)

    def warm(kind: str, key: str) -> float:
        rows = [r for rounds in results[kind] for r in (rounds[1:] or rounds)]
        return round(statistics.median(r[key] for r in rows), 1)

    paced = f", offered at {args.rate:g}/s" if args.rate else ", each as soon as the last was acked"
    print(f"{args.starts} fresh starts of each app x {args.rounds} rounds of {args.round} signed "
          f"`/finetune {args.text}` from {args.clients} concurrent clients{paced} ({os.cpu_count()} CPUs); round 1 of each start is cold "
          "(right after the process said it was ready); load = the load average (1/5/15 min) before the round:")
    for kind, starts in results.items():
        name = "bare Bolt app" if kind == "bare" else "tuneops"
        for s, rounds in enumerate(starts, 1):
            for i, r in enumerate(rounds, 1):
                print(f"  {name:13} start {s} round {i}: ack p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, max "
                      f"{r['max_ms']} ms; {r['commands_per_s']} commands/s; {r['non_200']} not 200; load {r['load']}")
    print(f"  tuneops answered {answered_in_ack} commands in their acks and {answered} on response_url after "
          "their acks")
    summary = {"round": args.round, "rounds": args.rounds, "starts": args.starts, "clients": args.clients,
               "text": args.text, "cpus": os.cpu_count(), "offered_rate": args.rate, "results": results}
    for kind in results:
        summary[f"{kind}_p99_ms"] = {"cold_median": cold(kind, "p99_ms"), "warm_median": warm(kind, "p99_ms")}
        print(f"  {kind:13} p99 median: cold {cold(kind, 'p99_ms')} ms, warm {warm(kind, 'p99_ms')} ms; "
              f"warm {warm(kind, 'commands_per_s')} commands/s")
    t_warm, t_rate = warm("tuneops", "p99_ms"), warm("tuneops", "commands_per_s")
    kept_up = t_rate >= 200 or bool(args.rate and args.rate >= 200 and t_rate >= 0.98 * args.rate)
    goals = {"warm p99 <= 50 ms, >= 200 commands/s": t_warm <= 50 and kept_up}
    if "bare" in results:
        warm_ratio = t_warm / max(warm("bare", "p99_ms"), 0.1)
        cold_ratio = cold("tuneops", "p99_ms") / max(cold("bare", "p99_ms"), 0.1)
        summary.update(warm_p99_ratio=round(warm_ratio, 2), cold_p99_ratio=round(cold_ratio, 2))
        print(f"  p99 ratio tuneops / bare app: warm {warm_ratio:.2f} (medians of the warm rounds), "
              f"cold {cold_ratio:.2f} (medians of the first rounds)")
        goals["warm p99 <= 1.3x the bare app"] = warm_ratio <= 1.3
        goals["cold p99 <= 1.5x the bare app"] = cold_ratio <= 1.5
    for goal, met in goals.items():
        print(f"  goal ({goal}): {'met' if met else 'NOT met'}")
    summary["goals"] = goals
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
