"""Small reads and writes on the Azure Files share (azure-storage-file-share): what the executor and the sync use.

Paths are relative to the share's root, which the job sees as /mount. A missing file reads as empty, never as an
error: a run that has not written its events yet is normal.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError

# Azure Files' rules for directory and file names ("Naming and referencing shares, directories, files, and
# metadata", learn.microsoft.com/rest/api/storageservices/naming-and-referencing-shares--directories--files--and-metadata):
# at most 255 characters a component, none of " \ / : | < > * ? nor control characters, not a reserved device name
# (the page's list; azure-storage-azcopy#580: a file named `con` cannot be copied). A trailing dot is trimmed unless
# the request allows it (Azure/azure-cli#27622), so `data.` would land as `data`: refused too, as is a trailing space.
MAX_NAME = 255
FORBIDDEN = set('"\\/:|<>*?') | {chr(c) for c in range(0x20)}
RESERVED = frozenset({"con", "prn", "aux", "nul", "clock$", *(f"com{i}" for i in range(1, 10)),
                      *(f"lpt{i}" for i in range(1, 10))})


def name_problem(path: str) -> str:
    """Why Azure Files cannot hold `path` (relative, `/`-separated), or ''."""
    for part in path.split("/"):
        bad = sorted({c for c in part if c in FORBIDDEN})
        if bad:
            shown = " ".join(repr(c)[1:-1] for c in bad)
            return f"{part!r} has characters Azure Files does not allow ({shown})"
        if len(part) > MAX_NAME:
            return f"{part[:40]!r}... is longer than {MAX_NAME} characters"
        if part in (".", "..") or part.lower() in RESERVED:
            return f"{part!r} is a name Azure Files reserves"
        if part.endswith((".", " ")):
            return f"{part!r} ends with a dot or a space, which Azure Files drops"
    return ""


def ensure_dirs(share, rel_dir: str, known: set[str] | None = None) -> None:
    """Create `rel_dir` and its parents on the share (Azure Files has real directories, created one by one)."""
    known = known if known is not None else set()
    parts = [p for p in rel_dir.strip("/").split("/") if p]
    for i in range(1, len(parts) + 1):
        d = "/".join(parts[:i])
        if d in known:
            continue
        try:
            share.get_directory_client(d).create_directory()
        except ResourceExistsError:
            pass
        known.add(d)


def write_bytes(share, path: str, data: bytes, known_dirs: set[str] | None = None) -> None:
    parent = posixpath.dirname(path)
    if parent:
        ensure_dirs(share, parent, known_dirs)
    share.get_file_client(path).upload_file(data, length=len(data))


def size_of(share, path: str) -> int | None:
    """The file's size, or None when it does not exist."""
    try:
        return share.get_file_client(path).get_file_properties().size
    except ResourceNotFoundError:
        return None


def read_range(share, path: str, offset: int = 0, max_bytes: int | None = None) -> bytes:
    """Bytes of `path` from `offset` (at most `max_bytes`); b'' when the file is missing or has nothing new."""
    size = size_of(share, path)
    if size is None or size <= offset:
        return b""
    length = size - offset if max_bytes is None else min(max_bytes, size - offset)
    try:
        return share.get_file_client(path).download_file(offset=offset, length=length).readall()
    except ResourceNotFoundError:
        return b""


def read_tail(share, path: str, max_bytes: int) -> tuple[bytes, bool]:
    """The last `max_bytes` of a file and whether that is the whole file."""
    size = size_of(share, path)
    if not size:
        return b"", True
    start = max(0, size - max_bytes)
    return share.get_file_client(path).download_file(offset=start, length=size - start).readall(), start == 0


def read_json(share, path: str) -> Any:
    """The parsed JSON file, or None when it is missing or not valid JSON (a half-written file reads as None)."""
    data = read_range(share, path)
    if not data:
        return None
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


def exists(share, path: str) -> bool:
    return size_of(share, path) is not None


def dir_exists(share, path: str) -> bool:
    try:
        share.get_directory_client(path).get_directory_properties()
        return True
    except ResourceNotFoundError:
        return False


def list_dirs(share, path: str) -> list[str]:
    """Names of the directories directly in `path`; [] when it does not exist."""
    try:
        return sorted(e["name"] for e in share.get_directory_client(path).list_directories_and_files()
                      if e.get("is_directory"))
    except ResourceNotFoundError:
        return []


def list_files(share, path: str) -> list[str]:
    """Names of the files (not directories) directly in `path`; [] when it does not exist."""
    try:
        return sorted(e["name"] for e in share.get_directory_client(path).list_directories_and_files()
                      if not e.get("is_directory"))
    except ResourceNotFoundError:
        return []
