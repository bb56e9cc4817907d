"""Reading the run event stream from one or more bot processes, so that each run's events are rendered by one process,
in stream order, and none is lost when a process dies.

Every process is a member of one consumer group under a name of its own and keeps a heartbeat key alive. A run is
owned by the process that first received one of its events; entries of the run that reach another process are handed
to the owner (XCLAIM) in the same Lua script that read them, so the owner's pending list holds the run's entries in
order. A process whose heartbeat lapsed is dead: a live one claims its pending entries and its runs, again in one
script. (XAUTOCLAIM by idle time would also take entries a live owner holds on purpose, such as log lines it is
batching, so the takeover goes by heartbeat and by consumer instead.)
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid

import redis

from jobs.core import store
from jobs.core.domain import RunEvent

log = logging.getLogger(__name__)

GROUP = "tuneops-bot"
OWNERS = f"{store.PREFIX}:notifier:owners"            # hash: run id -> the consumer that renders its events
ALIVE = store.PREFIX + ":notifier:alive:{}"           # a consumer's heartbeat
ALIVE_TTL_MS = 30_000
REAP_EVERY_S = 5.0
SCAN_COUNT = 500

# KEYS: stream, owners. ARGV: group, me, count. Returns {last id of the stream, entries kept by me}.
_DELIVER = """
local res = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS', KEYS[1], '>')
local mine = {}
if res then
  for _, e in ipairs(res[1][2]) do
    local f = e[2]
    local run = nil
    for i = 1, #f, 2 do
      if f[i] == 'run_id' then run = f[i + 1] break end
    end
    local owner = ARGV[2]
    if run then
      owner = redis.call('HGET', KEYS[2], run)
      if not owner then
        redis.call('HSET', KEYS[2], run, ARGV[2])
        owner = ARGV[2]
      end
    end
    if owner == ARGV[2] then
      table.insert(mine, e)
    else
      redis.call('XCLAIM', KEYS[1], ARGV[1], owner, 0, e[1], 'JUSTID')
    end
  end
end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local last_id = '0-0'
if #last > 0 then last_id = last[1][1] end
return {last_id, mine}
"""

# KEYS: stream, owners, the dead consumer's heartbeat. ARGV: group, me, dead. Returns entries taken over (-1: alive).
_TAKE_OVER = """
if redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
local moved = 0
for _ = 1, 10000 do
  local pend = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 500, ARGV[3])
  if #pend == 0 then break end
  local args = {KEYS[1], ARGV[1], ARGV[2], 0}
  for _, p in ipairs(pend) do table.insert(args, p[1]) end
  table.insert(args, 'JUSTID')
  local claimed = {}
  for _, id in ipairs(redis.call('XCLAIM', unpack(args))) do claimed[id] = true end
  for _, p in ipairs(pend) do
    if not claimed[p[1]] then redis.call('XACK', KEYS[1], ARGV[1], p[1]) end  -- trimmed from the stream
  end
  moved = moved + #pend
end
local owners = redis.call('HGETALL', KEYS[2])
for i = 1, #owners, 2 do
  if owners[i + 1] == ARGV[3] then redis.call('HSET', KEYS[2], owners[i], ARGV[2]) end
end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[3])
return moved
"""


# KEYS: stream, owners. ARGV: group, me, run ids. Lets go of the runs none of whose entries this consumer still holds
# (checked in the same script, so no entry can be handed to it meanwhile); returns how many it let go.
_RELEASE = """
local mine = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1000, ARGV[2])
if #mine >= 1000 then return 0 end
local busy = {}
for _, p in ipairs(mine) do
  local e = redis.call('XRANGE', KEYS[1], p[1], p[1])
  if #e > 0 then
    local f = e[1][2]
    for i = 1, #f, 2 do
      if f[i] == 'run_id' then busy[f[i + 1]] = true break end
    end
  end
end
local released = 0
for i = 3, #ARGV do
  if not busy[ARGV[i]] and redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[2] then
    redis.call('HDEL', KEYS[2], ARGV[i])
    released = released + 1
  end
end
return released
"""


def consumer_name() -> str:
    """Unique per process, and says where it runs (for XINFO and logs)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class EventStream:
    """This process's view of the event stream. Synchronous (quick Redis calls); the notifier runs it in a thread."""

    def __init__(self, conn: redis.Redis, consumer: str | None = None, group: str = GROUP):
        self.conn = conn
        self.name = consumer or consumer_name()
        self.group = group
        self._deliver = conn.register_script(_DELIVER)
        self._take_over = conn.register_script(_TAKE_OVER)
        self._release = conn.register_script(_RELEASE)
        self._ready = False
        self._last_reap = 0.0

    def _ensure_group(self) -> None:
        if self._ready:
            return
        try:
            self.conn.xgroup_create(store.EVENT_STREAM, self.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._ready = True

    def heartbeat(self) -> None:
        self.conn.set(ALIVE.format(self.name), str(time.time()), px=ALIVE_TTL_MS)

    def leave(self) -> None:
        """Stop heartbeating at once, so that another process takes over what is left without waiting."""
        self.conn.delete(ALIVE.format(self.name))

    def reap(self) -> dict[str, int]:
        """Take over the pending entries and the runs of every consumer whose heartbeat lapsed."""
        self._ensure_group()
        taken: dict[str, int] = {}
        for info in self.conn.xinfo_consumers(store.EVENT_STREAM, self.group):
            name = info["name"]
            if name == self.name or self.conn.exists(ALIVE.format(name)):
                continue
            moved = int(self._take_over(keys=[store.EVENT_STREAM, OWNERS, ALIVE.format(name)],
                                        args=[self.group, self.name, name]))
            if moved >= 0:
                taken[name] = moved
                log.warning("took over %d event(s) and the runs of %s, which stopped", moved, name)
        return taken

    def read(self, count: int, inflight: set[str], block_ms: int = 1000) -> list[tuple[str, RunEvent]]:
        """Entries for this process that it does not hold yet, oldest first: new ones it owns, and ones handed to it
        by other processes or taken over from dead ones. Waits up to `block_ms` when there are none.

        A Redis that came back empty has no group any more (NOGROUP): the group is made again from the stream's
        start, so that what the workers append after finding their runs again (jobs/core/snapshots) is read."""
        try:
            return self._read(count, inflight, block_ms)
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            log.warning("the event stream's consumer group is gone (Redis lost its data?); making it again")
            self._ready = False
            return self._read(count, inflight, block_ms)

    def _read(self, count: int, inflight: set[str], block_ms: int) -> list[tuple[str, RunEvent]]:
        self._ensure_group()
        self.heartbeat()
        if time.monotonic() - self._last_reap >= REAP_EVERY_S:
            self._last_reap = time.monotonic()
            self.reap()
        for attempt in range(2):
            last_id, mine = self._deliver(keys=[store.EVENT_STREAM, OWNERS], args=[self.group, self.name, count])
            entries = {entry_id: fields for entry_id, fields in mine}
            # Entries handed to this process since its last read may be older than the ones just delivered to it;
            # reading its pending list after the delivery and sorting keeps each run's order.
            pending = self._pending_count()
            if pending > len(inflight) + len(entries):
                for entry_id, fields in self._scan_pending():
                    if entry_id not in inflight and entry_id not in entries:
                        entries[entry_id] = fields
            if entries or attempt or not block_ms:
                break
            self.conn.xread({store.EVENT_STREAM: last_id}, count=1, block=block_ms)
        out: list[tuple[str, RunEvent]] = []
        for entry_id in sorted(entries, key=_id_key):
            fields = _as_dict(entries[entry_id])
            try:
                out.append((entry_id, store.parse_entry(fields)))  # the store's own reading of an entry
            except (KeyError, ValueError, TypeError) as e:
                log.warning("skipping malformed or trimmed event stream entry %s: %s", entry_id, e)
                self.ack([entry_id])
        return out

    def _pending_count(self) -> int:
        summary = self.conn.xpending(store.EVENT_STREAM, self.group)
        for c in summary.get("consumers") or []:
            if c.get("name") == self.name:
                return int(c.get("pending") or 0)
        return 0

    def _scan_pending(self):
        cursor = "0"
        while True:
            reply = self.conn.xreadgroup(self.group, self.name, {store.EVENT_STREAM: cursor}, count=SCAN_COUNT)
            batch = reply[0][1] if reply else []
            if not batch:
                return
            yield from batch
            cursor = batch[-1][0]

    def ack(self, entry_ids: list[str]) -> None:
        if entry_ids:
            self.conn.xack(store.EVENT_STREAM, self.group, *entry_ids)

    def release(self, run_ids: list[str]) -> int:
        """Stop owning runs this process has nothing left of (idle lanes), so that the owners hash stays small."""
        if not run_ids:
            return 0
        return int(self._release(keys=[store.EVENT_STREAM, OWNERS], args=[self.group, self.name, *run_ids]))

    def owner_of(self, run_id: str) -> str | None:
        return self.conn.hget(OWNERS, run_id)


def _as_dict(fields) -> dict[str, str]:
    """A stream entry's fields, as redis-py gives them (a dict) or as a script returns them (a flat list)."""
    if isinstance(fields, dict):
        return fields
    if not fields:
        return {}
    return {fields[i]: fields[i + 1] for i in range(0, len(fields) - 1, 2)}
