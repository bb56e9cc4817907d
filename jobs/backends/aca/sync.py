"""Incremental workspace sync to the Azure Files share: datasets, run configs, local models and the payload code.

A manifest on the share (`.tuneops/manifest.json`) records each synced file's size and SHA-256; a file whose size and
hash match it is not sent again. Local hashes are cached by (size, mtime, inode), so an unchanged workspace is only
stat()ed, not read. Uploads run in parallel with a bound, big files go up in 4 MiB ranges, and nothing on the share
is deleted unless asked (`delete=True` removes files the manifest knows that are gone locally under the same sources).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from azure.core.exceptions import ResourceNotFoundError

from jobs.backends.aca import share as sharefs
from jobs.core.errors import BackendError

log = logging.getLogger(__name__)

MANIFEST = ".tuneops/manifest.json"
DEFAULT_EXCLUDE = ("__pycache__", "*.pyc", ".git", ".tuneops*", ".DS_Store")
# Files above this go up with several ranges in flight at once.
BIG_FILE = 32 * 1024 * 1024


@dataclass(frozen=True)
class Source:
    """A local file or folder and the path it gets on the share."""

    local: Path
    dest: str
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE


@dataclass
class LocalFile:
    path: Path
    size: int
    sha256: str = ""


@dataclass
class SyncResult:
    uploaded: list[str] = field(default_factory=list)
    skipped: int = 0
    deleted: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"sent {len(self.uploaded)} file(s), {self.bytes_sent / 1e6:.1f} MB; {self.skipped} unchanged"
                + (f"; deleted {len(self.deleted)}" if self.deleted else "") + f" ({self.seconds:.1f} s)")


def _excluded(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def collect(sources: Iterable[Source]) -> dict[str, Path]:
    """Share path -> local file, for every file of the sources (folders walked, excluded names skipped)."""
    out: dict[str, Path] = {}
    for src in sources:
        dest = src.dest.strip("/")
        if src.local.is_file():
            out[dest] = src.local
            continue
        if not src.local.is_dir():
            raise FileNotFoundError(f"{src.local} does not exist")
        for root, dirs, files in os.walk(src.local):
            dirs[:] = sorted(d for d in dirs if not _excluded(d, src.exclude))
            rel_root = Path(root).relative_to(src.local).as_posix()
            for name in sorted(files):
                if _excluded(name, src.exclude):
                    continue
                rel = name if rel_root == "." else f"{rel_root}/{name}"
                out[f"{dest}/{rel}" if dest else rel] = Path(root) / name
    bad = [(rel, why) for rel in out if (why := sharefs.name_problem(rel))]
    if bad:
        listed = "; ".join(f"{rel}: {why}" for rel, why in bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5
                                                                        else "")
        raise BackendError(f"{len(bad)} file name(s) cannot go to the Azure Files share: {listed}. Rename them in "
                           f"the workspace and try again.")
    return out


def plan(local: Mapping[str, LocalFile], manifest: Mapping[str, Mapping]) -> list[str]:
    """The share paths to send: new files, and files whose size or hash differ from the manifest's. Pure."""
    send = []
    for rel, f in local.items():
        seen = manifest.get(rel)
        if not seen or seen.get("size") != f.size or seen.get("sha256") != f.sha256:
            send.append(rel)
    return sorted(send)


def stale(local: Mapping[str, LocalFile], manifest: Mapping[str, Mapping], dests: Iterable[str]) -> list[str]:
    """Manifest entries under the sources' destinations that no longer exist locally. Pure."""
    prefixes = [d.strip("/") for d in dests]

    def under(rel: str) -> bool:
        return any(rel == p or rel.startswith(p + "/") or not p for p in prefixes)

    return sorted(rel for rel in manifest if rel not in local and under(rel))


class HashCache:
    """Local SHA-256s keyed by path, reused while (size, mtime_ns, inode) stay the same."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, list] = {}
        self.dirty = False
        self._lock = threading.Lock()
        if path and path.exists():
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                self.entries = {}

    def cached(self, path: Path) -> tuple[int, str] | None:
        """(size, sha256) when the file is unchanged since it was last hashed; None when it must be read."""
        st = path.stat()
        with self._lock:
            hit = self.entries.get(str(path.absolute()))
        if hit and hit[:3] == [st.st_size, st.st_mtime_ns, st.st_ino]:
            return st.st_size, hit[3]
        return None

    def sha256(self, path: Path) -> tuple[int, str]:
        hit = self.cached(path)
        if hit is not None:
            return hit
        st = path.stat()
        key = str(path.absolute())
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1024 * 1024), b""):
                h.update(chunk)
        digest = h.hexdigest()
        with self._lock:
            self.entries[key] = stamp + [digest]
            self.dirty = True
        return st.st_size, digest

    def save(self) -> None:
        if not self.path or not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.entries))
        os.replace(tmp, self.path)
        self.dirty = False


def default_cache_path() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "tuneops" / "sync-hashes.json"


def read_manifest(share) -> dict[str, dict]:
    data = sharefs.read_json(share, MANIFEST)
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return {}  # no manifest yet, or a broken one: everything is sent again, which is safe
    return data["files"]


def write_manifest(share, updates: Mapping[str, dict], removed: Iterable[str] = (),
                   current: Mapping[str, dict] | None = None, known_dirs: set[str] | None = None) -> None:
    """Write the manifest with `updates`. Without `current` (read under the caller's lock) it is read again first,
    so that entries another sync added meanwhile are kept."""
    files = dict(current) if current is not None else read_manifest(share)
    files.update(updates)
    for rel in removed:
        files.pop(rel, None)
    body = json.dumps({"version": 1, "files": files}, separators=(",", ":"), sort_keys=True).encode()
    sharefs.write_bytes(share, MANIFEST, body, known_dirs)


def sync_workspace(share, sources: Iterable[Source], *, concurrency: int = 8, cache: HashCache | None = None,
                   delete: bool = False, lock=None) -> SyncResult:
    """Send what changed under `sources` to the share; returns what was sent. `lock` (e.g. a Redis lock) serializes
    syncs that share a manifest across workers."""
    t0 = time.perf_counter()
    sources = list(sources)
    cache = cache if cache is not None else HashCache(default_cache_path())
    files = collect(sources)
    local: dict[str, LocalFile] = {}

    # Unchanged files are only stat()ed; the others are read and hashed in parallel (hashlib releases the GIL).
    misses = []
    for rel, path in files.items():
        hit = cache.cached(path)
        if hit is None:
            misses.append((rel, path))
        else:
            local[rel] = LocalFile(path, *hit)

    def hash_one(item):
        rel, path = item
        size, digest = cache.sha256(path)
        return rel, LocalFile(path, size, digest)

    if misses:
        with ThreadPoolExecutor(max(1, min(concurrency, 8))) as pool:
            for rel, lf in pool.map(hash_one, misses):
                local[rel] = lf
        cache.save()

    # Without the lock, this sync's manifest could overwrite the entries of one that holds it: wait, or give up.
    if lock is not None and not lock.acquire():
        raise BackendError("Another workspace sync to the share has been going on for too long; the run will be "
                           "started again later.", transient=True)
    try:
        manifest = read_manifest(share)
        to_send = plan(local, manifest)
        to_delete = stale(local, manifest, [s.dest for s in sources]) if delete else []
        result = SyncResult(skipped=len(local) - len(to_send))
        # A manifest that was read lives in a directory that exists.
        known_dirs: set[str] = {MANIFEST.rsplit("/", 1)[0]} if manifest else set()
        for d in sorted({rel.rsplit("/", 1)[0] for rel in to_send if "/" in rel}, key=lambda d: (d.count("/"), d)):
            sharefs.ensure_dirs(share, d, known_dirs)
        sent_lock = threading.Lock()

        def upload(rel: str) -> None:
            lf = local[rel]
            with lf.path.open("rb") as f:
                share.get_file_client(rel).upload_file(f, length=lf.size,
                                                       max_concurrency=4 if lf.size > BIG_FILE else 1)
            with sent_lock:
                result.bytes_sent += lf.size
                result.uploaded.append(rel)

        if len(to_send) == 1:
            upload(to_send[0])
        elif to_send:
            with ThreadPoolExecutor(max(1, min(concurrency, len(to_send)))) as pool:
                for _ in pool.map(upload, to_send):
                    pass
        for rel in to_delete:
            try:
                share.get_file_client(rel).delete_file()
            except ResourceNotFoundError:
                pass
            result.deleted.append(rel)
        if to_send or to_delete:
            write_manifest(share, {rel: {"size": local[rel].size, "sha256": local[rel].sha256} for rel in to_send},
                           to_delete, current=manifest if lock is not None else None, known_dirs=known_dirs)
    finally:
        if lock is not None:
            try:
                lock.release()
            except Exception:  # an expired Redis lock: the sync finished anyway
                log.warning("the sync lock expired before the sync ended")
    result.uploaded.sort()
    result.seconds = time.perf_counter() - t0
    log.info("workspace sync: %s", result.summary())
    return result
