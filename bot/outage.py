"""One log line when Redis goes away and one when it is back, however many requests and commands notice in between.

The middleware, the listeners and /healthz report what they saw (`REDIS.failed(...)`, `REDIS.ok()`); each failure
after the first is logged at debug level only, and the line that says Redis is back tells how many calls failed.
"""

from __future__ import annotations

import logging
import time

import redis

log = logging.getLogger("bot.outage")

# A store error that means Redis is gone (refused, reset) or hangs (the client's socket timeout ran out); any other
# RedisError (a wrong type, out of memory) is an answer, and says nothing about reachability.
UNREACHABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class Outage:
    """Whether a dependency is down, as the calls of this process last found it."""

    def __init__(self, what: str, logger: logging.Logger = log, clock=time.monotonic):
        self.what = what
        self.log = logger
        self.clock = clock
        self.down_since: float | None = None
        self.failures = 0

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def failed(self, error: BaseException, doing: str) -> None:
        """A call failed because the dependency is unreachable: a warning the first time, debug after."""
        self.failures += 1
        if self.down_since is None:
            self.down_since = self.clock()
            self.log.warning("%s is unreachable (%s: %s) while %s; until it is back, commands that need it are "
                             "answered that the store is unreachable", self.what, type(error).__name__, error, doing)
        else:
            self.log.debug("%s still unreachable (%s) while %s", self.what, type(error).__name__, doing)

    def ok(self) -> None:
        """A call succeeded: the one line that says it is back, when it was down. Cheap when it was not."""
        if self.down_since is None:
            return
        self.log.info("%s is reachable again after %.1f s (%d calls failed meanwhile)", self.what,
                      self.clock() - self.down_since, self.failures)
        self.down_since, self.failures = None, 0


REDIS = Outage("Redis")
