"""What a request asks of the sampler: its sampling parameters and its stop sequences, found in text that arrives
in pieces. A module of its own, below both the engine and the batching scheduler, which use it."""

from __future__ import annotations

from dataclasses import dataclass


class StopScanner:
    """Finds stop sequences in text that arrives in pieces, holding back a tail that may be the start of one."""

    def __init__(self, stops: list[str] | tuple[str, ...]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Return (text that is safe to send, whether a stop sequence was met)."""
        self.pending += piece
        return self._scan(final=False)

    def flush(self) -> tuple[str, bool]:
        """At the end of the text: what is left to send, and whether it held a stop sequence after all."""
        return self._scan(final=True)

    def _scan(self, final: bool) -> tuple[str, bool]:
        # The stop that starts first in the whole text wins. A stop found in what is pending may still lose to a
        # longer one that starts earlier and is not complete yet (stops "|" and "<|<", pending "<|"): until the text
        # says, everything from that earlier start is held back.
        text = self.pending
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        first = min(hits) if hits else len(text)
        if not final:
            for i in range(first):
                if any(len(s) > len(text) - i and s.startswith(text[i:]) for s in self.stops):
                    out, self.pending = text[:i], text[i:]
                    return out, False
        self.pending = ""
        return text[:first], bool(hits)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: as many as DEFAULT_MAX_TOKENS and the context allow
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks)
