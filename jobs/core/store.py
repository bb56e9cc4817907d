"""Run records, their indexes and the run event stream in Redis: the one place that knows the keys.

Every change to a run goes through `update_run`, an optimistic transaction (WATCH/MULTI) that writes the record, its
indexes and the events that report the change at once: a worker killed at any point leaves no half-written state, and
two workers acting on the same run cannot both apply a step. Each write also leaves a snapshot of the record in the
run's folder (`jobs.core.snapshots`), from which `jobs.reconcile` finds the runs again if Redis comes back empty.

The clients wait through a Redis outage (a restart, a failover) with exponential backoff, for as long as the process's
patience (`set_patience`): a moment (a reconnect) in the bot, which must answer Slack within 3 s and says itself that
the store is down, minutes in the workers, which must not lose the step they are in and log the outage once as it
starts and once as it ends.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from jobs.core import cost, snapshots
from jobs.core.domain import Op, Run, RunEvent, RunState
from jobs.core.settings import JobSettings

log = logging.getLogger(__name__)

PREFIX = "tuneops"
EVENT_STREAM = f"{PREFIX}:events"
RUN_KEY = PREFIX + ":run:{}"
RUN_SEQ = f"{PREFIX}:run_seq"
ALL_RUNS = f"{PREFIX}:runs"            # zset: run id -> sequence number (newest has the highest)
QUEUED = f"{PREFIX}:queued"            # zset: run id -> time it joined the line (oldest first)
ACTIVE = f"{PREFIX}:active"            # set: runs that hold a GPU slot (preparing or running)
HELD = f"{PREFIX}:held"                # set: runs over budget waiting for an approver (Run.held), not yet in line
POSITIONS = f"{PREFIX}:positions"      # hash: run id -> the queue position last reported in a "queued" event
REQUEST_KEY = PREFIX + ":request:{}"   # submit idempotency: request key -> run id
DELIVERY_KEY = PREFIX + ":delivery:{}"  # hash: one Slack delivery's claim (bot.middleware)
# The queue's bookkeeping (jobs.runs.tasks, jobs.reconcile)
TICK_KEY = PREFIX + ":tick:{}"         # the job id of a run's current monitor tick
RECONCILE_KEY = f"{PREFIX}:reconcile"  # the job id of the current reconcile pass
ADMIT_LOCK = f"{PREFIX}:lock:admit"
START_LOCK = PREFIX + ":lock:start:{}"  # held while a run's execution is started or stopped
CANCELLING = PREFIX + ":cancelling:{}"  # a cancel task was enqueued recently
# Deploy requests (jobs.deploys.approval)
APPROVAL_KEY = PREFIX + ":approval:{}"
APPROVAL_SEQ = f"{PREFIX}:approval_seq"
# Cost (jobs.core.cost): the month's ledger (hash: run id -> what it spent that month, JSON) and the measured training
# throughput of finished runs (hash per model size class and GPU profile: run id -> median tokens/s)
COST_MONTH = PREFIX + ":cost:{}"
THROUGHPUT = PREFIX + ":throughput:{}|{}"
# Backend operations (jobs.backends.*.ops) and the backends' own locks and records
OP_SEQ = f"{PREFIX}:op_seq"
OP_KEY = PREFIX + ":op:{}"
AZURE_LOCK = PREFIX + ":lock:azure:{}"  # one per Azure resource
ACA_SYNC_LOCK = f"{PREFIX}:lock:aca-sync"
LOCAL_SERVER_KEY = f"{PREFIX}:serve:local"
LOCAL_SERVER_LOCK = f"{PREFIX}:lock:serve:local"
# Counters the workers keep for GET /metrics (jobs.core.metrics): one hash per metric, field = its label values
METRICS_KEY = PREFIX + ":metrics:{}"
# Written once by the first worker to meet this Redis: when it is missing, Redis lost what it held (jobs.reconcile).
STORE_MARKER = f"{PREFIX}:store"
# bot.threads' record of where a run's card (the root of its thread) was posted. jobs/ never reads it; the store
# carries it in the run's snapshot so that a run found again after Redis lost everything is told in the same thread.
THREAD_KEY = PREFIX + ":slack:run:{}"
# bot.home's Home tab: who opened it lately (zset: user id -> when), and per person the throttle of its refreshes, the
# digest of the view last published and a notice shown on it (a hash). jobs/ never reads them.
HOME_VIEWERS = f"{PREFIX}:slack:home:viewers"
HOME_KEY = PREFIX + ":slack:home:{}"
HOME_NEXT = PREFIX + ":slack:home:{}:next"
# The stream is a log of facts for the bot; it is capped so that it cannot grow without bound.
STREAM_MAXLEN = 100_000

# Longer than the longest blocking read made through these clients (bot.stream's XREAD BLOCK of 1 s; RQ's worker
# raises it above its own blocking dequeue for its client), short enough that a bot command facing a Redis that
# accepts connections and never answers is still answered within Slack's 3 s.
SOCKET_TIMEOUT_S = 1.5
CONNECT_TIMEOUT_S = 1.5
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 2.0
# By default a call rides out a connection reset (a pooled connection gone stale, a quick restart) and no more: the
# bot must answer Slack quickly and says itself that the store is down (bot.outage). The workers set a longer one.
DEFAULT_PATIENCE_S = 0.5

_clients: dict[tuple[str, bool], redis.Redis] = {}
_clients_lock = threading.Lock()
_workspaces: dict[int, Path] = {}  # id of a shared client -> the workspace whose run folders hold the snapshots
_patience_s = DEFAULT_PATIENCE_S


def set_patience(seconds: float) -> None:
    """How long a Redis command of this process may wait through an outage before it fails. A process that waits
    (a worker) also has the store log each outage, once as it starts and once as it ends; one that does not leaves
    that to its callers, which see the errors."""
    global _patience_s
    _patience_s = max(0.0, seconds)
    _outage.level = logging.WARNING if _patience_s > DEFAULT_PATIENCE_S else logging.DEBUG


class _Outage:
    """One log line when Redis stops answering and one when it answers again, however many calls meet the outage."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.since: float | None = None
        self.level = logging.DEBUG

    def begin(self, error: Exception) -> None:
        if self.since is not None:
            return
        with self.lock:
            if self.since is None:
                self.since = time.monotonic()
                log.log(self.level, "Redis is not answering (%s): waiting for it, retrying with backoff", error)

    def end(self) -> None:
        if self.since is None:
            return
        with self.lock:
            if self.since is not None:
                log.log(self.level, "Redis answers again, after %.1f s", time.monotonic() - self.since)
                self.since = None

    def forked(self) -> None:
        self.lock = threading.Lock()  # another thread may have held it at the fork (RQ forks a process per job)


_outage = _Outage()
os.register_at_fork(after_in_child=_outage.forked)


class PatientRetry(Retry):
    """redis-py's retry on ConnectionError and TimeoutError with exponential backoff, bounded by the process's
    patience (seconds from the call's start) rather than by a count, and reporting outages. A transaction that was
    WATCHing gets a WatchError instead (redis-py's own rule), which `update_run` and the others answer by starting
    over on the fresh record."""

    def __init__(self) -> None:
        super().__init__(ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S), retries=1_000_000)

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        failures = 0
        deadline = time.monotonic() + _patience_s
        while True:
            try:
                result = do()
            except self._supported_errors as error:
                if is_retryable and not is_retryable(error):
                    raise
                failures += 1
                if with_failure_count:
                    fail(error, failures)
                else:
                    fail(error)
                if failures > 1:  # a connection that merely went stale fails once, then reconnects: no outage
                    _outage.begin(error)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                time.sleep(min(self._backoff.compute(failures), left))
                continue
            _outage.end()
            return result


def _shared(url: str, text: bool) -> redis.Redis:
    """One client (one connection pool) per URL, kind and process."""
    with _clients_lock:
        client = _clients.get((url, text))
        if client is None:
            options = {"socket_timeout": SOCKET_TIMEOUT_S, "socket_connect_timeout": CONNECT_TIMEOUT_S,
                       "retry": PatientRetry()}
            client = (redis.Redis.from_url(url, decode_responses=True, health_check_interval=30, **options) if text
                      else redis.Redis.from_url(url, **options))
            _clients[(url, text)] = client
        return client


def connect(settings: JobSettings) -> redis.Redis:
    """The shared client that returns str: records, indexes, events. Run records written through it leave their
    snapshots in the settings' workspace."""
    client = _shared(settings.redis_url, True)
    _workspaces[id(client)] = Path(settings.workspace)
    return client


def connect_bytes(settings: JobSettings) -> redis.Redis:
    """The shared client that returns bytes, for RQ, which stores pickled jobs."""
    return _shared(settings.redis_url, False)


def azure_lock(kind: str, name: str) -> str:
    """The lock of one Azure resource ("job", "app"): its provisionings and the runs staged into it take turns."""
    return AZURE_LOCK.format(f"{kind}:{name}")


def run_key(run_id: str) -> str:
    return RUN_KEY.format(run_id)


def new_run_id(conn: redis.Redis) -> str:
    """A fresh run id. Never one whose run folder exists already (a Redis that lost its counter would otherwise hand
    out the ids of runs it forgot, and a new run would write into an old run's folder)."""
    workspace = _workspaces.get(id(conn))
    while True:
        run_id = f"ft-{conn.incr(RUN_SEQ):04d}"
        if workspace is None or not (workspace / snapshots.run_dir(run_id)).exists():
            return run_id
        highest = snapshots.highest_seq(workspace)
        log.warning("run id %s is taken by a run folder: the run counter was behind; moving it to %d", run_id,
                    highest)
        raise_run_seq(conn, highest)


def raise_run_seq(conn: redis.Redis, at_least: int) -> None:
    """Move the run counter up to `at_least` (never down)."""
    raise_counter(conn, RUN_SEQ, at_least)


def raise_counter(conn: redis.Redis, key: str, at_least: int) -> None:
    """Move a counter (the run or deploy-request ids') up to `at_least`, never down."""
    while True:
        with conn.pipeline() as pipe:
            try:
                pipe.watch(key)
                if int(pipe.get(key) or 0) >= at_least:
                    pipe.unwatch()
                    return
                pipe.multi()
                pipe.set(key, at_least)
                pipe.execute()
                return
            except redis.WatchError:
                continue


def _seq(run_id: str) -> int:
    return int(run_id.rsplit("-", 1)[1])


def snapshot_run(conn: redis.Redis, run: Run, thread: str | None = None) -> None:
    """Leave the record's snapshot in its run folder (see the module doc); `write_run`'s callers call it once their
    transaction is done. `thread`: the bot's thread reference, when the caller read it already."""
    workspace = _workspaces.get(id(conn))
    if workspace is None:
        return
    if thread is None:
        thread = conn.get(THREAD_KEY.format(run.id))
    snapshots.write(workspace, snapshots.Snapshot(run, thread or ""))


# Events ------------------------------------------------------------------------------------------------------------

def _event_fields(event: RunEvent) -> dict[str, str]:
    return {"run_id": event.run_id, "kind": event.kind, "data": json.dumps(event.data, default=str),
            "ts": repr(float(event.ts))}


def parse_entry(fields: dict[str, str]) -> RunEvent:
    return RunEvent(run_id=fields["run_id"], kind=fields["kind"], data=json.loads(fields.get("data") or "{}"),
                    ts=float(fields.get("ts") or 0.0))


def append_event(conn: redis.Redis | redis.client.Pipeline, event: RunEvent) -> str:
    """Append one event; returns the entry id (or the pipeline, when given one)."""
    return conn.xadd(EVENT_STREAM, _event_fields(event), maxlen=STREAM_MAXLEN, approximate=True)


def read_events(conn: redis.Redis, group: str, consumer: str, count: int = 100,
                block_ms: int = 1000) -> list[tuple[str, RunEvent]]:
    """Read as a consumer group member: this consumer's pending (delivered, not acked) entries first, then new ones.

    The group is created on first use and starts at the beginning of the stream, so events appended before the
    reader first came up are delivered too. Entries that are not run events are acked and skipped.
    """
    try:
        conn.xgroup_create(EVENT_STREAM, group, id="0", mkstream=True)
    except redis.ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise
    replies = conn.xreadgroup(group, consumer, {EVENT_STREAM: "0"}, count=count)
    entries = replies[0][1] if replies else []
    if not entries:
        replies = conn.xreadgroup(group, consumer, {EVENT_STREAM: ">"}, count=count, block=block_ms or None)
        entries = replies[0][1] if replies else []
    out: list[tuple[str, RunEvent]] = []
    for entry_id, fields in entries:
        if not fields:  # trimmed away while pending
            conn.xack(EVENT_STREAM, group, entry_id)
            continue
        try:
            out.append((entry_id, parse_entry(fields)))
        except (KeyError, ValueError, TypeError) as e:
            log.warning("skipping malformed event stream entry %s: %s", entry_id, e)
            conn.xack(EVENT_STREAM, group, entry_id)
    return out


def ack_event(conn: redis.Redis, group: str, entry_id: str) -> None:
    conn.xack(EVENT_STREAM, group, entry_id)


def run_events(conn: redis.Redis, run_id: str | None = None) -> list[RunEvent]:
    """All events still in the stream, oldest first (of one run when `run_id` is given). For tests and tools."""
    out = []
    for _, fields in conn.xrange(EVENT_STREAM):
        if run_id is None or fields.get("run_id") == run_id:
            out.append(parse_entry(fields))
    return out


# Runs --------------------------------------------------------------------------------------------------------------

def load_run(conn: redis.Redis, run_id: str) -> Run | None:
    raw = conn.get(run_key(run_id))
    return Run.from_dict(json.loads(raw)) if raw else None


def load_runs(conn: redis.Redis, run_ids: Iterable[str]) -> list[Run]:
    ids = list(run_ids)
    if not ids:
        return []
    return [Run.from_dict(json.loads(raw)) for raw in conn.mget([run_key(i) for i in ids]) if raw]


def write_run(pipe: redis.client.Pipeline, run: Run, *, queued_at: float | None = None) -> None:
    """Queue the record and the index updates that follow from its state on a MULTI pipeline (then, once the
    transaction is done, `snapshot_run` leaves its durable copy)."""
    pipe.set(run_key(run.id), json.dumps(run.to_dict(), default=str))
    pipe.zadd(ALL_RUNS, {run.id: _seq(run.id)})
    if run.state is RunState.QUEUED and not run.held:
        # nx: saving a queued run again (e.g. the bot recording its card) keeps its place in line.
        pipe.zadd(QUEUED, {run.id: queued_at if queued_at is not None else time.time()}, nx=True)
    else:
        pipe.zrem(QUEUED, run.id)
        pipe.hdel(POSITIONS, run.id)
    if run.state.active:
        pipe.sadd(ACTIVE, run.id)
    else:
        pipe.srem(ACTIVE, run.id)
    if run.held and run.state is RunState.QUEUED:
        pipe.sadd(HELD, run.id)
    else:
        pipe.srem(HELD, run.id)
    if run.state.terminal and run.gpu_periods:
        entries = cost.ledger_entries(run.id, run.requester, run.model, run.estimate, run.gpu_periods,
                                      run.finished_at)
        for month, entry in entries.items():
            pipe.hset(COST_MONTH.format(month), run.id, json.dumps(entry))
    rate = run.metrics.get("tokens_per_s_median") or run.metrics.get("tokens_per_s")
    if run.state is RunState.SUCCEEDED and rate and run.estimate.get("size") and run.estimate.get("profile"):
        pipe.hset(THROUGHPUT.format(run.estimate["size"], run.estimate["profile"]), run.id, float(rate))


def create_run(conn: redis.Redis, run: Run, events_for: Callable[[int], list[RunEvent]]) -> int:
    """Save a new queued run and the events `events_for(position)` says, in one transaction; returns its position.

    The position is the run's place at the end of the line, computed under WATCH so that it cannot be stale.
    """
    while True:
        with conn.pipeline() as pipe:
            try:
                pipe.watch(QUEUED)
                position = pipe.zcard(QUEUED) + 1
                now = time.time()
                last = pipe.zrange(QUEUED, -1, -1, withscores=True)
                # Keep the line strictly ordered even when clocks of two hosts disagree a little.
                queued_at = max(now, last[0][1] + 1e-3) if last else now
                pipe.multi()
                write_run(pipe, run, queued_at=queued_at)
                if not run.held:  # a held run joins the line (and gets its place reported) once approved
                    pipe.hset(POSITIONS, run.id, position)
                for event in events_for(position):
                    append_event(pipe, event)
                pipe.execute()
                snapshot_run(conn, run, "")
                return position
            except redis.WatchError:
                continue


class RunGone(LookupError):
    pass


def update_run(conn: redis.Redis, run_id: str,
               step: Callable[[Run], list[RunEvent] | None], retries: int = 20) -> tuple[Run, list[RunEvent]] | None:
    """Apply `step` to the stored run atomically: it mutates the run and returns the events that report the change,
    or None to leave everything as it is. Record, indexes and events are written in one transaction; if the record
    changed meanwhile the step is run again on the fresh record. Returns (run, events) or None when nothing changed.
    """
    for _ in range(retries):
        with conn.pipeline() as pipe:
            try:
                pipe.watch(run_key(run_id))
                raw = pipe.get(run_key(run_id))
                if raw is None:
                    raise RunGone(run_id)
                run = Run.from_dict(json.loads(raw))
                events = step(run)
                if events is None:
                    pipe.unwatch()
                    return None
                run.updated_at = time.time()
                pipe.multi()
                write_run(pipe, run)
                for event in events:
                    append_event(pipe, event)
                pipe.get(THREAD_KEY.format(run_id))
                thread = pipe.execute()[-1]
                snapshot_run(conn, run, thread)
                return run, events
            except redis.WatchError:
                continue
    raise RuntimeError(f"{run_id}: the record kept changing; gave up after {retries} attempts")


def mark_store(conn: redis.Redis) -> bool:
    """Leave this Redis tuneops's mark; True when it was missing: Redis is new to tuneops, or lost what it held."""
    return bool(conn.set(STORE_MARKER, repr(time.time()), nx=True))


def restore_run(conn: redis.Redis, run: Run, thread: str, events: list[RunEvent]) -> bool:
    """Put back a run that Redis lost (found again from its snapshot): the record, its indexes, the bot's thread
    reference and the events that tell of it, in one transaction. False, and nothing written, when Redis has it."""
    key = run_key(run.id)
    while True:
        with conn.pipeline() as pipe:
            try:
                pipe.watch(key)
                if pipe.exists(key):
                    pipe.unwatch()
                    return False
                pipe.multi()
                write_run(pipe, run, queued_at=run.created_at)  # a run back in line keeps its place
                if thread:
                    pipe.set(THREAD_KEY.format(run.id), thread, nx=True)
                for event in events:
                    append_event(pipe, event)
                pipe.execute()
                break
            except redis.WatchError:
                continue
    snapshot_run(conn, run, thread)
    raise_run_seq(conn, _seq(run.id))
    return True


def queued_ids(conn: redis.Redis) -> list[str]:
    return conn.zrange(QUEUED, 0, -1)


def active_ids(conn: redis.Redis) -> set[str]:
    return conn.smembers(ACTIVE)


def held_ids(conn: redis.Redis) -> set[str]:
    return conn.smembers(HELD)


def queue_position(conn: redis.Redis, run_id: str) -> int | None:
    rank = conn.zrank(QUEUED, run_id)
    return None if rank is None else rank + 1


def recent_run_ids(conn: redis.Redis, limit: int) -> list[str]:
    return conn.zrevrange(ALL_RUNS, 0, max(limit, 1) - 1)


def report_positions(conn: redis.Redis) -> list[RunEvent]:
    """Append a "queued" event for every queued run whose place in line moved since it was last reported."""
    while True:
        with conn.pipeline() as pipe:
            try:
                pipe.watch(QUEUED, POSITIONS)
                ids = pipe.zrange(QUEUED, 0, -1)
                reported = pipe.hgetall(POSITIONS)
                events = [RunEvent(run_id, "queued", {"position": pos})
                          for pos, run_id in enumerate(ids, start=1) if reported.get(run_id) != str(pos)]
                stale = [run_id for run_id in reported if run_id not in set(ids)]
                if not events and not stale:
                    pipe.unwatch()
                    return []
                pipe.multi()
                for event in events:
                    pipe.hset(POSITIONS, event.run_id, event.data["position"])
                    append_event(pipe, event)
                if stale:
                    pipe.hdel(POSITIONS, *stale)
                pipe.execute()
                return events
            except redis.WatchError:
                continue


def month_ledger(conn: redis.Redis, month: str) -> list[dict]:
    """What ended runs spent in a month ('2026-11'): one entry per run (jobs.core.cost.ledger_entries)."""
    return [json.loads(raw) for raw in conn.hvals(COST_MONTH.format(month))]


def team_throughputs(conn: redis.Redis, size: str, profile: str) -> list[float]:
    """The measured tokens/s of this team's finished runs of a model size class on a GPU profile."""
    return [float(v) for v in conn.hvals(THROUGHPUT.format(size, profile))]


def load_op(conn: redis.Redis, op_id: str) -> Op | None:
    h = conn.hgetall(OP_KEY.format(op_id))
    return Op.from_hash(op_id, h) if h else None


@contextmanager
def holding(conn: redis.Redis, key: str, *, timeout_s: float, wait_s: float, busy: Exception) -> Iterator[None]:
    """Hold the Redis lock `key` for the block (released after; it lapses by itself after `timeout_s`); `busy` is
    raised when another holder kept it for `wait_s`."""
    lock = conn.lock(key, timeout=timeout_s, blocking_timeout=wait_s)
    if not lock.acquire():
        raise busy
    try:
        yield
    finally:
        try:
            lock.release()
        except redis.exceptions.LockError:  # it lapsed: the next holder may already have it
            log.warning("the lock %s had lapsed before it was released", key)
