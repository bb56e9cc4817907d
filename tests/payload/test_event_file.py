"""The event file after a writer was killed mid-append: the restart's events stay readable."""

from __future__ import annotations

from payload.events import EVENTS_FILE, EventWriter, read_events


def test_a_torn_last_line_does_not_swallow_the_next_event(tmp_path, capsys):
    (tmp_path / EVENTS_FILE).write_text('{"type":"start","total_steps":3,"ts":1}\n{"type":"step","st')
    EventWriter(tmp_path).emit("start", total_steps=3, resumed_from_step=0)
    evs, _ = read_events(tmp_path / EVENTS_FILE)
    assert [e["type"] for e in evs] == ["start", "start"] and evs[1]["resumed_from_step"] == 0


def test_a_whole_file_is_left_as_it_is(tmp_path, capsys):
    path = tmp_path / EVENTS_FILE
    path.write_text('{"type":"start","total_steps":3,"ts":1}\n')
    EventWriter(tmp_path)
    assert path.read_text() == '{"type":"start","total_steps":3,"ts":1}\n'
    EventWriter(tmp_path / "new")
    assert not (tmp_path / "new" / EVENTS_FILE).exists()
