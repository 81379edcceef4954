"""The reference's list of test cases (HAProxy semantics, section 12), against the whole proxy.

Every test drives one in-memory proxy end to end: bytes go in from a client,
and the test asserts what the chosen server receives and what the client gets
back (:mod:`tests.relay_harness`). Where the reference asks for better than
HAProxy 2.6 does, the test asserts the better behaviour. Parser details are
covered by ``test_proxyproto.py`` and ``test_httphead.py``; these tests check
what the proxy does with them: who gets the request, which status the client
sees, whether the connection survives.

Test names start with ``test_case_NN`` after the reference's numbering.
"""

# Twisted's test transports and Failure are not annotated; calling them from
# typed tests is expected.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import functools
import itertools
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from stickyproxy import pool as pool_module
from stickyproxy.config import parse_config
from stickyproxy.hashring import HashRing, address_key
from stickyproxy.pool import Pool, State
from stickyproxy.relay import Frontend
from tests.relay_harness import CONFIG, KEY, SWITCH, UPGRADE, FakeTCP, Harness, ok

GET = b"GET / HTTP/1.1\r\nHost: app\r\n\r\n"
#: The address of the L4 balancer itself: the harness's TCP peer.
PEER = "127.0.0.1"
#: The client address the PROXY headers of these tests advertise.
CLIENT = "203.0.113.7"

Feed = Literal["whole", "bytewise"]
FEEDS: tuple[Feed, ...] = ("whole", "bytewise")


# -- shared set-up --------------------------------------------------------------------------

_RINGS: dict[tuple[tuple[str, int], ...], HashRing] = {}


def _shared_ring(weights: Mapping[str, int]) -> HashRing:
    key = tuple(sorted(weights.items()))
    ring = _RINGS.get(key)
    if ring is None:
        ring = _RINGS[key] = HashRing(weights)
    return ring


@pytest.fixture(autouse=True, scope="module")
def _share_rings() -> Iterator[None]:
    """Build each hash ring once for the whole module.

    A ring's slot table depends only on server names and weights and is never
    changed after it is built, but building it takes a tenth of a second; this
    module opens hundreds of connections, each with its own pool.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pool_module, "HashRing", _shared_ring)
        yield


def config(*, redispatch: bool = True, **changes: str) -> str:
    """The harness configuration with ``key = value`` lines of ``[proxy]`` changed."""
    text = CONFIG.format(redispatch=str(redispatch).lower())
    for key, value in changes.items():
        text, count = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        if not count:
            text = text.replace("[proxy]\n", f"[proxy]\n{key} = {value}\n", 1)
    return text


def feed(h: Harness, data: bytes, how: Feed) -> None:
    """Send ``data`` in one segment or one byte per segment."""
    if how == "whole":
        h.send(data)
    else:
        for index in range(len(data)):
            h.send(data[index : index + 1])


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (taken modulo its length)."""
    bounds = [0, *sorted({cut % len(data) for cut in cuts} - {0}), len(data)]
    return [data[start:end] for start, end in itertools.pairwise(bounds)]


def hashed(h: Harness, address: str) -> str:
    """The server a cookie-less client from ``address`` is hashed to."""
    server = h.pool.choose([], address_key(address)).server
    assert server is not None
    return server.name


def forward(h: Harness, data: bytes = GET, how: Feed = "whole") -> bytes:
    """Send ``data`` and return what the server the proxy connected to received."""
    feed(h, data, how)
    assert h.attempts(), f"no server was contacted; the client got {h.output()!r}"
    _, transport = h.accept()
    return bytes(transport.value())


def fields(message: bytes) -> list[tuple[bytes, bytes]]:
    """The header fields of a message head, in order."""
    head = message.partition(b"\r\n\r\n")[0]
    result = []
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        result.append((name, value.strip(b" \t")))
    return result


def values(message: bytes, name: bytes) -> list[bytes]:
    return [v for n, v in fields(message) if n.lower() == name.lower()]


def answer(h: Harness, response: bytes | None = None) -> bytes:
    """Let the latest server answer ``response``; return what the client got."""
    backend, _ = h.backends[-1]
    backend.dataReceived(ok() if response is None else response)
    return h.output()


def assert_dropped(h: Harness) -> None:
    """Aborted with no response at all, and no server ever contacted (PP §2)."""
    assert h.output() == b""
    assert h.client.aborted
    assert h.attempts() == []


def assert_refused(h: Harness, status: int) -> bytes:
    """The proxy answered ``status`` itself, said it closes, and closed."""
    out = h.output()
    assert out.startswith(b"HTTP/1.1 %d " % status), out[:200]
    assert values(out, b"Connection") == [b"close"]
    assert closing(h.client)
    return out


def closing(transport: FakeTCP) -> bool:
    """Whether the proxy has closed (or aborted) this connection."""
    return bool(transport.disconnecting)


# PROXY protocol headers, built here byte by byte (PP §2.1, §2.2) rather than
# with the project's own formatter, so that malformed variants are easy.


def v1(source: str = CLIENT, port: int = 40000) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    destination = "2001:db8::2" if family == "TCP6" else "10.0.0.1"
    return f"PROXY {family} {source} {destination} {port} 80\r\n".encode()


V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(
    body: bytes = b"", *, command: int = 0x21, family: int = 0x11, length: int | None = None
) -> bytes:
    """A v2 header: ``command`` is the version/command byte, ``family`` the next one."""
    size = len(body) if length is None else length
    return V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", size) + body


def inet4(source: str = CLIENT, destination: str = "10.0.0.1") -> bytes:
    addresses = b"".join(bytes(int(part) for part in a.split(".")) for a in (source, destination))
    return addresses + struct.pack("!HH", 40000, 80)


def inet6(source: bytes, destination: bytes = b"\x20\x01\x0d\xb8" + bytes(11) + b"\x02") -> bytes:
    return source + destination + struct.pack("!HH", 40000, 80)


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, RFC 3720 §B.4), bit by bit."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def v2_with_crc(body: bytes, *, corrupt: bool = False) -> bytes:
    """A v2 header whose last TLV is the CRC32C of the whole header (PP §2.2.3).

    :param corrupt: flip one bit of the checksum.
    """
    header = v2(body + tlv(0x03, bytes(4)))
    return header[:-4] + struct.pack("!I", crc32c(header) ^ int(corrupt))


def accepted_from(header: bytes, how: Feed = "whole") -> str:
    """Send ``header`` and a GET; return the client address the server was told."""
    h = Harness()
    forwarded = forward(h, header + GET, how)
    assert forwarded.startswith(b"GET / HTTP/1.1\r\n")
    (address,) = values(forwarded, b"X-Forwarded-For")
    return address.decode()


# == PROXY protocol ==========================================================================


def test_case_01_a_v1_tcp4_header_names_the_client_for_hashing_logs_and_the_server() -> None:
    h = Harness()
    assert hashed(h, CLIENT) != hashed(h, PEER), "the test needs addresses on two servers"
    forwarded = forward(h, v1(CLIENT) + GET)
    assert h.server_of() == hashed(h, CLIENT)
    assert values(forwarded, b"X-Forwarded-For") == [CLIENT.encode()]
    assert h.frontend.peer_text() == f"{CLIENT}:40000"
    assert answer(h).startswith(b"HTTP/1.1 200 OK\r\n")


def test_case_02_a_v1_tcp6_header_is_hashed_by_its_ipv6_address() -> None:
    h = Harness()
    # An address hashed elsewhere than the balancer's, so that the test can
    # tell which of the two was used.
    client = next(
        address
        for address in (f"2001:db8::{n:x}" for n in range(1, 64))
        if hashed(h, address) != hashed(h, PEER)
    )
    forwarded = forward(h, v1(client) + GET)
    assert h.server_of() == hashed(h, client)
    assert values(forwarded, b"X-Forwarded-For") == [client.encode()]
    assert h.frontend.peer_text() == f"[{client}]:40000"


@pytest.mark.parametrize(
    "header",
    [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n"],
    ids=["case_03_bare", "case_04_with_addresses"],
)
@pytest.mark.parametrize("how", FEEDS)
def test_case_03_04_proxy_unknown_is_accepted_and_the_real_peer_address_is_used(
    header: bytes, how: Feed
) -> None:
    h = Harness()
    assert hashed(h, "1.2.3.4") != hashed(h, PEER)
    forwarded = forward(h, header + GET, how)
    assert values(forwarded, b"X-Forwarded-For") == [PEER.encode()]
    assert h.server_of() == hashed(h, PEER)


def test_case_05_a_header_sent_one_byte_every_2_ms_is_accepted() -> None:
    h = Harness()
    for byte in v1():
        h.send(bytes([byte]))
        h.reactor.advance(0.002)
    assert not closing(h.client)
    forwarded = forward(h)
    assert values(forwarded, b"X-Forwarded-For") == [CLIENT.encode()]


def test_case_06_a_header_split_with_a_300_ms_pause_is_accepted() -> None:
    h = Harness()
    h.send(b"PROX")
    h.reactor.advance(0.3)
    assert not closing(h.client)
    forwarded = forward(h, v1()[4:] + GET)
    assert values(forwarded, b"X-Forwarded-For") == [CLIENT.encode()]


_STREAM = v1() + b"GET /x HTTP/1.1\r\nHost: app\r\nCookie: a=1\r\n\r\n"


@given(cuts=st.lists(st.integers(1, 1 << 16), max_size=6))
def test_case_05_06_header_and_request_cut_anywhere_with_pauses_arrive_intact(
    cuts: list[int],
) -> None:
    h = Harness()
    for piece in _cut(_STREAM, cuts):
        h.send(piece)
        h.reactor.advance(0.3)
    forwarded = forward(h, b"")
    assert forwarded == (
        b"GET /x HTTP/1.1\r\nHost: app\r\nCookie: a=1\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n"
    )


def test_case_07_a_request_half_a_second_after_the_header_is_served() -> None:
    h = Harness()
    h.send(v1())
    h.reactor.advance(0.5)
    forward(h)
    assert answer(h).startswith(b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize("deadline", [3, 7])
def test_case_08_a_connection_that_sends_nothing_is_closed_silently_at_the_deadline(
    deadline: int,
) -> None:
    h = Harness(config=config(timeout_http_request=f"{deadline}s"))
    h.reactor.advance(deadline - 0.01)
    assert not closing(h.client)
    h.reactor.advance(0.02)
    assert closing(h.client)
    assert h.output() == b""


def test_case_09_a_header_and_no_request_is_closed_silently_without_a_408() -> None:
    h = Harness()
    h.send(v1())
    h.reactor.advance(2.99)
    assert not closing(h.client)
    h.reactor.advance(0.02)
    assert closing(h.client)
    assert h.output() == b""


@pytest.mark.parametrize("how", FEEDS)
def test_case_10_plain_http_on_the_proxy_port_is_dropped_without_a_response(how: Feed) -> None:
    h = Harness()
    feed(h, GET, how)
    assert_dropped(h)


# The start of a TLS 1.2 ClientHello record (RFC 8446 §5.1, §4.1.2).
_CLIENT_HELLO = bytes.fromhex("16030100f4010000f00303") + bytes(32) + b"\x00\x00\x02\x13\x01"


@pytest.mark.parametrize("how", FEEDS)
def test_case_11_a_tls_client_hello_without_a_header_is_dropped(how: Feed) -> None:
    h = Harness()
    feed(h, _CLIENT_HELLO, how)
    assert_dropped(h)


# The longest way to write an IPv6 address (RFC 4291 §2.2, form 3): two of them
# make a TCP6 line of 116 bytes, beyond PP §2.1's 107.
_MAPPED = b"ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"

_BAD_V1 = {
    # case 12
    "lf_only": b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 80\n",
    "cr_only": b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 80\r",
    "double_space": b"PROXY TCP4  203.0.113.7 10.0.0.1 40000 80\r\n",
    "trailing_space": b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 80 \r\n",
    "missing_dport": b"PROXY TCP4 203.0.113.7 10.0.0.1 40000\r\n",
    "lowercase_proxy": b"proxy TCP4 203.0.113.7 10.0.0.1 40000 80\r\n",
    "tcp5": b"PROXY TCP5 203.0.113.7 10.0.0.1 40000 80\r\n",
    "udp4": b"PROXY UDP4 203.0.113.7 10.0.0.1 40000 80\r\n",
    # case 13
    "tcp4_with_ipv6": b"PROXY TCP4 2001:db8::1 ::1 1 2\r\n",
    "tcp6_with_ipv4": b"PROXY TCP6 203.0.113.7 10.0.0.1 40000 80\r\n",
    # case 14: HAProxy accepts these; the spec does not
    "leading_zero_octet": b"PROXY TCP4 001.2.3.4 10.0.0.1 40000 80\r\n",
    "leading_zero_port": b"PROXY TCP4 203.0.113.7 10.0.0.1 01 80\r\n",
    "port_65536": b"PROXY TCP4 203.0.113.7 10.0.0.1 65536 80\r\n",
    "octet_256": b"PROXY TCP4 203.0.113.256 10.0.0.1 40000 80\r\n",
    # case 16: HAProxy accepts a TCP6 line of any length
    "tcp6_over_107_bytes": b"PROXY TCP6 2001:db8::1 2001:db8::2 40000 80" + b" " * 200 + b"\r\n",
    "tcp6_well_formed_over_107_bytes": b"PROXY TCP6 %s %s 65535 65535\r\n" % (_MAPPED, _MAPPED),
}


@pytest.mark.parametrize("header", list(_BAD_V1.values()), ids=list(_BAD_V1))
@pytest.mark.parametrize("how", FEEDS)
def test_case_12_13_14_16_a_malformed_v1_header_is_dropped_without_a_response(
    header: bytes, how: Feed
) -> None:
    h = Harness()
    feed(h, header + GET, how)
    assert_dropped(h)


@pytest.mark.parametrize(
    "line",
    [b"PROXY TCP4 " + b"1" * 289, b"PROXY UNKNOWN " + b"x" * 286],
    ids=["tcp4_digits", "unknown_padding"],
)
def test_case_15_a_v1_line_without_crlf_is_given_up_within_107_bytes(line: bytes) -> None:
    h = Harness()
    sent = 0
    while not h.client.aborted and sent < len(line):
        h.send(line[sent : sent + 1])
        sent += 1
    assert_dropped(h)
    assert sent <= 107


def test_case_17_a_v2_tcp4_header_names_the_client() -> None:
    assert accepted_from(v2(inet4(CLIENT))) == CLIENT


def test_case_17_a_v2_tcp6_header_names_the_client() -> None:
    client = b"\x20\x01\x0d\xb8" + bytes(11) + b"\x01"
    assert accepted_from(v2(inet6(client), family=0x21)) == "2001:db8::1"


@pytest.mark.parametrize(
    "header",
    [v2(command=0x20, family=0x00), v2(inet4(), command=0x20, family=0x11)],
    ids=["local_len_0", "local_with_an_address_block"],
)
@pytest.mark.parametrize("how", FEEDS)
def test_case_18_v2_local_uses_the_real_peer_address(header: bytes, how: Feed) -> None:
    assert accepted_from(header, how) == PEER


@pytest.mark.parametrize(
    "header",
    [v2(family=0x00), v2(b"/tmp/a".ljust(108, b"\0") * 2, family=0x31), v2(inet4(), family=0x12)],
    ids=["unspec", "unix_stream", "udp4"],
)
def test_case_19_v2_families_without_a_tcp_client_fall_back_to_the_peer_address(
    header: bytes,
) -> None:
    assert accepted_from(header) == PEER


_BAD_V2 = {
    # case 20
    "family_0x41": v2(inet4(), family=0x41),
    "command_2": v2(inet4(), command=0x22),
    "version_1": v2(inet4(), command=0x11),
    "version_3": v2(inet4(), command=0x31),
    "len_below_the_address_block": v2(inet4()[:8], family=0x11),
    # case 21
    "tlv_overrunning_len": v2(inet4() + b"\x02\x00\x0aeditor"),
    "partial_tlv_header": v2(inet4() + b"\x04\x00"),
    # case 22
    "crc32c_wrong": v2_with_crc(inet4(), corrupt=True),
    "crc32c_length_3": v2(inet4() + tlv(0x03, b"\x00\x00\x00")),
    # case 23
    "unique_id_129_bytes": v2(inet4() + tlv(0x05, b"u" * 129)),
    # case 24
    "len_0xffff": v2(inet4(), length=0xFFFF),
}


@pytest.mark.parametrize("header", list(_BAD_V2.values()), ids=list(_BAD_V2))
@pytest.mark.parametrize("how", FEEDS)
def test_case_20_to_24_a_malformed_v2_header_is_dropped_without_a_response(
    header: bytes, how: Feed
) -> None:
    h = Harness()
    feed(h, header + GET, how)
    assert_dropped(h)


_SSL_TLV = tlv(0x20, b"\x01" + bytes(4) + tlv(0x21, b"TLSv1.3"))
_GOOD_TLVS = {
    "authority": tlv(0x02, b"editor.example.com"),
    "unique_id": tlv(0x05, b"u" * 16),
    "noop": tlv(0x04, bytes(3)),
    "ssl": _SSL_TLV,
    "custom_0xe0": tlv(0xE0, b"custom"),
    "all_of_them": tlv(0x02, b"a.example") + tlv(0x05, b"id") + tlv(0x04, b"") + _SSL_TLV,
    "unique_id_128_bytes": tlv(0x05, b"u" * 128),  # case 23
}


@pytest.mark.parametrize("tlvs", list(_GOOD_TLVS.values()), ids=list(_GOOD_TLVS))
def test_case_21_23_v2_headers_with_valid_tlvs_are_accepted(tlvs: bytes) -> None:
    assert accepted_from(v2(inet4() + tlvs)) == CLIENT


def test_case_22_a_v2_header_with_a_correct_crc32c_is_accepted() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the RFC 3720 check value
    assert accepted_from(v2_with_crc(inet4() + tlv(0x02, b"a.example"))) == CLIENT


def test_case_24_a_huge_v2_length_is_refused_once_the_length_is_known() -> None:
    h = Harness()
    header = v2(inet4(), length=0xFFFF)
    h.send(header[:15])
    assert not closing(h.client)
    h.send(header[15:16])
    assert_dropped(h)


def test_case_24_a_v2_sender_that_stalls_is_dropped_at_the_deadline() -> None:
    h = Harness()
    header = v2(inet4() + tlv(0xE0, b"x" * 1000))
    h.send(header[:500])
    h.reactor.advance(2.99)
    assert not closing(h.client)
    h.reactor.advance(0.02)
    assert closing(h.client)
    assert h.output() == b""
    assert h.attempts() == []


#: Every stream dropped above for its PROXY header.
_ALL_DROPPED = [GET, _CLIENT_HELLO, *(h + GET for h in [*_BAD_V1.values(), *_BAD_V2.values()])]


@given(data=st.sampled_from(_ALL_DROPPED), cuts=st.lists(st.integers(1, 1 << 16), max_size=5))
def test_case_10_to_24_a_drop_does_not_depend_on_how_the_stream_is_cut(
    data: bytes, cuts: list[int]
) -> None:
    h = Harness()
    for piece in _cut(data, cuts):
        h.send(piece)
    assert_dropped(h)


@pytest.mark.parametrize(
    "second",
    [v1(), v2(inet4())],
    ids=["then_v1", "then_v2"],
)
@pytest.mark.parametrize("first", [v1(), v2(inet4())], ids=["v1", "v2"])
def test_case_25_a_second_proxy_header_is_bad_http_and_gets_400(
    first: bytes, second: bytes
) -> None:
    h = Harness()
    h.send(first + second + GET)
    assert_refused(h, 400)
    assert h.attempts() == []


@pytest.mark.parametrize(
    "after",
    [b"NOT HTTP AT ALL\r\n\r\n", b"\x00\x01\x02binary\r\n\r\n", _CLIENT_HELLO],
    ids=["text", "binary", "tls"],
)
def test_case_26_bytes_after_a_v2_header_that_are_not_http_get_400(after: bytes) -> None:
    h = Harness()
    h.send(v2(inet4()) + after)
    assert_refused(h, 400)
    assert h.attempts() == []


# == Cookie persistence (insert indirect nocache) ============================================


def cookie_request(cookie_lines: Sequence[bytes], method: bytes = b"GET") -> bytes:
    lines = b"".join(b"Cookie: " + line + b"\r\n" for line in cookie_lines)
    return method + b" / HTTP/1.1\r\nHost: app\r\n" + lines + b"\r\n"


def sticky(
    cookie_lines: Sequence[bytes], response: bytes | None = None
) -> tuple[str, bytes, bytes]:
    """One request from CLIENT with these Cookie headers.

    :return: the server chosen, what it received, what the client got back.
    """
    h = Harness()
    h.proxy_header(CLIENT)
    forwarded = forward(h, cookie_request(cookie_lines))
    return h.server_of(), forwarded, answer(h, response)


def set_cookie(server: str) -> bytes:
    return b"storify_editor_host=%s; path=/" % server.encode()


@functools.cache
def home() -> str:
    """The server CLIENT is hashed to when it presents no usable cookie."""
    return hashed(Harness(), CLIENT)


def test_case_27_a_client_without_a_cookie_gets_one_appended_after_the_servers_headers() -> None:
    h = Harness()
    h.proxy_header(CLIENT)
    forwarded = forward(h)
    assert values(forwarded, b"Cookie") == []
    out = answer(h, ok(extra=b"Content-Type: text/plain\r\nX-App: 1\r\n"))
    server = h.server_of()
    assert server == hashed(h, CLIENT)
    names = [name for name, _ in fields(out)]
    assert names[:3] == [b"Content-Length", b"Content-Type", b"X-App"]
    assert (b"Set-Cookie", set_cookie(server)) in fields(out)[3:]
    assert values(out, b"Set-Cookie") == [set_cookie(server)]


def test_case_28_our_cookie_among_others_routes_and_only_it_is_stripped() -> None:
    server, forwarded, out = sticky([b"a=1; storify_editor_host=s2; b=2"])
    assert server == "s2"
    assert values(forwarded, b"Cookie") == [b"a=1; b=2"]
    assert values(out, b"Set-Cookie") == []


def test_case_29_our_cookie_alone_routes_and_the_cookie_header_goes_away() -> None:
    server, forwarded, out = sticky([b"storify_editor_host=s2"])
    assert server == "s2"
    assert values(forwarded, b"Cookie") == []
    assert values(out, b"Set-Cookie") == []


def test_case_30_our_cookie_in_the_second_cookie_header_routes_and_the_first_is_kept() -> None:
    server, forwarded, _ = sticky([b"a=1", b"storify_editor_host=s2; b=2"])
    assert server == "s2"
    assert values(forwarded, b"Cookie") == [b"a=1", b"b=2"]


def test_case_31_spaces_around_the_cookie_are_tolerated_and_the_rest_forwarded() -> None:
    server, forwarded, out = sticky([b"storify_editor_host = s2 ; z=9"])
    assert server == "s2"
    assert values(forwarded, b"Cookie") == [b"z=9"]
    assert values(out, b"Set-Cookie") == []


@pytest.mark.parametrize(
    "value", [b'"s2"', b"S2", b"", b"bogus"], ids=["quoted", "uppercase", "empty", "bogus"]
)
def test_case_32_an_invalid_value_is_load_balanced_re_pinned_and_stripped(value: bytes) -> None:
    assert home() != "s2"
    server, forwarded, out = sticky([b"keep=me; storify_editor_host=" + value + b"; other=2"])
    assert server == home()
    assert values(forwarded, b"Cookie") == [b"keep=me; other=2"]
    assert values(out, b"Set-Cookie") == [set_cookie(home())]


def test_case_33_a_cookie_name_in_another_case_is_not_ours() -> None:
    assert home() != "s3"
    server, forwarded, out = sticky([b"STORIFY_EDITOR_HOST=s3"])
    assert server == home()
    assert values(forwarded, b"Cookie") == [b"STORIFY_EDITOR_HOST=s3"]
    assert values(out, b"Set-Cookie") == [set_cookie(home())]


def test_case_34_of_two_values_the_valid_one_routes_and_both_are_stripped() -> None:
    server, forwarded, _ = sticky([b"storify_editor_host=bogus; a=1; storify_editor_host=s3"])
    assert server == "s3"
    assert values(forwarded, b"Cookie") == [b"a=1"]


_APP_COOKIES = b"Set-Cookie: storify_editor_host=fromapp\r\nSet-Cookie: other=1\r\n"


def test_case_35_the_servers_own_persistence_cookie_is_replaced_by_ours() -> None:
    server, _, out = sticky([], ok(extra=_APP_COOKIES))
    assert values(out, b"Set-Cookie") == [b"other=1", set_cookie(server)]


def test_case_35_the_servers_own_persistence_cookie_is_dropped_for_a_pinned_client() -> None:
    _, _, out = sticky([b"storify_editor_host=s2"], ok(extra=_APP_COOKIES))
    assert values(out, b"Set-Cookie") == [b"other=1"]


def test_case_36_37_a_post_and_a_plain_get_that_get_the_cookie_are_made_private() -> None:
    for method in (b"POST", b"GET"):
        h = Harness()
        h.proxy_header(CLIENT)
        forward(
            h, cookie_request([], method).replace(b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n")
        )
        out = answer(h)
        assert values(out, b"Set-Cookie") == [set_cookie(home())]
        assert values(out, b"Cache-Control") == [b"private"]


def test_case_37_a_response_with_a_validator_gets_private_after_the_set_cookie() -> None:
    _, _, out = sticky([], ok(extra=b"Last-Modified: Mon, 01 Jan 2024 00:00:00 GMT\r\n"))
    names = [name.lower() for name, _ in fields(out)]
    assert names.index(b"cache-control") > names.index(b"set-cookie")
    assert values(out, b"Cache-Control") == [b"private"]


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        (b"public, max-age=60", b"max-age=60, private"),
        (b"public", b"private"),
        (b"no-cache", b"no-cache, private"),  # case 38
        (b"private", b"private"),
        (b"no-store", b"no-store"),
    ],
)
def test_case_37_38_an_existing_cache_control_becomes_private_without_a_second_header(
    sent: bytes, expected: bytes
) -> None:
    _, _, out = sticky([], ok(extra=b"Cache-Control: " + sent + b"\r\n"))
    assert values(out, b"Cache-Control") == [expected]


def test_case_37_a_pinned_client_gets_the_servers_caching_unchanged() -> None:
    _, _, out = sticky([b"storify_editor_host=s2"], ok(extra=b"Cache-Control: public\r\n"))
    assert values(out, b"Cache-Control") == [b"public"]


def test_case_39_an_error_status_from_the_server_still_gets_the_cookie() -> None:
    server, _, out = sticky([], b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 403 ")
    assert values(out, b"Set-Cookie") == [set_cookie(server)]


def test_case_40_pipelined_requests_are_routed_one_by_one_and_only_the_first_is_pinned() -> None:
    assert home() not in ("s2", "s3")
    h = Harness()
    h.proxy_header(CLIENT)
    h.send(
        b"GET /1 HTTP/1.1\r\nHost: app\r\n\r\n"
        b"GET /2 HTTP/1.1\r\nHost: app\r\nCookie: storify_editor_host=s3\r\n\r\n"
        b"GET /3 HTTP/1.1\r\nHost: app\r\nCookie: storify_editor_host=s2\r\n\r\n"
    )
    served, answers = [], []
    for index, path in enumerate((b"/1", b"/2", b"/3")):
        assert len(h.attempts()) == index + 1, "each request goes to another server"
        served.append(h.server_of(index))
        _, transport = h.accept(index)
        assert transport.value().startswith(b"GET " + path + b" ")
        answers.append(answer(h, ok(path)))
    assert served == [home(), "s3", "s2"]
    assert [values(a, b"Set-Cookie") for a in answers] == [[set_cookie(home())], [], []]
    assert [a.rpartition(b"\r\n\r\n")[2] for a in answers] == [b"/1", b"/2", b"/3"]


def test_case_41_the_101_of_an_upgrade_without_a_cookie_carries_the_cookie() -> None:
    h = Harness()
    h.proxy_header(CLIENT)
    forward(h, UPGRADE)
    out = answer(h, SWITCH)
    assert out.startswith(b"HTTP/1.1 101 ")
    assert values(out, b"Set-Cookie") == [set_cookie(h.server_of())]


def test_case_41_an_upgrade_with_a_cookie_tunnels_to_that_server() -> None:
    h = Harness()
    h.proxy_header(CLIENT)
    request = UPGRADE.replace(b"\r\n\r\n", b"\r\nCookie: storify_editor_host=s3\r\n\r\n")
    forwarded = forward(h, request)
    assert h.server_of() == "s3"
    assert values(forwarded, b"Cookie") == []
    out = answer(h, SWITCH + b"from s3")
    assert values(out, b"Set-Cookie") == []
    assert out.endswith(b"\r\n\r\nfrom s3")


def address_on(h: Harness, server: str) -> str:
    """A client address that a cookie-less client is hashed from to ``server``."""
    for n in range(1, 250):
        address = f"198.51.100.{n}"
        if hashed(h, address) == server:
            return address
    raise AssertionError(f"no address hashes to {server}")


def test_case_42_a_draining_server_keeps_its_pinned_clients_and_gets_no_new_ones() -> None:
    h = Harness()
    newcomer = address_on(h, "s2")
    h.pool.set_admin("s2", "drain")
    h.proxy_header(newcomer)
    forward(h, cookie_request([b"storify_editor_host=s2"]))
    assert h.server_of() == "s2"
    assert values(answer(h), b"Set-Cookie") == []

    other = Harness()
    other.pool.set_admin("s2", "drain")
    other.proxy_header(newcomer)
    forward(other)
    assert other.server_of() != "s2"
    assert values(answer(other), b"Set-Cookie") == [set_cookie(other.server_of())]


def _rerouted_from_s2(h: Harness) -> None:
    h.proxy_header(CLIENT)
    forward(h, cookie_request([b"storify_editor_host=s2"]))
    server = h.server_of()
    assert server != "s2"
    assert values(answer(h), b"Set-Cookie") == [set_cookie(server)]


def test_case_43_a_cookie_for_a_server_in_maintenance_is_rerouted_even_without_redispatch() -> None:
    h = Harness(redispatch=False)
    h.pool.set_admin("s2", "maint")
    _rerouted_from_s2(h)


def test_case_44_a_cookie_for_a_server_down_by_health_check_is_rerouted() -> None:
    h = Harness(redispatch=False)
    h.pool.record_check("s2", False, 0.0, "L7STS/503")
    assert h.pool.servers["s2"].state is State.DOWN
    _rerouted_from_s2(h)


def test_case_45_a_refused_pinned_server_is_redispatched_at_once_and_the_cookie_rewritten() -> None:
    h = Harness(redispatch=True)
    h.proxy_header(CLIENT)
    h.send(cookie_request([b"storify_editor_host=s2"]))
    assert h.server_of() == "s2"
    h.refuse()
    assert len(h.attempts()) == 2, "no waiting before the redispatch"
    other = h.server_of()
    assert other != "s2"
    h.accept()
    assert values(answer(h), b"Set-Cookie") == [set_cookie(other)]
    assert h.reactor.seconds() == 0


@pytest.mark.parametrize(("timeout_connect", "pause"), [("5s", 1.0), ("300ms", 0.3)])
def test_case_45_without_redispatch_retries_are_spaced_then_503_keeps_the_connection(
    timeout_connect: str, pause: float
) -> None:
    h = Harness(config=config(redispatch=False, retries="3", timeout_connect=timeout_connect))
    h.proxy_header(CLIENT)
    h.send(cookie_request([b"storify_editor_host=s2"]))
    for attempt in range(1, 4):
        h.refuse()
        h.reactor.advance(pause - 0.01)
        assert len(h.attempts()) == attempt
        h.reactor.advance(0.01)
        assert len(h.attempts()) == attempt + 1
        assert h.server_of() == "s2"
    h.refuse()
    out = h.output()
    assert out.startswith(b"HTTP/1.1 503 ")
    assert values(out, b"Connection") == []
    assert not closing(h.client)
    assert h.pool.servers["s2"].active == 0
    forward(h, cookie_request([b"storify_editor_host=s3"]))
    assert h.server_of() == "s3"


# == Hashing ==================================================================================


def test_case_48_one_address_from_twenty_source_ports_always_reaches_the_same_server() -> None:
    served = set()
    for port in range(40000, 40020):
        h = Harness()
        forward(h, v1(CLIENT, port) + GET)
        served.add(h.server_of())
    assert served == {home()}


def _pool(text: str | None = None) -> Pool:
    parsed = parse_config(config() if text is None else text)
    return Pool(parsed.servers, parsed.health, parsed.balance)


_ADDRESSES = [f"198.51.{n // 250}.{n % 250 + 1}" for n in range(600)]


def _placement(pool: Pool) -> dict[str, str]:
    chosen = {}
    for address in _ADDRESSES:
        server = pool.choose([], address_key(address)).server
        assert server is not None
        chosen[address] = server.name
    return chosen


@pytest.mark.parametrize("how", ["drain", "maint", "down"])
def test_case_49_taking_one_server_out_moves_only_its_clients_and_they_come_back(
    how: str,
) -> None:
    pool = _pool()
    before = _placement(pool)
    assert set(before.values()) == {"s1", "s2", "s3"}
    if how == "down":
        pool.record_check("s2", False, 0.0, "L4CON")
    else:
        pool.set_admin("s2", "drain" if how == "drain" else "maint")
    during = _placement(pool)
    for address, server in before.items():
        if server == "s2":
            assert during[address] in {"s1", "s3"}
        else:
            assert during[address] == server
    if how == "down":
        pool.record_check("s2", True, 1.0, "L7OK")
    else:
        pool.set_admin("s2", "ready")
    assert _placement(pool) == before


def test_case_49_removing_a_server_from_the_configuration_moves_only_its_clients() -> None:
    before = _placement(_pool())
    without_s2 = config().replace("[server s2]\naddress = 10.1.0.2:80\n", "")
    assert "s2" not in without_s2
    after = _placement(_pool(without_s2))
    for address, server in before.items():
        if server != "s2":
            assert after[address] == server


# == Limits and errors ========================================================================


def test_case_56_no_server_up_gives_503_with_an_explanation_and_the_connection_stays() -> None:
    h = Harness()
    for name in ("s1", "s2", "s3"):
        h.pool.record_check(name, False, 0.0, "L4CON")
    h.proxy_header(CLIENT)
    h.send(GET)
    out = h.output()
    assert out.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"No server is available to handle this request." in out
    assert values(out, b"Connection") == []
    assert not closing(h.client)
    h.pool.record_check("s3", True, 1.0, "L7OK")
    forward(h)
    assert h.server_of() == "s3"


def _queued_behind_a_slow_request() -> tuple[Harness, Frontend, FakeTCP]:
    """s2 at maxconn 1 with a request in flight; a second client pinned to s2 arrives."""
    text = config(timeout_queue="1500ms").replace(
        "address = 10.1.0.2:80\n", "address = 10.1.0.2:80\nmaxconn = 1\n"
    )
    h = Harness(config=text)
    h.proxy_header(CLIENT)
    forward(h, cookie_request([b"storify_editor_host=s2"]))
    waiting, transport = h.another_client()
    waiting.dataReceived(v1("198.51.100.1") + cookie_request([b"storify_editor_host=s2"]))
    assert len(h.attempts()) == 1, "the second request waits instead of connecting"
    return h, waiting, transport


def test_case_57_a_request_queued_for_a_full_server_gets_503_at_timeout_queue() -> None:
    h, _, transport = _queued_behind_a_slow_request()
    h.reactor.advance(1.49)
    assert transport.value() == b""
    h.reactor.advance(0.02)
    assert transport.value().startswith(b"HTTP/1.1 503 ")
    assert len(h.attempts()) == 1


def test_case_57_a_queued_request_takes_the_slot_its_server_frees() -> None:
    h, _, transport = _queued_behind_a_slow_request()
    h.reactor.advance(1.0)
    answer(h)
    h.reactor.advance(0)
    assert len(h.attempts()) == 2 and h.server_of() == "s2"
    h.accept()
    answer(h, ok(b"second"))
    assert transport.value().endswith(b"second")


def test_case_58_a_server_closing_without_a_response_gives_502_and_close() -> None:
    h = Harness()
    h.proxy_header(CLIENT)
    forward(h)
    backend, _ = h.backends[-1]
    backend.connectionLost(Failure(ConnectionDone()))
    out = assert_refused(h, 502)
    assert b"The server returned an invalid or incomplete response." in out


def test_case_58_a_truncated_body_is_relayed_as_far_as_it_came_then_the_client_is_closed() -> None:
    h = Harness()
    h.proxy_header(CLIENT)
    forward(h)
    backend, _ = h.backends[-1]
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    backend.dataReceived(b"0123")
    backend.readConnectionLost()
    backend.connectionLost(Failure(ConnectionDone()))
    out = h.output()
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")
    assert out.endswith(b"\r\n\r\n0123")
    assert closing(h.client)


def test_case_59_a_server_silent_past_timeout_server_gives_504() -> None:
    h = Harness()
    h.proxy_header(CLIENT)
    forward(h)
    h.reactor.advance(9.99)
    assert h.output() == b""
    h.reactor.advance(0.02)
    assert_refused(h, 504)


def test_case_60_a_response_head_larger_than_the_limit_gives_502() -> None:
    h = Harness()
    h.proxy_header(CLIENT)
    forward(h)
    h.backends[-1][0].dataReceived(ok(extra=b"X-Big: " + b"x" * 20000 + b"\r\n"))
    assert_refused(h, 502)


# == WebSocket ================================================================================


def open_tunnel(cookie: bytes | None = None) -> tuple[Harness, FakeTCP]:
    h = Harness()
    h.proxy_header(CLIENT)
    request = UPGRADE
    if cookie is not None:
        request = UPGRADE.replace(b"\r\n\r\n", b"\r\nCookie: " + cookie + b"\r\n\r\n")
    forward(h, request)
    answer(h, SWITCH)
    _, transport = h.backends[-1]
    transport.clear()
    return h, transport


def test_case_61_an_upgrade_is_relayed_both_ways_and_early_frames_follow_the_101() -> None:
    h = Harness()
    h.proxy_header(CLIENT)
    forwarded = forward(h, UPGRADE + b"early frame")
    assert forwarded.endswith(b"\r\n\r\n"), "early bytes wait for the 101"
    backend, transport = h.backends[-1]
    transport.clear()
    backend.dataReceived(SWITCH)
    assert h.output().startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert transport.value() == b"early frame"
    h.send(b"\x81\x02hi")
    assert transport.value().endswith(b"\x81\x02hi")
    backend.dataReceived(b"\x81\x05hello")
    assert h.output() == b"\x81\x05hello"


@pytest.mark.parametrize(
    "request_",
    [
        UPGRADE.replace(b"Sec-WebSocket-Key: " + KEY + b"\r\n", b""),
        UPGRADE.replace(KEY, b"dG9vIHNob3J0"),
        UPGRADE.replace(b"Upgrade: websocket", b"Upgrade: h2c, websocket").replace(
            b"Sec-WebSocket-Key: " + KEY + b"\r\n", b""
        ),
    ],
    ids=["no_key", "key_not_24_characters", "upgrade_list_without_key"],
)
def test_case_62_an_upgrade_without_a_valid_key_gets_400_and_close(request_: bytes) -> None:
    h = Harness()
    h.proxy_header(CLIENT)
    h.send(request_)
    assert_refused(h, 400)
    assert h.attempts() == []


_NO_ACCEPT = SWITCH.replace(b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n", b"")


@pytest.mark.parametrize(
    ("request_", "response"),
    [
        (UPGRADE, _NO_ACCEPT),
        (UPGRADE.replace(b"Connection: Upgrade\r\n", b""), SWITCH),
        (UPGRADE, SWITCH.replace(b"Connection: Upgrade\r\n", b"")),
    ],
    ids=["101_without_accept", "request_without_connection_upgrade", "101_without_connection"],
)
def test_case_63_an_invalid_101_gives_502_and_no_tunnel(request_: bytes, response: bytes) -> None:
    h = Harness()
    h.proxy_header(CLIENT)
    forward(h, request_)
    h.backends[-1][0].dataReceived(response + b"tunnel bytes")
    out = assert_refused(h, 502)
    assert b"tunnel bytes" not in out


def test_case_64_an_upgrade_refused_by_the_server_is_an_ordinary_response() -> None:
    h = Harness()
    h.proxy_header(CLIENT)
    forward(h, UPGRADE)
    out = answer(h, b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno")
    assert out.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert out.endswith(b"\r\n\r\nno")
    assert not closing(h.client)
    _, transport = h.backends[-1]
    transport.clear()
    h.send(b"GET /next HTTP/1.1\r\nHost: app\r\n\r\n")
    assert transport.value().startswith(b"GET /next HTTP/1.1\r\n")
    assert answer(h).startswith(b"HTTP/1.1 200 OK\r\n")


def test_case_65_an_idle_tunnel_outlives_timeout_client_and_closes_at_timeout_tunnel() -> None:
    h, transport = open_tunnel()
    h.reactor.advance(29.9)  # timeout_client is 10 s, timeout_tunnel 30 s
    assert not closing(h.client)
    h.reactor.advance(0.2)
    assert closing(h.client)
    assert h.output() == b""
    h.frontend.connectionLost(Failure(ConnectionDone()))
    assert closing(transport)
    assert h.pool.servers[h.server_of()].active == 0


def test_case_65_a_half_closed_tunnel_that_goes_quiet_is_closed_at_timeout_tunnel() -> None:
    h, transport = open_tunnel()
    h.frontend.readConnectionLost()
    assert transport.write_closed
    assert not closing(h.client)
    h.reactor.advance(30.1)
    assert closing(h.client)


@pytest.mark.parametrize("how", ["down", "maint"])
def test_case_55_an_open_websocket_survives_its_server_leaving_the_pool(how: str) -> None:
    h, transport = open_tunnel(b"storify_editor_host=s2")
    assert h.server_of() == "s2"
    if how == "down":
        h.pool.record_check("s2", False, 1.0, "L7STS/503")
    else:
        h.pool.set_admin("s2", "maint")
    h.send(b"still there?")
    assert transport.value() == b"still there?"
    h.backends[-1][0].dataReceived(b"yes")
    assert h.output() == b"yes"
    assert not closing(h.client) and not closing(transport)


def test_case_55_shutting_down_a_servers_sessions_closes_its_open_websockets() -> None:
    h, _ = open_tunnel(b"storify_editor_host=s2")
    assert h.ctx.shutdown_sessions("s1") == 0
    assert not closing(h.client)
    assert h.ctx.shutdown_sessions("s2") == 1
    assert h.client.aborted


# == Slow clients =============================================================================


def test_case_66_a_partial_head_then_silence_gets_408_at_timeout_http_request() -> None:
    h = Harness()
    h.proxy_header(CLIENT)
    h.send(b"GET / HTTP/1.1\r\nHost: a")
    h.reactor.advance(2.99)
    assert h.output() == b""
    h.reactor.advance(0.02)
    out = assert_refused(h, 408)
    assert h.attempts() == []
    assert b"Your browser didn't send a complete request in time." in out


def test_case_67_one_byte_every_half_second_does_not_stretch_the_head_deadline() -> None:
    h = Harness()
    h.proxy_header(CLIENT)
    for byte in b"GET /slowloris HTTP/1.1\r\nHost: app\r\nX: y\r\n":
        if closing(h.client):
            break
        h.send(bytes([byte]))
        h.reactor.advance(0.5)
    assert_refused(h, 408)
    assert h.reactor.seconds() == 3.0
    assert h.attempts() == []


def test_case_67_a_proxy_header_sent_one_byte_every_half_second_is_dropped_at_the_deadline() -> (
    None
):
    h = Harness()
    header = v1()
    for index in range(len(header)):
        if closing(h.client):
            break
        h.send(header[index : index + 1])
        h.reactor.advance(0.5)
    assert_dropped(h)
    assert h.reactor.seconds() == 3.0


def test_case_68_a_connection_that_never_sends_a_request_byte_is_closed_silently() -> None:
    h = Harness()
    h.proxy_header(CLIENT)
    h.reactor.advance(3.01)
    assert closing(h.client)
    assert h.output() == b""


def test_case_69_an_idle_keep_alive_connection_closes_silently_at_the_keep_alive_timeout() -> None:
    h = Harness()
    h.proxy_header(CLIENT)
    forward(h)
    answer(h)
    h.reactor.advance(4.99)
    assert not closing(h.client)
    h.reactor.advance(0.02)
    assert closing(h.client)
    assert h.output() == b""


# == HTTP parsing and smuggling ===============================================================


def refused(request: bytes, status: int, how: Feed = "whole") -> bytes:
    """Send ``request`` after a PROXY header; it must get ``status`` and reach no server."""
    h = Harness()
    h.proxy_header(CLIENT)
    feed(h, request, how)
    out = assert_refused(h, status)
    assert h.attempts() == []
    return out


def post(headers: bytes, body: bytes = b"abc") -> bytes:
    return b"POST /in HTTP/1.1\r\nHost: app\r\n" + headers + b"\r\n" + body


def test_case_70_content_length_with_chunked_is_read_as_chunked_and_closes_after() -> None:
    h = Harness()
    h.proxy_header(CLIENT)
    body = b"5\r\nhello\r\n0\r\n\r\n"
    smuggled = b"GET /admin HTTP/1.1\r\nHost: app\r\n\r\n"
    headers = b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % len(body)
    forwarded = forward(h, post(headers, body + smuggled))
    assert values(forwarded, b"Content-Length") == []
    assert values(forwarded, b"Transfer-Encoding") == [b"chunked"]
    assert forwarded.endswith(b"\r\n\r\n" + body)
    out = answer(h)
    assert values(out, b"Connection") == [b"close"]
    assert closing(h.client)
    assert len(h.attempts()) == 1
    assert b"/admin" not in h.backends[-1][1].value()


def test_case_71_two_equal_content_lengths_are_forwarded_as_one() -> None:
    h = Harness()
    h.proxy_header(CLIENT)
    forwarded = forward(h, post(b"Content-Length: 3\r\nContent-Length: 3\r\n"))
    assert values(forwarded, b"Content-Length") == [b"3"]
    assert forwarded.endswith(b"\r\n\r\nabc")


_BAD_CONTENT_LENGTHS = {
    "different": b"Content-Length: 3\r\nContent-Length: 4\r\n",
    "different_in_a_list": b"Content-Length: 3, 4\r\n",
    "plus_sign": b"Content-Length: +3\r\n",
    "negative": b"Content-Length: -1\r\n",
    "hex": b"Content-Length: 0x3\r\n",
    "empty": b"Content-Length: \r\n",
    "20_digits": b"Content-Length: " + b"9" * 20 + b"\r\n",
}


@pytest.mark.parametrize(
    "headers", list(_BAD_CONTENT_LENGTHS.values()), ids=list(_BAD_CONTENT_LENGTHS)
)
@pytest.mark.parametrize("how", FEEDS)
def test_case_71_a_bad_content_length_gets_400(headers: bytes, how: Feed) -> None:
    refused(post(headers), 400, how)


_CHUNKED_BODY = b"3\r\nabc\r\n0\r\n\r\n"
_BAD_TRANSFER_ENCODINGS = {
    "chunked_twice": (b"Transfer-Encoding: chunked, chunked\r\n", 400),
    "two_chunked_headers": (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", 400),
    "gzip_then_chunked": (b"Transfer-Encoding: gzip, chunked\r\n", 501),
    "chunked_not_last": (b"Transfer-Encoding: chunked, gzip\r\n", 400),
    "gzip": (b"Transfer-Encoding: gzip\r\n", 400),
    "identity": (b"Transfer-Encoding: identity\r\n", 400),
    "xchunked": (b"Transfer-Encoding: xchunked\r\n", 400),
    "space_before_colon": (b"Transfer-Encoding : chunked\r\n", 400),  # case 73
}


@pytest.mark.parametrize(
    ("headers", "status"),
    list(_BAD_TRANSFER_ENCODINGS.values()),
    ids=list(_BAD_TRANSFER_ENCODINGS),
)
def test_case_72_73_a_transfer_encoding_the_proxy_cannot_frame_is_refused(
    headers: bytes, status: int
) -> None:
    refused(post(headers, _CHUNKED_BODY), status)


_BAD_FIELDS = {
    # case 74
    "at_sign_in_name": b"X@Y: 1\r\n",
    "space_in_name": b"X Y: 1\r\n",
    "empty_name": b": 1\r\n",
    "no_colon": b"NoColonHere\r\n",
    # case 75
    "nul_in_value": b"X-A: a\x00b\r\n",
    "bare_cr_in_value": b"X-A: a\rb\r\n",
    # case 76
    "obs_fold": b"X-A: a\r\n  b\r\n",
}


@pytest.mark.parametrize("line", list(_BAD_FIELDS.values()), ids=list(_BAD_FIELDS))
@pytest.mark.parametrize("how", FEEDS)
def test_case_74_75_76_a_malformed_header_field_gets_400(line: bytes, how: Feed) -> None:
    refused(b"GET / HTTP/1.1\r\nHost: app\r\n" + line + b"\r\n", 400, how)


def test_case_76_a_continuation_line_after_host_is_not_folded_into_it() -> None:
    refused(b"GET / HTTP/1.1\r\nHost: app\r\n X-Injected: v\r\n\r\n", 400)


_BAD_REQUEST_LINES = {
    # case 77
    "space_in_uri": b"GET /a b HTTP/1.1",
    "nul_in_uri": b"GET /a\x00b HTTP/1.1",
    "fragment": b"GET /a#frag HTTP/1.1",
    # case 78
    "http_0_9": b"GET /",
    "version_11_1": b"GET / HTTP/11.1",
    "lowercase_version": b"GET / http/1.1",
}


@pytest.mark.parametrize("line", list(_BAD_REQUEST_LINES.values()), ids=list(_BAD_REQUEST_LINES))
@pytest.mark.parametrize("how", FEEDS)
def test_case_77_78_a_malformed_request_line_gets_400(line: bytes, how: Feed) -> None:
    refused(line + b"\r\nHost: app\r\n\r\n", 400, how)


def test_case_78_http_1_2_is_forwarded_as_http_1_1() -> None:
    h = Harness()
    h.proxy_header(CLIENT)
    forwarded = forward(h, b"GET /v HTTP/1.2\r\nHost: app\r\n\r\n")
    assert forwarded.startswith(b"GET /v HTTP/1.1\r\n")
    assert answer(h).startswith(b"HTTP/1.1 200 OK\r\n")
    assert not closing(h.client)


_AMBIGUOUS_HOSTS = {
    "two_different_hosts": b"GET / HTTP/1.1\r\nHost: app\r\nHost: other\r\n\r\n",
    "two_equal_hosts": b"GET / HTTP/1.1\r\nHost: app\r\nHost: app\r\n\r\n",
    "absolute_uri_with_another_authority": b"GET http://other/ HTTP/1.1\r\nHost: app\r\n\r\n",
}


@pytest.mark.parametrize("request_", list(_AMBIGUOUS_HOSTS.values()), ids=list(_AMBIGUOUS_HOSTS))
def test_case_79_an_ambiguous_host_gets_400(request_: bytes) -> None:
    refused(request_, 400)


def test_case_79_an_absolute_uri_agreeing_with_host_is_forwarded() -> None:
    h = Harness()
    h.proxy_header(CLIENT)
    forward(h, b"GET http://app/x HTTP/1.1\r\nHost: app\r\n\r\n")
    assert answer(h).startswith(b"HTTP/1.1 200 OK\r\n")


_GET_WITH_BODY_1_0 = b"GET / HTTP/1.0\r\nHost: app\r\nContent-Length: 3\r\n\r\nabc"


def test_case_80_an_http_1_0_get_with_a_body_gets_413() -> None:
    refused(_GET_WITH_BODY_1_0, 413)


_BAD_CHUNKS = {
    "size_zz": b"zz\r\nabc\r\n0\r\n\r\n",
    "size_overflow": b"1" + b"0" * 16 + b"\r\nabc\r\n0\r\n\r\n",
    "data_longer_than_size": b"3\r\nabcdef\r\n0\r\n\r\n",
    "overlong_size_line": b"3;ext=" + b"a" * 5000 + b"\r\nabc\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("body", list(_BAD_CHUNKS.values()), ids=list(_BAD_CHUNKS))
@pytest.mark.parametrize("how", FEEDS)
def test_case_81_a_malformed_chunked_body_gets_400_and_the_server_connection_goes(
    body: bytes, how: Feed
) -> None:
    h = Harness()
    h.proxy_header(CLIENT)
    feed(h, post(b"Transfer-Encoding: chunked\r\n", body), how)
    _, transport = h.accept()
    assert_refused(h, 400)
    assert closing(transport)


@pytest.mark.parametrize(
    "extra",
    [b"X-Big: " + b"x" * 15000 + b"\r\n", b"".join(b"X-%d: 1\r\n" % n for n in range(99))],
    ids=["15000_byte_header", "100_header_lines"],
)
def test_case_82_a_head_just_under_the_limits_is_forwarded(extra: bytes) -> None:
    h = Harness()
    h.proxy_header(CLIENT)
    forwarded = forward(h, b"GET / HTTP/1.1\r\nHost: app\r\n" + extra + b"\r\n")
    assert forwarded.startswith(b"GET / HTTP/1.1\r\nHost: app\r\n" + extra)


_OVERSIZED = {
    "one_large_header": (
        b"GET / HTTP/1.1\r\nHost: app\r\nX-Big: " + b"x" * 15400 + b"\r\n\r\n",
        431,
    ),
    "long_uri": (b"GET /" + b"u" * 17000 + b" HTTP/1.1\r\nHost: app\r\n\r\n", 414),
    "101_header_lines": (b"GET / HTTP/1.1\r\nHost: app\r\n" + b"X-A: 1\r\n" * 100 + b"\r\n", 431),
}


@pytest.mark.parametrize(("request_", "status"), list(_OVERSIZED.values()), ids=list(_OVERSIZED))
@pytest.mark.parametrize("how", FEEDS)
def test_case_82_an_oversized_request_head_is_refused_with_414_or_431(
    request_: bytes, status: int, how: Feed
) -> None:
    refused(request_, status, how)


def test_case_83_headers_named_in_connection_are_not_forwarded() -> None:
    h = Harness()
    h.proxy_header(CLIENT)
    forwarded = forward(
        h, b"GET / HTTP/1.1\r\nHost: app\r\nConnection: X-Foo\r\nX-Foo: secret\r\nX-Bar: 1\r\n\r\n"
    )
    assert b"secret" not in forwarded
    assert values(forwarded, b"X-Foo") == []
    assert values(forwarded, b"Connection") == []
    assert values(forwarded, b"X-Bar") == [b"1"]


_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@pytest.mark.parametrize("how", FEEDS)
def test_case_84_an_http2_preface_gets_400(how: Feed) -> None:
    refused(_H2_PREFACE, 400, how)


def _line(request_line: bytes) -> bytes:
    return request_line + b"\r\nHost: app\r\n\r\n"


def _field(line: bytes) -> bytes:
    return b"GET / HTTP/1.1\r\nHost: app\r\n" + line + b"\r\n"


#: Every request refused above, with its status.
_ALL_REFUSED = [
    *((post(headers), 400) for headers in _BAD_CONTENT_LENGTHS.values()),
    *(
        (post(headers, _CHUNKED_BODY), status)
        for headers, status in _BAD_TRANSFER_ENCODINGS.values()
    ),
    *((_field(line), 400) for line in _BAD_FIELDS.values()),
    *((_line(line), 400) for line in _BAD_REQUEST_LINES.values()),
    *((request, 400) for request in _AMBIGUOUS_HOSTS.values()),
    (_GET_WITH_BODY_1_0, 413),
    *_OVERSIZED.values(),
    (_H2_PREFACE, 400),
]


@given(case=st.sampled_from(_ALL_REFUSED), cuts=st.lists(st.integers(1, 1 << 16), max_size=5))
def test_case_71_to_84_a_refusal_does_not_depend_on_how_the_request_is_cut(
    case: tuple[bytes, int], cuts: list[int]
) -> None:
    request, status = case
    h = Harness()
    h.proxy_header(CLIENT)
    for piece in _cut(request, cuts):
        h.send(piece)
    assert_refused(h, status)
    assert h.attempts() == []


# == Reload and drain =========================================================================

# Cases 85 and 86 (reloads) need a real process: tests/integration/test_reload.py.


def test_case_87_a_drained_server_keeps_pinned_clients_until_its_sessions_end() -> None:
    h, transport = open_tunnel(b"storify_editor_host=s2")
    s2 = h.pool.servers["s2"]
    assert s2.active == 1
    h.pool.set_admin("s2", "drain")

    pinned, pinned_transport = h.another_client()
    pinned.dataReceived(v1("198.51.100.200") + cookie_request([b"storify_editor_host=s2"]))
    assert h.server_of() == "s2"
    backend, _ = h.accept()
    backend.dataReceived(ok())
    assert values(pinned_transport.value(), b"Set-Cookie") == []

    for address in _ADDRESSES[:30]:
        newcomer, _ = h.another_client()
        newcomer.dataReceived(v1(address) + GET)
        assert h.server_of() != "s2"

    assert s2.active == 1, "only the open WebSocket still counts"
    h.frontend.connectionLost(Failure(ConnectionDone()))
    assert s2.active == 0
    assert closing(transport)
