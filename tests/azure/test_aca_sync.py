"""Workspace sync to the Azure Files share, through the real azure-storage-file-share client and the stand-in."""

from __future__ import annotations

import json
import os
import threading

import pytest
from azure.core.exceptions import HttpResponseError

from jobs.backends.aca import share as sharefs
from jobs.backends.aca.standin import Fault
from jobs.backends.aca.sync import (
    MANIFEST,
    HashCache,
    LocalFile,
    Source,
    plan,
    stale,
    sync_workspace,
)
from jobs.core.errors import BackendError
from tests.azure.conftest import SHARE


def make_tree(root, n=12, size=3000):
    for i in range(n):
        p = root / f"d{i % 3}" / f"sub{i % 2}" / f"file {i}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(size))
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "x.pyc").write_bytes(b"skip me")
    return root


def share_files(standin):
    base = standin.share_dir(SHARE)
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in base.rglob("*") if p.is_file()}


def puts(standin, what="comp=range"):
    return [r for r in standin.requests_to("files", "PUT") if what in "&".join(f"{k}={v}" for k, v in r.query.items())
            or (what == "create" and not r.query)]


def test_first_sync_sends_all_then_only_what_changed(aca, tmp_path):
    src = make_tree(tmp_path / "data")
    cache = HashCache(tmp_path / "hashes.json")
    first = sync_workspace(aca.clients.share, [Source(src, "ws")], cache=cache)
    assert len(first.uploaded) == 12 and first.skipped == 0
    on_share = share_files(aca.standin)
    for rel in first.uploaded:
        assert on_share[rel] == (src / rel.removeprefix("ws/")).read_bytes()
    assert not any("__pycache__" in k for k in on_share)
    manifest = json.loads(on_share[MANIFEST])["files"]
    assert manifest["ws/d0/sub0/file 0.bin"]["size"] == 3000

    aca.standin.requests.clear()
    second = sync_workspace(aca.clients.share, [Source(src, "ws")], cache=HashCache(tmp_path / "hashes.json"))
    assert second.uploaded == [] and second.skipped == 12 and second.bytes_sent == 0
    assert aca.standin.requests_to("files", "PUT") == []  # not even the manifest is rewritten

    (src / "d1" / "sub1" / "file 1.bin").write_bytes(b"changed")
    (src / "new.txt").write_text("new")
    third = sync_workspace(aca.clients.share, [Source(src, "ws")], cache=cache)
    assert third.uploaded == ["ws/d1/sub1/file 1.bin", "ws/new.txt"]
    assert share_files(aca.standin)["ws/d1/sub1/file 1.bin"] == b"changed"


def test_a_file_with_the_same_size_but_new_content_is_sent(aca, tmp_path):
    src = tmp_path / "data"
    src.mkdir()
    f = src / "a.jsonl"
    f.write_bytes(b"aaaa")
    cache = HashCache(None)
    sync_workspace(aca.clients.share, [Source(f, "datasets/a.jsonl")], cache=cache)
    f.write_bytes(b"bbbb")
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    again = sync_workspace(aca.clients.share, [Source(f, "datasets/a.jsonl")], cache=cache)
    assert again.uploaded == ["datasets/a.jsonl"]
    assert share_files(aca.standin)["datasets/a.jsonl"] == b"bbbb"


def test_big_files_go_up_in_4_mib_ranges(aca, tmp_path):
    src = tmp_path / "big"
    src.mkdir()
    data = os.urandom(9 * 1024 * 1024 + 123)
    (src / "weights.bin").write_bytes(data)
    sync_workspace(aca.clients.share, [Source(src, "model-cache/m")], cache=HashCache(None))
    ranges = [r for r in aca.standin.requests_to("files", "PUT", r"weights\.bin") if r.query.get("comp") == "range"]
    assert len(ranges) == 3 and max(r.size for r in ranges) == 4 * 1024 * 1024
    assert share_files(aca.standin)["model-cache/m/weights.bin"] == data


def test_uploads_run_in_parallel_within_the_bound(aca, tmp_path):
    src = make_tree(tmp_path / "data", n=16, size=1000)
    aca.standin.inject(Fault("files", path=r"file", method="PUT", status=None, delay=0.2, times=1000))
    in_flight, peak, lock = [0], [0], threading.Lock()
    original = aca.clients.share.get_file_client

    class Counting:
        def __init__(self, client):
            self.client = client

        def upload_file(self, *a, **kw):
            with lock:
                in_flight[0] += 1
                peak[0] = max(peak[0], in_flight[0])
            try:
                return self.client.upload_file(*a, **kw)
            finally:
                with lock:
                    in_flight[0] -= 1

    share = aca.clients.share
    share.get_file_client = lambda path: Counting(original(path)) if "file" in path else original(path)
    try:
        result = sync_workspace(share, [Source(src, "p")], concurrency=3, cache=HashCache(None))
    finally:
        del share.get_file_client
    assert len(result.uploaded) == 16
    assert peak[0] == 3


def test_nothing_is_deleted_unless_asked(aca, tmp_path):
    src = make_tree(tmp_path / "data", n=3)
    cache = HashCache(None)
    sync_workspace(aca.clients.share, [Source(src, "ws")], cache=cache)
    gone = "ws/d1/sub1/file 1.bin"
    (src / "d1" / "sub1" / "file 1.bin").unlink()
    kept = sync_workspace(aca.clients.share, [Source(src, "ws")], cache=cache)
    assert kept.deleted == [] and gone in share_files(aca.standin)
    removed = sync_workspace(aca.clients.share, [Source(src, "ws")], cache=cache, delete=True)
    assert removed.deleted == [gone] and gone not in share_files(aca.standin)
    assert gone not in json.loads(share_files(aca.standin)[MANIFEST])["files"]


def test_a_broken_manifest_means_everything_is_sent_again(aca, tmp_path):
    src = make_tree(tmp_path / "data", n=4)
    cache = HashCache(None)
    sync_workspace(aca.clients.share, [Source(src, "ws")], cache=cache)
    sharefs.write_bytes(aca.clients.share, MANIFEST, b'{"files": {"ws/d0')
    again = sync_workspace(aca.clients.share, [Source(src, "ws")], cache=cache)
    assert len(again.uploaded) == 4


def test_a_busy_share_is_retried(aca, tmp_path):
    src = make_tree(tmp_path / "data", n=2)
    fault = aca.standin.inject(Fault("files", path=r"file", method="PUT", status=503, code="ServerBusy", times=2))
    result = sync_workspace(aca.clients.share, [Source(src, "ws")], cache=HashCache(None))
    assert fault.hits == 2 and len(result.uploaded) == 2


def test_the_hash_cache_skips_reading_unchanged_files(tmp_path):
    f = tmp_path / "x"
    f.write_bytes(b"hello")
    cache = HashCache(tmp_path / "c.json")
    size, h = cache.sha256(f)
    cache.save()
    # Same size and mtime: the cached hash is returned without reading (a forged entry proves it).
    key = str(f.absolute())
    cache.entries[key][3] = "forged"
    assert cache.sha256(f) == (5, "forged")
    f.write_bytes(b"HELLO!")
    assert cache.sha256(f)[1] != "forged"
    assert HashCache(tmp_path / "c.json").entries[key][3] == h


def test_plan_and_stale_are_pure():
    local = {"a": LocalFile(None, 1, "h1"), "b": LocalFile(None, 2, "h2"), "c": LocalFile(None, 3, "h3")}
    manifest = {"a": {"size": 1, "sha256": "h1"}, "b": {"size": 2, "sha256": "old"}, "x/y": {"size": 1, "sha256": "z"},
                "other/z": {"size": 1, "sha256": "z"}}
    assert plan(local, manifest) == ["b", "c"]
    assert stale(local, manifest, ["x"]) == ["x/y"]


def test_a_sync_that_cannot_get_the_lock_sends_nothing(aca, tmp_path, redis_url):
    import pytest
    import redis

    from jobs.core.errors import BackendError

    src = make_tree(tmp_path / "data", n=3)
    conn = redis.Redis.from_url(redis_url)
    holder = conn.lock("sync", timeout=60)
    assert holder.acquire()
    with pytest.raises(BackendError, match="Another workspace sync") as e:
        sync_workspace(aca.clients.share, [Source(src, "ws")], cache=HashCache(tmp_path / "hashes.json"),
                       lock=conn.lock("sync", timeout=60, blocking_timeout=0.2))
    assert e.value.transient
    assert share_files(aca.standin) == {}  # no file, no manifest written without the lock
    assert holder.owned()
    holder.release()


def test_names_azure_files_cannot_hold_are_refused_before_anything_is_sent(aca, tmp_path):
    src = make_tree(tmp_path / "data", n=3)
    (src / "d0" / "notes: day 1.txt").write_text("colon")
    (src / "d1" / "draft.").write_text("trailing dot")
    (src / "con").write_text("reserved")
    with pytest.raises(BackendError) as e:
        sync_workspace(aca.clients.share, [Source(src, "data")], cache=HashCache(tmp_path / "h.json"))
    msg = e.value.reason
    assert "3 file name(s)" in msg and "data/d0/notes: day 1.txt" in msg and "data/d1/draft." in msg
    assert "data/con" in msg and "Rename them" in msg
    assert not puts(aca.standin) and not share_files(aca.standin)


def test_the_share_refuses_bad_names_and_trims_a_trailing_dot_as_azure_files_does(aca):
    with pytest.raises(HttpResponseError) as e:
        aca.clients.share.get_file_client("a|b.txt").upload_file(b"x")
    assert e.value.status_code == 400 and e.value.error_code == "InvalidResourceName"
    aca.clients.share.get_file_client("draft.").upload_file(b"x")
    assert set(share_files(aca.standin)) == {"draft"}
    assert sharefs.name_problem("draft.") and sharefs.name_problem("a|b.txt") and not sharefs.name_problem("a b.txt")
