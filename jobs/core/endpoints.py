"""The endpoints' adapter manifests: which approved adapters each base model's inference server serves.

One file per base model, `deployments/<base>/adapters.json` in the workspace (on ACA: on the Azure Files share the
inference app mounts), in the format `python -m payload.serve --adapters FILE` follows while it runs
(payload.serving.manifest): `{"adapters": [{"name": "ft-0042", "path": "../../runs/ft-0042/adapter", "aliases":
["my-run"], "run": "ft-0042", ...}]}`, paths relative to the manifest's folder so that the same file works wherever
the workspace is mounted. A deploy adds its entry, an undeploy removes it; the server loads and unloads to follow,
without a restart, and a replica that starts from zero reads the same list.

The file is the record of what is live: entries also keep who approved the deploy, its request id and since when
(extra keys, which the server ignores). Writers take a lock file beside it (two deploys of the same base at once
must not lose one another's entry), and readers see the old file or the new one whole (jobs.core.files).
"""

from __future__ import annotations

import fcntl
import json
import os
import posixpath
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jobs.core.files import write_atomic

ROOT = "deployments"
MANIFEST = "adapters.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ManifestDamaged(Exception):
    """The manifest cannot be read as one; says which file and what to do."""


def endpoint_name(model: str) -> str:
    """The folder (and endpoint) name of a base model: `model-cache/tiny` -> `model-cache--tiny`, a hub id
    `Qwen/Qwen2.5-0.5B-Instruct` -> `Qwen--Qwen2.5-0.5B-Instruct`. Path tricks (`..`, absolute paths) cannot get out
    of the deployments folder: every character outside [A-Za-z0-9._-] becomes `-`, and leading dots are dropped."""
    name = "--".join(_UNSAFE.sub("-", part) for part in model.strip("/").split("/") if part not in ("", ".", ".."))
    name = name.lstrip(".")
    if not name:
        raise ValueError(f"{model!r} names no base model")
    return name


def manifest_path(workspace: Path, model: str) -> Path:
    return Path(workspace) / ROOT / endpoint_name(model) / MANIFEST


def read_entries(workspace: Path, model: str) -> list[dict[str, Any]]:
    """The entries of the base model's manifest, in order; [] when it has none yet."""
    return _read(manifest_path(workspace, model))


def new_entry(run_id: str, run_name: str, approval_id: str, requested_by: str) -> dict[str, Any]:
    """A deploy's manifest entry before its path is placed: the run's id as the name, its name as an alias, and
    what the record keeps beside (the request, who asked, since when), which the server ignores."""
    return {"name": run_id, "run": run_id, "aliases": [run_name] if run_name and run_name != run_id else [],
            "approval": approval_id, "requested_by": requested_by, "since": time.time()}


def manifest_rel(model: str) -> str:
    """The manifest's path relative to the workspace (or the share's root), `/`-separated."""
    return f"{ROOT}/{endpoint_name(model)}/{MANIFEST}"


def placed(entries: list[dict[str, Any]], entry: dict[str, Any], adapter_rel: str, model: str) -> list[dict[str, Any]]:
    """`entries` with one adapter's entry added, or replacing the entry of its name. `adapter_rel` is the adapter's
    folder relative to the workspace (or share) root; the entry gets it relative to the manifest's folder. An alias
    another entry already answers to stays with that one (two runs of one name: the first deployed keeps it)."""
    taken = {n for e in entries if e.get("name") != entry["name"] for n in (e.get("name"), *(e.get("aliases") or []))}
    written = {**entry, "aliases": [a for a in entry.get("aliases") or [] if a not in taken],
               "path": posixpath.relpath(adapter_rel, posixpath.dirname(manifest_rel(model)))}
    return [e for e in entries if e.get("name") != entry["name"]] + [written]


def add_entry(workspace: Path, model: str, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Add (or replace, by name) one adapter's entry; `entry["path"]` is the adapter folder, absolute or relative to
    the workspace. Returns the manifest's entries after."""
    path = manifest_path(workspace, model)
    adapter = Path(entry["path"])
    rel = os.path.relpath(adapter, workspace) if adapter.is_absolute() else str(adapter)
    with _locked(path):
        entries = placed(_read(path), entry, Path(rel).as_posix(), model)
        _write(path, entries)
    return entries


def remove_entry(workspace: Path, model: str, name: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Take one adapter's entry out; returns (the entry removed or None, the entries left)."""
    path = manifest_path(workspace, model)
    with _locked(path):
        entries = _read(path)
        removed = next((e for e in entries if e.get("name") == name), None)
        if removed is not None:
            entries = [e for e in entries if e is not removed]
            _write(path, entries)
    return removed, entries


def endpoints(workspace: Path) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Every endpoint folder's name and its entries (those with none included)."""
    root = Path(workspace) / ROOT
    if not root.is_dir():
        return
    for folder in sorted(p for p in root.iterdir() if (p / MANIFEST).is_file()):
        yield folder.name, _read(folder / MANIFEST)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ManifestDamaged(f"{path} cannot be read ({e}); fix or delete it (its server then serves only its base "
                              "model), then deploy the adapters again") from None
    return parse(text, str(path))


def parse(text: str, where: str) -> list[dict[str, Any]]:
    """The entries of a manifest's text; ManifestDamaged naming `where` when it is not a manifest."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ManifestDamaged(f"{where} cannot be read ({e}); fix or delete it (its server then serves only its base "
                              "model), then deploy the adapters again") from None
    adapters = doc.get("adapters") if isinstance(doc, dict) else None
    if not isinstance(adapters, list) or not all(isinstance(e, dict) for e in adapters):
        raise ManifestDamaged(f'{where} is not {{"adapters": [...]}}; fix or delete it, then deploy the adapters again')
    return adapters


def dump(entries: list[dict[str, Any]]) -> str:
    return json.dumps({"adapters": entries}, indent=2) + "\n"


def _write(path: Path, entries: list[dict[str, Any]]) -> None:
    write_atomic(path, dump(entries))


# Requests served ------------------------------------------------------------------------------------------------------

SERVED = "served"  # beside the manifest: one record per server process (payload.serving.manifest)


def sum_served(records: Iterable[Any]) -> dict[str, int]:
    """Requests served per model id over every process's record; records that are not one are skipped."""
    total: dict[str, int] = {}
    for record in records:
        counts = record.get("requests") if isinstance(record, dict) else None
        for name, n in (counts.items() if isinstance(counts, dict) else ()):
            if isinstance(name, str) and isinstance(n, int) and not isinstance(n, bool) and n >= 0:
                total[name] = total.get(name, 0) + n
    return total


def uptime_periods(records: Iterable[Any]) -> list[list[float]]:
    """Each server process's [started, last written] from its record: how long it ran, give or take a heartbeat."""
    out = []
    for r in records:
        start, end = (r.get("started"), r.get("updated")) if isinstance(r, dict) else (None, None)
        if isinstance(start, (int, float)) and isinstance(end, (int, float)) and end > start:
            out.append([float(start), float(end)])
    return out


def _records(folder: Path) -> list[Any]:
    records = []
    for f in sorted(folder.glob("*.json")):
        try:
            records.append(json.loads(f.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue  # a record being replaced, or damaged: the others still count
    return records


def served_here(workspace: Path, model: str) -> dict[str, int]:
    """Requests served per model id by every server process this base model's endpoint has had in the workspace."""
    return sum_served(_records(manifest_path(workspace, model).parent / SERVED))


def uptime_here(workspace: Path) -> list[list[float]]:
    """How long each server process of every endpoint in the workspace ran ([started, last written])."""
    root = Path(workspace) / ROOT
    folders = sorted(p / SERVED for p in root.iterdir() if (p / SERVED).is_dir()) if root.is_dir() else []
    return [period for folder in folders for period in uptime_periods(_records(folder))]
