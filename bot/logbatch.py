"""Batching a run's new log lines into thread messages: few messages, errors at once and never dropped.

Pure: no clock, no I/O. The caller feeds lines with the current time and posts what comes back, in order; it also
calls `flush(now)` on a tick (every second or so) so that quiet periods still deliver what is pending.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# Slack: a section's text holds at most 3,000 characters; each message here is one section, far below 50 blocks.
SECTION_LIMIT = 3000
FENCE = "```"

TRACEBACK_RE = re.compile(r"Traceback \(most recent call last\):")
ERROR_RE = re.compile(
    r"Traceback \(most recent call last\)"
    r"|\b(?:ERROR|CRITICAL|FATAL|PANIC)\b"
    r"|^\s*(?:error|fatal|Error|Fatal)\s*[:\]]"
    r"|\b(?:[A-Z][A-Za-z0-9_]*)?(?:Error|Exception)\b:"
    r"|\bKeyboardInterrupt\b"
    r"|out of memory|\bOOM\b|\bKilled\b|Segmentation fault|core dumped"
    r"|During handling of the above exception|The above exception was the direct cause"
)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_PARTIAL_ENTITY = re.compile(r"&[a-z]*$")


def is_error_line(line: str) -> bool:
    """A line worth sending at once: a log record at ERROR or worse, an exception, a traceback, an OOM kill."""
    return bool(ERROR_RE.search(line))


def omitted_marker(n: int) -> str:
    return f"... {n} line{'s' if n != 1 else ''} omitted"


def clean_line(raw: str, max_chars: int, redact: Callable[[str], str] | None = None) -> str:
    """One log line as it appears in a message: redacted, terminal codes dropped, escaped for mrkdwn, cut short.

    Redaction comes before cutting, so that a cut never leaves half a secret that no longer looks like one.
    """
    line = raw.rstrip("\r\n")
    if "\r" in line:  # a progress bar redraws its line; the terminal shows the last state
        line = line.rsplit("\r", 1)[-1]
    line = _ANSI.sub("", line)
    if redact is not None:
        line = redact(line)
    # Slack's three control characters, and a fence that would end the code block early.
    line = line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    line = line.replace(FENCE, "`\u200b`\u200b`")
    if len(line) > max_chars:
        line = _PARTIAL_ENTITY.sub("", line[: max_chars - 1]) + "…"
    return line


@dataclass(frozen=True)
class _Line:
    text: str
    error: bool
    block: int  # lines of one traceback share a block id; -1 for a line on its own


@dataclass(frozen=True)
class _Gap:
    n: int  # lines dropped while pending (more arrived than could ever be shown)


class LogBatcher:
    """Turns a run's log lines into mrkdwn code-block messages (already escaped: send them as they are).

    - at most one message every `interval_s` for ordinary lines; lines with errors go out at once;
    - a traceback is held until it ends (at most `error_grace_s`) so that it goes out whole;
    - a message holds at most `max_lines` lines and `max_chars` characters, fences included; lines are cut at
      `max_line_chars`; what is left out is counted in "... N lines omitted" lines, where it was left out;
    - error lines are never left out: when they do not fit one message, they fill several.
    """

    def __init__(self, interval_s: float = 20.0, max_lines: int = 40, *, max_line_chars: int = 300,
                 max_chars: int = SECTION_LIMIT, error_grace_s: float = 2.0, context_lines: int = 3,
                 redact: Callable[[str], str] | None = None, is_error: Callable[[str], bool] = is_error_line):
        if max_lines < 2:
            raise ValueError("max_lines must be at least 2 (a line and an omitted-lines note)")
        if not 20 <= max_line_chars <= max_chars - 2 * len(FENCE) - 2 - 40:
            raise ValueError(f"max_line_chars must be between 20 and {max_chars - 2 * len(FENCE) - 42}, "
                             "so that a line and an omitted-lines note fit one message")
        self.interval_s = interval_s
        self.max_lines = max_lines
        self.max_line_chars = max_line_chars
        self.max_chars = max_chars
        self.error_grace_s = error_grace_s
        self.context_lines = context_lines
        self._redact = redact
        self._is_error = is_error
        self._pending: list[_Line | _Gap] = []
        self._normal_pending = 0
        self._last_sent: float | None = None
        self._tb_open = False
        self._tb_started = 0.0
        self._tb_lines = 0
        self._blocks = 0
        self._after_error = 0  # ordinary lines still to keep as the context after an error
        # Ordinary lines kept while pending: more than any message shows, so that the newest and the context of
        # errors are at hand; older ones are only counted.
        self._keep_normal = 4 * max_lines + 8 * context_lines

    @property
    def pending(self) -> int:
        """Lines waiting (dropped ones included)."""
        return sum(e.n if isinstance(e, _Gap) else 1 for e in self._pending)

    @property
    def has_errors(self) -> bool:
        """Whether error lines are waiting (a traceback still arriving, say): the next message is an urgent one."""
        return any(isinstance(e, _Line) and e.error for e in self._pending)

    def due(self, now: float, lines: bool = False, errors: bool = False) -> bool:
        """Whether a flush at `now`, after feeding more lines (`lines`; with errors among them, `errors`), would send
        a message: so that a caller waits for a posting turn only when it will have something to post. (A traceback
        still arriving is held back by `flush`; this counts it as due all the same.)"""
        if errors or self.has_errors:
            return True
        if not (lines or any(isinstance(e, _Line) for e in self._pending)):
            return False
        return self._last_sent is None or now - self._last_sent >= self.interval_s

    def any_error(self, lines: Iterable[str]) -> bool:
        """Whether these lines, once fed, would make an error message: so a caller can tell urgent lines early."""
        return any(TRACEBACK_RE.search(part) or self._is_error(part)
                   for raw in lines for part in raw.rstrip("\r\n").split("\n"))

    def feed(self, lines: Iterable[str], now: float) -> list[str]:
        """Add new log lines; returns the messages to send now (often none)."""
        for raw in lines:
            for part in raw.rstrip("\r\n").split("\n"):
                self._add(part, now)
        self._compact()
        return self.flush(now)

    def flush(self, now: float, force: bool = False) -> list[str]:
        """The messages due at `now`; with `force` (the run ended) everything pending, whatever the time."""
        send, hold = self._pending, []
        if not force and self._tb_open and now - self._tb_started < self.error_grace_s:
            # A traceback is still arriving: hold it (to send it whole), but not what came before it.
            start = next((i for i, e in enumerate(self._pending) if isinstance(e, _Line) and e.block == self._blocks),
                         len(self._pending))
            send, hold = self._pending[:start], self._pending[start:]
        if not any(isinstance(e, _Line) for e in send):
            return []
        if not force:
            has_error = any(isinstance(e, _Line) and e.error for e in send)
            interval_over = self._last_sent is None or now - self._last_sent >= self.interval_s
            if not (has_error or interval_over):
                return []
        messages = self._render(send)
        self._pending = hold
        self._normal_pending = sum(1 for e in hold if isinstance(e, _Line) and not e.error)
        self._last_sent = now if self._last_sent is None else max(now, self._last_sent)
        return messages

    # -- reading lines ---------------------------------------------------------------------------------------

    def _add(self, raw: str, now: float) -> None:
        raw = raw.rstrip("\r\n")
        text = clean_line(raw, self.max_line_chars, self._redact)
        if TRACEBACK_RE.search(raw):
            self._blocks += 1
            self._tb_open, self._tb_started, self._tb_lines = True, now, 0
            error, block = True, self._blocks
        elif self._tb_open:
            error, block = True, self._blocks
            self._tb_lines += 1
            # The frames are indented; the first line that is not ends the traceback (the exception itself).
            continues = raw[:1].isspace() or raw.strip() == ""
            if not continues or self._tb_lines >= 1000:
                self._tb_open = False
        else:
            error, block = self._is_error(raw), -1
        if error:
            self._after_error = self.context_lines
        else:
            self._normal_pending += 1
        self._pending.append(_Line(text, error, block))

    def _compact(self) -> None:
        """Count, rather than keep, old ordinary lines once far more are pending than a message can show."""
        if self._normal_pending <= 2 * self._keep_normal:
            return
        protected = self._protected(self._pending)
        keep_from = self._normal_pending - self._keep_normal  # ordinal of the first ordinary line kept as is
        out: list[_Line | _Gap] = []
        ordinal = 0
        for i, e in enumerate(self._pending):
            if isinstance(e, _Line) and not e.error:
                ordinal += 1
                if ordinal <= keep_from and i not in protected:
                    e = _Gap(1)
            if isinstance(e, _Gap) and out and isinstance(out[-1], _Gap):
                out[-1] = _Gap(out[-1].n + e.n)
            else:
                out.append(e)
        self._pending = out
        self._normal_pending = sum(1 for e in out if isinstance(e, _Line) and not e.error)

    def _protected(self, entries: list[_Line | _Gap]) -> set[int]:
        """Indices of ordinary lines next to an error (the context worth showing with it)."""
        near: set[int] = set()
        for i, e in enumerate(entries):
            if isinstance(e, _Line) and e.error:
                for j in range(max(0, i - self.context_lines), min(len(entries), i + self.context_lines + 1)):
                    if isinstance(entries[j], _Line) and not entries[j].error:
                        near.add(j)
        return near

    # -- building messages -----------------------------------------------------------------------------------

    def _layout(self, entries: list[_Line | _Gap], kept: set[int]) -> list[tuple[str, int | None]]:
        """The lines of the kept entries in order, with an omitted-lines note for each run left out."""
        items: list[tuple[str, int | None]] = []
        skipped = 0
        for i, e in enumerate(entries):
            if i in kept:
                if skipped:
                    items.append((omitted_marker(skipped), None))
                    skipped = 0
                items.append((e.text, e.block))
            else:
                skipped += e.n if isinstance(e, _Gap) else 1
        if skipped:
            items.append((omitted_marker(skipped), None))
        return items

    def _fits(self, items: list[tuple[str, int | None]]) -> bool:
        return len(items) <= self.max_lines and self._size(items) <= self.max_chars

    @staticmethod
    def _size(items: list[tuple[str, int | None]]) -> int:
        # "```\n" + lines joined by "\n" + "\n```"
        return 2 * len(FENCE) + 2 + sum(len(t) for t, _ in items) + max(0, len(items) - 1)

    @staticmethod
    def _message(items: list[tuple[str, int | None]]) -> str:
        return FENCE + "\n" + "\n".join(t for t, _ in items) + "\n" + FENCE

    def _render(self, entries: list[_Line | _Gap]) -> list[str]:
        kept = {i for i, e in enumerate(entries) if isinstance(e, _Line) and e.error}
        items = self._layout(entries, kept)
        if not self._fits(items):
            return self._split(items)
        # Room left: add ordinary lines, those next to errors first, then the newest.
        near = self._protected(entries)
        normal = [i for i, e in enumerate(entries) if isinstance(e, _Line) and not e.error]
        order = sorted(normal, key=lambda i: (i not in near, -i))
        for i in order:
            trial = self._layout(entries, kept | {i})
            if not self._fits(trial):
                break
            kept.add(i)
            items = trial
        return [self._message(items)]

    def _split(self, items: list[tuple[str, int | None]]) -> list[str]:
        """Several messages for more error lines than one holds; a traceback starts a fresh message if that
        keeps it whole."""
        blocks: list[list[tuple[str, int | None]]] = []
        for item in items:
            if blocks and item[1] is not None and item[1] >= 0 and blocks[-1][-1][1] == item[1]:
                blocks[-1].append(item)
            else:
                blocks.append([item])
        messages: list[list[tuple[str, int | None]]] = [[]]
        for block in blocks:
            current = messages[-1]
            if current and not self._fits(current + block) and self._fits(block):
                messages.append([])
            for item in block:
                if messages[-1] and not self._fits(messages[-1] + [item]):
                    messages.append([])
                messages[-1].append(item)
        return [self._message(m) for m in messages if m]
