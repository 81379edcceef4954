# -*- test-case-name: tests.test_engineio -*-
"""The learned ``sid → server`` table of one proxy process, without clocks.

Each engine.io session learned from a handshake
(:class:`stickyproxy.engineio.HandshakeParser`) is remembered here until it
has been idle for as long as its own server would keep it: the ping interval
plus the ping timeout from that handshake. A live polling session sends a
request at least once per ping interval, so an entry idle for longer belongs
to a session its server has already closed.

Memory is bounded twice: idle entries expire, and a full table evicts the
entry idle for longest. Both are O(1) per entry. Entries live in two ordered
dicts at once:

* ``_lru``, every entry ordered by when it was last seen: its front is the
  next to evict;
* ``_by_ttl``, one ordered dict per distinct lifetime, also by last seen:
  in each, the front expires first, so expiry pops fronts and stops at the
  first live entry. Sessions served by one cluster share their ping settings,
  so there are very few of these.

Every method takes ``now`` in seconds from the caller's monotonic clock
(the reactor's); time never runs backwards between calls.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Final

__all__ = ["SidTable"]

#: How many expired entries each :meth:`SidTable.learn` sweeps on its way, so
#: that a stream of abandoned handshakes cleans up after itself.
_LEARN_SWEEP: Final = 4


class _Entry:
    __slots__ = ("last_seen", "server", "synced", "ttl")

    def __init__(self, server: str, ttl: float, last_seen: float) -> None:
        self.server = server
        self.ttl = ttl
        self.last_seen = last_seen
        # When the entry's lifetime was last extended in a shared store.
        self.synced = last_seen


class SidTable:
    """Remembers which server holds each engine.io session.

    :param max_entries: the most sessions remembered; when full, the one idle
        for longest is forgotten first.
    :param min_ttl: the shortest idle lifetime, in seconds, whatever the
        handshake says (guards against a zero or tiny ping setting).
    :param max_ttl: the longest idle lifetime, in seconds (guards against a
        huge ping setting keeping entries forever).
    """

    __slots__ = ("_by_ttl", "_lru", "evicted", "expired", "max_entries", "max_ttl", "min_ttl")

    def __init__(
        self, max_entries: int = 100_000, *, min_ttl: float = 10.0, max_ttl: float = 3600.0
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if not 0 < min_ttl <= max_ttl:
            raise ValueError("need 0 < min_ttl <= max_ttl")
        self.max_entries = max_entries
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self._lru: OrderedDict[str, _Entry] = OrderedDict()
        self._by_ttl: dict[float, OrderedDict[str, _Entry]] = {}
        #: Entries dropped because the table was full.
        self.evicted = 0
        #: Entries dropped because they were idle too long.
        self.expired = 0

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, sid: object) -> bool:
        return sid in self._lru

    def ttl_for(self, ping_interval: int, ping_timeout: int) -> float:
        """The idle lifetime, in seconds, of a session with these settings (in ms).

        Rounded up to whole seconds, which also keeps the number of distinct
        lifetimes, and so of expiry queues, small.
        """
        ttl = float(math.ceil((ping_interval + ping_timeout) / 1000))
        return min(max(ttl, self.min_ttl), self.max_ttl)

    def learn(
        self, sid: str, server: str, ping_interval: int, ping_timeout: int, now: float
    ) -> None:
        """Remember that ``server`` holds session ``sid``.

        :param ping_interval: the handshake's ``pingInterval``, in milliseconds.
        :param ping_timeout: the handshake's ``pingTimeout``, in milliseconds.
        :param now: the current time, in seconds.
        """
        self._remove(sid)
        entry = _Entry(server, self.ttl_for(ping_interval, ping_timeout), now)
        self._lru[sid] = entry
        queue = self._by_ttl.get(entry.ttl)
        if queue is None:
            queue = self._by_ttl[entry.ttl] = OrderedDict()
        queue[sid] = entry
        while len(self._lru) > self.max_entries:
            oldest = next(iter(self._lru))
            self._remove(oldest)
            self.evicted += 1
        self.expire(now, limit=_LEARN_SWEEP)

    def lookup(self, sid: str, now: float) -> str | None:
        """The server holding ``sid``, or None; a hit counts as traffic.

        An entry idle for its whole lifetime is dropped instead of returned.
        """
        entry = self._lru.get(sid)
        if entry is None:
            return None
        if now - entry.last_seen >= entry.ttl:
            self._remove(sid)
            self.expired += 1
            return None
        self._refresh(sid, entry, now)
        return entry.server

    def touch(self, sid: str, now: float) -> bool:
        """Count traffic for ``sid`` without routing, e.g. when a long poll ends.

        :returns: whether the session is (still) known.
        """
        return self.lookup(sid, now) is not None

    def forget(self, sid: str) -> bool:
        """Drop ``sid``, e.g. after its own server said it does not know it.

        :returns: whether it was known.
        """
        return self._remove(sid)

    def servers(self) -> set[str]:
        """The servers that hold at least one known session. O(entries)."""
        return {entry.server for entry in self._lru.values()}

    def sync_due(self, sid: str, now: float) -> float | None:
        """Whether a shared copy of ``sid``'s entry should be extended now.

        Polls keep the local entry alive; a copy elsewhere (a shared store
        with its own expiry) needs extending too, but not on every poll:
        once per third of the lifetime is enough to keep it from expiring.

        :returns: the lifetime to set, or None when no extension is due.
        """
        entry = self._lru.get(sid)
        if entry is None or now - entry.synced < entry.ttl / 3:
            return None
        entry.synced = now
        return entry.ttl

    def forget_server(self, server: str) -> int:
        """Drop every session of ``server`` (a server removed from the pool).

        O(entries): meant for reconfiguration, not for the request path.

        :returns: how many were dropped.
        """
        gone = [sid for sid, entry in self._lru.items() if entry.server == server]
        for sid in gone:
            self._remove(sid)
        return len(gone)

    def expire(self, now: float, limit: int | None = None) -> int:
        """Drop entries idle for their whole lifetime.

        Cheap when there is nothing to do: it looks at the front of each
        expiry queue only. Call it from a periodic timer.

        :param limit: the most entries dropped by this call, to bound the
            work done at once; None drops all that are due.
        :returns: how many were dropped.
        """
        dropped = 0
        for ttl, queue in list(self._by_ttl.items()):
            while queue and (limit is None or dropped < limit):
                sid, entry = next(iter(queue.items()))
                if now - entry.last_seen < ttl:
                    break
                del queue[sid]
                del self._lru[sid]
                dropped += 1
            if not queue:
                del self._by_ttl[ttl]
        self.expired += dropped
        return dropped

    def _refresh(self, sid: str, entry: _Entry, now: float) -> None:
        entry.last_seen = now
        self._lru.move_to_end(sid)
        self._by_ttl[entry.ttl].move_to_end(sid)

    def _remove(self, sid: str) -> bool:
        entry = self._lru.pop(sid, None)
        if entry is None:
            return False
        queue = self._by_ttl[entry.ttl]
        del queue[sid]
        if not queue:
            del self._by_ttl[entry.ttl]
        return True
