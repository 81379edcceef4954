"""Incremental parser for the PROXY protocol, versions 1 and 2.

An L4 balancer (AWS ELB, HAProxy in TCP mode) puts one PROXY header in front of
the client's bytes to say who the client really is.  :class:`ProxyHeaderParser`
buffers bytes until a whole header has arrived, however the network split it,
and returns the parsed :class:`ProxyInfo` together with the bytes that follow,
which are the start of the HTTP stream.  Section numbers ("PP §2.1") refer to
HAProxy's ``doc/proxy-protocol.txt``.

Theory of operation
-------------------
The parser is a pure function of the bytes buffered so far, re-run on every
:meth:`ProxyHeaderParser.feed`.  Headers are small (at most 107 bytes for v1,
16 + ``max_v2_length`` for v2), so looking at the buffer again is cheaper and
simpler than carrying a state machine, and every decision is taken exactly once
enough bytes are there to take it:

* The version is decided when the buffer is no longer a prefix of both
  ``"PROXY "`` and the 12-byte v2 signature.  A short first read is never an
  error (PP §2: "Recommendation is to be tolerant").
* Errors are raised as soon as the bytes that prove them have arrived (PP §2:
  abort "as soon as possible"): a v1 field once it is whole or holds a byte it
  can never hold, a bad v2 version or command at byte 13, an oversized v2
  length at byte 16.  Checks run in the order the bytes arrive, so the outcome,
  reason included, does not depend on how the stream was split.
* Nothing is held beyond the caps: a v1 line without CRLF in its first 107
  bytes is an error (PP §2.1), and a v2 ``len`` above ``max_v2_length`` is
  rejected before its bytes are awaited.

Deadlines belong to the caller, which knows the clock.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, overload

from stickyproxy.errors import ProxyHeaderError

__all__ = [
    "PP2_CLIENT_SSL",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NETNS",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_SSL",
    "PP2_TYPE_UNIQUE_ID",
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "ProxyHeaderParser",
    "ProxyInfo",
    "crc32c",
    "format_v1",
    "format_v2",
]

V1_PREFIX = b"PROXY "
#: PP §2.1: the worst case, "PROXY UNKNOWN" with two full IPv6 addresses and
#: ports, is 107 bytes including the CRLF.
V1_MAX_LENGTH = 107
#: PP §2.2: chosen so that it cannot start any HTTP, TLS or v1 stream.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED = 16  # signature, version/command, family/transport, length

_V2_VERSION = 0x2
_V2_LOCAL = 0x0
_V2_PROXY = 0x1
_V2_TCP4 = 0x11
_V2_TCP6 = 0x21
#: PP §2.2, byte 14: the only valid family/transport values, mapped to the size
#: of the address block they announce.  UNSPEC, DGRAM and UNIX are valid but
#: say nothing usable about a TCP client, so they fall back to the real
#: endpoints, as a receiver that does not implement a family must.
_V2_ADDRESS_SIZE = {0x00: 0, 0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}

# PP §2.2.1 - §2.2.7: TLV types.
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_TYPE_NETNS = 0x30
PP2_CLIENT_SSL = 0x01
_MAX_AUTHORITY = 255  # PP §2.2.2: a host name, as in SNI
_MAX_UNIQUE_ID = 128  # PP §2.2.5: "up to 128 bytes"
_SSL_FIXED = 5  # PP §2.2.6: client (1 byte) and verify (4 bytes)
_TLV_NAMES = {
    PP2_TYPE_AUTHORITY: "AUTHORITY",
    PP2_TYPE_CRC32C: "CRC32C",
    PP2_TYPE_UNIQUE_ID: "UNIQUE_ID",
    PP2_TYPE_SSL: "SSL",
}

# PP §2.1: IPv4 is four decimal numbers 0-255 without leading zeroes (which
# could be read as octal); ports are 0-65535 without leading zeroes.
_V1_IPV4 = re.compile(rb"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_V1_PROTOCOLS = (b"TCP4", b"TCP6", b"UNKNOWN")
# Characters and lengths that a still-incomplete field may hold, used to reject
# a line early.  IPv6 may end in a dotted quad (RFC 4291 §2.2 form 3), which
# inet_ntop() prints for IPv4-mapped addresses; 45 bytes is its longest form.
_V1_FIELD_SHAPES = {
    b"TCP4": (frozenset(b"0123456789."), 15),
    b"TCP6": (frozenset(b"0123456789abcdefABCDEF:."), 45),
}
_V1_PORT_SHAPE = (frozenset(b"0123456789"), 5)


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """What a PROXY header says about the connection.

    :param version: 1 or 2.
    :param local: ``True`` when the caller must use the real connection
        endpoints: v1 ``UNKNOWN``, v2 ``LOCAL``, and v2 ``PROXY`` with the
        UNSPEC, UNIX or any DGRAM family (PP §2.2 fallback).
    :param source: the client's ``(address, port)``, the address as
        :mod:`ipaddress` prints it; ``None`` when ``local``.
    :param destination: the address the client connected to, likewise.
    :param tlvs: every v2 TLV, in order, as ``(type, value)``.
    :param authority: the ``PP2_TYPE_AUTHORITY`` host name, if any.
    :param unique_id: the ``PP2_TYPE_UNIQUE_ID`` value, if any.
    :param ssl: an SSL TLV is present with its ``PP2_CLIENT_SSL`` bit set.
    """

    version: int
    local: bool
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    tlvs: tuple[tuple[int, bytes], ...] = ()
    authority: str | None = None
    unique_id: bytes | None = None
    ssl: bool = False


class ProxyHeaderParser:
    """Buffer the start of a connection until a whole PROXY header is there.

    :param optional: accept a stream without a header.  PP §2 says a receiver
        "MUST not try to guess"; this mode exists for listeners configured to
        take both, and only a stream that cannot be the start of a header
        counts as plain.  No TLS record or common HTTP method starts like one;
        a request whose method is ``PROXY`` is read as a (bad) header.
    :param max_v2_length: the largest v2 ``len`` accepted.  The field allows
        64 KiB; real headers are a few hundred bytes at most.
    """

    def __init__(self, *, optional: bool = False, max_v2_length: int = 4096) -> None:
        if max_v2_length < 0:
            raise ValueError("max_v2_length must not be negative")
        self._optional = optional
        self._max_v2_length = max_v2_length
        self._buffer = bytearray()
        self._error: ProxyHeaderError | None = None
        self._done = False

    @property
    def buffered(self) -> int:
        """How many bytes are held waiting for the rest of the header."""
        return len(self._buffer)

    def feed(self, data: bytes) -> tuple[ProxyInfo | None, bytes] | None:
        """Add bytes read from the connection.

        :param data: the next bytes; ``b""`` changes nothing.
        :returns: ``None`` while more bytes are needed; then ``(info, rest)``,
            where ``rest`` is everything after the header.  In optional mode
            ``info`` is ``None`` for a stream without a header, and ``rest``
            is then every byte fed so far.
        :raises ProxyHeaderError: the bytes are not a valid header; every later
            call raises it again.
        :raises RuntimeError: called again after a result was returned.
        """
        if self._error is not None:
            raise ProxyHeaderError(self._error.reason)
        if self._done:
            raise RuntimeError("feed() called after the PROXY header was complete")
        self._buffer += data
        try:
            result = self._parse()
        except ProxyHeaderError as error:
            self._error = error
            self._buffer = bytearray()
            raise
        if result is None:
            return None
        info, length = result
        rest = bytes(self._buffer[length:])
        self._buffer = bytearray()
        self._done = True
        return info, rest

    def _parse(self) -> tuple[ProxyInfo | None, int] | None:
        buffer = self._buffer
        # The two prefixes differ in their first byte, so at most one matches.
        if V2_SIGNATURE.startswith(buffer[: len(V2_SIGNATURE)]):
            return self._parse_v2() if len(buffer) >= len(V2_SIGNATURE) else None
        if V1_PREFIX.startswith(buffer[: len(V1_PREFIX)]):
            if len(buffer) < len(V1_PREFIX):
                return None
            return _parse_v1(bytes(buffer[:V1_MAX_LENGTH]))
        if self._optional:
            return None, 0
        raise ProxyHeaderError("not a PROXY protocol header")

    def _parse_v2(self) -> tuple[ProxyInfo, int] | None:
        buffer = self._buffer
        # PP §2.2: check each fixed byte as it arrives, so a bad header is
        # dropped without waiting for the rest of it.
        if len(buffer) > 12:
            if buffer[12] >> 4 != _V2_VERSION:
                raise ProxyHeaderError("v2 header version is not 2")
            if buffer[12] & 0x0F not in (_V2_LOCAL, _V2_PROXY):
                raise ProxyHeaderError("v2 header has an unknown command")
        command = buffer[12] & 0x0F if len(buffer) > 12 else None
        # PP §2.2: for LOCAL the receiver must "discard the protocol block
        # including the family (which is ignored)", so only PROXY checks it.
        if len(buffer) > 13 and command == _V2_PROXY and buffer[13] not in _V2_ADDRESS_SIZE:
            raise ProxyHeaderError("v2 header has an unknown address family or transport")
        if len(buffer) < _V2_FIXED:
            return None
        length = int.from_bytes(buffer[14:16], "big")
        if length > self._max_v2_length:
            raise ProxyHeaderError(f"v2 header length {length} exceeds {self._max_v2_length}")
        if command == _V2_PROXY and length < _V2_ADDRESS_SIZE[buffer[13]]:
            raise ProxyHeaderError("v2 header is too short for its address block")
        total = _V2_FIXED + length
        if len(buffer) < total:
            return None
        return _decode_v2(bytes(buffer[:total])), total


# -- v1 ----------------------------------------------------------------------


def _parse_v1(window: bytes) -> tuple[ProxyInfo, int] | None:
    """Parse the first ``V1_MAX_LENGTH`` bytes buffered (or all, if fewer)."""
    end = window.find(b"\r\n")
    if end != -1:
        return _scan_v1(window[:end], complete=True), end + 2
    # A final CR may be the first half of the CRLF.
    _scan_v1(window.removesuffix(b"\r"), complete=False)
    if len(window) >= V1_MAX_LENGTH:
        # PP §2.1: "If the CRLF sequence is not found in the first 107
        # characters, the receiver should declare the line invalid."
        raise ProxyHeaderError(f"v1 header has no CRLF within {V1_MAX_LENGTH} bytes")
    return None


@overload
def _scan_v1(line: bytes, *, complete: Literal[True]) -> ProxyInfo: ...
@overload
def _scan_v1(line: bytes, *, complete: Literal[False]) -> None: ...
def _scan_v1(line: bytes, *, complete: bool) -> ProxyInfo | None:
    """Check a v1 line without its CRLF, or as much of it as has arrived.

    Fields are checked in the order they arrive, and a field that fails a
    check fails it whatever follows, so a bad line is rejected as early as
    possible (PP §2.1) and for the same reason however the network split it.

    :param complete: the CRLF has arrived; otherwise the last field may grow.
    """
    fields = line[len(V1_PREFIX) :].split(b" ")
    for index, field in enumerate(fields):
        done = complete or index < len(fields) - 1
        # PP §2.1: the line ends with CRLF only; "a single CR or LF" must not
        # be tolerated, or a line ending in LF would swallow the request line.
        breaks = [at for at in (field.find(b"\r"), field.find(b"\n")) if at != -1]
        if breaks:
            _check_v1_field(fields[0], index, field[: min(breaks)], done=False)
            raise ProxyHeaderError("v1 header contains a bare CR or LF")
        _check_v1_field(fields[0], index, field, done=done)
        if index == 0 and done and field == b"UNKNOWN":
            # PP §2.1: after UNKNOWN "the receiver must ignore anything
            # presented before the CRLF", bare CRs and LFs aside.
            tail = line[len(V1_PREFIX) + len(field) :]
            if b"\r" in tail or b"\n" in tail:
                raise ProxyHeaderError("v1 header contains a bare CR or LF")
            return (
                ProxyInfo(version=1, local=True, source=None, destination=None)
                if complete
                else None
            )
    if not complete:
        return None
    if len(fields) != 5:
        raise ProxyHeaderError("v1 header is missing fields")
    protocol = fields[0]
    return ProxyInfo(
        version=1,
        local=False,
        source=(_v1_address(protocol, fields[1]), _v1_port(fields[3])),
        destination=(_v1_address(protocol, fields[2]), _v1_port(fields[4])),
    )


def _check_v1_field(protocol: bytes, index: int, field: bytes, *, done: bool) -> None:
    """Check field ``index`` (0 is the protocol word) of a v1 line.

    :param done: a space or the CRLF follows, so the field is whole.
    """
    if index == 0:
        if field not in _V1_PROTOCOLS and (
            done or not any(w.startswith(field) for w in _V1_PROTOCOLS)
        ):
            raise ProxyHeaderError("v1 header has an unknown protocol")
        return
    if index > 4:
        raise ProxyHeaderError("v1 header has data after the destination port")
    if done and not field:
        raise ProxyHeaderError("v1 header fields must be separated by single spaces")
    if done and index <= 2:
        _v1_address(protocol, field)
        return
    if done:
        _v1_port(field)
        return
    # The field may still grow: reject only what no further byte can fix.
    allowed, longest = _V1_FIELD_SHAPES[protocol] if index <= 2 else _V1_PORT_SHAPE
    if not allowed.issuperset(field) or len(field) > longest:
        raise ProxyHeaderError(_v1_field_error(protocol, index))
    if index > 2:
        numbers, count, largest = [field], 1, 65535
    elif protocol == b"TCP4":
        numbers, count, largest = field.split(b"."), 4, 255
    else:
        return
    if len(numbers) > count or any(
        (len(number) > 1 and number.startswith(b"0")) or int(number or b"0") > largest
        for number in numbers
    ):
        raise ProxyHeaderError(_v1_field_error(protocol, index))


def _v1_field_error(protocol: bytes, index: int) -> str:
    if index >= 3:
        return "v1 header has an invalid port"
    if protocol == b"TCP4":
        return "v1 TCP4 header has an invalid IPv4 address"
    return "v1 TCP6 header has an invalid IPv6 address"


def _v1_address(protocol: bytes, field: bytes) -> str:
    """Parse an address field; TCP4 must carry IPv4 and TCP6 IPv6 (PP §2.1)."""
    if protocol == b"TCP4":
        if _V1_IPV4.fullmatch(field) is None or any(int(n) > 255 for n in field.split(b".")):
            raise ProxyHeaderError(_v1_field_error(protocol, 1))
        return str(ipaddress.IPv4Address(field.decode("ascii")))
    allowed, longest = _V1_FIELD_SHAPES[protocol]
    # The alphabet check keeps out zone ids ("%eth0"), which ipaddress accepts
    # but which mean nothing on another host, and any non-ASCII digit.
    if not allowed.issuperset(field) or len(field) > longest:
        raise ProxyHeaderError(_v1_field_error(protocol, 1))
    try:
        return str(ipaddress.IPv6Address(field.decode("ascii")))
    except ValueError:
        raise ProxyHeaderError(_v1_field_error(protocol, 1)) from None


def _v1_port(field: bytes) -> int:
    if _V1_PORT.fullmatch(field) is None or int(field) > 65535:
        raise ProxyHeaderError("v1 header has an invalid port")
    return int(field)


# -- v2 ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Tlvs:
    items: tuple[tuple[int, bytes], ...] = ()
    authority: str | None = None
    unique_id: bytes | None = None
    ssl: bool = False
    crc_offset: int | None = None  # where the CRC32C value sits in the header


def _decode_v2(header: bytes) -> ProxyInfo:
    """Parse a complete v2 header whose fixed part was already checked."""
    command, family = header[12] & 0x0F, header[13]
    if command == _V2_LOCAL:
        return _decode_v2_local(header)
    block = header[_V2_FIXED : _V2_FIXED + _V2_ADDRESS_SIZE[family]]
    tlvs = _read_tlvs(header, _V2_FIXED + len(block))
    _verify_crc(header, tlvs)
    source = destination = None
    if family == _V2_TCP4:
        source = (str(ipaddress.IPv4Address(block[0:4])), int.from_bytes(block[8:10], "big"))
        destination = (str(ipaddress.IPv4Address(block[4:8])), int.from_bytes(block[10:12], "big"))
    elif family == _V2_TCP6:
        source = (str(ipaddress.IPv6Address(block[0:16])), int.from_bytes(block[32:34], "big"))
        destination = (
            str(ipaddress.IPv6Address(block[16:32])),
            int.from_bytes(block[34:36], "big"),
        )
    return ProxyInfo(
        version=2,
        local=source is None,
        source=source,
        destination=destination,
        tlvs=tlvs.items,
        authority=tlvs.authority,
        unique_id=tlvs.unique_id,
        ssl=tlvs.ssl,
    )


def _decode_v2_local(header: bytes) -> ProxyInfo:
    """Parse a LOCAL header, whose contents the receiver must ignore (PP §2.2).

    Senders differ: HAProxy 2.6 sends health checks as LOCAL with a TCP4
    address block, others send TLVs straight after byte 16.  The TLVs are read
    after the address block the family byte announces when it fits in ``len``
    and from byte 16 otherwise, and reported when they parse.  Contents that
    do not parse are dropped rather than rejected, since LOCAL means "ignore
    the contents".  A CRC32C TLV that parses is still verified: it covers the
    command byte, so a mismatch may mean a PROXY header damaged into LOCAL.
    """
    start = _V2_FIXED + _V2_ADDRESS_SIZE.get(header[13], 0)
    if start > len(header):
        start = _V2_FIXED
    try:
        tlvs = _read_tlvs(header, start)
    except ProxyHeaderError:
        tlvs = _Tlvs()
    _verify_crc(header, tlvs)
    return ProxyInfo(
        version=2,
        local=True,
        source=None,
        destination=None,
        tlvs=tlvs.items,
        authority=tlvs.authority,
        unique_id=tlvs.unique_id,
        ssl=tlvs.ssl,
    )


def _split_tlvs(data: bytes, what: str) -> list[tuple[int, int, bytes]]:
    """Cut ``data`` into ``(type, offset of value, value)``, bounds-checked."""
    items = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < 3:
            raise ProxyHeaderError(f"v2 {what} header is truncated")
        kind = data[offset]
        size = int.from_bytes(data[offset + 1 : offset + 3], "big")
        offset += 3
        if offset + size > len(data):
            raise ProxyHeaderError(f"v2 {what} overruns its container")
        items.append((kind, offset, data[offset : offset + size]))
        offset += size
    return items


def _read_tlvs(header: bytes, start: int) -> _Tlvs:
    """Read and check the TLVs from ``start`` to the end of the header."""
    authority: str | None = None
    unique_id: bytes | None = None
    crc_offset: int | None = None
    ssl = False
    seen: set[int] = set()
    items = []
    for kind, offset, value in _split_tlvs(header[start:], "TLV"):
        items.append((kind, value))
        if kind in _TLV_NAMES:
            # Two values for one field would let two readers disagree.
            if kind in seen:
                raise ProxyHeaderError(f"v2 header repeats the {_TLV_NAMES[kind]} TLV")
            seen.add(kind)
        if kind == PP2_TYPE_CRC32C:
            if len(value) != 4:
                raise ProxyHeaderError("v2 CRC32C TLV is not 4 bytes")
            crc_offset = start + offset
        elif kind == PP2_TYPE_AUTHORITY:
            if len(value) > _MAX_AUTHORITY:
                raise ProxyHeaderError(f"v2 AUTHORITY TLV is longer than {_MAX_AUTHORITY} bytes")
            try:
                authority = value.decode("utf-8")
            except UnicodeDecodeError:
                raise ProxyHeaderError("v2 AUTHORITY TLV is not UTF-8") from None
        elif kind == PP2_TYPE_UNIQUE_ID:
            if len(value) > _MAX_UNIQUE_ID:
                raise ProxyHeaderError(f"v2 UNIQUE_ID TLV is longer than {_MAX_UNIQUE_ID} bytes")
            unique_id = value
        elif kind == PP2_TYPE_SSL:
            if len(value) < _SSL_FIXED:
                raise ProxyHeaderError(f"v2 SSL TLV is shorter than {_SSL_FIXED} bytes")
            _split_tlvs(value[_SSL_FIXED:], "SSL sub-TLV")
            ssl = bool(value[0] & PP2_CLIENT_SSL)
    return _Tlvs(tuple(items), authority, unique_id, ssl, crc_offset)


def _verify_crc(header: bytes, tlvs: _Tlvs) -> None:
    # PP §2.2.3: the CRC32C is computed over the whole header with the CRC
    # field zeroed, and a mismatch makes the connection invalid.
    if tlvs.crc_offset is None:
        return
    at = tlvs.crc_offset
    expected = int.from_bytes(header[at : at + 4], "big")
    if crc32c(header[:at] + bytes(4) + header[at + 4 :]) != expected:
        raise ProxyHeaderError("v2 CRC32C mismatch")


def _make_crc32c_table() -> tuple[int, ...]:
    # RFC 4960 appendix B: the Castagnoli polynomial, bit-reflected.
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _make_crc32c_table()


def crc32c(data: bytes) -> int:
    """Return the CRC32C (Castagnoli, RFC 4960 appendix B) of ``data``."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# -- writing -----------------------------------------------------------------


def _endpoints(
    source: tuple[str, int] | None, destination: tuple[str, int] | None
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] | None:
    if source is None and destination is None:
        return None
    if source is None or destination is None:
        raise ValueError("give both source and destination, or neither")
    addresses = tuple(ipaddress.ip_address(address) for address, _ in (source, destination))
    if addresses[0].version != addresses[1].version:
        raise ValueError("source and destination must be of the same IP version")
    for address in addresses:
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
            raise ValueError("the PROXY protocol cannot carry an IPv6 zone id")
    for _, port in (source, destination):
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} is out of range")
    return addresses


def format_v1(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> bytes:
    """Build a v1 header line; ``None`` for both gives ``PROXY UNKNOWN``.

    :raises ValueError: mixed IP versions, bad addresses or ports.
    """
    addresses = _endpoints(source, destination)
    if addresses is None or source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    protocol = "TCP4" if addresses[0].version == 4 else "TCP6"
    src, dst = addresses
    return f"PROXY {protocol} {src} {dst} {source[1]} {destination[1]}\r\n".encode("ascii")


def format_v2(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
    *,
    tlvs: Sequence[tuple[int, bytes]] = (),
    local: bool = False,
    crc: bool = False,
) -> bytes:
    """Build a v2 header for a TCP connection.

    :param source: the client endpoint, or ``None`` (with ``destination``)
        for the UNSPEC family and no address block.
    :param destination: the endpoint the client connected to.
    :param tlvs: ``(type, value)`` pairs, written in order.
    :param local: send the LOCAL command instead of PROXY.
    :param crc: append a CRC32C TLV covering the whole header.
    :raises ValueError: bad endpoints, TLVs, or a header over 64 KiB.
    """
    addresses = _endpoints(source, destination)
    body = bytearray()
    family = 0x00
    if addresses is not None and source is not None and destination is not None:
        family = _V2_TCP4 if addresses[0].version == 4 else _V2_TCP6
        body += addresses[0].packed + addresses[1].packed
        body += source[1].to_bytes(2, "big") + destination[1].to_bytes(2, "big")
    for kind, value in tlvs:
        if not 0 <= kind <= 255 or len(value) > 0xFFFF:
            raise ValueError("a TLV type is one byte and its value at most 65535 bytes")
        body += bytes([kind]) + len(value).to_bytes(2, "big") + value
    if crc:
        body += bytes([PP2_TYPE_CRC32C, 0, 4]) + bytes(4)
    if len(body) > 0xFFFF:
        raise ValueError("a v2 header holds at most 65535 bytes after its fixed part")
    command = _V2_LOCAL if local else _V2_PROXY
    header = V2_SIGNATURE + bytes([_V2_VERSION << 4 | command, family])
    header += len(body).to_bytes(2, "big") + bytes(body)
    if crc:
        header = header[:-4] + crc32c(header).to_bytes(4, "big")
    return header
