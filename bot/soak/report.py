"""What the soak measured, read from the evidence each part leaves: the stand-in's messages and calls (Slack's side),
the trainers' own records and logs in the run folders (the trainer's side) and the run records in Redis.

"Executed twice" means either of two things that tuneops must never do: the same run's trainer running twice at the
same time (a second start found the run's lock taken), or a run started again after its trainer had finished (its
metrics.json was there). A start of the same attempt number twice counts too (tuneops did not ask for it). A later
attempt that resumes from a checkpoint after the first trainer died is a resume that tuneops recorded (a new
`attempt-N`), not a second execution; it is reported on its own line.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.soak.trainer import STARTS_FILE
from bot.standin.slack import Call, Message

LINE_RE = re.compile(r"soak (ft-\d+) a(\d+) step (\d+) line (\d+)")
OMITTED_RE = re.compile(r"\.\.\. (\d+) lines? omitted")
POSTING = ("chat.postMessage", "chat.update")


def completion_re(run_id: str) -> re.Pattern[str]:
    """The message that ends a run's story (bot.blocks: finished, failed, cancelled, ran out of time), not the notice
    of an automatic resume ("ran out of time; resuming it by itself")."""
    return re.compile(rf"\b{re.escape(run_id)} (finished|failed|was cancelled|ran out of time(?!; resuming))\b")


@dataclass
class ThreadCheck:
    run_id: str
    completions: int = 0
    started: int = 0                        # ":rocket: <id> started" messages
    completed_at: float | None = None       # when the (first) completion message was posted
    lines_seen: Counter[str] = field(default_factory=Counter)
    omitted: int = 0

    @property
    def duplicate_lines(self) -> int:
        return sum(n - 1 for n in self.lines_seen.values() if n > 1)


def check_thread(run_id: str, replies: list[Message]) -> ThreadCheck:
    """Completion messages and log lines of one run's thread, as a reader of the channel sees it."""
    check = ThreadCheck(run_id)
    ends = completion_re(run_id)
    started = re.compile(rf"\b{re.escape(run_id)} started\b")
    for m in replies:
        if started.search(m.text):
            check.started += 1
            continue
        if ends.search(m.text):
            check.completions += 1
            if check.completed_at is None:
                check.completed_at = float(m.ts.split(".")[0])
            continue
        if m.text.endswith(": log"):
            text = "\n".join(str((b.get("text") or {}).get("text", "")) for b in m.blocks)
            for match in LINE_RE.finditer(text):
                check.lines_seen[match.group(0)] += 1
            check.omitted += sum(int(n) for n in OMITTED_RE.findall(text))
    return check


def printed_lines(run_dir: Path) -> set[str]:
    """The log lines the run's trainers printed (train.log in its folder)."""
    try:
        text = (run_dir / "train.log").read_text(errors="replace")
    except OSError:
        return set()
    return {m.group(0) for m in LINE_RE.finditer(text)}


@dataclass
class Executions:
    starts: int = 0
    concurrent: bool = False        # a start found another trainer of the run holding its lock
    after_done: bool = False        # a start after the run had finished
    same_attempt: bool = False      # one attempt number started twice
    resumes: int = 0                # later attempts, each one tuneops recorded

    @property
    def twice(self) -> bool:
        return self.concurrent or self.after_done or self.same_attempt


def executions(run_dir: Path) -> Executions:
    ex = Executions()
    try:
        lines = (run_dir / STARTS_FILE).read_text().splitlines()
    except OSError:
        return ex
    attempts: Counter[int] = Counter()
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("event") != "start":
            continue
        ex.starts += 1
        ex.concurrent |= bool(rec.get("concurrent"))
        ex.after_done |= bool(rec.get("after_done"))
        attempts[int(rec.get("attempt") or 0)] += 1
    ex.same_attempt = any(n > 1 for n in attempts.values())
    ex.resumes = max(0, len(attempts) - 1)
    return ex


def trainer_times(run_dir: Path) -> tuple[dict[int, float], float | None]:
    """From the run's events.jsonl: when the trainer reached each step (the first time), and when it was done."""
    steps: dict[int, float] = {}
    done = None
    try:
        text = (run_dir / "events.jsonl").read_text(errors="replace")
    except OSError:
        return steps, done
    for line in text.splitlines():
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        if ev.get("type") == "step":
            steps.setdefault(int(ev["step"]), float(ev["ts"]))
        elif ev.get("type") == "done":
            done = float(ev["ts"])
    return steps, done


def state_lag(now: float, record_step: int, terminal: bool, steps: dict[int, float], done: float | None) -> float:
    """How long the run record has been behind its trainer at `now`: since the oldest trainer step the record does
    not show yet (or since the trainer finished, for a record that is not terminal yet); 0 when it is caught up."""
    if terminal:
        return 0.0
    behind = [ts for step, ts in steps.items() if step > record_step and ts <= now]
    if done is not None and done <= now:
        behind.append(done)
    return max(0.0, now - min(behind)) if behind else 0.0


def call_rates(calls: list[Call]) -> dict[str, Any]:
    """Slack calls that post or edit in a channel, per channel and second: the busiest second, and each channel's
    mean over the seconds it was busy."""
    per: dict[str, Counter[int]] = defaultdict(Counter)
    posts: dict[str, Counter[int]] = defaultdict(Counter)
    for c in calls:
        if c.method in POSTING and c.params.get("channel"):
            per[c.params["channel"]][int(c.time)] += 1
            if c.method == "chat.postMessage":
                posts[c.params["channel"]][int(c.time)] += 1
    busiest = max((n for seconds in per.values() for n in seconds.values()), default=0)
    busiest_posts = max((n for seconds in posts.values() for n in seconds.values()), default=0)
    means = [sum(s.values()) / (max(s) - min(s) + 1) for s in per.values() if s]
    return {"max_per_s": busiest, "max_posts_per_s": busiest_posts,
            "mean_per_s": round(sum(means) / len(means), 2) if means else 0.0, "channels": len(per)}


def slack_errors(calls: list[Call], t0: float = 0.0) -> dict[str, Any]:
    """429s and 5xx; for each 429 of the stand-in's own limit, when it came (seconds after `t0`) and how long after
    the channel's last accepted chat.postMessage, to line it up with the faults."""
    last_post: dict[str, float] = {}
    limited: list[dict[str, Any]] = []
    for c in sorted(calls, key=lambda c: c.time):
        if c.method != "chat.postMessage":
            continue
        channel = str(c.params.get("channel", ""))
        if c.status == 429 and not c.injected:
            gap = c.time - last_post[channel] if channel in last_post else None
            limited.append({"t": round(c.time - t0, 1), "channel": channel,
                            "after_last_post_s": None if gap is None else round(gap, 3)})
        elif c.status == 200:
            last_post[channel] = c.time
    return {
        "429_injected": sum(1 for c in calls if c.status == 429 and c.injected),
        "429_rate_limit": sum(1 for c in calls if c.status == 429 and not c.injected),
        "429_rate_limit_when": limited,
        "5xx_injected": sum(1 for c in calls if c.status >= 500 and c.injected),
        "calls": len(calls),
    }
