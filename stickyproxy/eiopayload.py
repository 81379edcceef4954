# -*- test-case-name: tests.test_engineio -*-
"""The bytes of engine.io response bodies that a proxy reads, without I/O.

Two kinds of body matter to routing:

* the **handshake**, the answer to a request that opens a session. Its body
  starts with the *open* packet: the type ``0`` followed by a JSON object that
  holds ``sid``, ``pingInterval`` and ``pingTimeout`` (in any key order).
  EIO4 sends packets bare, separated by ``\\x1e`` (``0{...}``). EIO3 prefixes
  each packet with its length in UTF-16 code units (``96:0{...}2:40``), or, in
  its binary payload form, with a zero byte, the length as digit *bytes* and
  ``0xFF``;
* the **unknown session** answer, a 400 whose short body says the server
  holds no such session: the sign of a misrouted (or expired) session.

Backends may send either with the chunked transfer coding, which
:class:`BodyPrefix` undoes on a bounded copy while the proxy relays the
original bytes untouched. Whatever the bytes, a bad body raises nothing but
:class:`HandshakeError`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from stickyproxy.httphead import ResponseHead

__all__ = [
    "HANDSHAKE_LIMIT",
    "MAX_SID_LENGTH",
    "UNKNOWN_SESSION_BODY",
    "BodyPrefix",
    "Handshake",
    "HandshakeError",
    "HandshakeParser",
    "UnknownSession",
    "UnknownSessionSniffer",
    "locate_sid",
    "parse_handshake",
    "redact",
    "sid_problem",
    "unknown_session_kind",
]

#: The longest sid accepted, decoded. Default sids are 20 characters and a
#: UUID from a custom id generator 36; the margin leaves room for a server tag
#: and for other generators, while keeping every table key small.
MAX_SID_LENGTH: Final = 128
#: How many body bytes are examined to find a handshake. A handshake is about
#: 120 bytes; anything past this is not a handshake worth learning from.
HANDSHAKE_LIMIT: Final = 4096
#: What engine.io itself answers to a poll for a sid it does not know; the
#: proxy can send the same when a session's server is gone, so that the client
#: starts a new session at once.
UNKNOWN_SESSION_BODY: Final = b'{"code":1,"message":"Session ID unknown"}'

# Default sids use the base64url alphabet; UUIDs add nothing to it. Standard
# base64 ("+/="), "." (the server tag), "~" and ":" are accepted for custom
# id generators. Everything else (spaces, quotes, controls, non-ASCII) is
# refused: it could not be logged or put back into a query safely, and no
# known generator produces it.
_SID_ALPHABET: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~+/=:"


class HandshakeError(Exception):
    """A response body is not a handshake the proxy can learn from or tag.

    :param reason: a short, fixed description, fit to count skips by
        (``"eio3"``, ``"too large"``, ``"webtransport"``…); it never contains
        the sid.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def redact(sid: str | bytes) -> str:
    """Show enough of a sid to correlate log lines, never the whole of it.

    At most four characters, and at most half of the sid, are kept; anything
    outside the base64url alphabet is shown as ``?``.
    """
    text = sid.decode("latin-1") if isinstance(sid, bytes) else sid
    shown = text[: min(4, len(text) // 2)]
    return "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "?" for c in shown) + "…"


def sid_problem(sid: bytes) -> str | None:
    """Why ``sid`` (decoded) is not acceptable as a session id, or None if it is."""
    if len(sid) > MAX_SID_LENGTH:
        return f"sid too long ({len(sid)} bytes)"
    if sid.translate(None, _SID_ALPHABET):
        return f"invalid character in sid {redact(sid)}"
    return None


# --------------------------------------------------------------------------
# Bodies

_C_SIZE, _C_DATA, _C_DATA_END, _C_DONE, _C_BROKEN = range(5)
# A chunk-size line of a handshake needs a few hex digits; extensions are
# allowed (RFC 9112 §7.1.1) but are never long in practice.
_MAX_CHUNK_LINE: Final = 256


class BodyPrefix:
    """The first bytes of a response body, with chunked coding undone.

    The proxy relays bodies verbatim (:class:`stickyproxy.httphead.BodyReader`
    finds where they end and rejects bad framing); this keeps a decoded copy
    of at most ``limit`` bytes for the parsers here. It never raises: chunked
    syntax it cannot follow marks the copy :attr:`broken`.

    :param chunked: the body uses the chunked transfer coding (RFC 9112 §7.1).
    :param limit: how many decoded bytes to keep.
    """

    __slots__ = ("_chunked", "_data", "_left", "_limit", "_line", "_state", "overflow")

    def __init__(self, *, chunked: bool, limit: int) -> None:
        self._chunked = chunked
        self._limit = limit
        self._data = bytearray()
        self._line = bytearray()
        self._state = _C_SIZE if chunked else _C_DATA
        self._left = 0
        #: More decoded bytes arrived than ``limit``; the copy is truncated.
        self.overflow = False

    @property
    def data(self) -> bytes:
        """The decoded bytes kept so far."""
        return bytes(self._data)

    @property
    def buffer(self) -> bytearray:
        """The decoded bytes kept so far, not copied: read, never modify."""
        return self._data

    @property
    def complete(self) -> bool:
        """A chunked body's last chunk was seen (always False otherwise)."""
        return self._state == _C_DONE

    @property
    def broken(self) -> bool:
        """The chunked coding could not be followed; the copy is unusable."""
        return self._state == _C_BROKEN

    def _keep(self, data: bytes) -> None:
        room = self._limit - len(self._data)
        if len(data) > room:
            self.overflow = True
            data = data[:room]
        self._data += data

    def feed(self, data: bytes) -> None:
        """Add body bytes exactly as they travel on the wire."""
        if not self._chunked:
            if not self.overflow:
                self._keep(data)
            return
        i = 0
        size = len(data)
        while i < size and self._state not in (_C_DONE, _C_BROKEN) and not self.overflow:
            state = self._state
            if state == _C_DATA:
                take = min(self._left, size - i)
                self._keep(data[i : i + take])
                self._left -= take
                i += take
                if not self._left:
                    self._state = _C_DATA_END
                    self._line.clear()
                continue
            if state == _C_DATA_END:
                # chunk-data is followed by exactly CRLF (RFC 9112 §7.1).
                crlf = data[i : i + 2 - len(self._line)]
                self._line += crlf
                i += len(crlf)
                if not b"\r\n".startswith(self._line):
                    self._state = _C_BROKEN
                elif len(self._line) == 2:
                    self._state = _C_SIZE
                    self._line.clear()
                continue
            newline = data.find(b"\n", i)
            end = size if newline == -1 else newline + 1
            self._line += data[i:end]
            i = end
            if len(self._line) > _MAX_CHUNK_LINE:
                self._state = _C_BROKEN
            elif newline != -1:
                self._end_line(bytes(self._line))
                self._line.clear()

    def _end_line(self, line: bytes) -> None:
        digits = line.split(b";", 1)[0].strip(b" \t\r\n")
        if not digits or len(digits) > 8 or digits.strip(b"0123456789abcdefABCDEF"):
            self._state = _C_BROKEN
            return
        self._left = int(digits, 16)
        # The last chunk ends the body; trailers, if any, do not matter here.
        self._state = _C_DATA if self._left else _C_DONE


# --------------------------------------------------------------------------
# Handshakes


@dataclass(frozen=True, slots=True)
class Handshake:
    """The fields of an open packet that matter to the proxy.

    :param sid: the session id.
    :param ping_interval: milliseconds between heartbeats.
    :param ping_timeout: milliseconds a heartbeat may be late before the
        session is dead.
    :param upgrades: the transports the client may upgrade to.
    :param max_payload: the server's largest accepted payload, if sent.
    :param framing: ``"eio4"`` (bare packets), ``"eio3"`` (text payload with
        length prefixes) or ``"eio3-binary"`` (binary payload).
    """

    sid: str
    ping_interval: int
    ping_timeout: int
    upgrades: tuple[str, ...]
    max_payload: int | None
    framing: Literal["eio4", "eio3", "eio3-binary"]


# The bytes that matter when looking for the end of a JSON object.
_JSON_DELIMITERS: Final = re.compile(rb'["\\\[\]{}]')


class _ObjectScanner:
    """Finds where the JSON object opening at ``start`` ends, resuming across feeds.

    Only strings and brackets are tracked; validation is left to the JSON
    parser. Each byte is looked at once however the body is split. UTF-8
    continuation bytes are all >= 0x80, so scanning bytes for ASCII
    delimiters is safe.
    """

    __slots__ = ("depth", "end", "in_string", "pos")

    def __init__(self, start: int) -> None:
        self.pos = start
        self.depth = 0
        self.in_string = False
        #: Offset just after the object, once found.
        self.end: int | None = None

    def scan(self, data: bytes | bytearray) -> int | None:
        """Continue over ``data`` (the same buffer, grown); return the end or None."""
        if self.end is not None:
            return self.end
        for match in _JSON_DELIMITERS.finditer(data, self.pos):
            at = match.start()
            if at < self.pos:
                continue  # the character after a backslash, already skipped
            c = data[at]
            if self.in_string:
                if c == 0x5C:  # a backslash escapes the next character
                    self.pos = at + 2
                    continue
                if c == 0x22:
                    self.in_string = False
            elif c == 0x22:
                self.in_string = True
            elif c in (0x7B, 0x5B):
                self.depth += 1
            else:
                self.depth -= 1
                if self.depth == 0:
                    self.end = self.pos = at + 1
                    return self.end
            self.pos = at + 1
        self.pos = max(self.pos, len(data))
        return None


def _members(text: str) -> Iterator[tuple[str, object, int]]:
    """Yield ``(key, value, offset after the value)`` for each member of a JSON object."""
    decoder = json.JSONDecoder()
    ws = " \t\r\n"
    i = 1  # after "{"
    size = len(text)

    def skip(i: int) -> int:
        while i < size and text[i] in ws:
            i += 1
        return i

    i = skip(i)
    if text.startswith("}", i):
        return
    while True:
        if not text.startswith('"', i):
            raise ValueError("expected a key")
        key, i = json.decoder.scanstring(text, i + 1)  # type: ignore[attr-defined]
        i = skip(i)
        if not text.startswith(":", i):
            raise ValueError("expected ':'")
        value, i = decoder.raw_decode(text, skip(i + 1))
        yield key, value, i
        i = skip(i)
        if text.startswith("}", i):
            return
        if not text.startswith(",", i):
            raise ValueError("expected ',' or '}'")
        i = skip(i + 1)


def _ms(value: object) -> int:
    # bool is an int subclass, and true is no duration.
    if type(value) is not int or not 0 < value <= 86_400_000:
        raise HandshakeError("bad ping values")
    return value


_Framing = Literal["eio4", "eio3", "eio3-binary"]
_DIGIT_BYTES: Final = bytes(range(10))


def _packet_start(data: bytes | bytearray, final: bool) -> tuple[_Framing, int, int] | None:
    """Find the first packet of a decoded body.

    :returns: ``(framing, declared length or -1, offset of the "{" after the
        open packet's type)``, or None when more bytes are needed.
    :raises HandshakeError: when the body can never become a handshake.
    """
    if not data:
        if final:
            raise HandshakeError("empty body")
        return None
    first = data[0]
    framing: _Framing
    declared = -1
    if first == 0x30:  # "0": an EIO4 open packet
        framing, start = "eio4", 0
    elif 0x31 <= first <= 0x39:  # an EIO3 text payload: "<length>:<packet>"
        colon = data.find(b":", 0, 8)
        if colon == -1:
            if len(data) >= 8 or data.strip(b"0123456789") or final:
                raise HandshakeError("not a handshake")
            return None
        if data[:colon].strip(b"0123456789"):
            raise HandshakeError("not a handshake")
        framing, declared, start = "eio3", int(data[:colon]), colon + 1
    elif first == 0x00:  # an EIO3 binary payload, string packet: 0, digit bytes, 0xFF
        marker = data.find(b"\xff", 1, 9)
        if marker == -1:
            if len(data) >= 9 or data[1:].translate(None, _DIGIT_BYTES) or final:
                raise HandshakeError("not a handshake")
            return None
        digits = data[1:marker]
        if not digits or digits.translate(None, _DIGIT_BYTES):
            raise HandshakeError("not a handshake")
        declared = int("".join(str(d) for d in digits))
        framing, start = "eio3-binary", marker + 1
    elif first == 0x5F:  # "_": ___eio[j]("..."), JSONP
        raise HandshakeError("jsonp")
    else:
        raise HandshakeError("not a handshake")
    # The packet type must be "open". A socket.io CONNECT reply ("40{...}")
    # also carries a "sid", but that is the socket.io id, not the session's.
    if len(data) <= start + 1:
        if final or (len(data) == start + 1 and data[start] != 0x30):
            raise HandshakeError("not an open packet")
        return None
    if data[start : start + 2] != b"0{":
        raise HandshakeError("not an open packet")
    return framing, declared, start + 1


def _open_packet(
    data: bytes | bytearray, framing: _Framing, declared: int, start: int, end: int
) -> tuple[Handshake, int]:
    """Read the open packet's JSON object, ``data[start:end]``.

    :returns: the handshake and the offset in ``data`` just after the sid's
        closing quote.
    :raises HandshakeError: the object is not a usable handshake.
    """
    try:
        text = data[start:end].decode("utf-8")
        members = list(_members(text))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeError are ValueErrors
        raise HandshakeError("bad json") from e
    if declared >= 0:
        # The EIO3 length counts UTF-16 code units (JavaScript string length),
        # the packet type included.
        units = 1 + len(text.encode("utf-16-le")) // 2
        if units != declared:
            raise HandshakeError("bad length prefix")
    # JSON.parse and json.loads both keep the last of repeated keys.
    fields = {key: (value, after) for key, value, after in members}
    sid_value, sid_after = fields.get("sid", (None, 0))
    if not isinstance(sid_value, str) or not sid_value:
        raise HandshakeError("bad sid")
    if sid_problem(sid_value.encode("utf-8")) is not None:
        raise HandshakeError("bad sid")
    sid = sid_value
    upgrades = fields.get("upgrades", ([], 0))[0]
    max_payload = fields.get("maxPayload", (None, 0))[0]
    handshake = Handshake(
        sid=sid,
        ping_interval=_ms(fields.get("pingInterval", (None, 0))[0]),
        ping_timeout=_ms(fields.get("pingTimeout", (None, 0))[0]),
        upgrades=tuple(u for u in upgrades if isinstance(u, str))
        if isinstance(upgrades, list)
        else (),
        max_payload=max_payload if type(max_payload) is int else None,
        framing=framing,
    )
    sid_end = start + len(text[:sid_after].encode("utf-8"))
    return handshake, sid_end


def locate_sid(data: bytes) -> tuple[Handshake, int]:
    """Parse the open packet of a complete, decoded handshake body.

    :returns: the handshake and the offset just after the sid's closing quote.
    :raises HandshakeError: it is not a usable handshake.
    """
    if len(data) > HANDSHAKE_LIMIT:
        raise HandshakeError("too large")
    found = _packet_start(data, final=True)
    assert found is not None  # a final look never asks for more
    framing, declared, start = found
    end = _ObjectScanner(start).scan(data)
    if end is None:
        raise HandshakeError("truncated")
    return _open_packet(data, framing, declared, start, end)


class HandshakeParser:
    """Finds the sid in a handshake response body as it streams.

    Feed it the body bytes exactly as the backend sends them (chunked or
    not); it decodes at most ``limit`` bytes. A result is final as soon as the
    open packet is complete, usually before the body ends, so the proxy can
    learn the sid before relaying the response.

    :param chunked: the body uses the chunked transfer coding.
    :param limit: the most decoded body bytes examined.
    """

    __slots__ = ("_body", "_error", "_packet", "_result", "_scanner")

    def __init__(self, *, chunked: bool = False, limit: int = HANDSHAKE_LIMIT) -> None:
        self._body = BodyPrefix(chunked=chunked, limit=limit)
        self._packet: tuple[_Framing, int, int] | None = None
        self._scanner: _ObjectScanner | None = None
        self._result: Handshake | None = None
        self._error: HandshakeError | None = None

    def feed(self, data: bytes) -> Handshake | None:
        """Add body bytes.

        :returns: the handshake once known (and on every later call), or
            None while more bytes are needed.
        :raises HandshakeError: the body is not a usable handshake; every
            later call raises it again.
        """
        if self._result is not None:
            return self._result
        self._body.feed(data)
        return self._parse(final=self._body.complete)

    def eof(self) -> Handshake:
        """The body ended: return the handshake or give up.

        :raises HandshakeError: the body held no complete handshake.
        """
        if self._result is not None:
            return self._result
        result = self._parse(final=True)
        assert result is not None  # a final parse never asks for more
        return result

    def _parse(self, *, final: bool) -> Handshake | None:
        if self._error is not None:
            raise self._error
        body = self._body
        try:
            self._result = self._step(final)
            if self._result is None and body.overflow:
                raise HandshakeError("too large")
        except HandshakeError as e:
            self._error = e
            raise
        return self._result

    def _step(self, final: bool) -> Handshake | None:
        body = self._body
        if body.broken:
            raise HandshakeError("bad chunked coding")
        # The decoded bytes, not a copy: the scan resumes where it stopped, so
        # the body is read once however it is split.
        data = body.buffer
        if self._packet is None:
            self._packet = _packet_start(data, final)
            if self._packet is None:
                return None
            self._scanner = _ObjectScanner(self._packet[2])
        assert self._scanner is not None
        end = self._scanner.scan(data)
        if end is None:
            if final:
                raise HandshakeError("truncated")
            return None
        framing, declared, start = self._packet
        return _open_packet(data, framing, declared, start, end)[0]


def parse_handshake(body: bytes) -> Handshake:
    """Parse a complete, decoded handshake body.

    :raises HandshakeError: it is not a usable handshake.
    """
    return locate_sid(body)[0]


# --------------------------------------------------------------------------
# Unknown sessions: the misrouting signal

#: ``polling_json``: engine.io's JSON error with code 1, to a poll; ``upgrade_text``:
#: its plain-text answer to a WebSocket upgrade; ``python_engineio``: that
#: server's "Invalid session" answer, to either.
UnknownSession = Literal["polling_json", "upgrade_text", "python_engineio"]

#: Enough for every known answer; python-engineio's includes the sid.
_SNIFF_LIMIT: Final = 64 + MAX_SID_LENGTH


def unknown_session_kind(status: int, body: bytes) -> UnknownSession | None:
    """Whether a response says that the session does not exist on this server.

    :param status: the response status; every known answer is a 400.
    :param body: the (decoded) body, or its first bytes.
    """
    if status != 400:
        return None
    text = body.strip(b" \t\r\n")
    if text == b"Session ID unknown":
        return "upgrade_text"
    if text.startswith(b"Invalid session"):
        return "python_engineio"
    if not text.startswith((b"{", b'"')):
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if isinstance(value, dict) and type(value.get("code")) is int and value["code"] == 1:
        return "polling_json"
    if isinstance(value, str) and value.startswith("Invalid session"):
        return "python_engineio"
    return None


class UnknownSessionSniffer:
    """Watches a response body for an "unknown session" answer.

    Create one with :meth:`for_response` for the response to a session
    request, feed it the body bytes as they are relayed, and ask for the
    :meth:`verdict` once the body has ended. engine.io sends its JSON answer
    chunked, so chunked bodies are decoded.
    """

    __slots__ = ("_body", "_status")

    def __init__(self, status: int, *, chunked: bool) -> None:
        self._status = status
        self._body = BodyPrefix(chunked=chunked, limit=_SNIFF_LIMIT)

    @classmethod
    def for_response(cls, head: ResponseHead, *, chunked: bool) -> UnknownSessionSniffer | None:
        """A sniffer for this response, or None when it cannot be such an answer.

        :param chunked: the body's framing is chunked.
        """
        if head.status != 400:
            return None
        encoding = head.get(b"content-encoding")
        if encoding is not None and encoding.strip().lower() != b"identity":
            return None  # never compressed in practice: the answers are tiny
        return cls(head.status, chunked=chunked)

    def feed(self, data: bytes) -> None:
        """Add body bytes exactly as they travel on the wire."""
        self._body.feed(data)

    def verdict(self) -> UnknownSession | None:
        """The kind of answer seen so far, or None."""
        body = self._body
        if body.broken or body.overflow:
            return None
        return unknown_session_kind(self._status, body.data)
