"""The Redis store: run records, indexes and the event stream, against a real redis-server."""

from __future__ import annotations

import threading

import pytest

from jobs.core import store
from jobs.core.domain import Run, RunEvent, RunState
from jobs.runs.progress import move


def make_run(conn, **kw) -> Run:
    run = Run(id=store.new_run_id(conn), requester="U1", channel="C1", model="model-cache/tiny",
              dataset="datasets/train.jsonl", **kw)
    store.create_run(conn, run, lambda pos: [RunEvent(run.id, "queued", {"position": pos})])
    return run


@pytest.fixture
def conn(settings):
    return store.connect(settings)


def test_run_round_trip_keeps_every_field(conn):
    run = make_run(conn, params={"learning_rate": 2e-4, "max_steps": 10}, name="faq bot")
    loaded = store.load_run(conn, run.id)
    assert loaded == run
    assert loaded.state is RunState.QUEUED and isinstance(loaded.state, RunState)


def test_ids_count_up_and_list_is_newest_first(conn):
    ids = [make_run(conn).id for _ in range(3)]
    assert ids == ["ft-0001", "ft-0002", "ft-0003"]
    assert store.recent_run_ids(conn, 2) == ["ft-0003", "ft-0002"]


def test_create_reports_the_place_in_line(conn):
    runs = [make_run(conn) for _ in range(3)]
    assert [store.queue_position(conn, r.id) for r in runs] == [1, 2, 3]
    assert [e.data["position"] for e in store.run_events(conn)] == [1, 2, 3]


def test_update_writes_record_indexes_and_events_together(conn):
    run = make_run(conn)
    result = store.update_run(conn, run.id, lambda r: [move(r, RunState.PREPARING)])
    assert result is not None
    updated, events = result
    assert store.load_run(conn, run.id).state is RunState.PREPARING
    assert store.queued_ids(conn) == [] and store.active_ids(conn) == {run.id}
    assert [e.kind for e in store.run_events(conn, run.id)] == ["queued", "state"]
    # A step that returns None changes nothing.
    assert store.update_run(conn, run.id, lambda r: None) is None
    assert len(store.run_events(conn, run.id)) == 2


def test_concurrent_updates_are_all_applied_exactly_once(conn):
    run = make_run(conn)

    def bump(r: Run):
        r.step += 1
        return [RunEvent(r.id, "progress", {"step": r.step})]

    threads = [threading.Thread(target=lambda: [store.update_run(conn, run.id, bump) for _ in range(10)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.load_run(conn, run.id).step == 40
    steps = [e.data["step"] for e in store.run_events(conn, run.id) if e.kind == "progress"]
    assert steps == list(range(1, 41))  # each step reported once, in order


def test_an_illegal_move_in_a_step_leaves_everything_as_it_was(conn):
    run = make_run(conn)
    with pytest.raises(Exception, match="cannot go from queued to running"):
        store.update_run(conn, run.id, lambda r: [move(r, RunState.RUNNING)])
    assert store.load_run(conn, run.id).state is RunState.QUEUED
    assert len(store.run_events(conn, run.id)) == 1


def test_update_of_an_unknown_run(conn):
    with pytest.raises(store.RunGone):
        store.update_run(conn, "ft-0099", lambda r: [])


def test_positions_are_reported_when_the_line_moves(conn):
    a, b, c = (make_run(conn) for _ in range(3))
    assert store.report_positions(conn) == []  # nothing moved
    store.update_run(conn, a.id, lambda r: [move(r, RunState.PREPARING)])
    moved = store.report_positions(conn)
    assert [(e.run_id, e.data["position"]) for e in moved] == [(b.id, 1), (c.id, 2)]
    assert store.report_positions(conn) == []


def test_consumer_group_redelivers_unacked_events_first(conn):
    group, consumer = "bot", "bot-1"
    run = make_run(conn)  # appended before the group exists: still delivered
    store.append_event(conn, RunEvent(run.id, "notice", {"text": "hello"}))
    first = store.read_events(conn, group, consumer, block_ms=100)
    assert [e.kind for _, e in first] == ["queued", "notice"]
    assert first[1][1].data == {"text": "hello"} and first[1][1].run_id == run.id
    # Not acked (the bot crashed): the same entries come again, before anything new.
    store.append_event(conn, RunEvent(run.id, "notice", {"text": "later"}))
    again = store.read_events(conn, group, consumer, block_ms=100)
    assert [eid for eid, _ in again] == [eid for eid, _ in first]
    for eid, _ in again:
        store.ack_event(conn, group, eid)
    new = store.read_events(conn, group, consumer, block_ms=100)
    assert [e.data.get("text") for _, e in new] == ["later"]
    store.ack_event(conn, group, new[0][0])
    assert store.read_events(conn, group, consumer, block_ms=100) == []


def test_malformed_stream_entries_are_skipped_and_acked(conn):
    conn.xadd(store.EVENT_STREAM, {"run_id": "ft-0001", "kind": "exploded", "data": "{}", "ts": "1"})
    conn.xadd(store.EVENT_STREAM, {"run_id": "ft-0001", "kind": "notice", "data": '{"text": "ok"}', "ts": "2"})
    got = store.read_events(conn, "bot", "c", block_ms=100)
    assert [e.data for _, e in got] == [{"text": "ok"}]
    assert conn.xpending(store.EVENT_STREAM, "bot")["pending"] == 1  # only the good one waits for its ack
