# -*- test-case-name: tests.test_httphead -*-
"""HTTP/1.1 message heads and body framing, without I/O.

Theory of operation
-------------------

The proxy never re-encodes a body: it parses each message *head*, may edit a
few header lines, serializes the head to the other side and then forwards the
body bytes verbatim. So this module has two halves:

* :class:`HeadParser` buffers bytes until the empty line that ends a head
  (RFC 9112 §2.1), validates it strictly in one pass and returns a
  :class:`RequestHead` or :class:`ResponseHead`. Bytes after the head are
  handed back by :meth:`HeadParser.take_rest`.
* :class:`BodyReader` is given the message's :class:`Framing` (RFC 9112 §6.3;
  decided at parse time for requests, by :func:`response_framing` for
  responses) and splits incoming bytes into "still this message" and "after
  this message". It never copies or re-chunks data: chunked bodies are walked
  with index arithmetic and forwarded in the slices they arrived in.

Strictness is the defence against request smuggling: a proxy and a backend
that disagree about where a message ends can be made to smuggle a request past
the proxy. Every case where RFC 9112 lets a recipient choose between lenient
and strict, this module chooses strict, and says so where it decides:

* bare LF (and bare CR) line endings are rejected in heads and chunk lines,
  although RFC 9112 §2.2 lets a recipient accept a lone LF;
* obs-fold is rejected (RFC 9112 §5.2 allows rejecting it with 400);
* NUL, CR, LF and every other control character except HTAB are rejected in
  field values (RFC 9110 §5.5 allows rejecting "other CTL characters");
* a request carrying both Content-Length and Transfer-Encoding loses its
  Content-Length and closes the connection afterwards (RFC 9112 §6.1, §6.3
  step 3), and its Transfer-Encoding is forwarded as exactly ``chunked``.

All errors are :class:`~stickyproxy.errors.RemoteProtocolError` carrying the
status the proxy should answer with (400, 413, 414, 431, 501, 505 for
requests; 502 for anything wrong with a backend's response).
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from typing import Final, Generic, Literal, TypeVar, cast, overload

from stickyproxy.errors import RemoteProtocolError

__all__ = [
    "CHUNKED",
    "HOP_BY_HOP",
    "NO_BODY",
    "PROTECTED",
    "UNTIL_CLOSE",
    "BodyReader",
    "Framing",
    "HeadParser",
    "RequestHead",
    "ResponseHead",
    "response_framing",
    "strip_hop_by_hop",
    "validate_upgrade_response",
]

# --------------------------------------------------------------------------
# Character classes. Validation deletes the allowed bytes with
# ``bytes.translate(None, allowed)``: whatever is left over is invalid, and the
# whole check runs in C.

#: RFC 9110 §5.6.2: tchar, the bytes of a token (methods, field names, codings).
_TCHAR: Final = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
#: Bytes allowed anywhere in a head: VCHAR, obs-text, SP, HTAB (RFC 9110 §5.5)
#: plus CR and LF, whose pairing is checked separately.
_HEAD_OK: Final = bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100)) + b"\t\r\n"
#: The same without CR and LF: deleting these from a valid head leaves one
#: CRLF per line break and nothing else.
_LINE_OK: Final = _HEAD_OK[:-2]
#: Bytes allowed in a request-target: visible ASCII except "#" (a fragment is
#: never sent, RFC 9110 §4.2.4). Stricter than RFC 3986 would need ("{", "|",
#: quotes are tolerated as browsers send them) but no SP, CTL or byte >= 0x80.
_TARGET_OK: Final = bytes(range(0x21, 0x7F)).replace(b"#", b"")
_OWS: Final = b" \t"

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_QUOTED_STRING = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
# RFC 3986 §3.2.2 host (reg-name or IP-literal) and §3.2.3 port.
_HOST = rb"(?:\[[0-9A-Za-z:._~!$&'()*+,;=%-]+\]|[0-9A-Za-z._~!$&'()*+,;=%-]*)"
_HOST_HEADER_RE: Final = re.compile(_HOST + rb"(?::[0-9]*)?")
# RFC 9112 §3.2.3: authority-form is only host ":" port, and port is required.
_AUTHORITY_FORM_RE: Final = re.compile(_HOST + rb":[0-9]+")
# RFC 9112 §3.2.2 absolute-form; userinfo is refused (RFC 9110 §4.2.4
# deprecates it in http(s) URIs, and it hides the real host from log readers).
_ABSOLUTE_FORM_RE: Final = re.compile(rb"[Hh][Tt][Tt][Pp][Ss]?://([^/?@]+)(?:[/?].*)?", re.DOTALL)
_VERSION_RE: Final = re.compile(rb"HTTP/([0-9])\.([0-9])")
_STATUS_LINE_RE: Final = re.compile(rb"HTTP/([0-9])\.([0-9]) ([0-9]{3})(?: (.*))?", re.DOTALL)
# RFC 9112 §7.1: chunk-size [ chunk-ext ] CRLF, with
# chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] ).
_CHUNK_LINE_RE: Final = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[ \t]*"
    + _TOKEN
    + rb"(?:[ \t]*=[ \t]*(?:"
    + _TOKEN
    + rb"|"
    + _QUOTED_STRING
    + rb"))?)*\r\n"
)
# RFC 9112 §7.1.2: trailer fields have the syntax of header fields.
_TRAILER_LINE_RE: Final = re.compile(_TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r\n")

_KNOWN_VERSIONS: Final = {b"HTTP/1.1": b"HTTP/1.1", b"HTTP/1.0": b"HTTP/1.0"}
_HTTP11: Final = b"HTTP/1.1"
_HTTP10: Final = b"HTTP/1.0"
# Header names the parser looks at; everything else passes untouched.
_REQUEST_WATCH: Final = frozenset(
    (
        b"connection",
        b"content-length",
        b"host",
        b"sec-websocket-key",
        b"transfer-encoding",
        b"upgrade",
    )
)
_RESPONSE_WATCH: Final = frozenset((b"connection",))
#: Methods valid without checking them byte by byte (RFC 9110 §9.1 plus PATCH).
_COMMON_METHODS: Final = frozenset(
    (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH")
)
_NO_TOKENS: Final[frozenset[bytes]] = frozenset()

#: Field names already validated as tokens, mapped to their lower case. Most
#: messages repeat the same few dozen names, so a dictionary hit replaces the
#: per-line token check and lower-casing. Only valid names are ever stored, and
#: the table stops growing at ``_FIELD_NAMES_MAX`` entries, so a client sending
#: random names costs memory once and then merely takes the slower path.
_FIELD_NAMES: Final[dict[bytes, bytes]] = {}
_FIELD_NAMES_MAX: Final = 2048
for _name in (
    b"Accept",
    b"Accept-Encoding",
    b"Accept-Language",
    b"Authorization",
    b"Cache-Control",
    b"Connection",
    b"Content-Encoding",
    b"Content-Length",
    b"Content-Type",
    b"Cookie",
    b"Date",
    b"ETag",
    b"Expires",
    b"Host",
    b"If-Modified-Since",
    b"If-None-Match",
    b"Keep-Alive",
    b"Last-Modified",
    b"Location",
    b"Origin",
    b"Pragma",
    b"Referer",
    b"Sec-Fetch-Dest",
    b"Sec-Fetch-Mode",
    b"Sec-Fetch-Site",
    b"Sec-WebSocket-Accept",
    b"Sec-WebSocket-Extensions",
    b"Sec-WebSocket-Key",
    b"Sec-WebSocket-Protocol",
    b"Sec-WebSocket-Version",
    b"Server",
    b"Set-Cookie",
    b"Transfer-Encoding",
    b"Upgrade",
    b"User-Agent",
    b"Vary",
    b"X-Forwarded-For",
    b"X-Forwarded-Proto",
    b"X-Requested-With",
):
    _FIELD_NAMES[_name] = _FIELD_NAMES[_name.lower()] = _name.lower()
del _name


# --------------------------------------------------------------------------
# Framing


@dataclass(frozen=True, slots=True)
class Framing:
    """How the end of a message body is found (RFC 9112 §6.3).

    :param kind: ``"none"`` (no body), ``"length"`` (exactly ``length``
        bytes), ``"chunked"`` (chunked transfer coding, trailers included) or
        ``"close"`` (everything until the peer closes the connection).
    :param length: the body length for ``"length"``; 0 otherwise.
    """

    kind: Literal["none", "length", "chunked", "close"]
    length: int = 0

    def __post_init__(self) -> None:
        if self.length < 0 or (self.length and self.kind != "length"):
            raise ValueError(f"invalid framing {self.kind!r} with length {self.length}")


NO_BODY: Final = Framing("none")
CHUNKED: Final = Framing("chunked")
UNTIL_CLOSE: Final = Framing("close")

#: Framings of the small body lengths seen so far, shared as they are
#: immutable. Keyed by lengths below ``_LENGTH_CACHE_LIMIT`` only, so the table
#: is bounded whatever lengths peers announce.
_LENGTH_FRAMINGS: Final[dict[int, Framing]] = {}
_LENGTH_CACHE_LIMIT: Final = 4096


def _length_framing(length: int) -> Framing:
    """``Framing("length", length)``, reused for small lengths."""
    framing = _LENGTH_FRAMINGS.get(length)
    if framing is None:
        framing = Framing("length", length)
        if length < _LENGTH_CACHE_LIMIT:
            _LENGTH_FRAMINGS[length] = framing
    return framing


# --------------------------------------------------------------------------
# Heads


def _list_tokens(values: list[bytes]) -> frozenset[bytes]:
    """Lower-cased elements of comma-separated list headers.

    RFC 9110 §5.6.1: recipients accept empty list elements and ignore them.
    """
    if not values:
        return _NO_TOKENS
    if len(values) == 1 and b"," not in values[0]:
        # The usual "Connection: keep-alive": one element, no generator.
        element = values[0].strip(_OWS).lower()
        return frozenset((element,)) if element else _NO_TOKENS
    return frozenset(
        element
        for value in values
        for raw in value.lower().split(b",")
        if (element := raw.strip(_OWS))
    )


class _Fields:
    """Header access shared by request and response heads.

    Names are matched case-insensitively (RFC 9110 §5.1); the lookup name must
    be given in lower case. Values are forwarded exactly as received.
    """

    __slots__ = ()
    headers: list[tuple[bytes, bytes]]

    def get(self, name: bytes) -> bytes | None:
        """Return the first value of header ``name`` (lower case), or None."""
        size = len(name)
        for raw, value in self.headers:
            if len(raw) == size and raw.lower() == name:
                return value
        return None

    def get_all(self, name: bytes) -> list[bytes]:
        """Return every value of header ``name`` (lower case), in order."""
        size = len(name)
        return [v for raw, v in self.headers if len(raw) == size and raw.lower() == name]

    def remove(self, name: bytes) -> None:
        """Remove every occurrence of header ``name`` (lower case)."""
        size = len(name)
        self.headers[:] = [
            (raw, v) for raw, v in self.headers if len(raw) != size or raw.lower() != name
        ]

    def add(self, name: bytes, value: bytes) -> None:
        """Append a header line after all the others."""
        self.headers.append((name, value))

    def _serialize(self, start_line: bytes) -> bytes:
        parts = [start_line]
        for name, value in self.headers:
            parts.append(name + b": " + value)
        parts.append(b"\r\n")
        return b"\r\n".join(parts)


@dataclass(slots=True, eq=False)
class RequestHead(_Fields):
    """A parsed request head.

    ``keep_alive``, ``is_websocket_upgrade`` and ``connection_tokens``
    describe the message as it was received (or constructed): editing the
    headers afterwards, e.g. with :func:`strip_hop_by_hop`, does not change
    them.

    :param method: the method token, case preserved (RFC 9110 §9.1).
    :param target: the request-target, byte-exact.
    :param version: ``b"HTTP/1.1"`` or ``b"HTTP/1.0"``.
    :param headers: ``(name as received, value without surrounding OWS)``.
    :param framing: how the body ends (decided and validated by the parser).
    :param close_after: the connection must close after this exchange.
    """

    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    framing: Framing = NO_BODY
    close_after: bool = False
    _connection: frozenset[bytes] = field(init=False, repr=False, default=frozenset())
    _upgrade: frozenset[bytes] = field(init=False, repr=False, default=frozenset())

    def __post_init__(self) -> None:
        self._connection = _list_tokens(self.get_all(b"connection"))
        self._upgrade = _list_tokens(self.get_all(b"upgrade"))

    @property
    def connection_tokens(self) -> frozenset[bytes]:
        """The lower-cased Connection options the message was received with."""
        return self._connection

    @property
    def keep_alive(self) -> bool:
        """Whether the client wants the connection kept open (RFC 9112 §9.3).

        HTTP/1.1 persists unless "close" is among the Connection options;
        HTTP/1.0 persists only with "keep-alive" (RFC 9112 Appendix C.2.2).
        """
        if b"close" in self._connection:
            return False
        return self.version == _HTTP11 or b"keep-alive" in self._connection

    @property
    def wants_upgrade(self) -> bool:
        """Whether the request asks to switch protocols (RFC 9110 §7.8).

        An Upgrade in an HTTP/1.0 request is ignored, as §7.8 requires.
        """
        return self.version == _HTTP11 and b"upgrade" in self._connection and bool(self._upgrade)

    @property
    def is_websocket_upgrade(self) -> bool:
        """Whether this is a WebSocket opening handshake (RFC 6455 §4.1)."""
        return self.method == b"GET" and self.wants_upgrade and b"websocket" in self._upgrade

    def serialize(self) -> bytes:
        """Encode the head: request line, header lines, empty line."""
        return self._serialize(b"%s %s %s" % (self.method, self.target, self.version))


@dataclass(slots=True, eq=False)
class ResponseHead(_Fields):
    """A parsed response head.

    ``keep_alive`` and ``connection_tokens`` describe the message as received.

    :param version: ``b"HTTP/1.1"`` or ``b"HTTP/1.0"``.
    :param status: the status code, 100 to 599.
    :param reason: the reason phrase, possibly empty.
    :param headers: ``(name as received, value without surrounding OWS)``.
    """

    version: bytes
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    _connection: frozenset[bytes] = field(init=False, repr=False, default=frozenset())

    def __post_init__(self) -> None:
        self._connection = _list_tokens(self.get_all(b"connection"))

    @property
    def connection_tokens(self) -> frozenset[bytes]:
        """The lower-cased Connection options the message was received with."""
        return self._connection

    @property
    def keep_alive(self) -> bool:
        """Whether the server keeps the connection open (RFC 9112 §9.3)."""
        if b"close" in self._connection:
            return False
        return self.version == _HTTP11 or b"keep-alive" in self._connection

    def serialize(self) -> bytes:
        """Encode the head: status line, header lines, empty line.

        A status line received without a reason phrase is written with the
        SP that RFC 9112 §4 requires before the (empty) reason.
        """
        return self._serialize(b"%s %d %s" % (self.version, self.status, self.reason))


# --------------------------------------------------------------------------
# Head parser

_H = TypeVar("_H", bound=RequestHead | ResponseHead)


class HeadParser(Generic[_H]):
    """Incremental parser for one message head at a time.

    Feed it bytes until it returns a head; then :meth:`take_rest` returns the
    bytes that followed the head and readies the parser for the next one.
    After an error the parser must be discarded.

    :param kind: ``"request"`` (client side) or ``"response"`` (backend side).
    :param max_size: the largest head accepted, in bytes, empty line included.
    :param max_headers: the most header lines accepted.
    """

    __slots__ = (
        "_at_start",
        "_buf",
        "_lines",
        "_max_headers",
        "_max_size",
        "_request",
        "_rest",
        "_scanned",
        "_skipped",
    )

    @overload
    def __init__(
        self: HeadParser[RequestHead],
        kind: Literal["request"],
        *,
        max_size: int = ...,
        max_headers: int = ...,
    ) -> None: ...

    @overload
    def __init__(
        self: HeadParser[ResponseHead],
        kind: Literal["response"],
        *,
        max_size: int = ...,
        max_headers: int = ...,
    ) -> None: ...

    def __init__(
        self,
        kind: Literal["request", "response"],
        *,
        max_size: int = 15360,
        max_headers: int = 100,
    ) -> None:
        if kind not in ("request", "response"):
            raise ValueError(f"kind must be 'request' or 'response', not {kind!r}")
        self._request = kind == "request"
        self._max_size = max_size
        self._max_headers = max_headers
        self._buf = bytearray()
        self._rest: bytes | None = None
        self._reset()

    def _reset(self) -> None:
        self._buf.clear()
        self._rest = None
        self._scanned = 0  # how far the search for the end of the head got
        self._lines = 0  # line ends seen in the buffer so far
        self._skipped = 0  # empty lines dropped before a request line
        self._at_start = True

    @property
    def buffered(self) -> int:
        """How many received bytes the parser currently holds."""
        return len(self._buf) if self._rest is None else len(self._rest)

    def take_rest(self) -> bytes:
        """Return the bytes received after the completed head, and reset.

        :raises RuntimeError: if no head has been completed.
        """
        rest = self._rest
        if rest is None:
            raise RuntimeError("take_rest() called before a head was complete")
        if self._at_start:
            # Completed by the fast path in feed(): nothing else to reset.
            self._rest = None
        else:
            self._reset()
        return rest

    def _error(self, reason: str, status: int) -> RemoteProtocolError:
        # Anything wrong with a backend's response becomes 502 Bad Gateway
        # (RFC 9110 §15.6.3).
        return RemoteProtocolError(reason, status if self._request else 502)

    def feed(self, data: bytes) -> _H | None:
        """Add received bytes; return the head once it is complete.

        :returns: the parsed head, or None while more bytes are needed.
        :raises RemoteProtocolError: as soon as the bytes cannot be a valid
            head, with the status the proxy should answer.
        :raises RuntimeError: if a completed head's rest was not taken.
        """
        if self._rest is not None:
            raise RuntimeError("take_rest() must be called before feeding the next head")
        buf = self._buf
        if not buf and self._at_start and not self._skipped:
            # Fastest path: a whole head arrives in one segment and starts as
            # a head must (the same test _check_start makes). The parser's
            # state stays pristine, so take_rest() need not reset it.
            request = self._request
            if (data and data[0] in _TCHAR) if request else data.startswith(b"HTTP/"):
                end = data.find(b"\r\n\r\n")
                if end != -1 and end + 4 <= self._max_size:
                    self._rest = bytes(data[end + 4 :])
                    if request:
                        return cast(_H, self._parse_request(bytes(data[:end])))
                    return cast(_H, self._parse_response(bytes(data[:end])))
        # Fast path: a whole head in one segment is parsed without copying it
        # into the buffer first.
        view: bytes | bytearray
        if buf:
            buf += data
            view = buf
        else:
            view = data
        if self._at_start:
            view = self._check_start(view)
            if view is not buf:
                buf.clear()
            if self._at_start:
                # Only (part of) empty lines, or too few bytes to judge yet.
                if view is not buf:
                    buf += view
                return None
        end = view.find(b"\r\n\r\n", max(0, self._scanned - 3))
        if end == -1:
            self._check_incomplete(view)
            if view is not buf:
                buf += view
            self._scanned = len(buf)
            return None
        head_end = end + 4
        if self._skipped + head_end > self._max_size:
            raise self._too_big(view)
        head_bytes = bytes(view[:end])
        self._rest = bytes(view[head_end:])
        buf.clear()
        if self._request:
            return cast(_H, self._parse_request(head_bytes))
        return cast(_H, self._parse_response(head_bytes))

    def _check_start(self, view: bytes | bytearray) -> bytes | bytearray:
        """Drop empty lines before a request line and reject non-HTTP early.

        Clears ``_at_start`` once enough bytes arrived to judge the start.
        """
        if self._request:
            # RFC 9112 §2.2: a server SHOULD ignore at least one empty line
            # received before the request-line (some clients send CRLF after
            # a POST body). They still count towards the head size limit.
            skip = 0
            while view.startswith(b"\r\n", skip):
                skip += 2
            if skip:
                self._skipped += skip
                view = view[skip:]
                if self._skipped >= self._max_size:
                    raise self._error("too many empty lines before the request line", 400)
            if not view or view == b"\r":
                return view
            # A request starts with a method token: reject TLS handshakes and
            # other binary protocols without waiting for a line end.
            if view[0] not in _TCHAR:
                raise self._error("not an HTTP/1.x request", 400)
        else:
            if not b"HTTP/".startswith(view[:5]):
                raise self._error("not an HTTP/1.x response", 502)
            if len(view) < 5:
                return view
        self._at_start = False
        return view

    def _check_incomplete(self, view: bytes | bytearray) -> None:
        """Fail as soon as a partial head can no longer become valid."""
        start = max(0, self._scanned - 3)
        # With no CRLF CRLF in the buffer, LF LF or an LF CRLF can only come
        # from a bare LF line ending, which this parser refuses (module doc).
        if view.find(b"\n\n", start) != -1 or view.find(b"\n\r\n", start) != -1:
            raise self._error("bare LF line ending in head", 400)
        self._lines += view.count(b"\n", self._scanned)
        if self._lines > self._max_headers + 1:
            raise self._error("too many header lines", 431)
        if self._skipped + len(view) >= self._max_size:
            raise self._too_big(view)

    def _too_big(self, view: bytes | bytearray) -> RemoteProtocolError:
        if self._request and view.find(b"\n", 0, self._max_size) == -1:
            return self._error("request line too long", 414)
        return self._error("head too large", 431)

    # -- whole-head validation -------------------------------------------------

    def _split_lines(self, head: bytes) -> list[bytes]:
        lines = head.split(b"\r\n")
        crlf = len(lines) - 1
        # One C pass checks both the bytes and the line endings; the
        # specific error is worked out only for a head that fails.
        if head.translate(None, _LINE_OK) != b"\r\n" * crlf:
            if head.count(b"\n") != crlf or head.count(b"\r") != crlf:
                raise self._error("bare CR or LF in head", 400)
            bad = head.translate(None, _HEAD_OK)
            what = "NUL" if b"\x00" in bad else "control character"
            raise self._error(f"{what} in head", 400)
        if crlf > self._max_headers:
            raise self._error("too many header lines", 431)
        return lines

    def _parse_fields(
        self, lines: list[bytes], watch: frozenset[bytes]
    ) -> tuple[list[tuple[bytes, bytes]], dict[bytes, list[int]]]:
        """Parse header lines (RFC 9112 §5): ``name ":" OWS value OWS``.

        :param lines: the head's lines; the first (start line) is skipped.
        :param watch: lower-case names whose positions are wanted.
        :returns: the headers, and the positions of each watched name seen.
        """
        headers: list[tuple[bytes, bytes]] = []
        watched: dict[bytes, list[int]] = {}
        append = headers.append
        known = _FIELD_NAMES.get
        ows = _OWS
        for line in islice(lines, 1, None):
            # A known name is a non-empty token, so a line that starts with it
            # and a colon is well formed up to the value (whose bytes the
            # whole-head check already vetted); anything else is examined in
            # detail by _field_name.
            name, colon, value = line.partition(b":")
            lower = known(name) if colon else None
            if lower is None:
                lower = self._field_name(line)
            if lower in watch:
                watched.setdefault(lower, []).append(len(headers))
            append((name, value.strip(ows)))
        return headers, watched

    def _field_name(self, line: bytes) -> bytes:
        """Validate the name of a header line; return it in lower case."""
        if line[0] in (0x20, 0x09):
            # RFC 9112 §5.2: obs-fold may be rejected with 400; folding
            # into the previous line (HAProxy does so even for Host) is
            # a known way to hide headers from one side of a proxy.
            raise self._error("obsolete line folding in header", 400)
        colon = line.find(b":")
        if colon <= 0:
            raise self._error(
                "empty header name" if colon == 0 else "header line without colon", 400
            )
        name = line[:colon]
        if name.translate(None, _TCHAR):
            # RFC 9112 §5.1: no whitespace is allowed between the field
            # name and the colon; a server MUST reject such a message.
            if name[-1] in (0x20, 0x09):
                raise self._error("whitespace before colon in header", 400)
            raise self._error("invalid header name", 400)
        lower = name.lower()
        if len(_FIELD_NAMES) < _FIELD_NAMES_MAX:
            _FIELD_NAMES[name] = lower
        return lower

    def _parse_request(self, head: bytes) -> RequestHead:
        lines = self._split_lines(head)
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            if len(parts) == 2 and parts[0] and parts[1]:
                raise self._error("request line without HTTP version (HTTP/0.9)", 400)
            # RFC 9112 §3: single SP separators; the leniency §3 permits is
            # declined, as it is another source of parser disagreement.
            raise self._error("malformed request line", 400)
        method, target, raw_version = parts
        version = _KNOWN_VERSIONS.get(raw_version) or self._other_version(method, raw_version)
        if method not in _COMMON_METHODS and (not method or method.translate(None, _TCHAR)):
            raise self._error("invalid method", 400)
        if not target:
            raise self._error("empty request target", 400)
        authority = self._check_target(method, target)

        headers, watched = self._parse_fields(lines, _REQUEST_WATCH)

        drop: list[int] = []
        close_after = False
        framing = NO_BODY
        cl_index = watched.get(b"content-length")
        te_index = watched.get(b"transfer-encoding")
        if cl_index:
            length, digits = _content_length([headers[i][1] for i in cl_index], self._error, 400)
            framing = _length_framing(length)
            # RFC 9110 §8.6: a list of identical values may be replaced by a
            # single one; it is, so the backend never sees a list.
            first = cl_index[0]
            if headers[first][1] != digits:
                headers[first] = (headers[first][0], digits)
            drop += cl_index[1:]
        if te_index:
            if version == _HTTP10:
                # RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message
                # MUST be treated as faulty framing; for a request that is 400.
                raise self._error("Transfer-Encoding in an HTTP/1.0 request", 400)
            _check_request_codings([headers[i][1] for i in te_index], self._error)
            framing = CHUNKED
            # Forward exactly one "Transfer-Encoding: chunked" so no backend
            # can read the list differently than this parser did.
            first = te_index[0]
            if len(te_index) > 1 or headers[first][1].lower() != b"chunked":
                headers[first] = (headers[first][0], b"chunked")
            drop += te_index[1:]
            if cl_index:
                # RFC 9112 §6.3 step 3: Transfer-Encoding overrides
                # Content-Length, and an intermediary MUST remove the
                # Content-Length before forwarding; §6.1: the server MUST
                # close the connection after responding to such a request.
                drop += cl_index
                close_after = True
        if version == _HTTP10 and framing.length and method in (b"GET", b"HEAD", b"DELETE"):
            # A body on these methods had no meaning in HTTP/1.0 (RFC 1945),
            # so an HTTP/1.0 backend may ignore it and read the body as the
            # next request. HAProxy answers 413 here; so does this proxy.
            raise self._error("body in an HTTP/1.0 GET, HEAD or DELETE request", 413)

        # RFC 9112 §3.2: "A server MUST respond with a 400 (Bad Request)
        # status code to any HTTP/1.1 request message that lacks a Host header
        # field and to any request message that contains more than one Host
        # header field line or a Host header field with an invalid field
        # value." HAProxy merges identical duplicates; this parser follows
        # the RFC, as two Host lines are how routing confusion starts.
        host_index = watched.get(b"host")
        upgrade_index = watched.get(b"upgrade")
        if host_index:
            if len(host_index) > 1:
                raise self._error("more than one Host header", 400)
            host = headers[host_index[0]][1]
            if not _HOST_HEADER_RE.fullmatch(host):
                raise self._error("invalid Host header", 400)
            if authority is not None and authority.lower() != host.lower():
                raise self._error("Host header differs from the target's authority", 400)
        elif version == _HTTP11:
            raise self._error("missing Host header", 400)

        keys = (
            [headers[i][1] for i in watched.get(b"sec-websocket-key", ())] if upgrade_index else []
        )
        connection = upgrade = _NO_TOKENS
        if b"connection" in watched:
            connection = _list_tokens([headers[i][1] for i in watched[b"connection"]])
        if upgrade_index:
            upgrade = _list_tokens([headers[i][1] for i in upgrade_index])
        if drop:
            dropped = set(drop)
            headers = [h for i, h in enumerate(headers) if i not in dropped]
        # Built without __init__: the Connection and Upgrade options are
        # already known, so __post_init__'s extra pass over the headers is
        # skipped (this is the per-request hot path).
        request = object.__new__(RequestHead)
        request.method = method
        request.target = target
        request.version = version
        request.headers = headers
        request.framing = framing
        request._connection = connection
        request._upgrade = upgrade
        # keep_alive, inlined (RFC 9112 §9.3).
        request.close_after = (
            close_after
            or b"close" in connection
            or (version != _HTTP11 and b"keep-alive" not in connection)
        )
        if upgrade and request.is_websocket_upgrade:
            _check_websocket_request(request, keys, self._error)
        return request

    def _other_version(self, method: bytes, version: bytes) -> bytes:
        match = _VERSION_RE.fullmatch(version)
        if match is None:
            raise self._error("invalid HTTP version", 400)
        major = match.group(1)
        if major == b"1":
            # RFC 9110 §2.5: a higher minor version within a supported major
            # version is processed as the highest one supported.
            return _HTTP11
        if method == b"PRI" and version == b"HTTP/2.0":
            raise self._error("HTTP/2 connection preface: only HTTP/1.x is served", 400)
        # RFC 9110 §15.6.6: 505 refuses the major version of the request.
        raise self._error("unsupported HTTP major version", 505)

    def _check_target(self, method: bytes, target: bytes) -> bytes | None:
        """Validate the request-target form (RFC 9112 §3.2).

        :returns: the authority of an absolute-form target, else None.
        """
        if target.translate(None, _TARGET_OK):
            if b"#" in target:
                raise self._error("fragment in request target", 400)
            raise self._error("invalid byte in request target", 400)
        if method == b"CONNECT":
            # §3.2.3: CONNECT takes authority-form (host:port) only.
            if not _AUTHORITY_FORM_RE.fullmatch(target):
                raise self._error("CONNECT target must be host:port", 400)
            return None
        if target[0] == 0x2F:  # "/": origin-form, §3.2.1
            return None
        if target == b"*":
            # §3.2.4: asterisk-form is only used for a server-wide OPTIONS.
            if method != b"OPTIONS":
                raise self._error("asterisk target outside OPTIONS", 400)
            return None
        match = _ABSOLUTE_FORM_RE.fullmatch(target)
        if match is None:
            raise self._error("invalid request target", 400)
        authority = match.group(1)
        if not _HOST_HEADER_RE.fullmatch(authority):
            raise self._error("invalid authority in request target", 400)
        return authority

    def _parse_response(self, head: bytes) -> ResponseHead:
        lines = self._split_lines(head)
        line = lines[0]
        # RFC 9112 §4: status-line = HTTP-version SP status-code SP
        # [ reason-phrase ]. The usual "HTTP/1.1 200 OK" is checked with
        # slices; every other line goes through the full pattern.
        version = _KNOWN_VERSIONS.get(line[:8])
        code = line[9:12]
        if (
            version
            and line[8:9] == b" "
            and len(code) == 3
            and code.isdigit()
            and line[12:13] in (b" ", b"")
        ):
            reason = line[13:]
        else:
            match = _STATUS_LINE_RE.fullmatch(line)
            if match is None:
                raise self._error("malformed status line", 502)
            major, minor, code, reason = match.groups()
            if major != b"1":
                raise self._error("unsupported HTTP version in response", 502)
            version = _HTTP10 if minor == b"0" else _HTTP11
        status = int(code)
        if not 100 <= status <= 599:
            # RFC 9110 §15: values outside 100..599 are invalid.
            raise self._error("status code out of range", 502)
        headers, watched = self._parse_fields(lines, _RESPONSE_WATCH)
        response = object.__new__(ResponseHead)  # as in _parse_request
        response.version = version
        response.status = status
        response.reason = reason or b""
        response.headers = headers
        response._connection = (
            _list_tokens([headers[i][1] for i in watched[b"connection"]]) if watched else _NO_TOKENS
        )
        return response


# --------------------------------------------------------------------------
# Field-level checks shared by both directions


#: Builds the error to raise: ``(reason, status hint) -> error``.
_ErrorFactory = Callable[[str, int], RemoteProtocolError]


def _content_length(values: list[bytes], error: _ErrorFactory, status: int) -> tuple[int, bytes]:
    """Validate Content-Length values (RFC 9110 §8.6).

    Every value is a list of decimal numbers; all must be identical (as
    strings: "03" and "3" conflict, as they do for h11).

    :returns: the length, and its digits as received.
    """
    if len(values) == 1:
        value = values[0]
        # The usual single number. bytes.isdigit() accepts ASCII digits only,
        # and is False for an empty value.
        if value.isdigit() and len(value) <= 15:
            return int(value), value
    seen: bytes | None = None
    for value in values:
        for raw in value.split(b","):
            number = raw.strip(_OWS)
            if not number.isdigit() or len(number) > 15:
                # §8.6 warns about integer overflow: more than 15 digits
                # (nearly a petabyte) is refused rather than parsed.
                if number.isdigit():
                    raise error("Content-Length too large", status)
                raise error("invalid Content-Length", status)
            if seen is None:
                seen = number
            elif number != seen:
                raise error("conflicting Content-Length values", status)
    if seen is None:  # pragma: no cover - split() always yields an element
        raise error("invalid Content-Length", status)
    return int(seen), seen


def _transfer_codings(values: list[bytes], error: _ErrorFactory, status: int) -> list[bytes]:
    """Return the lower-cased transfer codings in order (RFC 9112 §6.1)."""
    codings = []
    for value in values:
        for raw in value.lower().split(b","):
            coding = raw.strip(_OWS)
            if not coding:
                continue  # RFC 9110 §5.6.1: empty list elements are ignored
            name = coding.split(b";", 1)[0].rstrip(_OWS)
            if not name or name.translate(None, _TCHAR):
                raise error("invalid Transfer-Encoding", status)
            codings.append(coding)
    if not codings:
        raise error("empty Transfer-Encoding", status)
    if codings.count(b"chunked") > 1:
        # RFC 9112 §6.1: a sender MUST NOT apply chunked more than once.
        raise error("chunked applied more than once", status)
    return codings


def _check_request_codings(values: list[bytes], error: _ErrorFactory) -> None:
    codings = _transfer_codings(values, error, 400)
    if codings[-1] != b"chunked":
        # RFC 9112 §6.3 step 4: a request whose final coding is not chunked
        # has no determinable length: 400 and close.
        raise error("chunked is not the final transfer coding", 400)
    if len(codings) > 1:
        # RFC 9112 §6.1: a server that does not understand a transfer coding
        # SHOULD answer 501 (HAProxy uses 422 for the same case).
        raise error("unsupported transfer coding", 501)


def _check_websocket_request(request: RequestHead, keys: list[bytes], error: _ErrorFactory) -> None:
    """RFC 6455 §4.2.1: the handshake fields a server requires."""
    if len(keys) != 1:
        raise error("WebSocket upgrade needs exactly one Sec-WebSocket-Key", 400)
    # Item 5: the key is a base64-encoded 16-byte value: 24 characters.
    key = keys[0]
    try:
        valid = len(key) == 24 and len(binascii.a2b_base64(key, strict_mode=True)) == 16
    except binascii.Error:
        valid = False
    if not valid:
        raise error("invalid Sec-WebSocket-Key", 400)
    if request.get(b"sec-websocket-version") is None:
        raise error("WebSocket upgrade without Sec-WebSocket-Version", 400)


def _response_error(reason: str, status: int) -> RemoteProtocolError:
    return RemoteProtocolError(reason, 502)


# --------------------------------------------------------------------------
# Responses


def response_framing(head: ResponseHead, request_method: bytes) -> Framing:
    """Decide how the body of a response ends (RFC 9112 §6.3).

    :param head: the response head.
    :param request_method: the method of the request it answers.
    :raises RemoteProtocolError: (status hint 502) for invalid framing headers.
    """
    status = head.status
    # Step 1: "Any response to a HEAD request and any response with a 1xx
    # (Informational), 204 (No Content), or 304 (Not Modified) status code is
    # always terminated by the first empty line after the header fields".
    if request_method == b"HEAD" or status < 200 or status in (204, 304):
        return NO_BODY
    # Step 2: "Any 2xx (Successful) response to a CONNECT request implies that
    # the connection will become a tunnel immediately after the empty line".
    # The caller relays both directions until either side closes.
    if request_method == b"CONNECT" and status < 300:
        return UNTIL_CLOSE
    # One pass collects both framing fields; names are compared by length
    # first, so most lines cost no lower-casing.
    te_values: list[bytes] = []
    cl_values: list[bytes] = []
    for name, value in head.headers:
        size = len(name)
        if size == 14:
            if name.lower() == b"content-length":
                cl_values.append(value)
        elif size == 17 and name.lower() == b"transfer-encoding":
            te_values.append(value)
    if te_values:
        if head.version == _HTTP10:
            # RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 is faulty framing.
            raise RemoteProtocolError("Transfer-Encoding in an HTTP/1.0 response", 502)
        if cl_values:
            # Step 3: "Such a message might indicate an attempt to perform
            # request smuggling or response splitting and ought to be handled
            # as an error." Our own backends have no excuse: 502.
            raise RemoteProtocolError("response with Content-Length and Transfer-Encoding", 502)
        codings = _transfer_codings(te_values, _response_error, 502)
        # Step 4: "If a Transfer-Encoding header field is present in a
        # response and the chunked transfer coding is not the final encoding,
        # the message body length is determined by reading the connection
        # until it is closed by the server."
        return CHUNKED if codings[-1] == b"chunked" else UNTIL_CLOSE
    if cl_values:
        # Step 6: a valid Content-Length gives the length. Step 5: with an
        # invalid one, "the proxy MUST close the connection to the server,
        # discard the received response, and send a 502 (Bad Gateway)".
        return _length_framing(_content_length(cl_values, _response_error, 502)[0])
    # Step 8: "Otherwise, this is a response message without a declared
    # message body length, so the message body length is determined by the
    # number of octets received prior to the server closing the connection."
    return UNTIL_CLOSE


def validate_upgrade_response(request: RequestHead, response: ResponseHead) -> None:
    """Check that a 101 Switching Protocols may be relayed.

    Does nothing for other statuses: a refused upgrade is an ordinary
    response and the connection goes on as HTTP.

    :raises RemoteProtocolError: (502) when the backend switched protocols
        without being asked, or without the fields the switch requires.
    """
    if response.status != 101:
        return
    # RFC 9110 §15.2.2: a server switches only when the request asked, with
    # "Connection: upgrade" and an Upgrade field (ignored in HTTP/1.0, §7.8).
    if not request.wants_upgrade:
        raise RemoteProtocolError("101 response to a request without Upgrade", 502)
    if b"upgrade" not in response.connection_tokens:
        raise RemoteProtocolError("101 response without Connection: upgrade", 502)
    # RFC 9110 §7.8: "A server that sends a 101 (Switching Protocols)
    # response MUST send an Upgrade header field".
    if not response.get_all(b"upgrade"):
        raise RemoteProtocolError("101 response without Upgrade", 502)
    if request.is_websocket_upgrade and response.get(b"sec-websocket-accept") is None:
        # RFC 6455 §4.1: the client fails the connection without it. Only
        # its presence is checked: the backend computed it from the client's
        # key, which the proxy forwarded unchanged.
        raise RemoteProtocolError("101 response without Sec-WebSocket-Accept", 502)


# --------------------------------------------------------------------------
# Hop-by-hop fields

#: RFC 9110 §7.6.1: fields that only concern the connection they arrive on.
#: Transfer-Encoding is also hop-by-hop, but this proxy forwards bodies
#: verbatim, so the framing header must go with them. Trailer is not removed:
#: trailers are forwarded verbatim too, so the declaration stays true.
#: Proxy-Authorization is kept: RFC 9110 §11.7.2 lets a proxy that does not
#: consume the credentials relay them, and this proxy consumes none.
HOP_BY_HOP: Final = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"te", b"upgrade")
)
#: Fields that a Connection option can never remove: deleting them would
#: change where the message ends or where it is routed, which is what
#: "Connection: Content-Length"-style attacks aim for.
PROTECTED: Final = frozenset((b"content-length", b"transfer-encoding", b"host"))
_HOP_BY_HOP_LENGTHS: Final = frozenset(len(name) for name in HOP_BY_HOP)


def strip_hop_by_hop(head: RequestHead | ResponseHead, *, keep_upgrade: bool) -> None:
    """Remove hop-by-hop fields before forwarding (RFC 9110 §7.6.1).

    Removes the standard hop-by-hop fields and every field named as a
    Connection option (except :data:`PROTECTED` ones). Call it before adding
    the proxy's own fields, so that a client cannot name those for removal.

    :param keep_upgrade: keep an upgrade request or 101 response intact: when
        "upgrade" was a Connection option, the first Connection field stays in
        place with exactly the value ``upgrade``, and Upgrade fields are kept.
    """
    headers = head.headers
    # Connection options only name fields to remove, so a message without
    # any standard hop-by-hop field (Connection included) is left as it is.
    # Names are compared by length first: most lines need no lower-casing.
    lengths = _HOP_BY_HOP_LENGTHS
    connection: list[bytes] = []
    found = False
    for name, value in headers:
        if len(name) in lengths:
            lower = name.lower()
            if lower in HOP_BY_HOP:
                found = True
                if lower == b"connection":
                    connection.append(value)
    if not found:
        return
    options = _list_tokens(connection)
    remove = (HOP_BY_HOP | options) - PROTECTED
    upgrade = keep_upgrade and b"upgrade" in options
    if upgrade:
        remove = remove - {b"upgrade"}
    kept: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        lower = name.lower()
        if lower not in remove:
            kept.append((name, value))
        elif upgrade and lower == b"connection":
            kept.append((name, b"upgrade"))
            upgrade = False  # only the first Connection field is kept
    headers[:] = kept


# --------------------------------------------------------------------------
# Body reader

_SIZE, _DATA, _DATA_CR, _DATA_LF, _TRAILER, _DONE = range(6)


class BodyReader:
    """Finds where a message body ends, forwarding its bytes untouched.

    :param framing: how the body ends.
    :param max_chunk_line: the longest chunk-size line (extensions included)
        or trailer line accepted, CRLF included.
    :param max_trailer_size: the largest trailer section accepted.
    :param error_status: the status hint of the errors raised: 400 for a
        request body, 502 for a response body.
    """

    __slots__ = (
        "_error_status",
        "_kind",
        "_line",
        "_max_line",
        "_max_trailer",
        "_remaining",
        "_state",
        "_trailer_size",
    )

    def __init__(
        self,
        framing: Framing,
        *,
        max_chunk_line: int = 4096,
        max_trailer_size: int = 15360,
        error_status: int = 400,
    ) -> None:
        self._kind = framing.kind
        self._remaining = framing.length
        self._max_line = max_chunk_line
        self._max_trailer = max_trailer_size
        self._error_status = error_status
        self._line = bytearray()  # a chunk-size or trailer line split across feeds
        self._trailer_size = 0
        if framing.kind == "none" or (framing.kind == "length" and not framing.length):
            self._state = _DONE
        elif framing.kind == "chunked":
            self._state = _SIZE
        else:
            self._state = _DATA

    @property
    def done(self) -> bool:
        """Whether the whole message, trailers included, has been seen."""
        return self._state == _DONE

    @property
    def remaining(self) -> int:
        """Body bytes still expected for "length" framing, or in the current chunk."""
        return self._remaining

    def eof(self) -> None:
        """Tell the reader the peer closed the connection.

        :raises RemoteProtocolError: unless the framing is "close" or the
            message was complete (the caller picks the status by direction).
        """
        if self._kind == "close":
            self._state = _DONE
        elif self._state != _DONE:
            raise RemoteProtocolError(
                "connection closed before the end of the body", self._error_status
            )

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        """Split received bytes at the end of the message.

        :returns: ``(bytes of this message, bytes after it)``; the first part
            is forwarded verbatim, the second starts the next message.
        :raises RemoteProtocolError: on invalid chunked syntax.
        """
        state = self._state
        if state == _DONE:
            return b"", data
        kind = self._kind
        if kind == "length":
            remaining = self._remaining
            if len(data) < remaining:
                self._remaining = remaining - len(data)
                return data, b""
            self._remaining = 0
            self._state = _DONE
            return data[:remaining], data[remaining:]
        if kind == "close":
            return data, b""
        end = self._feed_chunked(data)
        if end == len(data):
            return data, b""
        return data[:end], data[end:]

    def _error(self, reason: str) -> RemoteProtocolError:
        return RemoteProtocolError(reason, self._error_status)

    def _feed_chunked(self, data: bytes) -> int:
        """Walk chunked data (RFC 9112 §7.1); return where the message ends."""
        i = 0
        size = len(data)
        state = self._state
        while i < size and state != _DONE:
            if state == _DATA:
                take = min(self._remaining, size - i)
                i += take
                self._remaining -= take
                if not self._remaining:
                    state = _DATA_CR
            elif state == _DATA_CR and data.startswith(b"\r\n", i):
                i += 2
                state = _SIZE
            elif state in (_DATA_CR, _DATA_LF):
                # chunk = chunk-size [ chunk-ext ] CRLF chunk-data CRLF: the
                # data must be followed by exactly CRLF (possibly split).
                if data[i] != (0x0D if state == _DATA_CR else 0x0A):
                    raise self._error("chunk data longer than its size")
                i += 1
                state = _SIZE if state == _DATA_LF else _DATA_LF
            else:
                newline = data.find(b"\n", i)
                if newline == -1:
                    if len(self._line) + size - i > self._max_line:
                        raise self._error("chunk line too long")
                    self._line += data[i:]
                    i = size
                    break
                line = data[i : newline + 1]
                if self._line:
                    line = bytes(self._line) + line
                    self._line.clear()
                if len(line) > self._max_line:
                    raise self._error("chunk line too long")
                i = newline + 1
                state = self._chunk_size(line) if state == _SIZE else self._trailer(line)
        self._state = state
        return i

    def _chunk_size(self, line: bytes) -> int:
        match = _CHUNK_LINE_RE.fullmatch(line)
        if match is None:
            digits = re.match(rb"[0-9A-Fa-f]*", line)
            if digits is not None and digits.end() > 16:
                raise self._error("chunk size overflow")
            if not line.endswith(b"\r\n"):
                raise self._error("bare LF in chunk line")
            raise self._error("invalid chunk size line")
        self._remaining = int(match.group(1), 16)
        return _DATA if self._remaining else _TRAILER

    def _trailer(self, line: bytes) -> int:
        if line == b"\r\n":
            return _DONE
        self._trailer_size += len(line)
        if self._trailer_size > self._max_trailer:
            raise self._error("trailer section too large")
        if not _TRAILER_LINE_RE.fullmatch(line):
            raise self._error("invalid trailer field")
        return _TRAILER
