"""Checkpoints count only when complete; the newest complete one is found; rotation never loses the last one."""

from __future__ import annotations

import json

import pytest

from payload import checkpoints as ck


def make(root, step, complete=True, files=None):
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    for name, content in (files or {"adapter_model.safetensors": b"x" * 100, "optimizer.pt": b"y" * 50}).items():
        (d / name).write_bytes(content)
    if complete:
        ck.mark_complete(d, step)
    return d


def test_marker_lists_files_and_sizes(tmp_path):
    d = make(tmp_path, 10)
    marker = json.loads((d / ck.MARKER).read_text())
    assert marker == {"step": 10, "files": {"adapter_model.safetensors": 100, "optimizer.pt": 50}}
    assert ck.check_complete(d) == (True, "")


@pytest.mark.parametrize("damage, reason", [
    (lambda d: (d / ck.MARKER).unlink(), "no completion marker"),
    (lambda d: (d / "optimizer.pt").write_bytes(b"y" * 7), "optimizer.pt has 7 bytes, 50 were written"),
    (lambda d: (d / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    (lambda d: (d / ck.MARKER).write_text("{not json"), "unreadable completion marker"),
])
def test_damaged_checkpoints_do_not_count(tmp_path, damage, reason):
    d = make(tmp_path, 10)
    damage(d)
    ok, why = ck.check_complete(d)
    assert not ok and reason in why


def test_newest_complete_skips_newer_incomplete(tmp_path):
    make(tmp_path, 10)
    make(tmp_path, 20)
    make(tmp_path, 30, complete=False)
    (tmp_path / "checkpoint-x").mkdir()                 # not a checkpoint name: ignored
    (tmp_path / "notes.txt").write_text("")
    best, skipped = ck.newest_complete(tmp_path)
    assert best.step == 20 and best.path == tmp_path / "checkpoint-20"
    assert [c.step for c in skipped] == [30] and "marker" in skipped[0].reason
    assert ck.newest_complete(tmp_path / "missing") == (None, [])


def test_steps_sort_numerically(tmp_path):
    for s in (9, 10, 100):
        make(tmp_path, s)
    assert [c.step for c in ck.scan(tmp_path)] == [9, 10, 100]
    assert ck.newest_complete(tmp_path)[0].step == 100


def test_rotate_keeps_newest_complete_and_newer_incomplete(tmp_path):
    for s in (10, 20, 30):
        make(tmp_path, s)
    make(tmp_path, 15, complete=False)
    make(tmp_path, 40, complete=False)
    removed = ck.rotate(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["checkpoint-10", "checkpoint-15"]
    assert [c.step for c in ck.scan(tmp_path)] == [20, 30, 40]


def test_rotate_without_complete_deletes_nothing(tmp_path):
    make(tmp_path, 10, complete=False)
    assert ck.rotate(tmp_path, keep=1) == []
    assert (tmp_path / "checkpoint-10").is_dir()
    with pytest.raises(ValueError):
        ck.rotate(tmp_path, keep=0)


def test_discard_incomplete_only(tmp_path):
    good = make(tmp_path, 10)
    bad = make(tmp_path, 20, complete=False)
    assert ck.discard_incomplete(good) is False and good.is_dir()
    assert ck.discard_incomplete(bad) is True and not bad.exists()
    assert ck.discard_incomplete(tmp_path / "checkpoint-30") is False


def test_mark_complete_refuses_an_empty_folder(tmp_path):
    (tmp_path / "checkpoint-1").mkdir()
    with pytest.raises(ValueError, match="no files"):
        ck.mark_complete(tmp_path / "checkpoint-1", 1)
