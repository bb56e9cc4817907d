"""The durable copy of each run record in its run folder (`runs/<id>/record.json`), which outlives Redis.

Redis holds every fact while it runs; if it comes back empty (no persistence, a flushed or replaced instance) the
run folders in the workspace still say which runs there were, how far each got and where its story is told. The
store writes the snapshot whenever it writes the record; `jobs.reconcile` reads them back. Pure file work: the record
itself is the store's, and so is the thread reference (the bot's record of the run's card), carried opaquely.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from jobs.core.domain import RUN_ID_RE, Run
from jobs.core.files import write_atomic
from jobs.core.runconfig import RUNS_DIR, run_dir

log = logging.getLogger(__name__)

SNAPSHOT_NAME = "record.json"  # run.json is the trainer's run config
VERSION = 1


@dataclass
class Snapshot:
    run: Run
    thread: str = ""   # the bot's reference to the run's card (its thread), as the bot stored it


def path(workspace: Path, run_id: str) -> Path:
    return workspace / run_dir(run_id) / SNAPSHOT_NAME


def write(workspace: Path, snapshot: Snapshot) -> bool:
    """Write the snapshot atomically (readers see the old one or the new one); False when it could not be written.
    A workspace that does not exist is never created here."""
    if not workspace.is_dir():
        return False
    target = path(workspace, snapshot.run.id)
    body = {"version": VERSION, "run": snapshot.run.to_dict(), "thread": snapshot.thread}
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, json.dumps(body, default=str, indent=1) + "\n")
    except OSError as e:
        log.warning("%s: could not write its snapshot %s: %s", snapshot.run.id, target, e.strerror or e)
        return False
    return True


def read(workspace: Path, run_id: str) -> Snapshot | None:
    try:
        body = json.loads(path(workspace, run_id).read_text(encoding="utf-8"))
        return Snapshot(Run.from_dict(body["run"]), str(body.get("thread") or ""))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s: its snapshot %s cannot be read: %s", run_id, path(workspace, run_id), e)
        return None


def run_folder_ids(workspace: Path) -> list[str]:
    """The ids of the run folders in the workspace, oldest first (by id)."""
    try:
        with os.scandir(workspace / RUNS_DIR) as entries:
            ids = [e.name for e in entries if RUN_ID_RE.match(e.name) and e.is_dir()]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(ids, key=run_seq)


def run_seq(run_id: str) -> int:
    return int(run_id.rsplit("-", 1)[1])


def highest_seq(workspace: Path) -> int:
    ids = run_folder_ids(workspace)
    return run_seq(ids[-1]) if ids else 0


def read_all(workspace: Path) -> Iterator[tuple[str, Snapshot | None]]:
    """Every run folder's id and snapshot (None where it has none or it cannot be read), oldest first."""
    for run_id in run_folder_ids(workspace):
        yield run_id, read(workspace, run_id)
