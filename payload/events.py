"""The payload's progress event schema: one JSON object per line, importable without torch.

The trainer prints each event on stdout behind PREFIX and appends the same object to `<output>/events.jsonl`;
the jobs side reads either and parses them with `parse_line`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

PREFIX = "TUNEOPS_EVENT "
EVENTS_FILE = "events.jsonl"

# Every event type and the fields it must carry (besides "type" and "ts").
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "start": ("total_steps",),
    "step": ("step", "total_steps", "epoch", "loss", "lr", "tokens_per_s", "eta_s"),
    "eval": ("step", "eval_loss"),
    "checkpoint": ("step", "path"),
    "done": ("adapter", "metrics"),
    "link": ("name", "url"),           # a page about the run elsewhere, e.g. name "wandb": its W&B run
    "error": ("message",),
}
EVENT_TYPES = tuple(REQUIRED_FIELDS)

# Optional fields the trainer adds (readers must not rely on them being there): `start` says where it resumed from
# (resumed_from_step is 0 on a fresh start) and which incomplete checkpoints it skipped; the last `eval` compares
# with the base model.
OPTIONAL_FIELDS: dict[str, tuple[str, ...]] = {
    "start": ("run_id", "base_model", "device", "examples", "train_examples", "eval_examples", "sequences",
              "tokens_per_epoch", "resumed_from_step", "resumed_from", "skipped_checkpoints", "world_size"),
    "eval": ("base_eval_loss", "final"),
}


class EventError(ValueError):
    """A line that claims to be an event but is not a valid one."""


def make_event(type_: str, **fields: Any) -> dict[str, Any]:
    """Build a checked event dict: a known type with all its required fields."""
    if type_ not in REQUIRED_FIELDS:
        raise EventError(f"unknown event type {type_!r}")
    missing = [f for f in REQUIRED_FIELDS[type_] if f not in fields]
    if missing:
        raise EventError(f"{type_} event lacks {', '.join(missing)}")
    return {"type": type_, "ts": round(time.time(), 3), **fields}


def validate_event(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise EventError("event is not a JSON object")
    type_ = obj.get("type")
    if type_ not in REQUIRED_FIELDS:
        raise EventError(f"unknown event type {type_!r}")
    missing = [f for f in REQUIRED_FIELDS[type_] if f not in obj]
    if missing:
        raise EventError(f"{type_} event lacks {', '.join(missing)}")
    return obj


def encode(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"), default=str)


def parse_line(line: str) -> dict[str, Any] | None:
    """Parse one line of stdout or of events.jsonl; None for a line that is not an event (plain log output)."""
    text = line.strip()
    if text.startswith(PREFIX):
        text = text[len(PREFIX):]
    elif not text.startswith("{"):
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    try:
        return validate_event(obj)
    except EventError:
        return None


class EventWriter:
    """Emits events to stdout (behind PREFIX) and appends them to `<output_dir>/events.jsonl`."""

    def __init__(self, output_dir: str | Path, stream=None):
        self.path = Path(output_dir) / EVENTS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._stream = stream
        self._end_torn_line()

    def _end_torn_line(self) -> None:
        # A writer killed mid-append leaves a line without its newline; ending it keeps the next event on a line
        # of its own (the torn line is then skipped by readers, not glued to the restart's first event).
        try:
            with self.path.open("rb+") as f:
                f.seek(0, 2)
                if f.tell() == 0:
                    return
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    f.write(b"\n")
        except FileNotFoundError:
            pass

    def emit(self, type_: str, **fields: Any) -> dict[str, Any]:
        event = make_event(type_, **fields)
        line = encode(event)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
        import sys

        stream = self._stream or sys.stdout
        print(PREFIX + line, file=stream, flush=True)
        return event


def read_events(path: str | Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Read complete event lines from byte `offset` on; return them and the offset after the last complete line.

    A half-written last line (the writer is mid-append) is left for the next read.
    """
    p = Path(path)
    if not p.exists():
        return [], offset
    with p.open("rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    events = []
    for raw in data[: end + 1].splitlines():
        ev = parse_line(raw.decode("utf-8", errors="replace"))
        if ev is not None:
            events.append(ev)
    return events, offset + end + 1
