import json

import pytest

from payload import events


def test_writer_emits_stdout_and_file(tmp_path, capsys):
    w = events.EventWriter(tmp_path)
    w.emit("start", total_steps=10)
    w.emit("step", step=1, total_steps=10, epoch=0.1, loss=2.5, lr=1e-4, tokens_per_s=100.0, eta_s=9.0)
    out = capsys.readouterr().out.splitlines()
    assert [events.parse_line(x)["type"] for x in out] == ["start", "step"]
    assert all(x.startswith(events.PREFIX) for x in out)
    lines = (tmp_path / events.EVENTS_FILE).read_text().splitlines()
    assert [json.loads(x)["type"] for x in lines] == ["start", "step"]


def test_read_events_leaves_half_written_line(tmp_path):
    p = tmp_path / "events.jsonl"
    p.write_text('{"type":"start","total_steps":3,"ts":1}\n{"type":"error","mess')
    evs, cur = events.read_events(p)
    assert [e["type"] for e in evs] == ["start"]
    with p.open("a") as f:
        f.write('age":"boom","ts":2}\n')
    evs, cur2 = events.read_events(p, cur)
    assert evs == [{"type": "error", "message": "boom", "ts": 2}]
    assert cur2 == p.stat().st_size


@pytest.mark.parametrize("line", ["plain log", "{not json", '{"type":"bogus"}', '{"type":"step","step":1}', "[]"])
def test_parse_line_ignores_non_events(line):
    assert events.parse_line(line) is None


def test_make_event_rejects_missing_fields():
    with pytest.raises(events.EventError, match="lacks path"):
        events.make_event("checkpoint", step=3)
