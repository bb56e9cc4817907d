"""Where the bot posted things in Slack: bot-owned records of message coordinates, keyed by run, deploy request and
operation id. jobs/ records nothing of Slack; the notifier writes these when it posts a card or an op's root message,
and reads them to post into the thread or edit the card. A ts never changes once set, so reads are cached.
"""

from __future__ import annotations

import threading

from jobs.core import store
from jobs.core.settings import JobSettings

KEY = "tuneops:slack:{kind}:{id}"
RUN_CARD = "run"            # the run's card, whose thread tells the run's story
APPROVAL_CARD = "approval"  # a deploy request's card, in its run's thread
OP_ROOT = "op"              # an operation's root message, whose thread reports its steps


class Threads:
    def __init__(self, settings: JobSettings):
        self.settings = settings
        self._known: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def get(self, kind: str, key: str) -> str:
        """The ts of the message posted for (kind, key); "" when none was posted yet."""
        with self._lock:
            ts = self._known.get((kind, key))
        if ts:
            return ts
        ts = store.connect(self.settings).get(KEY.format(kind=kind, id=key)) or ""
        if ts:
            with self._lock:
                self._known[(kind, key)] = ts
        return ts

    def set(self, kind: str, key: str, ts: str) -> None:
        store.connect(self.settings).set(KEY.format(kind=kind, id=key), ts)
        with self._lock:
            self._known[(kind, key)] = ts
