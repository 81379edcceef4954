"""Signed, opaque, dated persistence-cookie values.

Without a secret the persistence cookie carries a server's configured cookie
value (``s1``) as it is, as HAProxy's ``insert`` mode does: any client can
write ``s2`` and pick its server, and the value names the server. With a
secret the value becomes a token that only a proxy holding the key can make:

* **Signed**: an HMAC-SHA256 tag (RFC 2104) truncated to 128 bits, as
  HMAC-SHA-256-128 (RFC 4868 §2.3), covers every other byte. A forged,
  altered, truncated or extended token is treated as no cookie.
* **Opaque**: the server appears as a keyed hash of its cookie value, not the
  value. The proxy maps it back with a table built from the servers it knows,
  so nothing needs encrypting, and without the key the id says nothing about
  the server beyond "the same as another client's". Every client of one
  server carries the same id, which reveals no more than the routing itself.
* **Dated**: the token carries the time the client was first pinned
  (``first_seen``, never changed) and the time of the last refresh
  (``last_seen``), HAProxy's ``maxlife`` and ``maxidle`` dates. Unlike
  HAProxy's dates they are signed, so a client cannot extend its own pin.
* **Rotatable**: the first key signs, every key verifies. A token verified by
  an older key is refreshed with the first key, so once every client has been
  seen (or after ``maxidle``), the old key can go without logging anyone out.

Token layout, 33 bytes, then base64url (RFC 4648 §5) into exactly 44
characters, all of them RFC 6265 §4.1.1 cookie-octets; 33 is a multiple of 3,
so there is no padding and each token has exactly one spelling::

    version (1) | server id (8) | first_seen (4) | last_seen (4) | tag (16)

Times are whole Unix seconds, unsigned 32-bit big-endian (good until 2106).
Tokens are deterministic: the same key, server and times give the same
token. A nonce would add length and protect nothing, because nothing in the
token is secret beyond what the keyed server id already hides.

Sans-IO: the current time is always passed in.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import math
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "DEFAULT_CLOCK_SKEW",
    "MIN_KEY_BYTES",
    "REFRESH_FRACTION",
    "TOKEN_LENGTH",
    "CookieSigner",
    "Rejection",
    "Verified",
    "parse_keys",
]

VERSION = 1
#: Length of every token, in characters.
TOKEN_LENGTH = 44
#: Shortest accepted key. 32 bytes is SHA-256's output size: RFC 2104 §3
#: advises keys no shorter than the hash output.
MIN_KEY_BYTES = 32
#: How far in the future a date may be before the token is refused. Tokens
#: can only come from proxies holding the key, so a future date means a peer
#: whose clock runs ahead; five minutes is the customary allowance between
#: NTP-synchronised machines (Kerberos uses the same default). HAProxy allows
#: 24 hours because its dates are unsigned and it only wants to catch nonsense.
DEFAULT_CLOCK_SKEW = 300.0
#: A token is refreshed once it has been idle for more than this fraction of
#: ``maxidle``. HAProxy rewrites the date on nearly every response (whenever
#: its 4-second stamp changes); each refresh costs a ``Set-Cookie`` and turns
#: the response private, so here it happens at most about twice per
#: ``maxidle``. A client idle for less than ``maxidle / 2`` therefore always
#: keeps its pin, and one idle for more than ``maxidle`` always loses it.
REFRESH_FRACTION = 0.5

_ID_BYTES = 8
_TAG_BYTES = 16
_BODY = struct.Struct(f">B{_ID_BYTES}sII")
_RAW_BYTES = _BODY.size + _TAG_BYTES
_MAX_TIME = 2**32 - 1
# Exactly the base64url alphabet: base64.b64decode would also take "+" and
# "/" (and skip other bytes without validate), giving a token a second spelling.
_TOKEN_RE = re.compile(rf"[A-Za-z0-9_-]{{{TOKEN_LENGTH}}}")
# Keys are written as base64, base64url or hex text.
_KEY_TEXT_RE = re.compile(r"[A-Za-z0-9_\-+/=]+")
# A random 32-character key has well over this many distinct characters;
# "changeme" repeated, or a run of one letter, does not.
_MIN_DISTINCT = 12
# Separate keys, derived from each configured key, for the two uses (RFC 5869
# §3.3 style): a server id is never a valid tag and the other way round.
_ID_LABEL = b"stickyproxy cookie server-id v1"
_TAG_LABEL = b"stickyproxy cookie tag v1"


class Rejection(enum.Enum):
    """Why a cookie value is not a usable token (HAProxy log flags in brackets)."""

    #: Wrong length, characters outside base64url, or impossible dates [I].
    MALFORMED = "malformed"
    #: A format this proxy does not know [I].
    VERSION = "version"
    #: Signed by no configured key: forged, altered, or an unknown key [I].
    SIGNATURE = "signature"
    #: Signed, but naming no configured server (removed from the pool) [I].
    SERVER = "server"
    #: Dated further in the future than the clock skew allows [E].
    FUTURE = "future"
    #: Not refreshed for longer than ``maxidle`` [E].
    IDLE = "idle"
    #: First issued longer ago than ``maxlife`` [O].
    LIFE = "life"


@dataclass(frozen=True, slots=True)
class Verified:
    """A valid token, decoded."""

    #: The server's configured cookie value, for :meth:`Pool.by_cookie`.
    server_cookie: str
    #: When the client was first pinned (whole Unix seconds).
    first_seen: float
    #: When the token was last issued or refreshed (whole Unix seconds).
    last_seen: float
    #: Whether the response should carry a fresh token: the token is stale
    #: (idle beyond ``REFRESH_FRACTION`` of ``maxidle``) or signed by an
    #: older key.
    refresh: bool
    #: Position of the key that verified it in the configured list.
    key_index: int


@dataclass(frozen=True, slots=True)
class _Key:
    tag: hmac.HMAC
    ids: dict[bytes, str]


def _derive(key: bytes, label: bytes) -> bytes:
    return hmac.new(key, label, hashlib.sha256).digest()


def _server_id(id_key: bytes, server_cookie: str) -> bytes:
    return hmac.new(id_key, server_cookie.encode("utf-8"), hashlib.sha256).digest()[:_ID_BYTES]


def _check_duration(name: str, value: float | None, low: float) -> None:
    if value is not None and not (math.isfinite(value) and value >= low):
        raise ValueError(f"{name} must be a finite number of seconds, at least {low:g}")


class CookieSigner:
    """Issue and verify persistence-cookie tokens.

    :param keys: the secrets, at least :data:`MIN_KEY_BYTES` each. The first
        signs; all verify, in order.
    :param servers: the cookie values of every configured server. Tokens name
        servers by keyed id; this is the table that maps ids back. A token
        for a server not listed is refused (as an unknown plain value is).
    :param maxidle: seconds a token stays valid after it was last issued or
        refreshed, or ``None`` for no limit.
    :param maxlife: seconds a token stays valid after the client was first
        pinned, however often it is refreshed, or ``None`` for no limit.
    :param clock_skew: seconds a date may lie in the future.
    :raises ValueError: for no key, a short key, or a bad duration.
    """

    def __init__(
        self,
        keys: Sequence[bytes],
        *,
        servers: Iterable[str],
        maxidle: float | None,
        maxlife: float | None,
        clock_skew: float = DEFAULT_CLOCK_SKEW,
    ) -> None:
        if not keys:
            raise ValueError("at least one key is needed")
        for position, key in enumerate(keys, 1):
            if len(key) < MIN_KEY_BYTES:
                raise ValueError(
                    f"key {position} has {len(key)} bytes; at least {MIN_KEY_BYTES} are needed"
                )
        # Dates have one-second resolution: a shorter limit cannot be kept.
        _check_duration("maxidle", maxidle, 1.0)
        _check_duration("maxlife", maxlife, 1.0)
        _check_duration("clock_skew", clock_skew, 0.0)
        self.maxidle = maxidle
        self.maxlife = maxlife
        self.clock_skew = clock_skew
        cookies = sorted({s for s in servers if s})
        self._keys: list[_Key] = []
        self._id_keys: list[bytes] = []
        for key in keys:
            id_key = _derive(key, _ID_LABEL)
            ids: dict[bytes, str] = {}
            for cookie in cookies:
                sid = _server_id(id_key, cookie)
                if sid in ids:  # about n² / 2**65: never, but never silently
                    raise ValueError(f"server cookies {ids[sid]!r} and {cookie!r} share an id")
                ids[sid] = cookie
            tag = hmac.new(_derive(key, _TAG_LABEL), digestmod=hashlib.sha256)
            self._keys.append(_Key(tag, ids))
            self._id_keys.append(id_key)

    def _tag(self, key: _Key, body: bytes) -> bytes:
        # Copying a keyed HMAC skips re-hashing the padded key on every call.
        mac = key.tag.copy()
        mac.update(body)
        return mac.digest()[:_TAG_BYTES]

    def issue(self, server_cookie: str, now: float, first_seen: float | None = None) -> str:
        """Make the token that pins a client to ``server_cookie``.

        :param server_cookie: the server's configured cookie value. Any value
            can be signed, so a response from a server that a reload just
            removed still gets a token (which later verifies to nothing).
        :param now: the current Unix time: becomes ``last_seen``.
        :param first_seen: when refreshing, the verified token's
            ``first_seen``, so that ``maxlife`` counts from the first pin;
            ``None`` for a new pin. A date ahead of ``now`` (from a peer's
            fast clock) is brought back to ``now``.
        :raises ValueError: for an empty server cookie, or a time that is not
            between 1970 and 2106.
        """
        if not server_cookie:
            raise ValueError("a server without a cookie value cannot be pinned")
        last = _whole_seconds("now", now)
        first = last if first_seen is None else min(_whole_seconds("first_seen", first_seen), last)
        sid = _server_id(self._id_keys[0], server_cookie)
        body = _BODY.pack(VERSION, sid, first, last)
        raw = body + self._tag(self._keys[0], body)
        return base64.urlsafe_b64encode(raw).decode("ascii")

    def inspect(self, token: str, now: float) -> Verified | Rejection:
        """Decode ``token``, or say why it is refused. Never raises.

        Checks run cheapest first, and the length before anything else, so a
        hostile value of any size costs constant work; at most one HMAC per
        configured key is computed.

        :param token: a cookie value exactly as the client sent it.
        :param now: the current Unix time.
        """
        if len(token) != TOKEN_LENGTH or not _TOKEN_RE.fullmatch(token):
            return Rejection.MALFORMED
        raw = base64.urlsafe_b64decode(token)
        body, tag = raw[: _BODY.size], raw[_BODY.size :]
        version, sid, first, last = _BODY.unpack(body)
        if version != VERSION:
            return Rejection.VERSION
        for index, key in enumerate(self._keys):
            # compare_digest: the time taken must not tell an attacker how
            # many leading bytes of a guessed tag were right.
            if not hmac.compare_digest(self._tag(key, body), tag):
                continue
            server = key.ids.get(sid)
            if server is None:
                return Rejection.SERVER
            return self._check_dates(server, first, last, index, now)
        return Rejection.SIGNATURE

    def _check_dates(
        self, server: str, first: int, last: int, index: int, now: float
    ) -> Verified | Rejection:
        if first > last:
            return Rejection.MALFORMED  # issue() never writes this
        if last - now > self.clock_skew:
            return Rejection.FUTURE
        idle = now - last
        if self.maxidle is not None and idle > self.maxidle:
            return Rejection.IDLE
        if self.maxlife is not None and now - first > self.maxlife:
            return Rejection.LIFE
        stale = self.maxidle is not None and idle > self.maxidle * REFRESH_FRACTION
        return Verified(server, float(first), float(last), stale or index > 0, index)

    def verify(self, token: str, now: float) -> Verified | None:
        """Decode ``token``, or ``None`` if it is not a valid, current token.

        ``None`` covers every :class:`Rejection`: the caller treats the value
        as no cookie at all. Never raises.
        """
        result = self.inspect(token, now)
        return result if isinstance(result, Verified) else None

    def verify_all(self, tokens: Iterable[str], now: float, limit: int = 8) -> list[Verified]:
        """Verify a request's cookie values, in order, keeping the valid ones.

        :param limit: how many values to look at. A client sends one; a
            header stuffed with thousands of token-shaped values would
            otherwise cost thousands of HMACs.
        """
        found: list[Verified] = []
        for count, token in enumerate(tokens):
            if count >= limit:
                break
            verified = self.verify(token, now)
            if verified is not None:
                found.append(verified)
        return found


def _whole_seconds(name: str, value: float) -> int:
    if not (math.isfinite(value) and 0 <= value <= _MAX_TIME):
        raise ValueError(f"{name} must be a Unix time between 1970 and 2106")
    return int(value)


def parse_keys(text: str) -> list[bytes]:
    """Read the ``[cookie] secret`` setting: keys separated by commas.

    Each key is written as text of letters, digits and ``-_+/=`` (base64,
    base64url or hex), at least :data:`MIN_KEY_BYTES` characters, and is used
    as those characters' bytes: ``python -c "import secrets;
    print(secrets.token_urlsafe(32))"`` makes a good one (43 characters,
    256 random bits). Keys may also be separated by newlines (continuation
    lines). Empty text means no signing: ``[]``.

    :raises ValueError: naming the position of each bad key, never its text
        (the message ends up in logs).
    """
    items = [item.strip() for item in text.replace("\n", ",").split(",")]
    if not any(items):
        return []
    count = len(items)
    problems: list[str] = []
    seen: dict[str, int] = {}
    for position, item in enumerate(items, 1):
        which = f"key {position} of {count}"
        if not item:
            problems.append(f"{which} is empty (a stray comma?)")
        elif not _KEY_TEXT_RE.fullmatch(item):
            problems.append(f"{which} may only use letters, digits and - _ + / =")
        elif len(item) < MIN_KEY_BYTES:
            problems.append(
                f"{which} has {len(item)} characters; at least {MIN_KEY_BYTES} are needed"
            )
        elif len(set(item)) < _MIN_DISTINCT:
            problems.append(
                f"{which} uses only {len(set(item))} different characters; a random key uses more"
            )
        elif item in seen:
            problems.append(f"{which} is the same as key {seen[item]}")
        else:
            seen[item] = position
    if problems:
        raise ValueError(
            "; ".join(problems)
            + ". Make a key with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return [item.encode("ascii") for item in items]
