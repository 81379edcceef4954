"""Consistent hashing of clients onto servers, keyed by server name and weight.

Two rings share one small interface (:class:`Ring`):

* :class:`HashRing`, the default, is a table of :data:`SLOTS` slots. A key
  hashes to a slot; each slot has an owner, and a per-slot weighted rendezvous
  order of the other servers to fall back on when the owner cannot take the
  client. The table depends only on the servers' names and weights, so every
  process on every machine given the same configuration builds the same table,
  whatever order the servers are listed in.
* :class:`HAProxyRing` reproduces HAProxy 2.6's ``balance source`` with
  ``hash-type consistent``, so that clients without a cookie stay on the same
  servers when traffic is cut over from HAProxy.

Keys are bytes. :func:`address_key` turns a client address into its packed
form (4 or 16 bytes); :func:`text_key` turns any other hash input (a header or
query value) into a key that can never equal an address key, because it is
always longer than 16 bytes.

How the default table is built, and why:

1. *Quotas.* Slots are shared out in exact proportion to weight (largest
   remainder), so no server starts with more than one slot above its share.
2. *Owners.* Each slot goes to the winner of a weighted rendezvous between
   the servers. A server's score for a slot is the position at which the slot
   first appears in a pseudo-random stream seeded by the server's name,
   divided by its weight. The score of a (server, slot) pair does not depend
   on the other servers, so adding or removing a server only changes the
   slots that server wins or owned. Streams are read in bulk, which keeps the
   build linear in the number of slots rather than slots times servers.
3. *Balance.* Rendezvous alone leaves binomial noise (about 1/sqrt(slots per
   server)), far too lumpy with many servers. Servers more than 1 % above
   quota give up the slots they won by the smallest margin, each to the
   server with the closest score that is still below its quota; then servers
   more than 3 % below quota take slots the same way from servers above it.
   Moving the cheapest slots first keeps most of the assignment unchanged
   when the configuration changes.

When a slot's owner is ineligible (down, draining, full, excluded) the slot's
clients go to the eligible server with the best weighted rendezvous score
(``ln(u) / weight``, Highest Random Weight) for that slot. That moves exactly
the unavailable server's clients, spreads them in proportion to weight, and
returns them exactly when the owner is eligible again.
"""

from __future__ import annotations

import bisect
import hashlib
import ipaddress
import itertools
import math
import sys
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "SLOTS",
    "HAProxyRing",
    "HashRing",
    "Ring",
    "address_key",
    "full_hash",
    "text_key",
]

#: Number of slots in the default table (16 bits of key hash).
SLOTS = 1 << 16

# A server may hold up to this fraction more than its exact quota of slots.
# Correcting the last percent costs more slot movement on configuration
# changes than it buys in balance: with 1,000,000 clients the sampling noise
# of the clients themselves is already of that order at 200 servers.
_BAND = 0.01
# Servers below quota are only topped up to this fraction under it: a lower
# floor costs more slot movement and does not change the busiest server.
_FLOOR_BAND = 0.03

# Expected number of stream draws per slot read in the first pass; slots no
# server drew yet are resolved by reading further into the streams.
_HORIZON = 5.0
_HORIZON_STEP = 3.0

# How many fallback servers are cached per slot; deeper walks are computed.
_FALLBACK_DEPTH = 8

_TEXT_PREFIX = b"stickyproxy:text:"  # 17 bytes: text keys never look like addresses
_U32 = 0xFFFFFFFF


class Ring(Protocol):
    """What :class:`~stickyproxy.pool.Pool` needs from a consistent hash."""

    def lookup(
        self,
        key: bytes,
        eligible: Callable[[str], bool],
        *,
        skip: Callable[[str], bool] | None = None,
    ) -> str | None:
        """Return the server for ``key`` among those ``eligible`` accepts.

        :param key: from :func:`address_key` or :func:`text_key`.
        :param eligible: whether a server is in the pool of candidates at all
            (HAProxy: whether its points are on the ring).
        :param skip: servers that stay candidates but must be passed over for
            this request (HAProxy's ``avoid`` and bounded-load checks).
        :returns: a server name, or ``None`` if no server qualifies.
        """
        ...

    def sequence(self, key: bytes) -> Iterator[str]:
        """Yield every server once, in ``key``'s deterministic preference order."""
        ...


def address_key(address: str) -> bytes:
    """Return the hash key of a client IP address in text form.

    The key is the packed address: 4 bytes for IPv4, 16 for IPv6. An
    IPv4-mapped IPv6 address (``::ffff:1.2.3.4``) is the same client as
    ``1.2.3.4`` seen through a dual-stack socket, and so gets the 4-byte key.

    :raises ValueError: if ``address`` is not an IP address.
    """
    ip = ipaddress.ip_address(address.strip("[]").split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.packed


def text_key(value: str) -> bytes:
    """Return the hash key for a non-address value (header or query value).

    The fixed prefix makes the key at least 17 bytes long, so it can never be
    mistaken for, or collide with, a packed address.
    """
    return _TEXT_PREFIX + value.encode("utf-8", "surrogateescape")


def _name_digest(name: str) -> bytes:
    return hashlib.blake2b(name.encode("utf-8"), digest_size=16, person=b"sp-ring-name").digest()


def _stream(name: str, length: int) -> array[int]:
    """Return the first ``length`` slot draws of ``name``'s pseudo-random stream."""
    seed = b"stickyproxy ring v1\x00" + name.encode("utf-8")
    draws = array("H", hashlib.shake_128(seed).digest(2 * length))
    if sys.byteorder == "big":  # draws are little-endian on every platform
        draws.byteswap()
    return draws


def _quotas(names: Sequence[str], weights: Mapping[str, int]) -> list[int]:
    """Share :data:`SLOTS` out by weight, largest remainders first (ties by name hash)."""
    total = sum(weights[n] for n in names)
    quotas = [SLOTS * weights[n] // total for n in names]
    left = SLOTS - sum(quotas)
    by_remainder = sorted(range(len(names)), key=lambda i: -(SLOTS * weights[names[i]] % total))
    for i in by_remainder[:left]:
        quotas[i] += 1
    return quotas


def _build_table(names: Sequence[str], weights: Mapping[str, int]) -> list[int]:
    """Assign every slot to an index into ``names`` (see the module docstring)."""
    count = len(names)
    total = sum(weights[n] for n in names)
    quotas = _quotas(names, weights)
    best_time = [math.inf] * SLOTS
    owner = [-1] * SLOTS
    streams: list[array[int]] = []
    # Step 2: a server's k-th draw happens at time (k + phase) / weight, and
    # the first draw of a slot is the server's score for it (later draws of
    # the same slot only score worse, so they need no filtering). The phase,
    # a fraction taken from the name, keeps servers of equal weight from
    # tying on equal draw positions. Only IEEE-exact + * / are used here, so
    # every platform builds the same table.
    phases = [(int.from_bytes(_name_digest(n)[:4], "big") + 0.5) / 2**32 for n in names]
    rates = [1.0 / weights[n] for n in names]
    for i, name in enumerate(names):
        stream = _stream(name, math.ceil(_HORIZON * SLOTS * weights[name] / total))
        streams.append(stream)
        phase, rate = phases[i], rates[i]
        for k, slot in enumerate(stream):
            t = (k + phase) * rate
            if t < best_time[slot]:
                best_time[slot] = t
                owner[slot] = i
    # The rare slots nobody drew yet (about SLOTS * e**-_HORIZON of them):
    # read further into every stream. Only the positions of pending slots
    # reach Python code; the scan itself runs in C.
    horizon = _HORIZON
    pending = {slot for slot in range(SLOTS) if owner[slot] < 0}
    while pending:
        horizon += _HORIZON_STEP
        for i, name in enumerate(names):
            lo = len(streams[i])
            stream = streams[i] = _stream(name, math.ceil(horizon * SLOTS * weights[name] / total))
            phase, rate = phases[i], rates[i]
            for k in itertools.compress(
                itertools.count(lo), map(pending.__contains__, stream[lo:])
            ):
                slot = stream[k]
                t = (k + phase) * rate
                if t < best_time[slot]:
                    best_time[slot] = t
                    owner[slot] = i
        pending = {slot for slot in pending if owner[slot] < 0}
    # Step 3: move the cheapest slots from servers above the band to servers
    # below quota, then from servers above quota to servers below the band.
    held = [0] * count
    for i in owner:
        held[i] += 1
    cap = [int(q * (1 + _BAND)) for q in quotas]
    floor = [math.ceil(q * (1 - _FLOOR_BAND)) for q in quotas]
    moving = _Moving(owner, best_time, streams, phases, rates, held)
    moving.rebalance(give_above=cap, take_below=quotas)
    moving.rebalance(give_above=quotas, take_below=floor)
    return owner


@dataclass(slots=True)
class _Moving:
    """Slot moves that correct the rendezvous assignment towards the quotas."""

    owner: list[int]
    best_time: list[float]
    streams: list[array[int]]
    phases: list[float]
    rates: list[float]
    held: list[int]

    def rebalance(self, give_above: list[int], take_below: list[int]) -> None:
        """Move slots from servers holding more than ``give_above`` to servers below ``take_below``.

        A move's cost is how much worse the receiver's rendezvous score for
        the slot is than the current owner's; the cheapest moves go first,
        considering only close runners-up at first and widening as needed.
        """
        owner, held, best_time = self.owner, self.held, self.best_time
        ratio_limit = 1.5
        while True:
            giving = [h > g for h, g in zip(held, give_above, strict=True)]
            if not any(giving) or all(h >= t for h, t in zip(held, take_below, strict=True)):
                return
            moves: list[tuple[float, int, int]] = []
            for j, stream in enumerate(self.streams):
                if held[j] >= take_below[j]:
                    continue
                phase, rate = self.phases[j], self.rates[j]
                for k, slot in enumerate(stream):
                    if giving[owner[slot]]:
                        cost = (k + phase) * rate / best_time[slot]
                        if cost < ratio_limit:
                            moves.append((cost, slot, j))
            moves.sort()
            for cost, slot, j in moves:
                i = owner[slot]
                if held[i] > give_above[i] and held[j] < take_below[j]:
                    owner[slot] = j
                    best_time[slot] *= cost
                    held[i] -= 1
                    held[j] += 1
            if ratio_limit == math.inf:
                return
            ratio_limit = ratio_limit * 4 if ratio_limit < 100 else math.inf


def _hrw_score(prefix: hashlib.blake2b, slot: bytes, weight: int) -> float:
    u = int.from_bytes(_copy_update(prefix, slot), "big")
    # ln(u) / weight on u in (0, 1]: the larger score wins; weighting the
    # logarithm gives each server a share proportional to its weight.
    return math.log((u + 1) / 2**64) / weight


def _copy_update(prefix: hashlib.blake2b, data: bytes) -> bytes:
    h = prefix.copy()
    h.update(data)
    return h.digest()


class HashRing:
    """The default ring: a weighted slot table with rendezvous fallback.

    :param weights: server name → weight. Servers of weight 0 own no slots and
        are never returned by :meth:`lookup`; they come last in
        :meth:`sequence`.
    """

    def __init__(self, weights: Mapping[str, int]) -> None:
        for name, weight in weights.items():
            if weight < 0:
                raise ValueError(f"negative weight for server {name!r}")
        self._weights = dict(weights)
        by_hash = sorted(self._weights, key=lambda n: (_name_digest(n), n))
        self._names = [n for n in by_hash if self._weights[n] > 0]
        self._idle = [n for n in by_hash if self._weights[n] == 0]
        self._table: list[str] = []
        if self._names:
            self._table = [self._names[i] for i in _build_table(self._names, self._weights)]
        self._prefixes = [
            (
                name,
                self._weights[name],
                hashlib.blake2b(_name_digest(name), digest_size=8, person=b"sp-ring-hrw"),
            )
            for name in self._names
        ]
        self._fallback: dict[int, tuple[str, ...]] = {}

    @staticmethod
    def slot(key: bytes) -> int:
        """Return the slot ``key`` hashes to."""
        return int.from_bytes(hashlib.blake2b(key, digest_size=2, person=b"sp-ring-key").digest())

    def owners(self) -> list[str]:
        """Return the owner of every slot (for measurements and tests)."""
        return list(self._table)

    def lookup(
        self,
        key: bytes,
        eligible: Callable[[str], bool],
        *,
        skip: Callable[[str], bool] | None = None,
    ) -> str | None:
        """See :meth:`Ring.lookup`; ``skip`` acts like ineligibility here."""
        if not self._table:
            return None
        slot = int.from_bytes(hashlib.blake2b(key, digest_size=2, person=b"sp-ring-key").digest())
        owner = self._table[slot]
        if eligible(owner) and (skip is None or not skip(owner)):
            return owner
        for name in self._slot_order(slot):
            if eligible(name) and (skip is None or not skip(name)):
                return name
        return None

    def sequence(self, key: bytes) -> Iterator[str]:
        """Yield the slot's owner, then the others by rendezvous score, then weight-0 servers."""
        if self._table:
            slot = self.slot(key)
            yield self._table[slot]
            yield from self._slot_order(slot)
        yield from self._idle

    def _slot_order(self, slot: int) -> Iterator[str]:
        """Yield the non-owners of ``slot`` by decreasing rendezvous score."""
        cached = self._fallback.get(slot)
        if cached is None:
            order = self._rank(slot)
            cached = self._fallback[slot] = tuple(order[:_FALLBACK_DEPTH])
            yield from cached
            yield from order[_FALLBACK_DEPTH:]
            return
        yield from cached
        if len(cached) == _FALLBACK_DEPTH:
            yield from self._rank(slot)[_FALLBACK_DEPTH:]

    def _rank(self, slot: int) -> list[str]:
        owner = self._table[slot]
        data = slot.to_bytes(2, "big")
        scored = [
            (-_hrw_score(prefix, data, weight), index, name)
            for index, (name, weight, prefix) in enumerate(self._prefixes)
            if name != owner
        ]
        scored.sort()
        return [name for _, _, name in scored]


def full_hash(a: int) -> int:
    """HAProxy's ``full_hash()``: Bob Jenkins' 6-shift integer hash, then times 3221225473.

    Source: ``include/haproxy/intops.h``; all arithmetic is on unsigned 32 bits.
    """
    a &= _U32
    a = ((a + 0x7ED55D16) + (a << 12)) & _U32
    a = ((a ^ 0xC761C23C) ^ (a >> 19)) & _U32
    a = ((a + 0x165667B1) + (a << 5)) & _U32
    a = ((a + 0xD3A2646C) ^ (a << 9)) & _U32
    a = ((a + 0xFD7046C5) + (a << 3)) & _U32
    a = ((a ^ 0xB55A4F09) ^ (a >> 16)) & _U32
    # The multiplier is a prime near 3/4 of 2^32, spreading values over the tree.
    return (a * 3221225473) & _U32


def _sdbm(data: bytes) -> int:
    h = 0
    for c in data:
        h = (c + (h << 6) + (h << 16) - h) & _U32
    return h


class HAProxyRing:
    """HAProxy 2.6 ``balance source`` + ``hash-type consistent``, point for point.

    Server ``puid`` (its ``id``, by default its 1-based position in the backend)
    has ``weight * 16`` points at ``full_hash(puid * 4096 + i)``. A packed IPv4
    key is hashed as ``full_hash(address as a 32-bit integer)``; an IPv6 key as
    ``full_hash`` of the XOR of its four 32-bit words (``backend.c:
    get_server_sh``). The server of the nearest point wins, the earlier point
    on a tie of distance (``lb_chash.c: chash_get_server_hash``). Ineligible
    servers have no points, as servers that are down, in maintenance, draining
    or of weight 0 are taken out of HAProxy's tree; skipped servers are walked
    past clockwise, like HAProxy's ``avoid`` and bounded-load checks.

    :func:`text_key` keys are hashed like HAProxy's ``hdr()``/``url_param``
    with ``hash-type consistent``: ``full_hash(sdbm(value))``. That path has
    not been compared with a running HAProxy.

    :param servers: ``(name, puid, weight)`` for every server.
    """

    def __init__(self, servers: Sequence[tuple[str, int, int]]) -> None:
        points: list[tuple[int, int, str]] = []
        for name, puid, weight in servers:
            if not 0 <= weight <= 256:
                raise ValueError(f"HAProxy weights are 0..256, got {weight} for {name!r}")
            points.extend((full_hash(puid * 4096 + i), puid, name) for i in range(weight * 16))
        # Equal points are ordered by puid: HAProxy's tree keeps duplicates in
        # insertion order, and servers are inserted in configuration order.
        points.sort()
        self._keys = [p[0] for p in points]
        self._owners = [p[2] for p in points]
        self._names = [name for name, _, _ in servers]

    @staticmethod
    def key_hash(key: bytes) -> int:
        """Return HAProxy's 32-bit hash of ``key``."""
        if len(key) in (4, 16):
            h = 0
            for offset in range(0, len(key), 4):
                h ^= int.from_bytes(key[offset : offset + 4], "big")
            return full_hash(h)
        if key.startswith(_TEXT_PREFIX):
            return full_hash(_sdbm(key[len(_TEXT_PREFIX) :]))
        return full_hash(_sdbm(key))

    def lookup(
        self,
        key: bytes,
        eligible: Callable[[str], bool],
        *,
        skip: Callable[[str], bool] | None = None,
    ) -> str | None:
        """See :meth:`Ring.lookup`."""
        count = len(self._keys)
        if not count:
            return None
        seen: dict[str, bool] = {}

        def on_ring(index: int) -> bool:
            name = self._owners[index % count]
            ok = seen.get(name)
            if ok is None:
                ok = seen[name] = eligible(name)
            return ok

        h = self.key_hash(key)
        start = bisect.bisect_left(self._keys, h)
        # next: the first eligible point at or after h, wrapping around.
        nxt = next((i for i in range(start, start + count) if on_ring(i)), None)
        if nxt is None:
            return None
        # prev: the eligible point before next, wrapping around.
        prv = next(i for i in range(nxt - 1, nxt - 1 - count, -1) if on_ring(i))
        dp = (h - self._keys[prv % count]) & _U32
        dn = (self._keys[nxt % count] - h) & _U32
        pick = prv if dp <= dn else nxt
        if skip is None:
            return self._owners[pick % count]
        for i in range(pick, pick + count):
            name = self._owners[i % count]
            if on_ring(i) and not skip(name):
                return name
        return None

    def sequence(self, key: bytes) -> Iterator[str]:
        """Yield servers in the order a clockwise walk from the nearest point meets them."""
        count = len(self._keys)
        seen: set[str] = set()
        if count:
            h = self.key_hash(key)
            nxt = bisect.bisect_left(self._keys, h) % count
            prv = nxt - 1
            dp = (h - self._keys[prv]) & _U32
            dn = (self._keys[nxt] - h) & _U32
            pick = prv if dp <= dn else nxt
            for i in range(pick, pick + count):
                name = self._owners[i % count]
                if name not in seen:
                    seen.add(name)
                    yield name
        for name in self._names:
            if name not in seen:
                seen.add(name)
                yield name
