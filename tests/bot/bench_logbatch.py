"""Benchmark: 20 runs of one channel, each writing 10,000 log lines, through LogBatcher with redaction, posting
under a one-message-a-second channel budget.

Simulated time (no sleeping, no Slack, no Redis): each run's poster feeds what arrived, then waits for a channel
slot for each message before it reads more, as the thread poster does with ChannelBudget. Prints the CPU cost per
line, the messages sent, the highest rate per channel and how late error lines reach the channel. Run:
    .venv/bin/python tests/bot/bench_logbatch.py
"""

from __future__ import annotations

import random
import re
import time

from bot.bench_thread import (
    run_lines,  # the same synthetic trainer log as the end-to-end benchmark
)
from bot.logbatch import LogBatcher
from bot.redact import Redactor

RUNS, LINES, DURATION_S, RATE_PER_S = 20, 10_000, 600, 1.0
ID = re.compile(r"\[r(\d+):(\d+)\]")


def main() -> None:
    rng = random.Random(7)
    redactor = Redactor(["a-known-storage-key-value==", "xoxb-configured-bot-token-000"])
    streams = [run_lines(rng, i, LINES) for i in range(RUNS)]
    batchers = [LogBatcher(redact=redactor) for _ in range(RUNS)]
    per_s = LINES / DURATION_S
    pos = [0] * RUNS
    ready_at = [0.0] * RUNS
    done = [False] * RUNS
    next_free = 0.0
    sent: list[tuple[float, int, str]] = []
    cpu = 0.0
    t = 0
    while not all(done):
        for i, b in enumerate(batchers):
            if done[i] or ready_at[i] > t:
                continue
            upto = min(LINES, int((t + 1) * per_s))
            c0 = time.process_time()
            msgs = b.feed(streams[i][0][pos[i]:upto], t)
            if upto == LINES:
                msgs += b.flush(t, force=True)
                done[i] = True
            else:
                msgs += b.flush(t)
            cpu += time.process_time() - c0
            pos[i] = upto
            for m in msgs:  # the poster waits for a channel slot for each message, in order
                slot = max(float(t), next_free)
                next_free = slot + 1 / RATE_PER_S
                sent.append((slot, i, m))
                ready_at[i] = slot
        t += 1

    arrival = lambda n: int(n / per_s)  # noqa: E731 - the second line n is written in
    delivered: dict[tuple[int, int], float] = {}
    for slot, _, m in sent:
        for r, n in ID.findall(m):
            delivered.setdefault((int(r), int(n)), slot)
    errors = [(r, n) for r, (_, errs) in enumerate(streams) for n in errs]
    missing = [e for e in errors if e not in delivered]
    lateness = sorted(delivered[e] - arrival(e[1]) for e in errors if e in delivered)
    per_second: dict[int, int] = {}
    for slot, _, _ in sent:
        per_second[int(slot)] = per_second.get(int(slot), 0) + 1
    span = max(s for s, _, _ in sent) - min(s for s, _, _ in sent)
    leaked = sum(1 for _, _, m in sent if "hf_xxxx" in m or "a-known-storage" in m)
    print(f"{RUNS} runs x {LINES} lines, written over {DURATION_S} s, one channel at {RATE_PER_S:g} message/s")
    print(f"CPU in LogBatcher (redaction, escaping, batching): {cpu:.2f} s = {cpu / (RUNS * LINES) * 1e6:.1f} µs a line")
    print(f"messages: {len(sent)} ({len(sent) / RUNS:.1f} a run) over {span:.0f} s; "
          f"highest rate {max(per_second.values())} in one second; largest {max(len(m) for _, _, m in sent)} chars")
    print(f"error lines: {len(errors)}, delivered {len(errors) - len(missing)}, missing {len(missing)}; "
          f"reached the channel after median {lateness[len(lateness) // 2]:.0f} s, "
          f"p95 {lateness[int(len(lateness) * 0.95)]:.0f} s, max {lateness[-1]:.0f} s")
    print(f"secrets in messages: {leaked}")


if __name__ == "__main__":
    main()
