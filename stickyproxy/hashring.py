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
   merged in time order with slice assignments, and the owners written in
   reverse time order with list stores run in C, so the build is linear in
   the number of slots rather than slots times servers. The few slots no
   server drew within the horizon take the owner of the first drawn slot on
   a fixed chain through the slots, which keeps that property.
3. *Balance.* Rendezvous alone leaves binomial noise (about 1/sqrt(slots per
   server)), far too lumpy with many servers. A server above its cap gives
   up exactly its excess, its weakest claims (the slots it drew last: a late
   first draw is one that later draws of other servers come close to). Each
   goes to the first server below its cap among the rendezvous owners of a
   fixed chain of slots starting at that slot. Then each server below its
   floor takes back slots it drew itself, in its own draw order, from
   servers that have slots to spare. Every choice depends on a server's own draws and on
   rendezvous owners only, so a configuration change redoes only the moves
   of servers whose counts it changes. Those servers are the ones held at
   the edges of the band, and each redoes about as many moves as the change
   shifts its count (a Poisson number of the removed server's slots, say,
   against a fixed rise of its quota). That cost grows like the square root
   of the table while the ideal movement grows like the table, which is why
   the table has 2**17 slots: at 200 servers the movement beyond the ideal
   share is then about a fifth of that share.

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
import heapq
import ipaddress
import itertools
import math
import operator
import sys
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol

#: Number of slots in the default table (17 bits of key hash).
SLOTS = 1 << 17
_MASK = SLOTS - 1

# The balance band. A server may hold up to ``_CAP * sqrt(quota)`` slots above
# its exact quota (about 1.8 % at 200 equal servers, 1 % at 50, 0.4 % at 10)
# and down to ``_FLOOR`` of its quota below it. Rendezvous noise is about
# ``sqrt(quota)`` slots, so the cap holds back about a third of the servers;
# each of them has its moves redone when a configuration change alters its
# count, and that is where movement beyond the ideal comes from. The noise of
# real client counts is of the same order as the cap, so a tighter cap buys
# little evenness for much more movement. The floor is looser, as a busy
# server costs capacity and a slightly idle one does not, but it bounds how
# far a light server's share can fall short of its weight.
_CAP = 0.5
_FLOOR = 0.025

# Expected stream draws per slot merged. Slots no server drew by then (about
# SLOTS * e**-_HORIZON of them) inherit the owner of the next drawn slot of a
# fixed chain through the slots. The horizon is long because a configuration
# change moves it (see _rounds): with few servers a change of total weight is
# large, and the slots first drawn between the two horizons change owner.
_HORIZON = 7.0

# Two chains through the slots, s -> (s * multiplier + increment) mod SLOTS.
# A multiplier of 1 mod 4 and an odd increment give a single cycle through
# every slot (Hull-Dobell), so a walk always finds a drawn slot. One chain
# names the heir of an undrawn slot, the other the candidate takers of a
# slot given away in the balance.
_HEIR_CHAIN = (0x6F4D, 0x0A0F3)
_TAKER_CHAIN = (0x1B8A5, 0x0C0B)
# How far a given-away slot walks its chain for a taker before the servers
# are tried in a fixed rotation.
_TAKER_STEPS = 64

# A key whose owner cannot take it tries the owners of this many further
# slots, derived from the key, before falling back to a per-slot order.
_ALTERNATES = 16
# How many fallback servers are cached per slot; deeper walks are computed.
_FALLBACK_DEPTH = 8

_SLOT_BYTES = 3  # bytes of key hash per slot number (17 bits used)
_DIGEST_SIZE = _SLOT_BYTES * (1 + _ALTERNATES)  # the slot, then the alternates
_KEY_PERSON = b"sp-ring-key"  # fixed: changing it re-deals every client
_TEXT_PREFIX = b"stickyproxy:text:"  # 17 bytes: text keys never look like addresses
_U32 = 0xFFFFFFFF
# Keeps the bits of a draw's third little-endian byte that fall below SLOTS.
_THIRD_BYTE = bytes(i & (_MASK >> 16) for i in range(256))


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
    seed = b"stickyproxy ring v2\x00" + name.encode("utf-8")
    raw = bytearray(hashlib.shake_128(seed).digest(4 * length))
    # Each draw is a little-endian 32-bit word cut down to its low 17 bits:
    # the byte operations run in C, where a mask per draw would not.
    raw[2::4] = raw[2::4].translate(_THIRD_BYTE)
    raw[3::4] = bytes(length)
    draws = array("I", raw)
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
        #: Per server: the offset of its draws within a unit of time.
        self.phases = [(int.from_bytes(_name_digest(n)[:4], "big") + 0.5) / 2**32 for n in names]
        #: Per server: its own draws, in its own time order.
        self.streams = [_stream(n, rounds * w) for n, w in zip(names, weights, strict=True)]
        timed = sorted(
            ((i + self.phases[j]) / w, j, i) for j, w in enumerate(weights) for i in range(w)
        )
        width = len(timed)
        #: The slot of every draw, in time order.
        self.draws = array("I", bytes(4 * width * rounds))
        for position, (_, j, i) in enumerate(timed):
            self.draws[position::width] = self.streams[j][i :: weights[j]]
        #: The server that made each draw of a round (every round alike).
        self.pattern = [j for _, j, _ in timed]
        #: Per server: its weight.
        self.weights = list(weights)


def _rounds(total_weight: int) -> int:
    """Return how many rounds to merge: :data:`_HORIZON` draws per slot.

    A configuration change alters the total weight and so the number of
    rounds, by a round or two; the slots first drawn in those rounds change
    owner, which is about ``total_weight * e**-_HORIZON`` slots per round.
    """
    return max(1, math.ceil(_HORIZON * SLOTS / total_weight))


def _walk(slot: int, chain: tuple[int, int]) -> Iterator[int]:
    """Yield the slots after ``slot`` on ``chain``, forever."""
    multiplier, increment = chain
    while True:
        slot = (slot * multiplier + increment) & _MASK
        yield slot


def _build_table(names: Sequence[str], weights: Mapping[str, int]) -> list[int]:
    """Assign every slot to an index into ``names`` (see the module docstring)."""
    counts = [weights[n] for n in names]
    merged = _Merged(names, counts, _rounds(sum(counts)))
    # A slot goes to the server that draws it first. Writing the owners in
    # reverse time order leaves the earliest draw's server in every slot, in
    # one pass of list stores run in C.
    owner = [-1] * SLOTS
    backwards = itertools.cycle(merged.pattern[::-1])
    deque(map(owner.__setitem__, reversed(merged.draws), backwards), 0)
    undrawn = list(itertools.compress(range(SLOTS), map(operator.lt, owner, itertools.repeat(0))))
    # An undrawn slot takes the owner of the first drawn slot on its chain.
    # Undrawn slots met on the way were settled the same way (ascending
    # order), so their owner is already that of the drawn slot beyond them.
    for slot in undrawn:
        heir = slot
        while owner[heir] < 0:
            heir = (heir * _HEIR_CHAIN[0] + _HEIR_CHAIN[1]) & _MASK
        owner[slot] = owner[heir]
    held = [0] * len(names)
    for j, n in Counter(owner).items():
        held[j] = n
    quotas = _quotas(names, weights)
    cap = [q + max(1, int(_CAP * math.sqrt(q))) for q in quotas]
    floor = [q - int(q * _FLOOR) for q in quotas]
    _give_excess(owner, held, cap, _weakest(owner, held, cap, undrawn, merged))
    # Top-ups come from servers with slots to spare: those above the middle
    # of their lower band, so a server just under quota is not stripped.
    spare = [(f + q) // 2 for f, q in zip(floor, quotas, strict=True)]
    _top_up(owner, held, spare, floor, merged)
    return owner


def _weakest(
    owner: list[int], held: list[int], cap: list[int], undrawn: list[int], merged: _Merged
) -> list[int]:
    """Return the slots servers above their caps give up, weakest claim first.

    A server's weakest claims are the slots it holds without having drawn
    them, then the slots it drew last: a late first draw is one that later
    draws of other servers come close to. Both depend only on the server's
    own draws and the slot, so a configuration change alters a server's
    choice only through its count.
    """
    excess = [max(0, h - c) for h, c in zip(held, cap, strict=True)]
    given: list[tuple[float, int]] = []
    for slot in undrawn:
        j = owner[slot]
        if excess[j]:
            excess[j] -= 1
            given.append((-math.inf, slot))
    for j, wanted in enumerate(excess):
        left = wanted
        stream, phase, weight = merged.streams[j], merged.phases[j], merged.weights[j]
        k = len(stream)
        seen: set[int] = set()
        while left and k:
            k -= 1
            slot = stream[k]
            if owner[slot] == j and slot not in seen:
                seen.add(slot)
                given.append((-(k + phase) / weight, slot))
                left -= 1
    given.sort()
    return [slot for _, slot in given]


def _give_excess(owner: list[int], held: list[int], cap: list[int], given: list[int]) -> None:
    """Move each of the ``given`` slots to a server below its cap.

    Each slot goes to the first server below its cap among the rendezvous
    owners of the slots on the slot's taker chain. The candidates depend only
    on rendezvous owners, which a configuration change alters only for the
    server added or removed; so the change redoes only the moves of servers
    whose counts it moves, and of the takers that fill up differently.
    """
    natural = owner.copy()
    count = len(held)
    for slot in given:
        giver = owner[slot]
        taker = next(
            (
                j
                for j in map(
                    natural.__getitem__, itertools.islice(_walk(slot, _TAKER_CHAIN), _TAKER_STEPS)
                )
                if j != giver and held[j] < cap[j]
            ),
            None,
        )
        if taker is None:
            # Some server is below its cap, since the caps sum to at least SLOTS.
            start = slot % count
            taker = next(
                j for j in itertools.chain(range(start, count), range(start)) if held[j] < cap[j]
            )
        owner[slot] = taker
        held[giver] -= 1
        held[taker] += 1


def _top_up(
    owner: list[int], held: list[int], spare: list[int], floor: list[int], merged: _Merged
) -> None:
    """Bring every server below its floor up to it, from servers above ``spare``.

    A server below its floor takes the slots it drew itself, in its own draw
    order, from owners still above ``spare``. The needy servers take in merged
    time order, so where two want the same slot the earlier draw wins.
    """
    need = [max(0, f - h) for f, h in zip(floor, held, strict=True)]
    phases, streams = merged.phases, merged.streams
    weights = merged.weights
    heap = [(phases[j] / weights[j], j, 0) for j, n in enumerate(need) if n]
    heapq.heapify(heap)
    while heap:
        _, j, k = heap[0]
        stream = streams[j]
        if k >= len(stream):
            heapq.heappop(heap)
            continue
        slot = stream[k]
        giver = owner[slot]
        if giver != j and held[giver] > spare[giver]:
            owner[slot] = j
            held[giver] -= 1
            held[j] += 1
            need[j] -= 1
            if not need[j]:
                heapq.heappop(heap)
                continue
        heapq.heapreplace(heap, ((k + 1 + phases[j]) / weights[j], j, k + 1))


def _key_digest(key: bytes) -> bytes:
    """Return ``key``'s slot number, then those of its alternate slots.

    Each takes :data:`_SLOT_BYTES` bytes, big-endian, masked to :data:`SLOTS`.
    One digest serves both, so a key whose owner is down costs no second hash.
    """
    return hashlib.blake2b(key, digest_size=_DIGEST_SIZE, person=_KEY_PERSON).digest()


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
            indices = _build_table(self._names, self._weights)
            self._table = list(map(self._names.__getitem__, indices))
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
        return int.from_bytes(_key_digest(key)[:_SLOT_BYTES]) & _MASK

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
        table = self._table
        if not table:
            return None
        # _key_digest and slot(), inline: this runs for every request.
        digest = hashlib.blake2b(key, digest_size=_DIGEST_SIZE, person=_KEY_PERSON).digest()
        slot = int.from_bytes(digest[:_SLOT_BYTES]) & _MASK
        owner = table[slot]
        if eligible(owner) and (skip is None or not skip(owner)):
            return owner
        # The first steps of _others, inline: this is the path of every client
        # of a server that is down. A server seen twice is simply refused twice.
        for i in range(_SLOT_BYTES, _DIGEST_SIZE, _SLOT_BYTES):
            name = table[int.from_bytes(digest[i : i + _SLOT_BYTES]) & _MASK]
            if name != owner and eligible(name) and (skip is None or not skip(name)):
                return name
        for name in self._slot_order(slot):
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
        digest = _key_digest(key)
        for i in range(_SLOT_BYTES, _DIGEST_SIZE, _SLOT_BYTES):
            name = table[int.from_bytes(digest[i : i + _SLOT_BYTES]) & _MASK]
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
        data = slot.to_bytes(_SLOT_BYTES, "big")
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
