"""The trainer's log as plain lines, the same way for every backend (a local train.log, a file on the share)."""

from __future__ import annotations

from payload.events import parse_line


def split_log(data: bytes) -> list[str]:
    """Plain log lines of a chunk of train.log: event lines and blank lines dropped, and of a line redrawn with
    carriage returns (progress bars) only its last state kept."""
    lines = []
    for raw in data.decode("utf-8", errors="replace").split("\n"):
        line = raw.rstrip("\r").rsplit("\r", 1)[-1].rstrip()
        if line and parse_line(line) is None:
            lines.append(line)
    return lines


def grep_lines(lines: list[str], text: str | None, tail: int) -> list[str]:
    """The last `tail` lines holding `text` (case-insensitive); pure."""
    if text:
        needle = text.lower()
        lines = [line for line in lines if needle in line.lower()]
    return lines[-tail:]
