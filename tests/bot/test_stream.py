"""Several bot processes on the one event stream (real Redis): a run's events reach its owner in order whoever read
them, a dead process's entries and runs are taken over, and an idle run is let go only when nothing of it is held."""

from __future__ import annotations

import redis

from bot.stream import ALIVE, OWNERS, EventStream
from jobs.core import store
from jobs.core.domain import RunEvent


def emit(conn, run_id: str, n: int) -> None:
    store.append_event(conn, RunEvent(run_id, "notice", {"text": str(n)}))


def said(batch) -> list[tuple[str, str]]:
    return [(e.run_id, e.data["text"]) for _, e in batch]


def test_a_runs_events_reach_its_owner_in_order_whoever_reads_them(redis_url):
    conn = redis.Redis.from_url(redis_url, decode_responses=True)
    a, b = EventStream(conn, "bot-a"), EventStream(conn, "bot-b")
    emit(conn, "ft-0001", 1)
    first = a.read(10, set(), block_ms=0)
    assert said(first) == [("ft-0001", "1")] and conn.hget(OWNERS, "ft-0001") == "bot-a"
    emit(conn, "ft-0001", 2)
    emit(conn, "ft-0002", 3)
    assert said(b.read(10, set(), block_ms=0)) == [("ft-0002", "3")]  # ft-0001's entry went to its owner
    emit(conn, "ft-0001", 4)
    held = {entry_id for entry_id, _ in first}
    # a reads its new entry and the one b handed over, oldest first
    assert said(a.read(10, held, block_ms=0)) == [("ft-0001", "2"), ("ft-0001", "4")]
    assert conn.hgetall(OWNERS) == {"ft-0001": "bot-a", "ft-0002": "bot-b"}


def test_a_dead_process_is_taken_over_with_its_runs_and_in_order(redis_url):
    conn = redis.Redis.from_url(redis_url, decode_responses=True)
    a, b = EventStream(conn, "bot-a"), EventStream(conn, "bot-b")
    for n in range(3):
        emit(conn, "ft-0001", n)
    a.heartbeat()
    assert len(a.read(10, set(), block_ms=0)) == 3
    b.heartbeat()
    assert b.reap() == {}  # a is alive: nothing to take
    conn.delete(ALIVE.format("bot-a"))  # a died; its heartbeat lapsed
    emit(conn, "ft-0001", 3)
    assert b.reap() == {"bot-a": 3}
    assert conn.hget(OWNERS, "ft-0001") == "bot-b"
    assert said(b.read(10, set(), block_ms=0)) == [("ft-0001", str(n)) for n in range(4)]
    assert [c["name"] for c in conn.xinfo_consumers(store.EVENT_STREAM, "tuneops-bot")] == ["bot-b"]


def test_an_idle_run_is_let_go_only_when_none_of_its_entries_is_held(redis_url):
    conn = redis.Redis.from_url(redis_url, decode_responses=True)
    a = EventStream(conn, "bot-a")
    emit(conn, "ft-0001", 1)
    emit(conn, "ft-0002", 2)
    batch = a.read(10, set(), block_ms=0)
    assert a.release(["ft-0001", "ft-0002"]) == 0  # both still held (not acked)
    a.ack([entry_id for entry_id, e in batch if e.run_id == "ft-0001"])
    assert a.release(["ft-0001", "ft-0002"]) == 1
    assert conn.hgetall(OWNERS) == {"ft-0002": "bot-a"}


def test_a_stream_that_lost_its_group_is_read_again_from_its_start(redis_url):
    conn = redis.Redis.from_url(redis_url, decode_responses=True)
    a = EventStream(conn, "bot-a")
    emit(conn, "ft-0001", 1)
    assert said(a.read(10, set(), block_ms=0)) == [("ft-0001", "1")]
    conn.flushall()  # Redis came back empty: no stream, no group
    emit(conn, "ft-0001", 2)  # what a worker appends after finding the run again
    assert said(a.read(10, set(), block_ms=0)) == [("ft-0001", "2")]
