"""The notifier: renders run events from jobs/ into Slack: the run card in the channel, and the run's story in its
thread (log excerpts, the completion with its loss curve, failures, timeouts, deploy requests and their results).

Events come from the one stream through `bot.stream` (one consumer per process; each run's events reach the one
process that owns the run, in order). Each run has a lane here: its events are handled one after another, while
lanes of other runs go on meanwhile, so a channel waiting on its posting budget holds up nobody else. An event is
acked once Slack accepted what it caused; log lines held by a run's LogBatcher keep their events pending until they
are posted, so a bot that dies mid-way gets them again. Progress edits of a card are throttled per run. Error lines
and a run's results go ahead of ordinary excerpts and progress edits, in the channel and in the lane (see `lanes`).

`Notifier` is put together from three parts: `lanes` (when: per-run lanes, acks, the card throttle, the stream
consumer's lifecycle), `render` (what: an event as the Slack calls to make) and `post` (how: the calls themselves).
"""

from __future__ import annotations

import asyncio
import time

from bot import threads
from bot.notifier.lanes import (
    LOG_INTERVAL_S,
    MAX_INFLIGHT,
    PROGRESS_INTERVAL_S,
    Lanes,
    Transient,
    _Lane,
    _Throttle,
)
from bot.notifier.post import Poster
from bot.notifier.render import Renderer
from bot.slack import SlackGateway
from bot.stream import GROUP, EventStream
from jobs.core import store
from jobs.core.settings import JobSettings

__all__ = ["GROUP", "Notifier", "Transient"]


class Notifier(Lanes, Renderer, Poster):
    """One process's notifier: `start()` it in the bot's event loop and `stop()` it on the way out; `step()` does
    one round by hand (tests, tools). All its state is set here; the three parts share it through `self`."""

    def __init__(self, settings: JobSettings, gateway: SlackGateway, *, consumer: str | None = None,
                 progress_interval_s: float = PROGRESS_INTERVAL_S, log_interval_s: float = LOG_INTERVAL_S,
                 block_ms: int = 1000, clock=time.monotonic, tick_s: float = 1.0, max_inflight: int = MAX_INFLIGHT):
        self.settings = settings
        self.threads = threads.Threads(settings)
        self.gateway = gateway
        self.stream = EventStream(store.connect(settings), consumer)
        self.consumer = self.stream.name
        self.block_ms = block_ms
        self.clock = clock
        self.tick_s = tick_s
        self.max_inflight = max_inflight
        self.log_interval_s = log_interval_s
        self.throttle = _Throttle(progress_interval_s)
        self.lanes: dict[str, _Lane] = {}
        self._inflight: set[str] = set()
        self._unacked: list[str] = []
        self._idle: list[str] = []  # runs whose lanes were dropped: this process lets go of them
        self._shown: dict[str, str] = {}  # run id / approval id -> the message last sent to Slack
        self._stop = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task | None = None
