"""Datasets from Slack files: whether tuneops may take the file a person points at, and fetching it into the workspace
as `datasets/slack/<file id>-<safe name>.jsonl` with the bot token (files.info, then url_private_download).

Every refusal is a RunRejected that says what was wrong and what to do. A download is streamed to a temporary file and
renamed into place only when it is whole, so a download cut short leaves nothing behind; a file already fetched (same
id, size and timestamp, kept as the file's mtime) is not fetched again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError

from bot.slack import SlackGateway
from jobs.core.errors import RunRejected

log = logging.getLogger(__name__)

SLACK_DIR = PurePosixPath("datasets/slack")
SUFFIX = ".jsonl"
MAX_SAFE_NAME = 80
CHUNK = 1 << 20
STALE_PART_S = 3600   # a temporary file this old was left by a bot that died mid-download
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

# Downloads under way in this process, by destination: the shortcut starts one when the form opens, and the form's
# submission waits for that one instead of starting a second.
_inflight: dict[Path, asyncio.Future] = {}


@dataclass(frozen=True)
class SlackFile:
    id: str
    name: str
    size: int
    timestamp: int
    url: str                      # url_private_download: needs the bot token
    permalink: str
    shared_in: dict[str, str]     # channel -> ts of the message that shared the file there ("" when unknown)


@dataclass(frozen=True)
class Fetched:
    path: str          # relative to the workspace
    source: str        # a link to the message the file came with
    file: SlackFile
    downloaded: bool   # False: the same file was already in the workspace


def megabytes(n: int) -> str:
    """A size as people read it: 900 B, 12 kB, 3.4 MB, 250 MB."""
    if n < 1000:
        return f"{n} B"
    if n < 1e6:
        return f"{n / 1e3:,.0f} kB"
    return f"{n / 1e6:,.1f} MB" if n < 10e6 else f"{n / 1e6:,.0f} MB"


def info_refusal(file_id: str, error: str) -> RunRejected:
    """files.info's error, as what the person does about it."""
    if error == "file_not_found":
        return RunRejected(f"tuneops cannot see the Slack file {file_id}: it does not exist, or it was shared only "
                           "where the bot is not. Share it in this channel (invite the bot first: `/invite @tuneops`) "
                           "and try again.")
    if error == "file_deleted":
        return RunRejected(f"The Slack file {file_id} was deleted. Share the dataset again and use the new file.")
    if error == "missing_scope":
        return RunRejected("The Slack app may not read files (it lacks the files:read scope). An admin adds the scope "
                           "(manifest.yaml lists it) and reinstalls the app; then try again.")
    return RunRejected(f"Slack did not give tuneops the file {file_id} ({error}). Try again in a minute.")


def check_name(name: str) -> str:
    """The file's name when it is a plain .jsonl name; RunRejected for another type or a name that plays with paths."""
    shown = name.encode("unicode_escape").decode("ascii")[:80]
    if (not name or any(c in name for c in "/\\") or any(ord(c) < 32 or ord(c) == 127 for c in name)
            or name.startswith((".", "~")) or ".." in name):
        raise RunRejected(f"The file's name `{shown}` has path characters (/, \\, .., a leading dot or control "
                          "characters), which tuneops does not write to disk. Rename it to a plain name like "
                          "train.jsonl, share it again and use that one.")
    if not name.lower().endswith(SUFFIX):
        raise RunRejected(f"`{shown}` is not a JSONL file: tuneops trains on JSON Lines files named *.jsonl (one "
                          "JSON object per line: messages, prompt/completion or text). Save it as .jsonl and share "
                          "it again.")
    return name


def safe_name(file_id: str, name: str) -> str:
    """`<file id>-<name>.jsonl` with only letters, digits, `.`, `_` and `-` in the name part."""
    stem = _UNSAFE.sub("_", name[: -len(SUFFIX)]).strip("._-")[:MAX_SAFE_NAME] or "dataset"
    return f"{file_id}-{stem}{SUFFIX}"


def _shares(info: dict[str, Any]) -> dict[str, str]:
    shared: dict[str, str] = {}
    for kind in ("public", "private"):
        for channel, shares in ((info.get("shares") or {}).get(kind) or {}).items():
            ts = next((s.get("ts", "") for s in shares if isinstance(s, dict)), "") if isinstance(shares, list) else ""
            shared.setdefault(str(channel), str(ts or ""))
    for key in ("channels", "groups", "ims"):
        for channel in info.get(key) or []:
            shared.setdefault(str(channel), "")
    return shared


def check_file(info: dict[str, Any], channel: str, max_bytes: int) -> SlackFile:
    """files.info's file object, checked: a .jsonl with a plain name, shared in `channel`, within `max_bytes`."""
    file_id = str(info.get("id", ""))
    name = check_name(str(info.get("name") or ""))
    size = int(info.get("size") or 0)
    url = str(info.get("url_private_download") or "")
    if info.get("is_external") or not url:
        raise RunRejected(f"`{name}` is stored outside Slack, so tuneops cannot download it. Upload the file itself "
                          "to Slack and try again.")
    shared = _shares(info)
    if channel not in shared:
        raise RunRejected(f"`{name}` is not shared in this channel. tuneops takes only files shared where the run is "
                          "asked for, so that everyone here sees what it trains on: share the file here, then try "
                          "again.")
    if size > max_bytes:
        raise RunRejected(f"`{name}` is {megabytes(size)}; tuneops fetches datasets of up to {megabytes(max_bytes)} "
                          "from Slack (TUNEOPS_SLACK_FILE_MAX_MB). Put it in the workspace and use `--dataset "
                          "datasets/NAME.jsonl`, or ask an admin to raise the limit.")
    if size == 0:
        raise RunRejected(f"`{name}` is empty. Share the file with its examples in it.")
    return SlackFile(id=file_id, name=name, size=size, timestamp=int(info.get("timestamp") or info.get("created") or 0),
                     url=url, permalink=str(info.get("permalink") or ""), shared_in=shared)


def local_path(f: SlackFile) -> PurePosixPath:
    return SLACK_DIR / safe_name(f.id, f.name)


def already_fetched(path: Path, f: SlackFile) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return path.is_file() and st.st_size == f.size and int(st.st_mtime) == f.timestamp


async def fetch(gateway: SlackGateway, workspace: Path, file_id: str, channel: str, max_bytes: int, *,
                message_ts: str = "") -> Fetched:
    """Look the file up, check it, and have it in the workspace; `message_ts` is the message it came with, when
    known (else the message that shared it in `channel`)."""
    try:
        info = await gateway.file_info(file_id)
    except SlackApiError as e:
        error = str(e.response.get("error", "error"))
        if error not in ("file_not_found", "file_deleted", "missing_scope"):
            log.warning("files.info %s failed: %s", file_id, error)
        raise info_refusal(file_id, error) from None
    f = check_file(info, channel, max_bytes)
    rel = local_path(f)
    root = (workspace / SLACK_DIR).resolve()
    dest = root / rel.name
    if dest.parent != root:  # the safe name cannot leave the folder; this says so to a reader, and to a future edit
        raise RunRejected(f"`{f.name}` would be written outside {SLACK_DIR}: rename the file and share it again.")
    downloaded = False
    if not already_fetched(dest, f):
        await _download_once(gateway, f, dest, max_bytes)
        downloaded = True
    ts = message_ts or f.shared_in.get(channel, "")
    source = f.permalink
    if ts:
        try:
            source = await gateway.permalink(channel, ts)
        except SlackApiError as e:  # the file's own link still leads to the file and its messages
            log.info("chat.getPermalink for %s in %s failed: %s", file_id, channel, e.response.get("error"))
    return Fetched(path=str(rel), source=source, file=f, downloaded=downloaded)


async def _download_once(gateway: SlackGateway, f: SlackFile, dest: Path, max_bytes: int) -> None:
    task = _inflight.get(dest)
    if task is None:
        task = asyncio.ensure_future(_download(gateway, f, dest, max_bytes))
        _inflight[dest] = task
        task.add_done_callback(lambda t: (_inflight.pop(dest, None), t.cancelled() or t.exception()))
    await asyncio.shield(task)  # a caller that stops waiting does not stop the download for the others


async def _download(gateway: SlackGateway, f: SlackFile, dest: Path, max_bytes: int) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(f".tuneops-{dest.name}.*.part"):
        try:
            if time.time() - stale.stat().st_mtime > STALE_PART_S:
                stale.unlink()
        except OSError:  # gone meanwhile
            pass
    # A name the workspace sync skips (`.tuneops*`), so that a run synced meanwhile never sends half a download.
    tmp = dest.with_name(f".tuneops-{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
    cut_short = RunRejected(f"The download of `{f.name}` from Slack was cut short; nothing was kept. Try again; if it "
                            "keeps happening, Slack or the network between it and tuneops is in trouble.")
    try:
        async with gateway.download(f.url) as resp:
            if resp.status != 200:
                raise RunRejected(f"Slack answered HTTP {resp.status} to the download of `{f.name}`. Try again in a "
                                  "minute; if the file was deleted meanwhile, share it again.")
            if resp.content_type == "text/html":
                # Slack's answer to a download without a token that may read files: its sign-in page, with 200.
                log.error("Slack sent its sign-in page for %s: the bot token may not read files", f.id)
                raise RunRejected("Slack sent its sign-in page instead of the file: the bot's token may not read "
                                  "files. An admin checks that the app has the files:read scope (manifest.yaml) and "
                                  "that SLACK_BOT_TOKEN is the app's current bot token, then try again.")
            got = 0
            with open(tmp, "wb") as out:
                async for chunk in resp.content.iter_chunked(CHUNK):
                    got += len(chunk)
                    if got > max_bytes:
                        raise RunRejected(f"`{f.name}` is larger than the {megabytes(max_bytes)} tuneops fetches "
                                          "from Slack (TUNEOPS_SLACK_FILE_MAX_MB), though Slack said "
                                          f"{megabytes(f.size)}; nothing was kept. Put it in the workspace and use "
                                          "`--dataset datasets/NAME.jsonl`, or ask an admin to raise the limit.")
                    out.write(chunk)
        if got != f.size:
            raise cut_short
        os.utime(tmp, (f.timestamp, f.timestamp))  # "already fetched" compares size and this timestamp
        os.replace(tmp, dest)
        log.info("fetched Slack file %s (%d bytes) to %s", f.id, got, dest)
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        log.warning("the download of Slack file %s was cut short: %s", f.id, type(e).__name__)
        raise cut_short from None
    finally:
        tmp.unlink(missing_ok=True)
