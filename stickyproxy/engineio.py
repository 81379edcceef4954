# -*- test-case-name: tests.test_engineio -*-
"""engine.io as a sticky proxy sees it, without I/O.

Theory of operation
-------------------

A long-polling engine.io session is a series of independent HTTP requests
that must all reach the backend that created the session. The session id
(``sid``) is the only thing they share, and it appears in exactly two places:

* the **handshake**: the answer to a ``GET`` on the engine.io path without a
  ``sid``. Its body opens with the *open* packet, ``0`` followed by a JSON
  object holding ``sid``, ``pingInterval`` and ``pingTimeout``. EIO4 sends the
  packet bare (``0{...}``, further packets separated by ``\\x1e``); EIO3
  prefixes every packet with its length in UTF-16 code units (``96:0{...}``,
  possibly followed by ``2:40``) or, in its binary payload form, with a zero
  byte, the length as digit *bytes* and ``0xFF``. A server may also repeat the
  sid in an ``io`` cookie;
* the ``sid`` **query parameter** of every later request: polls, posts, CORS
  preflights and the WebSocket upgrade.

So this module offers:

* :func:`classify`: is a request on the engine.io path, a handshake or part
  of a session, and which sid does it carry (duplicates and odd sids are
  refused with a 400, since servers disagree on which duplicate wins);
* :class:`HandshakeParser` and :func:`sid_from_set_cookie`: learn the sid of
  a new session from the handshake response, before it reaches the client;
* :func:`tag_handshake_body`, :func:`untag` and :func:`untag_target`: the
  stateless alternative, which appends an opaque server tag to the sid in the
  EIO4 handshake and strips it from later request targets;
* :class:`UnknownSessionSniffer`: recognise a backend's "this session does not
  exist here" answer, the signal that a request was misrouted (or that its
  session expired).

The body parsers live in :mod:`stickyproxy.eiopayload` and are re-exported
here; the table that maps learned sids to servers is :mod:`stickyproxy.sidtable`.

A sid is a bearer credential: whoever knows it can read and write the
session. Nothing here puts a whole sid into an error message; use
:func:`redact` to log one.
"""

from __future__ import annotations

import re
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal
from urllib.parse import quote, unquote_to_bytes

from stickyproxy.eiopayload import (
    HANDSHAKE_LIMIT,
    MAX_SID_LENGTH,
    UNKNOWN_SESSION_BODY,
    BodyPrefix,
    Handshake,
    HandshakeError,
    HandshakeParser,
    UnknownSession,
    UnknownSessionSniffer,
    locate_sid,
    parse_handshake,
    redact,
    sid_problem,
    unknown_session_kind,
)
from stickyproxy.errors import ProtocolError

if TYPE_CHECKING:
    from stickyproxy.httphead import RequestHead, ResponseHead

__all__ = [
    "DEFAULT_PREFIX",
    "HANDSHAKE_LIMIT",
    "MAX_SID_LENGTH",
    "MAX_TAG_LENGTH",
    "UNKNOWN_SESSION_BODY",
    "BodyPrefix",
    "EngineRequest",
    "Handshake",
    "HandshakeError",
    "HandshakeParser",
    "SidError",
    "UnknownSession",
    "UnknownSessionSniffer",
    "classify",
    "parse_handshake",
    "redact",
    "redact_target",
    "set_content_length",
    "sid_from_set_cookie",
    "tag_handshake_body",
    "unknown_session_kind",
    "untag",
    "untag_target",
]

#: socket.io's default path; bare engine.io uses ``/engine.io/``.
DEFAULT_PREFIX: Final = b"/socket.io/"
#: The longest server tag :func:`tag_handshake_body` will append.
MAX_TAG_LENGTH: Final = 32

_TAG_RE: Final = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_TAG_LENGTH}}}")
# A target in absolute-form (RFC 9112 §3.2.2): the path starts after the authority.
_SCHEME_AUTHORITY_RE: Final = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://[^/?]*")
# Percent-encoding of a sid put back into a query: RFC 3986 §2.3 unreserved
# characters stay as they are, everything else is escaped.
_UNRESERVED: Final = "-._~"


class SidError(ProtocolError):
    """A request carries a ``sid`` the proxy refuses to route (answered with 400)."""


def _check_sid(raw: bytes) -> str:
    """Validate a decoded sid from a request and return it as text."""
    problem = sid_problem(raw)
    if problem is not None:
        raise SidError(problem)
    return raw.decode("ascii")


# --------------------------------------------------------------------------
# Requests


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """What a request on the engine.io path is.

    :param kind: ``"handshake"`` (a GET without ``sid``: its response creates
        a session), ``"session"`` (carries a ``sid``: route it to the
        session's server) or ``"other"`` (no ``sid`` and not a GET, such as a
        CORS preflight: route it as any other request).
    :param sid: the decoded ``sid``, tag included, for a session request.
    :param eio: the protocol revision. engine.io reads every ``EIO`` value
        but ``4`` as 3, and so does this; several values count as 3 unless
        all of them are ``4``.
    :param transport: the ``transport`` parameter (``"polling"``,
        ``"websocket"``), or ``""`` when absent or repeated.
    :param jsonp: a ``j`` parameter asks for a JSONP-wrapped body.
    """

    kind: Literal["handshake", "session", "other"]
    sid: str | None
    eio: Literal[3, 4]
    transport: str
    jsonp: bool

    @property
    def learnable(self) -> bool:
        """Whether the response may carry a sid in a handshake body.

        A WebSocket-first handshake sends its sid in the first frame and never
        again, so it needs no stickiness and is left alone. JSONP wraps the
        body in a script and is skipped.
        """
        return self.kind == "handshake" and self.transport == "polling" and not self.jsonp


def _decode_component(raw: bytes) -> bytes:
    # application/x-www-form-urlencoded: "+" is a space, then percent-decoding.
    # Both servers (URLSearchParams, parse_qs) decode names and values this
    # way, so "s%69d" is a sid as much as "sid" is.
    if b"%" not in raw and b"+" not in raw:
        return raw
    return unquote_to_bytes(raw.replace(b"+", b" "))


def _query_start(target: bytes) -> int:
    """Offset of the query in ``target`` (after "?"), or -1 when there is none."""
    mark = target.find(b"?")
    return -1 if mark == -1 else mark + 1


def _path(target: bytes) -> bytes:
    if not target.startswith(b"/"):
        match = _SCHEME_AUTHORITY_RE.match(target)
        if match is None:
            return b""  # asterisk-form or authority-form: never engine.io
        target = target[match.end() :]
    return target.partition(b"?")[0]


def _params(target: bytes) -> Iterator[tuple[bytes, int, int]]:
    """Yield ``(decoded name, value start, value end)`` for each query parameter.

    Offsets index ``target``, so that one value can be replaced while every
    other byte stays as the client sent it. Parameters are separated by "&"
    only, as both servers split them (RFC 3986 §3.4 leaves the query's inner
    syntax to the application).
    """
    pos = _query_start(target)
    if pos == -1:
        return
    size = len(target)
    while pos <= size:
        amp = target.find(b"&", pos)
        if amp == -1:
            amp = size
        if amp > pos:
            eq = target.find(b"=", pos, amp)
            if eq == -1:
                yield _decode_component(target[pos:amp]), amp, amp
            else:
                yield _decode_component(target[pos:eq]), eq + 1, amp
        pos = amp + 1


def _sid_span(target: bytes) -> tuple[int, int] | None:
    """Where the one ``sid`` value of ``target`` is, or None without one.

    :raises SidError: for a repeated ``sid`` (engine.io takes the last,
        python-engineio the first: routing by either could pick the wrong one).
    """
    span: tuple[int, int] | None = None
    for name, start, end in _params(target):
        if name == b"sid":
            if span is not None:
                raise SidError("duplicate sid parameter")
            span = (start, end)
    return span


def _sid_at(target: bytes, span: tuple[int, int]) -> str | None:
    raw = target[span[0] : span[1]]
    # Each decoded byte takes at most three encoded ones: refuse giant values
    # before decoding them.
    if len(raw) > 3 * MAX_SID_LENGTH:
        raise SidError(f"sid too long ({len(raw)} bytes)")
    value = _decode_component(raw)
    # An empty sid is no sid: both servers then start a new session.
    return _check_sid(value) if value else None


def classify(head: RequestHead, prefix: bytes = DEFAULT_PREFIX) -> EngineRequest | None:
    """Tell what an engine.io request is, or None for a request off its path.

    The path matches when it starts with ``prefix``, compared byte for byte
    as engine.io compares the raw URL with its configured path.

    :param prefix: a path prefix, without a query (``[engineio] path``).
    :raises SidError: (status hint 400) for a repeated, oversized or
        malformed ``sid``.
    """
    target = head.target
    # Nearly every target is in origin-form, where the path opens the target:
    # a prefix (which has no "?") then matches the target as it matches the
    # path, with no copy made on the per-request path.
    path = target if target[:1] == b"/" else _path(target)
    if not path.startswith(prefix):
        return None
    sid: str | None = None
    span = _sid_span(target)
    if span is not None:
        sid = _sid_at(target, span)
    eio: Literal[3, 4] | None = None
    transports: list[bytes] = []
    jsonp = False
    for name, start, end in _params(target):
        if name == b"EIO":
            four = _decode_component(target[start:end]) == b"4"
            eio = 4 if four and eio != 3 else 3
        elif name == b"transport":
            transports.append(_decode_component(target[start:end]))
        elif name == b"j":
            jsonp = True
    transport = transports[0].decode("latin-1") if len(transports) == 1 else ""
    if sid is not None:
        kind: Literal["handshake", "session", "other"] = "session"
    elif head.method == b"GET":
        kind = "handshake"
    else:
        kind = "other"
    return EngineRequest(kind, sid, eio or 3, transport, jsonp)


def redact_target(target: bytes, prefix: bytes = DEFAULT_PREFIX) -> bytes:
    """``target`` with every ``sid`` value on the engine.io path shortened for a log.

    A sid is a bearer credential: an access log must not let its readers
    take over sessions. Each value keeps what :func:`redact` keeps;
    duplicates and malformed values (answered with 400) are shortened too.
    """
    if b"sid" not in target or not _path(target).startswith(prefix):
        return target
    spans = [(start, end) for name, start, end in _params(target) if name == b"sid"]
    for start, end in reversed(spans):
        # Targets are bytes shown as Latin-1: keep the marker ASCII.
        shown = redact(target[start:end]).replace("\u2026", "...").encode("ascii")
        target = target[:start] + shown + target[end:]
    return target


def sid_from_set_cookie(headers: Sequence[tuple[bytes, bytes]], name: str = "io") -> str | None:
    """The sid a handshake response sets in engine.io's own cookie, if any.

    engine.io 3 sets ``io=<sid>`` by default, later versions and
    python-engineio when configured to. The value is URL-encoded by
    engine.io and may be DQUOTE-wrapped (RFC 6265 §4.1.1). When several
    Set-Cookie fields name the cookie, the last wins, as in a client's jar
    (RFC 6265 §5.3 step 11). A value that is not a valid sid is ignored.

    :param headers: the response's header lines.
    :param name: the cookie name the backends are configured with.
    """
    ours = name.encode("utf-8")
    found: str | None = None
    for field_name, value in headers:
        if field_name.lower() != b"set-cookie":
            continue
        pair = value.split(b";", 1)[0]
        cookie_name, eq, cookie_value = pair.partition(b"=")
        if not eq or cookie_name.strip(b" \t") != ours:
            continue
        cookie_value = cookie_value.strip(b" \t")
        if len(cookie_value) >= 2 and cookie_value[0] == cookie_value[-1] == 0x22:
            cookie_value = cookie_value[1:-1]
        if not cookie_value or len(cookie_value) > 3 * MAX_SID_LENGTH:
            continue
        try:
            found = _check_sid(unquote_to_bytes(cookie_value))
        except SidError:
            continue
    return found


# --------------------------------------------------------------------------
# The stateless sid tag


def _check_tag(tag: str) -> None:
    if not _TAG_RE.fullmatch(tag):
        raise ValueError(f"a server tag is 1 to {MAX_TAG_LENGTH} base64url characters")


def tag_handshake_body(body: bytes, tag: str, *, eio: int = 4) -> bytes:
    """Append ``"." + tag`` to the sid of a complete, decoded EIO4 handshake body.

    Every later request then carries the tag in its ``sid`` and can be routed
    by any proxy that knows the tag, with no shared state; :func:`untag_target`
    restores the sid before the request reaches the backend. Only the sid's
    JSON string changes: the rest of the body stays byte for byte (the caller
    must update the framing, see :func:`set_content_length`).

    ``.`` and the base64url tag characters are left alone by every client's
    URL encoding (JavaScript's ``encodeURIComponent``, Java's ``URLEncoder``,
    python-engineio's raw append). Neither default sids (base64url) nor UUIDs
    contain a dot, so a tagged sid cannot be taken for a server's own; for
    a custom id generator that emits dots, give :func:`untag_target` the set
    of known tags.

    Tagging is refused where it would break a session:

    * EIO3 (``eio=3`` or a length-prefixed body): a socket.io 2 client uses the
      engine sid as its socket id, which the application may send to the
      server, where it would no longer match;
    * ``"webtransport"`` among the upgrades: over WebTransport the sid is
      sent inside the stream, where the proxy cannot strip the tag;
    * anything that is not a plain open packet (compressed, JSONP or binary
      bodies), or a sid that the tag would make too long.

    Applications that compare the client's engine id with the server's see
    the difference even with EIO4; those deployments should not tag.

    :param body: the whole handshake body, without transfer coding.
    :param tag: the server's opaque tag (base64url, at most 32 characters);
        it must not reveal the server's address.
    :param eio: the request's protocol revision (:attr:`EngineRequest.eio`).
    :raises HandshakeError: tagging is refused; the body must go out untouched.
    :raises ValueError: ``tag`` is not a valid tag.
    """
    _check_tag(tag)
    if eio != 4:
        raise HandshakeError("eio3")
    handshake, sid_end = locate_sid(body)
    if handshake.framing != "eio4":
        raise HandshakeError("eio3")
    if "webtransport" in handshake.upgrades:
        raise HandshakeError("webtransport")
    if len(handshake.sid) + 1 + len(tag) > MAX_SID_LENGTH:
        raise HandshakeError("sid too long")
    # sid_end is just after the closing quote: insert before it, so escapes
    # inside the string (if any) are kept as they were.
    quote_at = sid_end - 1
    return body[:quote_at] + b"." + tag.encode("ascii") + body[quote_at:]


def untag(sid: str) -> tuple[str | None, str]:
    """Split a sid into ``(tag, original sid)``; the tag is None when there is none.

    The tag follows the last ``.``. A sid whose last dot is followed by
    something that is not a tag, or that starts with its only dot, is
    returned whole.
    """
    original, dot, tag = sid.rpartition(".")
    if not dot or not original or not _TAG_RE.fullmatch(tag):
        return None, sid
    return tag, original


def untag_target(
    target: bytes, known_tags: Container[str] | None = None
) -> tuple[str | None, bytes]:
    """Strip the server tag from a request target's ``sid``.

    Only the ``sid`` value changes; every other byte of the target (path,
    other parameters, their order and encoding) is kept. The client's own
    encoding of the sid is kept too when possible.

    :param known_tags: when given, a tag not in it is no tag: the target is
        returned unchanged. This keeps a custom sid that happens to contain a
        dot intact.
    :returns: ``(tag, new target)``, or ``(None, target)`` untouched when
        the sid carries no (known) tag or there is no sid.
    :raises SidError: (400) for a repeated, oversized or malformed ``sid``.
    """
    span = _sid_span(target)
    if span is None:
        return None, target
    sid = _sid_at(target, span)
    if sid is None:
        return None, target
    tag, original = untag(sid)
    if tag is None or (known_tags is not None and tag not in known_tags):
        return None, target
    start, end = span
    raw = target[start:end]
    suffix = b"." + tag.encode("ascii")
    if raw.endswith(suffix) and _decode_component(raw[: -len(suffix)]) == original.encode():
        new_value = raw[: -len(suffix)]
    else:
        new_value = quote(original, safe=_UNRESERVED).encode("ascii")
    return tag, target[:start] + new_value + target[end:]


def set_content_length(head: ResponseHead, length: int) -> None:
    """Frame a rewritten response body by its length.

    Removes Transfer-Encoding and every Content-Length, then adds
    ``Content-Length: length``. Use it when the proxy sends a body it has
    buffered and rewritten: a chunked body then goes out unchunked, which is
    valid for any HTTP/1.1 client (RFC 9112 §6.3).
    """
    head.remove(b"transfer-encoding")
    head.remove(b"content-length")
    head.add(b"Content-Length", str(length).encode("ascii"))
