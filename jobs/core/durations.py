"""Durations as people write them in settings ("10800", "3h", "30m", "1h30m", "90s", "1d") and as messages say them.

Pure; used for TUNEOPS_RUN_TIMEOUT_S and TUNEOPS_APPROVAL_TTL.
"""

from __future__ import annotations

import math
import re

_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([dhms])")
_WHOLE = re.compile(r"^(?:\d+(?:\.\d+)?\s*[dhms]\s*)+$")


def parse_duration(text: str) -> float:
    """Seconds in `text`: a plain number of seconds or parts like 1h30m; ValueError (with what to write) otherwise."""
    raw = (text or "").strip().lower()
    if not raw:
        raise ValueError("empty duration")
    try:
        seconds = float(raw)
    except ValueError:
        if not _WHOLE.match(raw):
            raise ValueError(f"{text!r} is not a duration: write seconds (3600) or a form like 24h, 30m, 1h30m")
        seconds = sum(float(n) * _UNITS[u] for n, u in _PART.findall(raw))
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{text!r} is not a positive duration")
    return seconds


def describe_duration(seconds: float) -> str:
    """3h, 1h 30m, 45m, 90s, 2d 4h: the largest two units that are not zero."""
    total = int(round(seconds))
    if total < 60:
        return f"{total}s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        n, total = divmod(total, size)
        if n:
            parts.append(f"{n}{unit}")
    return " ".join(parts[:2])
