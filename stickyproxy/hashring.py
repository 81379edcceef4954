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
   the servers. Every server draws slots from a pseudo-random stream seeded
   by its name, its ``k``-th draw at time ``(k + phase) / weight``; a slot
   goes to the server that draws it first. The score of a (server, slot)
   pair does not depend on the other servers, so adding or removing a
   server only changes the slots that server wins or owned. The streams are
   merged in time order with slice assignments and scanned in C, which
   keeps the build linear in the number of slots rather than slots times
   servers. The few slots no server drew within the horizon go by each
   server's *late order*, a fixed permutation of the slots per server.
3. *Balance.* Rendezvous alone leaves binomial noise (about 1/sqrt(slots per
   server)), far too lumpy with many servers. A server above its cap gives
   up exactly its excess, the slots it drew last (a late first draw is one
   that later draws of other servers come close to), each to the server
   below quota whose late order reaches the slot first; then servers below the floor are topped up
   the same way from servers above quota. Only the moves of servers whose
   counts a configuration change alters are affected by it.

When a slot's owner is ineligible (down, draining, full, excluded) the key
tries the owners of further slots derived from the key itself, then the
slot's weighted rendezvous order (``ln(u) / weight``, Highest Random Weight).
That moves exactly the unavailable server's clients, spreads them client by
client in proportion to the other servers' shares of the table, and returns
them exactly when the owner is eligible again.
"""

from __future__ import annotations

import bisect
import hashlib
import ipaddress
import itertools
import math
import sys
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

#: Number of slots in the default table (16 bits of key hash).
SLOTS = 1 << 16

# The balance band. A server may hold up to ``_CAP * sqrt(quota)`` slots above
# its exact quota (about 1 % at 200 equal servers, 0.5 % at 50, 0.2 % at 10)
# and down to ``_FLOOR`` of its quota below it. Both rendezvous noise and the
# noise of real client counts are of order ``1 / sqrt(quota)``, so the cap
# is a fixed fraction of the noise that clients add anyway. Every slot moved
# to meet a tighter band can move again when the configuration changes, so
# the floor is looser: a busy server costs capacity, a slightly idle one
# does not.
_CAP = 0.18
_FLOOR = 0.04

# Expected stream draws per slot merged. Slots no server drew by then (about
# SLOTS * e**-_HORIZON of them) are decided by each server's late order.
_HORIZON = 5.0

# A key whose owner cannot take it tries the owners of this many further
# slots, derived from the key, before falling back to a per-slot order.
_ALTERNATES = 16
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


class _Merged:
    """Every server's stream of slot draws, merged into one sequence in time order.

    Server ``j`` of weight ``w`` makes its ``k``-th draw at time
    ``(k + phase) / w``, so in each unit of time it makes exactly ``w`` draws,
    at the same offsets in every unit. One unit (a *round*) therefore has a
    fixed order of ``(server, draw)`` pairs, and the merged sequence is that
    order repeated, filled in with one slice assignment per pair.

    :param names: the servers, in name-hash order (which breaks exact ties).
    :param weights: their weights, all positive.
    :param rounds: how many rounds to merge.
    """

    def __init__(self, names: Sequence[str], weights: Sequence[int], rounds: int) -> None:
        # The phase, a fraction taken from the name, keeps servers of equal
        # weight from drawing at the same instant. Only IEEE-exact + and / are
        # used, so every platform merges in the same order.
        phases = [(int.from_bytes(_name_digest(n)[:4], "big") + 0.5) / 2**32 for n in names]
        timed = sorted(((i + phases[j]) / w, j, i) for j, w in enumerate(weights) for i in range(w))
        width = len(timed)
        streams = [_stream(n, rounds * w) for n, w in zip(names, weights, strict=True)]
        #: The slot of every draw, in time order.
        self.draws = array("H", bytes(2 * width * rounds))
        for position, (_, j, i) in enumerate(timed):
            self.draws[position::width] = streams[j][i :: weights[j]]
        #: The server that made each draw.
        self.server = [j for _, j, _ in timed] * rounds
        #: Per server: what :meth:`late_choice` needs.
        self.late = [
            (*_late_permutation(n), phase, w)
            for n, phase, w in zip(names, phases, weights, strict=True)
        ]

    def late_choice(self, slot: int, among: Sequence[int]) -> int:
        """Return the server of ``among`` whose late order reaches ``slot`` first.

        Beyond the merged rounds a server's draws are modelled by a fixed
        permutation of the slots (an odd multiplier modulo :data:`SLOTS`), so
        a server's late rank for a slot is one multiplication rather than a
        scan of further draws. Ranks are weighted like draw times.
        """
        late = self.late
        times = [
            ((((slot - offset) * multiplier) & (SLOTS - 1)) + phase) / w
            for offset, multiplier, phase, w in map(late.__getitem__, among)
        ]
        return among[times.index(min(times))]


def _late_permutation(name: str) -> tuple[int, int]:
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=4, person=b"sp-ring-late").digest()
    return int.from_bytes(digest[:2], "big"), int.from_bytes(digest[2:], "big") | 1


def _build_table(names: Sequence[str], weights: Mapping[str, int]) -> list[int]:
    """Assign every slot to an index into ``names`` (see the module docstring)."""
    counts = [weights[n] for n in names]
    merged = _Merged(names, counts, max(1, math.ceil(_HORIZON * SLOTS / sum(counts))))
    # A slot goes to the server that draws it first. The dict hands each slot
    # out once, so the scan of the draws runs in C and only the 65,536 first
    # draws reach Python code.
    undrawn = dict.fromkeys(range(SLOTS), 1)
    firsts = bytes(map(undrawn.pop, merged.draws, itertools.repeat(0)))
    by_arrival = list(itertools.compress(merged.draws, firsts))
    owner = [0] * SLOTS
    for slot, j in zip(by_arrival, itertools.compress(merged.server, firsts), strict=True):
        owner[slot] = j
    everyone = range(len(names))
    for slot in undrawn:
        owner[slot] = merged.late_choice(slot, everyone)
    held = [0] * len(names)
    for j, n in Counter(owner).items():
        held[j] = n
    quotas = _quotas(names, weights)
    cap = [q + max(1, int(_CAP * math.sqrt(q))) for q in quotas]
    floor = [q - int(q * _FLOOR) for q in quotas]
    # Weakest claims first: the slots nobody drew, then the latest first draws.
    weakest = [*undrawn, *reversed(by_arrival)]
    balance = _Balance(merged, owner, held, weakest)
    balance.shift(give_above=cap, take_below=quotas)
    balance.shift(give_above=quotas, take_below=floor)
    return owner


@dataclass(slots=True)
class _Balance:
    """Slot moves that bring the rendezvous assignment into the band."""

    merged: _Merged
    owner: list[int]
    held: list[int]
    weakest: list[int]

    def shift(self, give_above: list[int], take_below: list[int]) -> None:
        """Move slots from servers above ``give_above`` to servers below ``take_below``.

        Each server above the band gives up exactly its excess: the slots it
        drew last, where other servers' draws come closest to its own. Each
        given slot goes to the taker, among the servers still below the band,
        whose late order reaches it first. Both orders are fixed per (server,
        slot), so a configuration change alters only the moves of servers
        whose counts it changes.
        """
        owner, held = self.owner, self.held
        need = [max(0, t - h) for t, h in zip(take_below, held, strict=True)]
        excess = [max(0, h - g) for h, g in zip(held, give_above, strict=True)]
        offered = sum(excess)
        takers = [j for j, n in enumerate(need) if n]
        if not offered or not takers:
            return
        for slot in self.weakest:
            giver = owner[slot]
            if excess[giver]:
                excess[giver] -= 1
                taker = self.merged.late_choice(slot, takers)
                owner[slot] = taker
                held[giver] -= 1
                held[taker] += 1
                need[taker] -= 1
                if not need[taker]:
                    takers.remove(taker)
                    if not takers:
                        return
                offered -= 1
                if not offered:
                    return


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
    """The default ring: a weighted slot table with a per-key fallback order.

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
        for name in self._others(key, slot, owner):
            if eligible(name) and (skip is None or not skip(name)):
                return name
        return None

    def sequence(self, key: bytes) -> Iterator[str]:
        """Yield the slot's owner, then :meth:`lookup`'s fallback order, then weight-0 servers."""
        if self._table:
            slot = self.slot(key)
            owner = self._table[slot]
            yield owner
            yield from self._others(key, slot, owner)
        yield from self._idle

    def _others(self, key: bytes, slot: int, owner: str) -> Iterator[str]:
        """Yield every server but ``owner`` once, in ``key``'s fallback order.

        First come the owners of further slots picked by the key itself: each
        key of an unavailable server lands on its own random slot, so the
        displaced clients spread over the other servers in proportion to
        their shares of the table, client by client rather than slot by slot.
        The servers still missing follow in the slot's rendezvous order.
        """
        seen = {owner}
        table = self._table
        alternates = hashlib.blake2b(
            key, digest_size=2 * _ALTERNATES, person=b"sp-ring-alt"
        ).digest()
        for i in range(0, 2 * _ALTERNATES, 2):
            name = table[int.from_bytes(alternates[i : i + 2])]
            if name not in seen:
                seen.add(name)
                yield name
        for name in self._slot_order(slot):
            if name not in seen:
                seen.add(name)
                yield name

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
