"""Tests for the incremental PROXY protocol parser.

Every accepted header is fed whole, one byte at a time and cut at every offset,
followed by the start of an HTTP request that must come back untouched.  Case
numbers refer to the PROXY protocol cases of the HAProxy behaviour study the
project keeps as reference.
"""

from __future__ import annotations

import ipaddress
import itertools
import subprocess
import sys
from collections.abc import Sequence

import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from stickyproxy.errors import ProxyHeaderError
from stickyproxy.proxyproto import (
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NETNS,
    PP2_TYPE_NOOP,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyHeaderParser,
    ProxyInfo,
    crc32c,
    format_v1,
    format_v2,
)
from tests.helpers import splits

REQUEST = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"
CLIENT = ("203.0.113.7", 40000)
SERVER = ("10.0.0.1", 80)
TCP4_BLOCK = bytes([203, 0, 113, 7, 10, 0, 0, 1]) + (40000).to_bytes(2, "big") + b"\x00\x50"


def v2(command: int = 1, family: int = 0x11, body: bytes = b"", version: int = 2) -> bytes:
    """Build a v2 header by hand, including ones format_v2 refuses to write."""
    fixed = V2_SIGNATURE + bytes([version << 4 | command, family])
    return fixed + len(body).to_bytes(2, "big") + body


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


def feed_chunks(
    chunks: Sequence[bytes],
    header_length: int,
    *,
    optional: bool = False,
    max_v2_length: int = 4096,
) -> tuple[ProxyInfo | None, bytes]:
    """Feed ``chunks``; the result must appear with the header's last byte."""
    parser = ProxyHeaderParser(optional=optional, max_v2_length=max_v2_length)
    fed = 0
    for index, chunk in enumerate(chunks):
        result = parser.feed(chunk)
        fed += len(chunk)
        if result is None:
            assert fed < header_length, "complete header not reported"
            continue
        assert fed >= header_length, "header reported before it was complete"
        info, rest = result
        assert parser.buffered == 0
        return info, rest + b"".join(chunks[index + 1 :])
    raise AssertionError("header never completed")


def accept(header: bytes, *, optional: bool = False, max_v2_length: int = 4096) -> ProxyInfo:
    """Parse ``header`` + REQUEST in every split; all must agree."""
    infos = set()
    for chunks in splits(header + REQUEST):
        info, rest = feed_chunks(
            chunks, len(header), optional=optional, max_v2_length=max_v2_length
        )
        assert rest == REQUEST
        assert info is not None
        infos.add(info)
    assert len(infos) == 1
    return infos.pop()


def reject(data: bytes, reason: str, *, optional: bool = False, max_v2_length: int = 4096) -> None:
    """``data`` must be refused with ``reason`` however it is split."""
    for chunks in splits(data):
        parser = ProxyHeaderParser(optional=optional, max_v2_length=max_v2_length)
        with pytest.raises(ProxyHeaderError) as caught:
            for chunk in chunks:
                assert parser.feed(chunk) is None
        assert caught.value.reason == reason
        assert caught.value.status_hint is None


def bytes_until_rejected(data: bytes) -> int:
    """Feed one byte at a time; return how many bytes it took to fail."""
    parser = ProxyHeaderParser()
    for count in range(1, len(data) + 1):
        try:
            assert parser.feed(data[count - 1 : count]) is None
        except ProxyHeaderError:
            return count
    raise AssertionError("never rejected")


class TestV1:
    def test_tcp4_names_the_client(self) -> None:  # case 1
        info = accept(b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 80\r\n")
        assert info == ProxyInfo(version=1, local=False, source=CLIENT, destination=SERVER)

    def test_tcp6_names_the_client_in_canonical_form(self) -> None:  # case 2
        info = accept(b"PROXY TCP6 2001:DB8:0::1 ::1 65535 0\r\n")
        assert info.source == ("2001:db8::1", 65535)
        assert info.destination == ("::1", 0)
        assert not info.local

    def test_tcp6_accepts_an_ipv4_mapped_address_in_dotted_form(self) -> None:
        info = accept(b"PROXY TCP6 ::ffff:203.0.113.7 ::1 1 2\r\n")
        assert info.source is not None
        assert ipaddress.ip_address(info.source[0]) == ipaddress.ip_address("::ffff:cb00:7107")

    def test_unknown_uses_the_real_endpoints(self) -> None:  # case 3
        info = accept(b"PROXY UNKNOWN\r\n")
        assert info == ProxyInfo(version=1, local=True, source=None, destination=None)

    @pytest.mark.parametrize(
        "line",
        [
            b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n",  # case 4: legal per spec, HAProxy RSTs
            b"PROXY UNKNOWN whatever  the sender \x00 chose\r\n",
            b"PROXY UNKNOWN " + b"f" * (V1_MAX_LENGTH - 16) + b"\r\n",  # exactly 107 bytes
        ],
    )
    def test_unknown_ignores_everything_before_the_crlf(self, line: bytes) -> None:
        assert accept(line).local

    def test_a_line_of_exactly_107_bytes_is_accepted(self) -> None:
        address = "ffff:" * 7 + "ffff"
        line = f"PROXY TCP6 {address} {address} 65535 65535\r\n".encode()
        assert len(line) == 104  # PP §2.1's TCP6 worst case; pad with UNKNOWN below
        padded = b"PROXY UNKNOWN " + line[len(b"PROXY TCP6 ") :]
        assert len(padded) == V1_MAX_LENGTH
        assert accept(padded).local
        assert accept(line).source == (address, 65535)

    @pytest.mark.parametrize(
        ("line", "reason"),
        [  # case 12
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "v1 header contains a bare CR or LF"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rGET", "v1 header contains a bare CR or LF"),
            (b"PROXY UNKNOWN\nGET / HTTP/1.1\r\n", "v1 header contains a bare CR or LF"),
            (
                b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
                "v1 header fields must be separated by single spaces",
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
                "v1 header has data after the destination port",
            ),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "v1 header is missing fields"),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
                "v1 header has data after the destination port",
            ),
            (b"PROXY TCP4\r\n", "v1 header is missing fields"),
            (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "v1 header has an unknown protocol"),
            (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "v1 header has an unknown protocol"),
            (b"PROXY UNKNOWNX\r\n", "v1 header has an unknown protocol"),
            (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "v1 header has an unknown protocol"),
            (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY protocol header"),
            (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "v1 header has an unknown protocol"),
        ],
    )
    def test_malformed_lines_are_rejected(self, line: bytes, reason: str) -> None:
        reject(line + REQUEST, reason)

    @pytest.mark.parametrize(
        ("line", "reason"),
        [  # case 13: the protocol word decides the address family
            (b"PROXY TCP4 2001:db8::1 ::1 1 2\r\n", "v1 TCP4 header has an invalid IPv4 address"),
            (b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "v1 TCP6 header has an invalid IPv6 address"),
            (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "v1 TCP6 header has an invalid IPv6 address"),
            (b"PROXY TCP6 1::2::3 ::1 1 2\r\n", "v1 TCP6 header has an invalid IPv6 address"),
            (
                b"PROXY TCP6 ::1 1:2:3:4:5:6:7:8:9 1 2\r\n",
                "v1 TCP6 header has an invalid IPv6 address",
            ),
            (
                b"PROXY TCP6 ::ffff:01.2.3.4 ::1 1 2\r\n",
                "v1 TCP6 header has an invalid IPv6 address",
            ),
        ],
    )
    def test_addresses_must_match_the_protocol_word(self, line: bytes, reason: str) -> None:
        reject(line, reason)

    @pytest.mark.parametrize(
        ("line", "reason"),
        [  # case 14: HAProxy accepts all of these; PP §2.1 forbids them
            (b"PROXY TCP4 001.2.3.4 5.6.7.8 1 2\r\n", "v1 TCP4 header has an invalid IPv4 address"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.08 1 2\r\n", "v1 TCP4 header has an invalid IPv4 address"),
            (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "v1 TCP4 header has an invalid IPv4 address"),
            (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "v1 TCP4 header has an invalid IPv4 address"),
            (b"PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n", "v1 TCP4 header has an invalid IPv4 address"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "v1 header has an invalid port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "v1 header has an invalid port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n", "v1 header has an invalid port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xd9\xa1\r\n", "v1 header has an invalid port"),
        ],
    )
    def test_numbers_are_strict_decimal_without_leading_zeroes(
        self, line: bytes, reason: str
    ) -> None:
        reject(line, reason)

    def test_port_zero_is_accepted(self) -> None:
        assert accept(b"PROXY TCP4 0.0.0.0 255.255.255.255 0 0\r\n").source == ("0.0.0.0", 0)

    def test_a_line_without_crlf_fails_at_the_107th_byte(self) -> None:  # case 15
        data = b"PROXY UNKNOWN " + b"1" * 300
        assert bytes_until_rejected(data) == V1_MAX_LENGTH
        reject(data, "v1 header has no CRLF within 107 bytes")

    def test_a_crlf_that_ends_past_107_bytes_is_too_late(self) -> None:
        line = b"PROXY UNKNOWN " + b"f" * (V1_MAX_LENGTH - 15) + b"\r\n"
        assert len(line) == V1_MAX_LENGTH + 1
        reject(line, "v1 header has no CRLF within 107 bytes")

    def test_a_padded_tcp6_line_over_107_bytes_is_rejected(self) -> None:  # case 16
        reject(
            b"PROXY TCP6 ::1 ::1 1 2" + b" " * 200 + b"\r\n",
            "v1 header has data after the destination port",
        )
        reject(b"PROXY TCP6 " + b"0" * 200 + b"\r\n", "v1 TCP6 header has an invalid IPv6 address")

    @pytest.mark.parametrize(
        ("data", "rejected_at"),
        [
            (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", len(b"PROXY TCP5")),
            (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", len(b"PROXY TCP4 1.2.3.4  ")),
            (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", len(b"PROXY TCP4 01")),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", len(b"PROXY TCP4 1.2.3.4 5.6.7.8 65536")),
            (b"PROXY TCP6 ::1%eth0 ::1 1 2\r\n", len(b"PROXY TCP6 ::1%")),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\nGET", len(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n")),
        ],
    )
    def test_invalid_lines_fail_before_the_crlf(self, data: bytes, rejected_at: int) -> None:
        assert bytes_until_rejected(data) == rejected_at

    def test_a_second_header_is_left_for_the_http_parser(self) -> None:  # cases 25, 26
        first = b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 80\r\n"
        for second in (first, format_v2(CLIENT, SERVER), b"\x16\x03\x01junk"):
            info, rest = feed_chunks([first + second], len(first))
            assert info is not None
            assert info.source == CLIENT
            assert rest == second


class TestV2:
    def test_tcp4_names_the_client(self) -> None:  # case 17
        header = v2(body=TCP4_BLOCK)
        assert header == format_v2(CLIENT, SERVER)
        info = accept(header)
        assert info == ProxyInfo(version=2, local=False, source=CLIENT, destination=SERVER)

    def test_tcp6_names_the_client(self) -> None:  # case 17
        info = accept(format_v2(("2001:db8::1", 1), ("2001:db8::2", 443)))
        assert info.source == ("2001:db8::1", 1)
        assert info.destination == ("2001:db8::2", 443)

    @pytest.mark.parametrize(
        "header",
        [  # case 18
            v2(command=0, family=0x00),
            v2(command=0, family=0x11, body=TCP4_BLOCK),
            v2(command=0, family=0x41, body=b"\xff" * 7),  # PP §2.2: LOCAL ignores the family
            v2(command=0, family=0x00, body=b"\x01\xff\xff garbage, not TLVs"),
        ],
    )
    def test_local_uses_the_real_endpoints_whatever_it_carries(self, header: bytes) -> None:
        info = accept(header)
        assert info.local
        assert info.source is None
        assert info.tlvs == ()

    def test_local_reports_tlvs_after_its_address_block(self) -> None:
        header = v2(command=0, family=0x11, body=TCP4_BLOCK + tlv(PP2_TYPE_AUTHORITY, b"a.example"))
        assert accept(header).authority == "a.example"
        header = v2(command=0, family=0x00, body=tlv(PP2_TYPE_UNIQUE_ID, b"id"))
        assert accept(header).unique_id == b"id"

    def test_local_with_a_wrong_crc32c_is_rejected(self) -> None:
        header = bytearray(format_v2(None, None, local=True, crc=True))
        header[-1] ^= 1
        reject(bytes(header), "v2 CRC32C mismatch")

    @pytest.mark.parametrize("family", [0x00, 0x12, 0x22, 0x31, 0x32])
    def test_families_without_a_tcp_client_fall_back_to_the_real_endpoints(
        self, family: int
    ) -> None:  # case 19
        size = {0x00: 0, 0x12: 12, 0x22: 36, 0x31: 216, 0x32: 216}[family]
        body = b"\x01" * size + tlv(PP2_TYPE_AUTHORITY, b"a.example")
        info = accept(v2(family=family, body=body))
        assert info.local
        assert info.source is None
        assert info.destination is None
        assert info.authority == "a.example"

    @pytest.mark.parametrize(
        ("header", "reason"),
        [  # case 20
            (
                v2(family=0x41, body=TCP4_BLOCK),
                "v2 header has an unknown address family or transport",
            ),
            (
                v2(family=0x13, body=TCP4_BLOCK),
                "v2 header has an unknown address family or transport",
            ),
            (
                v2(family=0x01, body=TCP4_BLOCK),
                "v2 header has an unknown address family or transport",
            ),
            (v2(command=2, body=TCP4_BLOCK), "v2 header has an unknown command"),
            (v2(command=0xF, body=TCP4_BLOCK), "v2 header has an unknown command"),
            (v2(version=1, body=TCP4_BLOCK), "v2 header version is not 2"),
            (v2(version=3, body=TCP4_BLOCK), "v2 header version is not 2"),
            (v2(body=TCP4_BLOCK[:11]), "v2 header is too short for its address block"),
            (v2(family=0x21, body=TCP4_BLOCK), "v2 header is too short for its address block"),
            (v2(family=0x31, body=b"\x00" * 215), "v2 header is too short for its address block"),
        ],
    )
    def test_malformed_fixed_parts_are_rejected(self, header: bytes, reason: str) -> None:
        reject(header, reason)

    @pytest.mark.parametrize(
        ("header", "rejected_at"),
        [
            (v2(version=1, body=TCP4_BLOCK), 13),
            (v2(command=2, body=TCP4_BLOCK), 13),
            (v2(family=0x41, body=TCP4_BLOCK), 14),
            (v2(body=TCP4_BLOCK[:4]), 16),
        ],
    )
    def test_bad_fixed_bytes_fail_as_soon_as_they_arrive(
        self, header: bytes, rejected_at: int
    ) -> None:
        assert bytes_until_rejected(header) == rejected_at

    def test_a_huge_length_fails_at_the_16th_byte(self) -> None:  # case 24
        header = V2_SIGNATURE + b"\x21\x11\xff\xff"
        assert bytes_until_rejected(header + b"\x00" * 100) == 16
        reject(header, "v2 header length 65535 exceeds 4096")

    def test_the_length_cap_is_configurable(self) -> None:
        header = format_v2(CLIENT, SERVER, tlvs=[(PP2_TYPE_NOOP, b"\x00" * 85)])
        assert len(header) == 16 + 100
        assert accept(header, max_v2_length=100).source == CLIENT
        reject(header, "v2 header length 100 exceeds 99", max_v2_length=99)

    def test_a_negative_length_cap_is_a_programming_error(self) -> None:
        with pytest.raises(ValueError, match="max_v2_length"):
            ProxyHeaderParser(max_v2_length=-1)

    def test_the_signature_is_recognised_only_whole(self) -> None:
        reject(V2_SIGNATURE[:11] + b"X" + b"\x00" * 20, "not a PROXY protocol header")


class TestTlvs:
    def test_known_and_custom_tlvs_are_reported_in_order(self) -> None:  # case 21
        tlvs = [
            (PP2_TYPE_ALPN, b"http/1.1"),
            (PP2_TYPE_AUTHORITY, "bücher.example".encode()),
            (PP2_TYPE_UNIQUE_ID, b"\x00\x01id"),
            (PP2_TYPE_NOOP, b"\x00\x00\x00"),
            (PP2_TYPE_SSL, b"\x01\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3") + tlv(0x22, b"cn")),
            (PP2_TYPE_NETNS, b"blue"),
            (0xE0, b"x" * 2000),
            (PP2_TYPE_ALPN, b"h2"),  # only interpreted types must be unique
        ]
        info = accept(format_v2(CLIENT, SERVER, tlvs=tlvs))
        assert info.tlvs == tuple(tlvs)
        assert info.authority == "bücher.example"
        assert info.unique_id == b"\x00\x01id"
        assert info.ssl
        assert info.source == CLIENT

    def test_ssl_is_false_without_the_client_ssl_bit(self) -> None:
        info = accept(format_v2(CLIENT, SERVER, tlvs=[(PP2_TYPE_SSL, b"\x06\x00\x00\x00\x00")]))
        assert not info.ssl
        assert not accept(format_v2(CLIENT, SERVER)).ssl

    def test_empty_authority_and_unique_id_are_reported_as_empty(self) -> None:
        tlvs = [(PP2_TYPE_AUTHORITY, b""), (PP2_TYPE_UNIQUE_ID, b"")]
        info = accept(format_v2(CLIENT, SERVER, tlvs=tlvs))
        assert info.authority == ""
        assert info.unique_id == b""

    @pytest.mark.parametrize(
        ("tlvs", "reason"),
        [  # case 21
            (tlv(0xE0, b"abc")[:-1], "v2 TLV overruns its container"),
            (tlv(0xE0, b"") + b"\xe0\x00", "v2 TLV header is truncated"),
            (b"\x04", "v2 TLV header is truncated"),
            # case 23
            (tlv(PP2_TYPE_UNIQUE_ID, b"u" * 129), "v2 UNIQUE_ID TLV is longer than 128 bytes"),
            (tlv(PP2_TYPE_AUTHORITY, b"a" * 256), "v2 AUTHORITY TLV is longer than 255 bytes"),
            (tlv(PP2_TYPE_AUTHORITY, b"\xff.example"), "v2 AUTHORITY TLV is not UTF-8"),
            (tlv(PP2_TYPE_SSL, b"\x01\x00\x00\x00"), "v2 SSL TLV is shorter than 5 bytes"),
            (
                tlv(PP2_TYPE_SSL, b"\x01\x00\x00\x00\x00\x21\x00\x09TLS"),
                "v2 SSL sub-TLV overruns its container",
            ),
            (tlv(PP2_TYPE_SSL, b"\x01\x00\x00\x00\x00\x21"), "v2 SSL sub-TLV header is truncated"),
            (tlv(PP2_TYPE_AUTHORITY, b"a") * 2, "v2 header repeats the AUTHORITY TLV"),
            (tlv(PP2_TYPE_UNIQUE_ID, b"a") * 2, "v2 header repeats the UNIQUE_ID TLV"),
            # case 22
            (tlv(PP2_TYPE_CRC32C, b"\x00\x00\x00"), "v2 CRC32C TLV is not 4 bytes"),
            (tlv(PP2_TYPE_CRC32C, b"\x00" * 4), "v2 CRC32C mismatch"),
        ],
    )
    def test_malformed_tlvs_are_rejected(self, tlvs: bytes, reason: str) -> None:
        reject(v2(body=TCP4_BLOCK + tlvs), reason)

    def test_a_unique_id_of_128_bytes_is_accepted(self) -> None:  # case 23
        info = accept(format_v2(CLIENT, SERVER, tlvs=[(PP2_TYPE_UNIQUE_ID, b"u" * 128)]))
        assert info.unique_id == b"u" * 128

    def test_an_authority_of_255_bytes_is_accepted(self) -> None:
        info = accept(format_v2(CLIENT, SERVER, tlvs=[(PP2_TYPE_AUTHORITY, b"a" * 255)]))
        assert info.authority == "a" * 255

    def test_a_correct_crc32c_is_accepted(self) -> None:  # case 22
        header = format_v2(CLIENT, SERVER, tlvs=[(PP2_TYPE_NOOP, b"pad")], crc=True)
        info = accept(header)
        assert info.tlvs[-1] == (PP2_TYPE_CRC32C, header[-4:])

    def test_a_crc32c_covers_every_byte_of_the_header(self) -> None:  # case 22
        header = format_v2(CLIENT, SERVER, tlvs=[(PP2_TYPE_NOOP, b"pad")], crc=True)
        for position in [*range(16, 28), len(header) - 8, len(header) - 1]:
            damaged = bytearray(header)
            damaged[position] ^= 0x01
            reject(bytes(damaged), "v2 CRC32C mismatch")

    def test_crc32c_matches_the_rfc_3720_check_value(self) -> None:
        # The standard "123456789" check value for CRC-32C (Castagnoli).
        assert crc32c(b"123456789") == 0xE3069283
        assert crc32c(b"") == 0
        assert crc32c(b"\x00" * 32) == 0x8A9136AA  # RFC 3720 B.4 test vector


class TestStreamsWithoutHeader:
    @pytest.mark.parametrize(
        "data",
        [b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"],
    )
    def test_a_required_header_that_is_missing_fails_at_the_first_byte(
        self, data: bytes
    ) -> None:  # cases 10, 11
        assert bytes_until_rejected(data) == 1
        reject(data, "not a PROXY protocol header")

    @pytest.mark.parametrize(
        ("data", "decided_after"),
        [
            (b"GET / HTTP/1.1\r\n\r\n", 1),
            (b"POST / HTTP/1.1\r\n\r\n", 2),
            (b"PROXYX", 6),
            (b"\r\n\r\n\x00\r\nQUIX\n", 11),
            (b"\x16\x03\x01\x02\x00", 1),
        ],
    )
    def test_optional_mode_passes_a_plain_stream_through_once_it_can_tell(
        self, data: bytes, decided_after: int
    ) -> None:
        for chunks in splits(data):
            info, rest = feed_chunks(chunks, decided_after, optional=True)
            assert info is None
            assert rest == data

    def test_optional_mode_still_parses_headers(self) -> None:
        assert (
            accept(b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 80\r\n", optional=True).source == CLIENT
        )
        assert accept(format_v2(CLIENT, SERVER), optional=True).source == CLIENT

    def test_optional_mode_still_rejects_a_bad_header(self) -> None:
        reject(b"PROXY TCP4 1.2.3.4\r\n", "v1 header is missing fields", optional=True)
        reject(v2(version=1), "v2 header version is not 2", optional=True)

    def test_a_lone_p_is_not_enough_to_decide(self) -> None:
        parser = ProxyHeaderParser(optional=True)
        assert parser.feed(b"P") is None
        assert parser.feed(b"") is None
        assert parser.feed(b"U") == (None, b"PU")


class TestParserLifecycle:
    def test_an_error_is_raised_again_on_every_later_feed(self) -> None:
        parser = ProxyHeaderParser()
        with pytest.raises(ProxyHeaderError):
            parser.feed(b"GET")
        with pytest.raises(ProxyHeaderError, match="not a PROXY protocol header"):
            parser.feed(b"PROXY UNKNOWN\r\n")
        assert parser.buffered == 0

    def test_feeding_after_the_header_is_a_programming_error(self) -> None:
        parser = ProxyHeaderParser()
        assert parser.feed(b"PROXY UNKNOWN\r\n") is not None
        with pytest.raises(RuntimeError):
            parser.feed(b"GET")

    def test_v1_holds_at_most_106_bytes(self) -> None:
        parser = ProxyHeaderParser()
        assert parser.feed(b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 15)) is None
        assert parser.buffered == V1_MAX_LENGTH - 1
        with pytest.raises(ProxyHeaderError):
            parser.feed(b"x" * 10_000)
        assert parser.buffered == 0

    def test_v2_holds_at_most_its_declared_length(self) -> None:
        header = format_v2(CLIENT, SERVER, tlvs=[(0xE0, b"x" * (4096 - 12 - 3))])
        parser = ProxyHeaderParser()
        assert parser.feed(header[:-1]) is None
        assert parser.buffered == 16 + 4096 - 1
        assert parser.feed(header[-1:] + REQUEST) is not None
        assert parser.buffered == 0

    def test_the_module_does_not_import_twisted(self) -> None:
        code = "import sys, stickyproxy.proxyproto; assert 'twisted' not in sys.modules"
        subprocess.run([sys.executable, "-c", code], check=True)


class TestFormat:
    def test_v1_unknown_and_mixed_endpoints(self) -> None:
        assert format_v1(None, None) == b"PROXY UNKNOWN\r\n"
        assert format_v1(CLIENT, SERVER) == b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 80\r\n"
        with pytest.raises(ValueError, match="same IP version"):
            format_v1(CLIENT, ("::1", 80))
        with pytest.raises(ValueError, match="both"):
            format_v1(CLIENT, None)

    @pytest.mark.parametrize(
        ("source", "message"),
        [(("203.0.113.7", 65536), "out of range"), (("fe80::1%eth0", 1), "zone id")],
    )
    def test_endpoints_the_protocol_cannot_carry_are_refused(
        self, source: tuple[str, int], message: str
    ) -> None:
        destination = ("::1", 1) if ":" in source[0] else SERVER
        for formatter in (format_v1, format_v2):
            with pytest.raises(ValueError, match=message):
                formatter(source, destination)

    def test_v2_refuses_oversized_tlvs(self) -> None:
        with pytest.raises(ValueError, match="TLV"):
            format_v2(CLIENT, SERVER, tlvs=[(0xE0, b"x" * 65536)])
        with pytest.raises(ValueError, match="65535"):
            format_v2(CLIENT, SERVER, tlvs=[(0xE0, b"x" * 40000)] * 2)


# -- properties -----------------------------------------------------------------------------------

ports = st.integers(0, 65535)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
endpoint_pairs = st.one_of(
    st.just((None, None)),
    st.tuples(st.tuples(ipv4, ports), st.tuples(ipv4, ports)),
    st.tuples(st.tuples(ipv6, ports), st.tuples(ipv6, ports)),
)
plain_tlvs = st.tuples(
    st.sampled_from([PP2_TYPE_ALPN, PP2_TYPE_NOOP, PP2_TYPE_NETNS, 0x06, 0xE0, 0xEF, 0xF0, 0xFF]),
    st.binary(max_size=64),
)
authority = st.text(max_size=60).map(str.encode).filter(lambda b: len(b) <= 255)
special_tlvs = st.fixed_dictionaries(
    {},
    optional={
        PP2_TYPE_AUTHORITY: authority,
        PP2_TYPE_UNIQUE_ID: st.binary(max_size=128),
        PP2_TYPE_SSL: st.tuples(st.integers(0, 7), st.binary(min_size=4, max_size=4)).map(
            lambda cv: bytes([cv[0]]) + cv[1] + tlv(0x21, b"TLSv1.3")
        ),
    },
)


@st.composite
def tlv_lists(draw: st.DrawFn) -> list[tuple[int, bytes]]:
    items = draw(st.lists(plain_tlvs, max_size=5)) + list(draw(special_tlvs).items())
    return draw(st.permutations(items))


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def normalised(endpoint: tuple[str, int] | None) -> tuple[str, int] | None:
    return None if endpoint is None else (str(ipaddress.ip_address(endpoint[0])), endpoint[1])


cut_points = st.lists(st.integers(0, 10_000), max_size=8)


@given(endpoint_pairs, st.binary(max_size=40), cut_points)
@example((("::ffff:1.2.3.4", 1), ("::1", 2)), b"", [])
def test_any_v1_header_round_trips_at_any_split(
    endpoints: tuple[tuple[str, int] | None, tuple[str, int] | None],
    trailing: bytes,
    points: list[int],
) -> None:
    source, destination = endpoints
    header = format_v1(source, destination)
    info, rest = feed_chunks(cut(header + trailing, points), len(header))
    assert rest == trailing
    assert info == ProxyInfo(
        version=1,
        local=source is None,
        source=normalised(source),
        destination=normalised(destination),
    )


v2_specs = st.tuples(endpoint_pairs, tlv_lists(), st.booleans(), st.booleans())


@given(v2_specs, st.binary(max_size=40), cut_points)
def test_any_v2_header_round_trips_at_any_split(
    spec: tuple[
        tuple[tuple[str, int] | None, tuple[str, int] | None],
        list[tuple[int, bytes]],
        bool,
        bool,
    ],
    trailing: bytes,
    points: list[int],
) -> None:
    endpoints, tlvs, local, crc = spec
    source, destination = endpoints
    header = format_v2(source, destination, tlvs=tlvs, local=local, crc=crc)
    info, rest = feed_chunks(cut(header + trailing, points), len(header))
    assert rest == trailing
    assert info is not None
    expected_tlvs = tuple(tlvs) + (((PP2_TYPE_CRC32C, header[-4:]),) if crc else ())
    specials = dict(tlvs)
    ssl_value = specials.get(PP2_TYPE_SSL)
    assert info == ProxyInfo(
        version=2,
        local=local or source is None,
        source=None if local else normalised(source),
        destination=None if local else normalised(destination),
        tlvs=expected_tlvs,
        authority=specials[PP2_TYPE_AUTHORITY].decode() if PP2_TYPE_AUTHORITY in specials else None,
        unique_id=specials.get(PP2_TYPE_UNIQUE_ID),
        ssl=ssl_value is not None and bool(ssl_value[0] & 1),
    )


def meaning(consumed: bytes) -> tuple[int, bool, tuple[str, int] | None, tuple[str, int] | None]:
    """Decode a header the parser accepted, independently of the parser."""
    if consumed.startswith(b"PROXY "):
        assert consumed.endswith(b"\r\n")
        assert len(consumed) <= V1_MAX_LENGTH
        words = consumed[:-2].decode("ascii").split(" ")
        if words[1] == "UNKNOWN":
            return 1, True, None, None
        version = ipaddress.ip_address(words[2]).version
        assert words[1] == f"TCP{version}"
        assert all(str(int(word)) == word for word in words[4:])
        return (
            1,
            False,
            (str(ipaddress.ip_address(words[2])), int(words[4])),
            (
                str(ipaddress.ip_address(words[3])),
                int(words[5]),
            ),
        )
    assert consumed[:12] == V2_SIGNATURE
    assert len(consumed) == 16 + int.from_bytes(consumed[14:16], "big")
    command, family, body = consumed[12], consumed[13], consumed[16:]
    if command == 0x21 and family in (0x11, 0x21):
        size = 4 if family == 0x11 else 16
        address = ipaddress.IPv4Address if family == 0x11 else ipaddress.IPv6Address
        ports_at = 2 * size
        return (
            2,
            False,
            (
                str(address(body[:size])),
                int.from_bytes(body[ports_at : ports_at + 2], "big"),
            ),
            (
                str(address(body[size : 2 * size])),
                int.from_bytes(body[ports_at + 2 : ports_at + 4], "big"),
            ),
        )
    assert command in (0x20, 0x21)
    return 2, True, None, None


def outcome(chunks: list[bytes]) -> tuple[ProxyInfo | None, bytes] | str | None:
    """Feed chunks; return the result, the error reason, or None if unfinished."""
    parser = ProxyHeaderParser(max_v2_length=300)
    data = b"".join(chunks)
    fed = 0
    try:
        for chunk in chunks:
            fed += len(chunk)
            result = parser.feed(chunk)
            if result is not None:
                return result[0], result[1] + data[fed:]
            assert parser.buffered < (V1_MAX_LENGTH if data.startswith(b"P") else 16 + 300)
    except ProxyHeaderError as error:
        return error.reason
    return None


valid_headers = st.one_of(
    st.builds(lambda e: format_v1(*e), endpoint_pairs),
    st.builds(
        lambda e, t, local, crc: format_v2(*e, tlvs=t, local=local, crc=crc),
        endpoint_pairs,
        tlv_lists(),
        st.booleans(),
        st.booleans(),
    ),
)
mutations = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4)


def check_stream(data: bytes, points: list[int]) -> None:
    split = outcome(cut(data, points))
    assert split == outcome([data]), "the split changed the result"
    event("rejected" if isinstance(split, str) else "incomplete" if split is None else "parsed")
    if isinstance(split, tuple):
        info, rest = split
        assert data.endswith(rest)
        if info is not None:
            consumed = data[: len(data) - len(rest)]
            assert meaning(consumed) == (info.version, info.local, info.source, info.destination)


@given(valid_headers, st.binary(max_size=20), mutations, cut_points)
@example(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", b"", [(15, ord("0"))], [])
def test_mutated_headers_fail_cleanly_or_keep_their_meaning(
    header: bytes, trailing: bytes, changes: list[tuple[int, int]], points: list[int]
) -> None:
    data = bytearray(header + trailing)
    for position, value in changes:
        data[position % len(data)] = value
    check_stream(bytes(data), points)


@given(
    st.sampled_from(
        [b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", V2_SIGNATURE]
    ),
    st.binary(max_size=400),
    cut_points,
)
def test_random_bytes_only_ever_raise_proxy_header_error(
    prefix: bytes, data: bytes, points: list[int]
) -> None:
    check_stream(prefix + data, points)
