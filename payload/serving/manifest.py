"""The adapter manifest behind `--adapters FILE`: which LoRA adapters the server loads, followed while it runs.

The file is JSON: `{"adapters": [{"name": "ft-0042", "path": "runs/ft-0042/adapter", "aliases": ["my-run"],
"run": "ft-0042"}]}`, relative paths being relative to the manifest's folder. The server loads every entry at start,
then polls the file's modification time every couple of seconds (and `POST /admin/reload` re-reads it at once) to
load what was added and unload what was removed.

Why a file and not only an admin route: on Azure Container Apps the inference app scales to zero, and a replica that
starts later knows nothing of what an earlier one was told over HTTP. The manifest lives on the Azure Files share next
to the adapters, so every fresh replica reads the same list, and a deploy is one file write, seen by all replicas.

An entry that cannot be served (missing folder, unreadable weights, trained for another base) is refused with a
one-line reason in `GET /admin/adapters`; it never disturbs the adapters already loaded.

Requests served: each server process keeps `served/<host>-<pid>-<start>.json` beside the manifest up to date (the
requests it accepted per model id, written when they changed, at most every SERVED_EVERY_S, and at least every
SERVED_HEARTBEAT_S with the time, so that `started` to `updated` is how long the process ran: the inference part of
the team's GPU spend). The bot sums the
folder for `/finetune deployments`: a file per process, so replicas never write the same file, and the counts outlive
a replica that scaled to zero without anyone waking the endpoint to ask.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from payload.serving.engine import Engine, StartupError

log = logging.getLogger("payload.serve")  # the server's one logger name, as its operators know it from the log

POLL_S = 2.0
SERVED_DIR = "served"
SERVED_EVERY_S = 10.0
SERVED_HEARTBEAT_S = 60.0  # written at least this often while the process lives: its uptime, for the GPU bill


class ManifestError(ValueError):
    """The manifest as a whole cannot be read; what was loaded stays loaded."""


@dataclass(frozen=True)
class ManifestEntry:
    name: str
    path: Path
    aliases: tuple[str, ...] = ()
    run: str | None = None


def parse_manifest(text: str, folder: Path) -> tuple[list[ManifestEntry], dict[str, str]]:
    """The manifest's entries, and the entries refused as written (name or position -> reason). Pure."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ManifestError(f"not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("adapters"), list):
        raise ManifestError('expected a JSON object {"adapters": [{"name": ..., "path": ...}, ...]}')
    entries: list[ManifestEntry] = []
    refused: dict[str, str] = {}
    names: set[str] = set()
    for i, item in enumerate(doc["adapters"]):
        label = item.get("name") if isinstance(item, dict) and isinstance(item.get("name"), str) else f"#{i}"
        if not isinstance(item, dict):
            refused[label] = "an entry must be a JSON object with 'name' and 'path'"
            continue
        name, path, aliases, run = item.get("name"), item.get("path"), item.get("aliases", []), item.get("run")
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            refused[label] = "'name' must be a non-empty string without surrounding spaces"
        elif not isinstance(path, str) or not path:
            refused[label] = "'path' must be the adapter's folder, a non-empty string"
        elif not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
            refused[label] = "'aliases' must be a list of non-empty strings"
        elif run is not None and not isinstance(run, str):
            refused[label] = "'run' must be a string (the run id)"
        elif name in names:
            refused[label] = f"the name {name!r} appears twice in the manifest; the first entry is served"
        else:
            names.add(name)
            entries.append(ManifestEntry(name, folder / path, tuple(aliases), run))
    return entries, refused


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _adapter_signature(folder: Path) -> tuple:
    """Changes when the adapter's files do, so that a retrained adapter under the same path is loaded again."""
    return tuple(_signature(folder / f) for f in ("adapter_config.json", "adapter_model.safetensors"))


class AdapterManifest:
    """Keeps the engine's adapters in step with the manifest file; `status()` says how each entry fared."""

    def __init__(self, engine: Engine, path: Path, *, poll_s: float = POLL_S):
        self.engine = engine
        self.path = path
        self.poll_s = poll_s
        self.error: str | None = None  # why the file itself could not be read, if it could not
        self._lock = threading.Lock()  # one sync at a time: the poller's and /admin/reload's
        self._loaded: dict[str, tuple[ManifestEntry, tuple]] = {}  # name -> (entry, adapter files' signature)
        self._status: dict[str, dict[str, Any]] = {}
        self._seen: tuple | None = None  # what the last complete sync saw of the manifest and the refused folders
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        started = time.time()
        self.served_path = path.parent / SERVED_DIR / f"{socket.gethostname()}-{os.getpid()}-{int(started)}.json"
        self._served = {"host": socket.gethostname(), "pid": os.getpid(), "started": started, "requests": {}}
        self._served_at = 0.0

    def start(self) -> None:
        """Load what the manifest holds now, then follow it from a background thread."""
        self.sync()
        self._thread = threading.Thread(target=self._poll, name="adapter-manifest", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.write_served(force=True)

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                if self._current_signature() != self._seen:
                    self.sync()
            except Exception:  # the poller must outlive any one bad sync; ours to debug, so logged in full
                log.exception("following the adapter manifest %s failed", self.path)
            self.write_served()

    def write_served(self, force: bool = False) -> bool:
        """Record the requests accepted per model id when they changed (and SERVED_EVERY_S passed, unless `force`),
        and the time at least every SERVED_HEARTBEAT_S; True if written. A failed write is logged and tried again
        later: counting must never stop serving."""
        counts = dict(self.engine.served_total)
        now = time.monotonic()
        beat = now - self._served_at >= SERVED_HEARTBEAT_S
        if not beat and (counts == self._served["requests"] or not force and now - self._served_at < SERVED_EVERY_S):
            return False
        record = {**self._served, "requests": counts, "updated": time.time()}
        try:
            self.served_path.parent.mkdir(exist_ok=True)
            tmp = self.served_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record), encoding="utf-8")
            tmp.replace(self.served_path)
        except OSError as e:
            log.warning("cannot record the requests served in %s: %s", self.served_path, e)
            return False
        self._served, self._served_at = record, now
        return True

    def _current_signature(self) -> tuple:
        # A refused entry whose folder changes (a run finished writing it) is tried again without touching the file.
        refused = tuple(sorted((name, _adapter_signature(Path(s["path"]))) for name, s in self._status.items()
                               if s["status"] == "refused" and s.get("path")))
        return _signature(self.path), refused

    def sync(self) -> dict[str, Any]:
        """Read the manifest now and load or unload adapters to follow it; returns `status()`."""
        with self._lock:
            signature = self._current_signature()
            try:
                text = self.path.read_text(encoding="utf-8")
            except FileNotFoundError:
                text = '{"adapters": []}'  # not written yet (or removed): serve no manifest adapters
                if self._seen is None:
                    log.warning("adapter manifest %s does not exist yet; serving without its adapters until it does",
                                self.path)
            except OSError as e:
                self.error = f"cannot read {self.path}: {e}"
                log.warning("%s; the adapters loaded stay loaded", self.error)
                return self.status()
            try:
                entries, refused = parse_manifest(text, self.path.parent)
            except ManifestError as e:
                # Perhaps caught mid-write: keep what is loaded, and try again at the next poll (no signature kept).
                self.error = f"{self.path}: {e}"
                log.warning("adapter manifest %s; the adapters loaded stay loaded", self.error)
                return self.status()
            self.error = None
            self._apply(entries, refused)
            # The file as it was before reading (a write during the sync shows at the next poll), the refused
            # folders as they are now.
            self._seen = (signature[0], self._current_signature()[1])
            return self.status()

    def _apply(self, entries: list[ManifestEntry], refused: dict[str, str]) -> None:
        wanted = {e.name: e for e in entries}
        for name, (entry, files) in list(self._loaded.items()):
            if wanted.get(name) != entry or _adapter_signature(entry.path) != files:
                self.engine.unload_adapter(name)
                del self._loaded[name]
        status: dict[str, dict[str, Any]] = {name: {"name": name, "status": "refused", "reason": reason}
                                             for name, reason in refused.items()}
        for entry in entries:
            row = {"name": entry.name, "path": str(entry.path), "run": entry.run, "aliases": list(entry.aliases)}
            if entry.name not in self._loaded:
                files = _adapter_signature(entry.path)
                try:
                    self.engine.load_adapter(entry.path, entry.name, aliases=entry.aliases, run=entry.run)
                except StartupError as e:
                    log.warning("adapter %s refused: %s", entry.name, e)
                    status[entry.name] = {**row, "status": "refused", "reason": str(e)}
                    continue
                self._loaded[entry.name] = (entry, files)
            status[entry.name] = {**row, "status": "loaded", "reason": None}
        self._status = status

    def status(self) -> dict[str, Any]:
        """Each entry of the manifest: loaded (since when, requests accepted since) or refused (why)."""
        rows = []
        for row in self._status.values():
            served = self.engine.lookup(row["name"]) if row["status"] == "loaded" else None
            rows.append({**row, "loaded_at": served.created, "requests": served.requests} if served else row)
        return {"manifest": str(self.path), "error": self.error, "adapters": rows}


def manifest_exists_or_folder(path: Path) -> str | None:
    """Why `--adapters PATH` cannot work at all (its folder is missing); None when it can."""
    if path.is_dir():
        return f"--adapters must name a JSON file, and {path} is a folder"
    if not path.parent.is_dir():
        return f"the folder of the adapter manifest {path} does not exist; create it or fix the path"
    if path.exists() and not os.access(path, os.R_OK):
        return f"the adapter manifest {path} cannot be read; check its permissions"
    return None
