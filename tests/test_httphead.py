"""Tests for stickyproxy.httphead: head parsing, framing, hop-by-hop, bodies.

Every valid message is fed whole, one byte at a time and cut at every offset
(tests.helpers.splits), followed by the start of the next message, and every
split must give the same head and the same rest. Every rejected message must
be rejected with the same status however it is split.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from typing import Literal

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from stickyproxy import httphead
from stickyproxy.errors import RemoteProtocolError
from stickyproxy.httphead import (
    CHUNKED,
    NO_BODY,
    UNTIL_CLOSE,
    BodyReader,
    Framing,
    HeadParser,
    RequestHead,
    ResponseHead,
    response_framing,
    strip_hop_by_hop,
    validate_upgrade_response,
)
from tests.helpers import splits

NEXT = b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n"
WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


def msg(*lines: bytes) -> bytes:
    """Join head lines with CRLF and end the head."""
    return b"\r\n".join(lines) + b"\r\n\r\n"


def feed_chunks(
    kind: Literal["request", "response"], chunks: Iterable[bytes], **limits: int
) -> tuple[RequestHead | ResponseHead, bytes]:
    """Feed chunks until a head completes; return it with all later bytes."""
    parser = HeadParser(kind, **limits)
    remaining = iter(chunks)
    for chunk in remaining:
        head = parser.feed(chunk)
        if head is not None:
            return head, parser.take_rest() + b"".join(remaining)
    raise AssertionError("the head never completed")


def fingerprint(head: RequestHead | ResponseHead) -> tuple[object, ...]:
    if isinstance(head, RequestHead):
        return (head.serialize(), head.framing, head.close_after, head.keep_alive)
    return (head.serialize(), head.keep_alive)


def parse_every_way(
    kind: Literal["request", "response"], data: bytes, **limits: int
) -> RequestHead | ResponseHead:
    """Parse ``data + NEXT`` split every way; all must agree. Returns the head."""
    results = set()
    first = None
    for chunks in splits(data + NEXT):
        head, rest = feed_chunks(kind, chunks, **limits)
        assert rest == NEXT
        results.add(fingerprint(head))
        first = first or head
    assert len(results) == 1
    assert first is not None
    return first


def request(data: bytes, **limits: int) -> RequestHead:
    head = parse_every_way("request", data, **limits)
    assert isinstance(head, RequestHead)
    return head


def response(data: bytes, **limits: int) -> ResponseHead:
    head = parse_every_way("response", data, **limits)
    assert isinstance(head, ResponseHead)
    return head


def outcome(
    kind: Literal["request", "response"], chunks: Iterable[bytes], **limits: int
) -> int | str:
    parser = HeadParser(kind, **limits)
    try:
        for chunk in chunks:
            if parser.feed(chunk) is not None:
                return "accepted"
    except RemoteProtocolError as exc:
        assert exc.status_hint is not None
        return exc.status_hint
    return "incomplete"


def assert_rejected(
    data: bytes,
    status: int,
    kind: Literal["request", "response"] = "request",
    reason: str | None = None,
    **limits: int,
) -> None:
    """``data`` is rejected with ``status`` however it is split."""
    for chunks in splits(data):
        assert outcome(kind, chunks, **limits) == status, chunks
    if reason is not None:
        with pytest.raises(RemoteProtocolError, match=reason):
            HeadParser(kind, **limits).feed(data)


def get(target: bytes = b"/", *headers: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    return msg(b"GET " + target + b" " + version, b"Host: example.com", *headers)


# --------------------------------------------------------------------------


class TestValidRequests:
    def test_simple_get_has_no_body_and_keeps_alive(self) -> None:
        head = request(get(b"/index.html?q=1", b"Accept: */*"))
        assert head.method == b"GET"
        assert head.target == b"/index.html?q=1"
        assert head.version == b"HTTP/1.1"
        assert head.headers == [(b"Host", b"example.com"), (b"Accept", b"*/*")]
        assert head.framing == NO_BODY
        assert head.keep_alive
        assert not head.close_after

    def test_serialization_round_trip_is_byte_exact(self) -> None:
        data = msg(
            b"POST /api/x?y=%20z HTTP/1.1",
            b"Host: example.com:8080",
            b"X-Weird-CASE: Value  with\tinner  space",
            b"Cookie: a=1; storify_editor_host=s1",
            b"X-Empty: ",
            b"X-Utf8: caf\xc3\xa9",
            b"Content-Length: 0",
        )
        assert request(data).serialize() == data

    def test_ows_around_values_is_stripped_and_names_keep_their_case(self) -> None:
        head = request(get(b"/", b"x-A:\t  spaced \t", b"X-b:tight"))
        assert head.headers[1:] == [(b"x-A", b"spaced"), (b"X-b", b"tight")]
        assert head.serialize() == get(b"/", b"x-A: spaced", b"X-b: tight")

    def test_empty_header_value_is_accepted(self) -> None:
        assert request(get(b"/", b"X-Empty:")).get(b"x-empty") == b""

    def test_content_length_body_is_framed_by_length(self) -> None:
        head = request(msg(b"POST / HTTP/1.1", b"Host: h", b"Content-Length: 11"))
        assert head.framing == Framing("length", 11)

    def test_content_length_zero_is_an_empty_length_framed_body(self) -> None:
        head = request(msg(b"POST / HTTP/1.1", b"Host: h", b"Content-Length: 0"))
        assert head.framing == Framing("length", 0)
        assert BodyReader(head.framing).done

    def test_leading_empty_lines_before_the_request_line_are_ignored(self) -> None:
        head = request(b"\r\n\r\n" + get())
        assert head.serialize() == get()

    def test_http10_without_keep_alive_closes_after_the_exchange(self) -> None:
        head = request(msg(b"GET / HTTP/1.0"))
        assert head.version == b"HTTP/1.0"
        assert not head.keep_alive
        assert head.close_after

    def test_http10_with_keep_alive_persists(self) -> None:
        head = request(msg(b"GET / HTTP/1.0", b"Connection: Keep-Alive"))
        assert head.keep_alive
        assert not head.close_after

    def test_http11_connection_close_closes_after_the_exchange(self) -> None:
        head = request(get(b"/", b"Connection: foo, CLOSE"))
        assert not head.keep_alive
        assert head.close_after

    def test_higher_http1_minor_version_is_handled_as_http11(self) -> None:
        head = request(get(version=b"HTTP/1.2"))
        assert head.version == b"HTTP/1.1"

    def test_lowercase_and_unknown_methods_are_forwarded(self) -> None:
        assert request(get().replace(b"GET", b"get", 1)).method == b"get"
        assert request(get().replace(b"GET", b"FOO", 1)).method == b"FOO"

    def test_absolute_form_with_matching_host_is_accepted(self) -> None:
        head = request(msg(b"GET http://Example.COM/a?b HTTP/1.1", b"Host: example.com"))
        assert head.target == b"http://Example.COM/a?b"

    def test_absolute_form_without_host_in_http10_is_accepted(self) -> None:
        assert request(msg(b"GET https://example.com HTTP/1.0")).target == b"https://example.com"

    def test_connect_with_authority_form_is_accepted(self) -> None:
        assert request(msg(b"CONNECT example.com:443 HTTP/1.1", b"Host: h")).method == b"CONNECT"

    def test_options_asterisk_is_accepted(self) -> None:
        assert request(msg(b"OPTIONS * HTTP/1.1", b"Host: h")).target == b"*"

    def test_unusual_but_visible_target_bytes_are_forwarded(self) -> None:
        target = b'/a/../b//c?x={"y"}|<z>%2e'
        assert request(get(target)).target == target

    def test_http10_request_without_host_is_accepted(self) -> None:
        assert request(msg(b"GET / HTTP/1.0")).get(b"host") is None

    def test_empty_host_is_accepted(self) -> None:
        assert request(msg(b"GET / HTTP/1.1", b"Host:")).get(b"host") == b""

    def test_http10_post_with_body_is_accepted(self) -> None:
        head = request(msg(b"POST / HTTP/1.0", b"Content-Length: 4"))
        assert head.framing == Framing("length", 4)

    def test_http10_get_with_empty_body_is_accepted(self) -> None:
        assert request(msg(b"GET / HTTP/1.0", b"Content-Length: 0")).framing.length == 0

    def test_head_of_exactly_max_size_is_accepted(self) -> None:
        base = get(b"/", b"X: ")
        data = get(b"/", b"X: " + b"a" * (200 - len(base)))
        assert len(data) == 200
        request(data, max_size=200)

    def test_exactly_max_headers_header_lines_are_accepted(self) -> None:
        data = get(b"/", *[b"X-%d: v" % i for i in range(9)])
        assert len(request(data, max_headers=10).headers) == 10


class TestContentLengthAndTransferEncoding:
    def test_equal_duplicate_content_length_headers_collapse_to_one(self) -> None:
        head = request(
            msg(b"POST / HTTP/1.1", b"Host: h", b"Content-Length: 3", b"X: y", b"content-length: 3")
        )
        assert head.headers == [(b"Host", b"h"), (b"Content-Length", b"3"), (b"X", b"y")]
        assert head.framing == Framing("length", 3)

    def test_content_length_list_of_equal_values_collapses_to_one_value(self) -> None:
        head = request(msg(b"POST / HTTP/1.1", b"Host: h", b"Content-Length: 3 ,3, 3"))
        assert head.get_all(b"content-length") == [b"3"]

    def test_chunked_request_is_framed_as_chunked(self) -> None:
        head = request(msg(b"POST / HTTP/1.1", b"Host: h", b"Transfer-Encoding: chunked"))
        assert head.framing == CHUNKED
        assert not head.close_after

    def test_mixed_case_chunked_is_accepted_and_forwarded_as_is(self) -> None:
        head = request(msg(b"POST / HTTP/1.1", b"Host: h", b"Transfer-Encoding: Chunked"))
        assert head.framing == CHUNKED
        assert head.get(b"transfer-encoding") == b"Chunked"

    def test_transfer_encoding_with_empty_list_elements_is_forwarded_as_plain_chunked(
        self,
    ) -> None:
        head = request(
            msg(b"POST / HTTP/1.1", b"Host: h", b"Transfer-Encoding: , chunked ,", b"X: 1")
        )
        assert head.headers == [(b"Host", b"h"), (b"Transfer-Encoding", b"chunked"), (b"X", b"1")]

    def test_content_length_with_transfer_encoding_drops_length_and_closes(self) -> None:
        head = request(
            msg(
                b"POST / HTTP/1.1",
                b"Host: h",
                b"Content-Length: 5",
                b"Transfer-Encoding: chunked",
            )
        )
        assert head.framing == CHUNKED
        assert head.get(b"content-length") is None
        assert head.close_after
        assert head.keep_alive  # the client did not ask to close; the proxy decides to

    @pytest.mark.parametrize(
        "value",
        [b"+3", b"-1", b"0x3", b"", b"3 3", b"3,", b"1e3", b"\xd9\xa3", b"1234567890123456"],
        ids=[
            "plus",
            "minus",
            "hex",
            "empty",
            "inner-space",
            "trailing-comma",
            "exp",
            "unicode",
            "16-digits",
        ],
    )
    def test_malformed_content_length_is_400(self, value: bytes) -> None:
        assert_rejected(msg(b"POST / HTTP/1.1", b"Host: h", b"Content-Length: " + value), 400)

    def test_fifteen_digit_content_length_is_accepted(self) -> None:
        head = request(msg(b"POST / HTTP/1.1", b"Host: h", b"Content-Length: 999999999999999"))
        assert head.framing.length == 999_999_999_999_999

    def test_conflicting_content_length_headers_are_400(self) -> None:
        assert_rejected(
            msg(b"POST / HTTP/1.1", b"Host: h", b"Content-Length: 3", b"Content-Length: 4"),
            400,
            reason="conflicting",
        )

    def test_conflicting_content_length_list_is_400(self) -> None:
        assert_rejected(msg(b"POST / HTTP/1.1", b"Host: h", b"Content-Length: 3, 4"), 400)

    def test_content_lengths_differing_only_in_leading_zeros_conflict(self) -> None:
        assert_rejected(msg(b"POST / HTTP/1.1", b"Host: h", b"Content-Length: 3, 03"), 400)

    def test_invalid_content_length_is_400_even_with_transfer_encoding(self) -> None:
        assert_rejected(
            msg(
                b"POST / HTTP/1.1", b"Host: h", b"Content-Length: x", b"Transfer-Encoding: chunked"
            ),
            400,
        )

    @pytest.mark.parametrize(
        ("value", "status"),
        [
            (b"chunked, chunked", 400),
            (b"gzip, chunked", 501),
            (b"chunked, gzip", 400),
            (b"gzip", 400),
            (b"identity", 400),
            (b"xchunked", 400),
            (b"chunked;q=1", 400),
            (b"", 400),
            (b" , ", 400),
            (b"chu nked", 400),
            (b'"chunked"', 400),
        ],
        ids=[
            "chunked-twice",
            "unknown-coding-before-chunked",
            "chunked-not-last",
            "gzip-alone",
            "identity",
            "xchunked",
            "chunked-with-parameter",
            "empty",
            "only-empty-elements",
            "space-inside",
            "quoted",
        ],
    )
    def test_transfer_encoding_other_than_final_chunked_is_refused(
        self, value: bytes, status: int
    ) -> None:
        assert_rejected(msg(b"POST / HTTP/1.1", b"Host: h", b"Transfer-Encoding: " + value), status)

    def test_two_transfer_encoding_headers_both_chunked_are_400(self) -> None:
        assert_rejected(
            msg(
                b"POST / HTTP/1.1",
                b"Host: h",
                b"Transfer-Encoding: chunked",
                b"Transfer-Encoding: chunked",
            ),
            400,
        )

    def test_transfer_encoding_split_over_two_headers_is_combined(self) -> None:
        assert_rejected(
            msg(
                b"POST / HTTP/1.1",
                b"Host: h",
                b"Transfer-Encoding: gzip",
                b"Transfer-Encoding: chunked",
            ),
            501,
        )

    def test_transfer_encoding_in_http10_request_is_400(self) -> None:
        assert_rejected(msg(b"POST / HTTP/1.0", b"Transfer-Encoding: chunked"), 400)

    @pytest.mark.parametrize("method", [b"GET", b"HEAD", b"DELETE"])
    def test_http10_get_head_delete_with_a_body_is_413(self, method: bytes) -> None:
        assert_rejected(msg(method + b" / HTTP/1.0", b"Content-Length: 5"), 413)

    def test_http11_get_with_a_body_is_forwarded(self) -> None:
        assert request(get(b"/", b"Content-Length: 5")).framing == Framing("length", 5)


class TestRequestLineRejections:
    @pytest.mark.parametrize(
        ("line", "status"),
        [
            (b"GET  / HTTP/1.1", 400),
            (b"GET / HTTP/1.1 ", 400),
            (b" GET / HTTP/1.1", 400),
            (b"GET\t/ HTTP/1.1", 400),
            (b"GET / http/1.1", 400),
            (b"GET / HTTP/11.1", 400),
            (b"GET / HTTP/1", 400),
            (b"GET / HTTP/1.1x", 400),
            (b"GET /", 400),
            (b"GET / HTTP/2.0", 505),
            (b"GET / HTTP/3.0", 505),
            (b"GET / HTTP/0.9", 505),
            (b"G@T / HTTP/1.1", 400),
            (b"GET /a b HTTP/1.1", 400),
            (b"GET /a\x00b HTTP/1.1", 400),
            (b"GET /a#frag HTTP/1.1", 400),
            (b"GET /caf\xc3\xa9 HTTP/1.1", 400),
            (b"GET /a\x7fb HTTP/1.1", 400),
            (b"GET * HTTP/1.1", 400),
            (b"OPTIONS */test HTTP/1.1", 400),
            (b"GET admin HTTP/1.1", 400),
            (b"GET example.com:80 HTTP/1.1", 400),
            (b"CONNECT example.com HTTP/1.1", 400),
            (b"CONNECT / HTTP/1.1", 400),
            (b"CONNECT http://example.com/ HTTP/1.1", 400),
            (b"GET http://user@example.com/ HTTP/1.1", 400),
            (b"GET ftp://example.com/ HTTP/1.1", 400),
            (b"GET http:/// HTTP/1.1", 400),
        ],
        ids=[
            "double-space",
            "trailing-space",
            "leading-space",
            "tab-separator",
            "lowercase-version",
            "two-digit-major",
            "no-minor",
            "junk-after-version",
            "http09-no-version",
            "http2",
            "http3",
            "http09-version",
            "at-in-method",
            "space-in-target",
            "nul-in-target",
            "fragment",
            "utf8-in-target",
            "del-in-target",
            "asterisk-for-get",
            "asterisk-with-path",
            "relative-target",
            "authority-form-for-get",
            "connect-without-port",
            "connect-origin-form",
            "connect-absolute-form",
            "userinfo",
            "ftp-scheme",
            "empty-authority",
        ],
    )
    def test_bad_request_line_is_refused(self, line: bytes, status: int) -> None:
        assert_rejected(msg(line, b"Host: example.com"), status)

    def test_http2_connection_preface_is_400_naming_http2(self) -> None:
        assert_rejected(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, reason="HTTP/2")

    def test_tls_client_hello_is_refused_at_the_first_byte(self) -> None:
        with pytest.raises(RemoteProtocolError) as info:
            HeadParser("request").feed(b"\x16")
        assert info.value.status_hint == 400

    def test_bare_cr_before_the_request_line_is_refused(self) -> None:
        assert_rejected(b"\rGET / HTTP/1.1\r\nHost: h\r\n\r\n", 400)


class TestHeaderLineRejections:
    @pytest.mark.parametrize(
        ("line", "reason"),
        [
            (b"Transfer-Encoding : chunked", "whitespace before colon"),
            (b"X-Foo\t: bar", "whitespace before colon"),
            (b"X@Foo: bar", "invalid header name"),
            (b"X Foo: bar", "invalid header name"),
            (b": bar", "empty header name"),
            (b"X-Foo bar", "without colon"),
            (b"X-Foo: a\x00b", "NUL"),
            (b"X-Foo: a\rb", "bare CR"),
            (b"X-Foo: a\x01b", "control character"),
            (b"X-Foo: a\x7fb", "control character"),
            (b"X-Foo: a\x0bb", "control character"),
            (b"X\xc3\xa9: v", "invalid header name"),
        ],
        ids=[
            "space-before-colon",
            "tab-before-colon",
            "at-in-name",
            "space-in-name",
            "empty-name",
            "no-colon",
            "nul-in-value",
            "bare-cr-in-value",
            "soh-in-value",
            "del-in-value",
            "vt-in-value",
            "utf8-in-name",
        ],
    )
    def test_bad_header_line_is_400(self, line: bytes, reason: str) -> None:
        assert_rejected(get(b"/", line), 400, reason=reason)

    def test_obs_fold_is_400(self) -> None:
        assert_rejected(get(b"/", b"X-Foo: a", b"  b"), 400, reason="folding")

    def test_obs_fold_right_after_host_is_400(self) -> None:
        assert_rejected(msg(b"GET / HTTP/1.1", b"Host: example.com", b"\tX-Evil: 1"), 400)

    def test_bare_lf_line_endings_are_400(self) -> None:
        assert_rejected(b"GET / HTTP/1.1\nHost: h\n\n", 400, reason="bare")

    def test_a_single_bare_lf_line_ending_is_400(self) -> None:
        assert_rejected(b"GET / HTTP/1.1\r\nHost: h\nX: y\r\n\r\n", 400, reason="bare")

    def test_bare_lf_ending_is_refused_before_any_crlf_crlf_arrives(self) -> None:
        parser = HeadParser("request")
        assert parser.feed(b"GET / HTTP/1.1\r\nHost: h\n") is None
        with pytest.raises(RemoteProtocolError, match="bare LF"):
            parser.feed(b"\r\n")


class TestHost:
    def test_missing_host_in_http11_is_400(self) -> None:
        assert_rejected(msg(b"GET / HTTP/1.1", b"X: y"), 400, reason="missing Host")

    def test_two_different_host_headers_are_400(self) -> None:
        assert_rejected(msg(b"GET / HTTP/1.1", b"Host: a", b"Host: b"), 400, reason="Host")

    def test_two_identical_host_headers_are_400_too(self) -> None:
        assert_rejected(msg(b"GET / HTTP/1.1", b"Host: a", b"X: 1", b"host: a"), 400, reason="Host")

    def test_duplicate_host_is_400_in_http10_too(self) -> None:
        assert_rejected(msg(b"GET / HTTP/1.0", b"Host: a", b"Host: a"), 400)

    def test_absolute_form_authority_differing_from_host_is_400(self) -> None:
        assert_rejected(msg(b"GET http://a.example/ HTTP/1.1", b"Host: b.example"), 400)

    def test_absolute_form_without_host_in_http11_is_400(self) -> None:
        assert_rejected(msg(b"GET http://a.example/ HTTP/1.1"), 400)

    @pytest.mark.parametrize("value", [b"a b", b"a/b", b"user@a", b"a:80:80", b"[::1"])
    def test_malformed_host_is_400(self, value: bytes) -> None:
        assert_rejected(msg(b"GET / HTTP/1.1", b"Host: " + value), 400)

    def test_ipv6_literal_host_with_port_is_accepted(self) -> None:
        assert request(msg(b"GET / HTTP/1.1", b"Host: [2001:db8::1]:8080")).get(b"host")


class TestLimits:
    def test_request_line_over_the_limit_is_414(self) -> None:
        data = get(b"/" + b"a" * 300)
        assert_rejected(data, 414, max_size=200)

    def test_head_over_the_limit_is_431(self) -> None:
        assert_rejected(get(b"/", b"X: " + b"a" * 300), 431, max_size=200)

    def test_head_one_byte_over_the_limit_is_431(self) -> None:
        data = get(b"/", b"X: ")
        data = get(b"/", b"X: " + b"a" * (201 - len(data)))
        assert len(data) == 201
        assert_rejected(data + NEXT, 431, max_size=200)

    def test_oversized_head_fails_as_soon_as_the_limit_is_crossed(self) -> None:
        parser = HeadParser("request", max_size=100)
        assert parser.feed(b"GET / HTTP/1.1\r\nX: " + b"a" * 70) is None
        with pytest.raises(RemoteProtocolError) as info:
            parser.feed(b"a" * 20)
        assert info.value.status_hint == 431

    def test_endless_request_line_fails_without_waiting_for_a_line_end(self) -> None:
        with pytest.raises(RemoteProtocolError) as info:
            HeadParser("request", max_size=100).feed(b"GET /" + b"a" * 100)
        assert info.value.status_hint == 414

    def test_too_many_header_lines_is_431(self) -> None:
        assert_rejected(get(b"/", *[b"X-%d: v" % i for i in range(10)]), 431, max_headers=10)

    def test_too_many_header_lines_fail_before_the_head_ends(self) -> None:
        parser = HeadParser("request", max_headers=3)
        with pytest.raises(RemoteProtocolError) as info:
            parser.feed(b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n")
        assert info.value.status_hint == 431

    def test_leading_empty_lines_count_towards_the_limit(self) -> None:
        assert_rejected(b"\r\n" * 60 + get(), 400, max_size=100)

    def test_default_limits_accept_a_15000_byte_header(self) -> None:
        HeadParser("request").feed(get(b"/", b"X: " + b"a" * 15000))

    def test_default_limits_refuse_a_15400_byte_header(self) -> None:
        with pytest.raises(RemoteProtocolError) as info:
            HeadParser("request").feed(get(b"/", b"X: " + b"a" * 15400))
        assert info.value.status_hint == 431


class TestWebSocketUpgrade:
    def upgrade(self, *extra: bytes, method: bytes = b"GET", version: bytes = b"HTTP/1.1") -> bytes:
        return msg(
            method + b" /socket.io/?transport=websocket " + version,
            b"Host: h",
            *extra,
        )

    def test_websocket_upgrade_is_detected(self) -> None:
        head = request(
            self.upgrade(
                b"Connection: Upgrade",
                b"Upgrade: websocket",
                b"Sec-WebSocket-Key: " + WS_KEY,
                b"Sec-WebSocket-Version: 13",
            )
        )
        assert head.is_websocket_upgrade
        assert head.wants_upgrade
        assert head.framing == NO_BODY

    def test_connection_and_upgrade_lists_are_searched_case_insensitively(self) -> None:
        head = request(
            self.upgrade(
                b"Connection: keep-alive, UPGRADE",
                b"Upgrade: foo/2, WebSocket",
                b"Sec-WebSocket-Key: " + WS_KEY,
                b"Sec-WebSocket-Version: 13",
            )
        )
        assert head.is_websocket_upgrade

    def test_upgrade_without_connection_upgrade_is_not_an_upgrade(self) -> None:
        head = request(self.upgrade(b"Upgrade: websocket"))
        assert not head.is_websocket_upgrade
        assert not head.wants_upgrade

    def test_post_upgrade_is_not_a_websocket_upgrade(self) -> None:
        head = request(self.upgrade(b"Connection: upgrade", b"Upgrade: websocket", method=b"POST"))
        assert not head.is_websocket_upgrade
        assert head.wants_upgrade

    def test_upgrade_in_http10_is_ignored(self) -> None:
        head = request(
            self.upgrade(b"Connection: upgrade", b"Upgrade: websocket", version=b"HTTP/1.0")
        )
        assert not head.is_websocket_upgrade
        assert not head.wants_upgrade

    def test_other_protocol_upgrade_is_not_websocket(self) -> None:
        head = request(self.upgrade(b"Connection: Upgrade, HTTP2-Settings", b"Upgrade: h2c"))
        assert head.wants_upgrade
        assert not head.is_websocket_upgrade

    @pytest.mark.parametrize(
        "key_lines",
        [
            [],
            [b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ="],
            [b"Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAAAA"],
            [b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZ!=="],
            [b"Sec-WebSocket-Key: " + WS_KEY, b"Sec-WebSocket-Key: " + WS_KEY],
        ],
        ids=["missing", "23-chars", "decodes-to-18-bytes", "not-base64", "twice"],
    )
    def test_websocket_upgrade_needs_one_valid_key(self, key_lines: list[bytes]) -> None:
        data = self.upgrade(
            b"Connection: upgrade", b"Upgrade: websocket", *key_lines, b"Sec-WebSocket-Version: 13"
        )
        assert_rejected(data, 400, reason="Sec-WebSocket-Key")

    def test_websocket_upgrade_needs_a_version(self) -> None:
        data = self.upgrade(
            b"Connection: upgrade", b"Upgrade: websocket", b"Sec-WebSocket-Key: " + WS_KEY
        )
        assert_rejected(data, 400, reason="Sec-WebSocket-Version")


# --------------------------------------------------------------------------


class TestResponses:
    def test_simple_response_is_parsed(self) -> None:
        head = response(msg(b"HTTP/1.1 200 OK", b"Content-Length: 5", b"Server: x"))
        assert (head.version, head.status, head.reason) == (b"HTTP/1.1", 200, b"OK")
        assert head.headers == [(b"Content-Length", b"5"), (b"Server", b"x")]
        assert head.keep_alive

    def test_response_serialization_round_trip_is_byte_exact(self) -> None:
        data = msg(b"HTTP/1.1 404 Not  Found\txyz", b"Set-Cookie: a=b; Path=/", b"X-Empty: ")
        assert response(data).serialize() == data

    def test_empty_reason_phrase_is_accepted(self) -> None:
        assert response(msg(b"HTTP/1.1 204 ")).reason == b""

    def test_missing_reason_phrase_is_accepted_and_written_with_its_space(self) -> None:
        head = response(msg(b"HTTP/1.1 204"))
        assert head.serialize() == msg(b"HTTP/1.1 204 ")

    def test_http10_response_closes_unless_keep_alive(self) -> None:
        assert not response(msg(b"HTTP/1.0 200 OK")).keep_alive
        assert response(msg(b"HTTP/1.0 200 OK", b"Connection: keep-alive")).keep_alive

    def test_connection_close_response_does_not_keep_alive(self) -> None:
        assert not response(msg(b"HTTP/1.1 200 OK", b"Connection: close")).keep_alive

    @pytest.mark.parametrize(
        "data",
        [
            msg(b"HTTP/1.1 20 OK"),
            msg(b"HTTP/1.1 2000 OK"),
            msg(b"HTTP/1.1 099 Odd"),
            msg(b"HTTP/1.1 600 Odd"),
            msg(b"HTTP/2.0 200 OK"),
            msg(b"HTTP/1.1  200 OK"),
            msg(b"http/1.1 200 OK"),
            msg(b"HTTP/1.1 200 OK", b"X : y"),
            msg(b"HTTP/1.1 200 OK", b"X: a", b" folded"),
            msg(b"HTTP/1.1 200 OK", b"X: a\x00"),
            b"HTTP/1.1 200 OK\nX: y\n\n",
            b"\r\nHTTP/1.1 200 OK\r\n\r\n",
        ],
        ids=[
            "two-digit-status",
            "four-digit-status",
            "status-below-100",
            "status-above-599",
            "http2",
            "double-space",
            "lowercase-version",
            "space-before-colon",
            "obs-fold",
            "nul",
            "bare-lf",
            "leading-empty-line",
        ],
    )
    def test_bad_response_head_is_502(self, data: bytes) -> None:
        assert_rejected(data, 502, kind="response")

    def test_non_http_response_is_refused_at_once(self) -> None:
        with pytest.raises(RemoteProtocolError) as info:
            HeadParser("response").feed(b"SSH-2.0")
        assert info.value.status_hint == 502

    def test_oversized_response_head_is_502(self) -> None:
        assert_rejected(
            msg(b"HTTP/1.1 200 OK", b"X: " + b"a" * 300), 502, kind="response", max_size=200
        )

    def test_too_many_response_headers_is_502(self) -> None:
        data = msg(b"HTTP/1.1 200 OK", *[b"X: %d" % i for i in range(5)])
        assert_rejected(data, 502, kind="response", max_headers=4)


class TestResponseFraming:
    def framing(self, *lines: bytes, status: bytes = b"200 OK", method: bytes = b"GET") -> Framing:
        head = HeadParser("response").feed(msg(b"HTTP/1.1 " + status, *lines))
        assert head is not None
        return response_framing(head, method)

    def test_response_to_head_has_no_body(self) -> None:
        assert self.framing(b"Content-Length: 10", method=b"HEAD") == NO_BODY

    @pytest.mark.parametrize("status", [b"100 Continue", b"101 Switching", b"204 No", b"304 Not"])
    def test_1xx_204_and_304_have_no_body(self, status: bytes) -> None:
        assert self.framing(b"Transfer-Encoding: chunked", status=status) == NO_BODY

    def test_2xx_to_connect_becomes_a_tunnel(self) -> None:
        assert self.framing(b"Content-Length: 5", method=b"CONNECT") == UNTIL_CLOSE

    def test_refused_connect_is_framed_normally(self) -> None:
        assert self.framing(b"Content-Length: 5", status=b"407 Auth", method=b"CONNECT") == Framing(
            "length", 5
        )

    def test_final_chunked_means_chunked(self) -> None:
        assert self.framing(b"Transfer-Encoding: gzip, Chunked") == CHUNKED

    def test_transfer_encoding_not_ending_in_chunked_reads_until_close(self) -> None:
        assert self.framing(b"Transfer-Encoding: chunked, gzip") == UNTIL_CLOSE

    def test_content_length_means_length(self) -> None:
        assert self.framing(b"Content-Length: 42", b"Content-Length: 42") == Framing("length", 42)

    def test_no_length_means_read_until_close(self) -> None:
        assert self.framing() == UNTIL_CLOSE

    @pytest.mark.parametrize(
        "lines",
        [
            [b"Content-Length: 3", b"Transfer-Encoding: chunked"],
            [b"Content-Length: x"],
            [b"Content-Length: 3, 4"],
            [b"Content-Length: -1"],
            [b"Transfer-Encoding: chunked, chunked"],
            [b"Transfer-Encoding: "],
        ],
        ids=["cl-and-te", "bad-cl", "conflicting-cl", "negative-cl", "chunked-twice", "empty-te"],
    )
    def test_invalid_response_framing_is_502(self, lines: list[bytes]) -> None:
        with pytest.raises(RemoteProtocolError) as info:
            self.framing(*lines)
        assert info.value.status_hint == 502

    def test_transfer_encoding_in_http10_response_is_502(self) -> None:
        head = HeadParser("response").feed(msg(b"HTTP/1.0 200 OK", b"Transfer-Encoding: chunked"))
        assert head is not None
        with pytest.raises(RemoteProtocolError) as info:
            response_framing(head, b"GET")
        assert info.value.status_hint == 502


class TestUpgradeResponse:
    def ws_request(self, version: bytes = b"HTTP/1.1") -> RequestHead:
        return RequestHead(
            b"GET",
            b"/",
            version,
            [
                (b"Host", b"h"),
                (b"Connection", b"Upgrade"),
                (b"Upgrade", b"websocket"),
                (b"Sec-WebSocket-Key", WS_KEY),
                (b"Sec-WebSocket-Version", b"13"),
            ],
        )

    def switching(self, *headers: tuple[bytes, bytes]) -> ResponseHead:
        return ResponseHead(b"HTTP/1.1", 101, b"Switching Protocols", list(headers))

    GOOD = (
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
    )

    def test_valid_101_to_websocket_request_passes(self) -> None:
        validate_upgrade_response(self.ws_request(), self.switching(*self.GOOD))

    def test_non_101_response_is_not_checked(self) -> None:
        plain = RequestHead(b"GET", b"/", b"HTTP/1.1", [(b"Host", b"h")])
        validate_upgrade_response(plain, ResponseHead(b"HTTP/1.1", 403, b"No", []))

    def assert_502(self, request: RequestHead, resp: ResponseHead, reason: str) -> None:
        with pytest.raises(RemoteProtocolError, match=reason) as info:
            validate_upgrade_response(request, resp)
        assert info.value.status_hint == 502

    def test_101_to_request_without_upgrade_is_502(self) -> None:
        plain = RequestHead(
            b"GET", b"/", b"HTTP/1.1", [(b"Host", b"h"), (b"Upgrade", b"websocket")]
        )
        self.assert_502(plain, self.switching(*self.GOOD), "without Upgrade")

    def test_101_to_http10_upgrade_request_is_502(self) -> None:
        self.assert_502(self.ws_request(b"HTTP/1.0"), self.switching(*self.GOOD), "without Upgrade")

    def test_101_without_connection_upgrade_is_502(self) -> None:
        resp = self.switching(self.GOOD[0], self.GOOD[2])
        self.assert_502(self.ws_request(), resp, "Connection")

    def test_101_without_upgrade_header_is_502(self) -> None:
        resp = self.switching(self.GOOD[1], self.GOOD[2])
        self.assert_502(self.ws_request(), resp, "without Upgrade")

    def test_101_to_websocket_without_accept_is_502(self) -> None:
        self.assert_502(self.ws_request(), self.switching(*self.GOOD[:2]), "Accept")

    def test_101_to_other_upgrade_needs_no_accept(self) -> None:
        h2c = RequestHead(
            b"GET", b"/", b"HTTP/1.1", [(b"Connection", b"upgrade"), (b"Upgrade", b"h2c")]
        )
        validate_upgrade_response(
            h2c, self.switching((b"Upgrade", b"h2c"), (b"Connection", b"Upgrade"))
        )


# --------------------------------------------------------------------------


class TestHeadApi:
    def head(self) -> RequestHead:
        return RequestHead(
            b"GET", b"/", b"HTTP/1.1", [(b"Host", b"h"), (b"X-A", b"1"), (b"x-a", b"2")]
        )

    def test_get_returns_the_first_value_case_insensitively(self) -> None:
        assert self.head().get(b"x-a") == b"1"
        assert self.head().get(b"x-missing") is None

    def test_get_all_returns_every_value_in_order(self) -> None:
        assert self.head().get_all(b"x-a") == [b"1", b"2"]

    def test_remove_removes_every_occurrence(self) -> None:
        head = self.head()
        head.remove(b"x-a")
        assert head.headers == [(b"Host", b"h")]

    def test_add_appends_at_the_end(self) -> None:
        head = self.head()
        head.add(b"X-Forwarded-For", b"203.0.113.7")
        assert head.serialize().endswith(b"x-a: 2\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n")

    def test_directly_built_heads_know_their_connection_options(self) -> None:
        head = RequestHead(b"GET", b"/", b"HTTP/1.0", [(b"Connection", b"keep-alive")])
        assert head.keep_alive
        assert head.connection_tokens == frozenset({b"keep-alive"})
        assert not ResponseHead(b"HTTP/1.1", 200, b"OK", [(b"Connection", b"close")]).keep_alive

    def test_framing_refuses_a_length_for_other_kinds(self) -> None:
        with pytest.raises(ValueError):
            Framing("chunked", 3)
        with pytest.raises(ValueError):
            Framing("length", -1)


class TestParserApi:
    def test_take_rest_before_a_head_is_complete_is_an_error(self) -> None:
        parser = HeadParser("request")
        parser.feed(b"GET / HT")
        with pytest.raises(RuntimeError):
            parser.take_rest()

    def test_feeding_before_taking_the_rest_is_an_error(self) -> None:
        parser = HeadParser("request")
        assert parser.feed(get()) is not None
        with pytest.raises(RuntimeError):
            parser.feed(b"x")

    def test_buffered_counts_held_bytes(self) -> None:
        parser = HeadParser("request")
        parser.feed(b"GET / HTTP/1.1\r\n")
        assert parser.buffered == 16
        parser.feed(b"Host: h\r\n\r\nabc")
        assert parser.buffered == 3
        parser.take_rest()
        assert parser.buffered == 0

    def test_parser_is_reused_for_pipelined_heads(self) -> None:
        parser = HeadParser("request")
        first = parser.feed(get(b"/1") + get(b"/2") + b"GE")
        assert first is not None
        assert first.target == b"/1"
        second = parser.feed(parser.take_rest())
        assert second is not None
        assert second.target == b"/2"
        assert parser.take_rest() == b"GE"

    def test_unknown_kind_is_refused(self) -> None:
        with pytest.raises(ValueError):
            HeadParser("both")  # type: ignore[call-overload]


# --------------------------------------------------------------------------


class TestStripHopByHop:
    def test_standard_hop_by_hop_fields_and_connection_options_are_removed(self) -> None:
        head = RequestHead(
            b"GET",
            b"/",
            b"HTTP/1.1",
            [
                (b"Host", b"h"),
                (b"Connection", b"keep-alive, X-Foo"),
                (b"Keep-Alive", b"timeout=5"),
                (b"Proxy-Connection", b"keep-alive"),
                (b"TE", b"trailers"),
                (b"Upgrade", b"websocket"),
                (b"x-foo", b"secret"),
                (b"Trailer", b"X-Checksum"),
                (b"Proxy-Authorization", b"Basic Zm9vOmJhcg=="),
                (b"Transfer-Encoding", b"chunked"),
            ],
        )
        strip_hop_by_hop(head, keep_upgrade=False)
        assert head.headers == [
            (b"Host", b"h"),
            (b"Trailer", b"X-Checksum"),
            (b"Proxy-Authorization", b"Basic Zm9vOmJhcg=="),
            (b"Transfer-Encoding", b"chunked"),
        ]

    def test_framing_and_host_fields_survive_being_named_in_connection(self) -> None:
        head = RequestHead(
            b"POST",
            b"/",
            b"HTTP/1.1",
            [
                (b"Host", b"h"),
                (b"Content-Length", b"3"),
                (b"Connection", b"Content-Length, Host, Transfer-Encoding, Cookie"),
                (b"Cookie", b"a=1"),
            ],
        )
        strip_hop_by_hop(head, keep_upgrade=False)
        assert head.headers == [(b"Host", b"h"), (b"Content-Length", b"3")]

    def test_keep_upgrade_keeps_upgrade_and_rewrites_connection_in_place(self) -> None:
        head = RequestHead(
            b"GET",
            b"/",
            b"HTTP/1.1",
            [
                (b"Host", b"h"),
                (b"connection", b"keep-alive, Upgrade, X-Foo"),
                (b"Upgrade", b"websocket"),
                (b"X-Foo", b"1"),
                (b"Connection", b"close"),
            ],
        )
        strip_hop_by_hop(head, keep_upgrade=True)
        assert head.headers == [
            (b"Host", b"h"),
            (b"connection", b"upgrade"),
            (b"Upgrade", b"websocket"),
        ]

    def test_keep_upgrade_without_an_upgrade_option_removes_upgrade(self) -> None:
        head = RequestHead(
            b"GET", b"/", b"HTTP/1.1", [(b"Connection", b"close"), (b"Upgrade", b"websocket")]
        )
        strip_hop_by_hop(head, keep_upgrade=True)
        assert head.headers == []

    def test_stripping_keeps_what_was_received_in_keep_alive(self) -> None:
        head = request(msg(b"GET / HTTP/1.0", b"Connection: keep-alive"))
        strip_hop_by_hop(head, keep_upgrade=False)
        assert head.get(b"connection") is None
        assert head.keep_alive

    def test_response_hop_by_hop_fields_are_removed(self) -> None:
        head = ResponseHead(
            b"HTTP/1.1",
            101,
            b"Switching Protocols",
            [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"), (b"Keep-Alive", b"x")],
        )
        strip_hop_by_hop(head, keep_upgrade=True)
        assert head.headers == [(b"Upgrade", b"websocket"), (b"Connection", b"upgrade")]


# --------------------------------------------------------------------------


def read_body(framing: Framing, chunks: Iterable[bytes], **kw: int) -> tuple[bytes, bytes, bool]:
    reader = BodyReader(framing, **kw)
    body, after = [], []
    for chunk in chunks:
        if reader.done:
            after.append(chunk)
            continue
        this, rest = reader.feed(chunk)
        body.append(this)
        after.append(rest)
    return b"".join(body), b"".join(after), reader.done


def body_every_way(framing: Framing, body: bytes) -> None:
    """``body + NEXT`` split every way yields exactly ``body`` then ``NEXT``."""
    for chunks in splits(body + NEXT):
        assert read_body(framing, chunks) == (body, NEXT, True), chunks


def body_error(framing: Framing, data: bytes, **kw: int) -> str:
    """The reason ``data`` is refused, the same however it is split."""
    reasons = set()
    for chunks in splits(data):
        with pytest.raises(RemoteProtocolError) as info:
            read_body(framing, chunks, **kw)
        assert info.value.status_hint == kw.get("error_status", 400)
        reasons.add(info.value.reason)
    assert len(reasons) == 1
    return reasons.pop()


CHUNKED_BODY = (
    b"5\r\nhello\r\n"
    b'1A;name=value; quoted="a \\" b"\r\n' + b"x" * 26 + b"\r\n"
    b"0000000000000003 ;ext\r\nabc\r\n"
    b"0\r\nX-Checksum: abc\r\nX-Other:\r\n\r\n"
)


class TestBodyReader:
    def test_no_body_is_done_at_once_and_forwards_nothing(self) -> None:
        reader = BodyReader(NO_BODY)
        assert reader.done
        assert reader.feed(NEXT) == (b"", NEXT)

    def test_length_body_ends_after_its_length(self) -> None:
        body_every_way(Framing("length", 11), b"hello world")

    def test_length_body_reports_the_remaining_bytes(self) -> None:
        reader = BodyReader(Framing("length", 10))
        reader.feed(b"abc")
        assert reader.remaining == 7
        assert not reader.done

    def test_chunked_body_ends_after_its_trailers(self) -> None:
        body_every_way(CHUNKED, CHUNKED_BODY)

    def test_chunked_body_without_trailers(self) -> None:
        body_every_way(CHUNKED, b"3\r\nabc\r\n0\r\n\r\n")

    def test_chunked_data_is_forwarded_in_the_slices_it_arrived_in(self) -> None:
        reader = BodyReader(CHUNKED)
        reader.feed(b"100000\r\n")
        data = b"d" * 0x100000
        forwarded, rest = reader.feed(data)
        assert forwarded is data
        assert rest == b""

    def test_read_until_close_forwards_everything_until_eof(self) -> None:
        reader = BodyReader(UNTIL_CLOSE)
        assert reader.feed(NEXT) == (NEXT, b"")
        assert not reader.done
        reader.eof()
        assert reader.done

    @pytest.mark.parametrize("framing", [Framing("length", 6), CHUNKED])
    def test_eof_before_the_end_of_the_body_is_an_error(self, framing: Framing) -> None:
        reader = BodyReader(framing, error_status=502)
        reader.feed(b"3\r\nab")
        with pytest.raises(RemoteProtocolError) as info:
            reader.eof()
        assert info.value.status_hint == 502

    def test_eof_after_a_complete_body_is_fine(self) -> None:
        reader = BodyReader(Framing("length", 2))
        reader.feed(b"ab")
        reader.eof()
        assert reader.done

    @pytest.mark.parametrize(
        ("data", "reason"),
        [
            (b"zz\r\n", "invalid chunk size"),
            (b"\r\n", "invalid chunk size"),
            (b"-1\r\n", "invalid chunk size"),
            (b"0x3\r\nabc\r\n", "invalid chunk size"),
            (b"3 \r\nabc\r\n", "invalid chunk size"),
            (b"3;\r\nabc\r\n", "invalid chunk size"),
            (b"3;a=\x01\r\nabc\r\n", "invalid chunk size"),
            (b'3;a="b\r\nabc\r\n', "invalid chunk size"),
            (b"11111111111111111\r\n", "overflow"),
            (b"3\nabc\r\n", "bare LF"),
            (b"3\r\nabcd\r\n0\r\n\r\n", "longer than its size"),
            (b"3\r\nabc\n0\r\n\r\n", "longer than its size"),
            (b"3\r\nabc\r\r\n", "longer than its size"),
            (b"0\r\nX : y\r\n\r\n", "invalid trailer"),
            (b"0\r\n folded\r\n\r\n", "invalid trailer"),
            (b"0\r\nX: \x00\r\n\r\n", "invalid trailer"),
            (b"0\r\nX: y\n\r\n", "invalid trailer"),
        ],
        ids=[
            "not-hex",
            "empty-size",
            "negative",
            "hex-prefix",
            "space-after-size",
            "empty-extension",
            "control-in-extension",
            "unterminated-quote",
            "17-hex-digits",
            "bare-lf-after-size",
            "data-longer-than-size",
            "bare-lf-after-data",
            "cr-cr-lf-after-data",
            "space-before-colon-in-trailer",
            "obs-fold-in-trailer",
            "nul-in-trailer",
            "bare-lf-in-trailer",
        ],
    )
    def test_bad_chunked_syntax_is_refused(self, data: bytes, reason: str) -> None:
        assert reason in body_error(CHUNKED, data)

    def test_chunk_errors_carry_the_status_given_by_the_caller(self) -> None:
        body_error(CHUNKED, b"zz\r\n", error_status=502)

    def test_overlong_chunk_size_line_is_refused_before_it_ends(self) -> None:
        reader = BodyReader(CHUNKED, max_chunk_line=64)
        reader.feed(b"3;" + b"a" * 40)
        with pytest.raises(RemoteProtocolError, match="too long"):
            reader.feed(b"a" * 40)

    def test_chunk_line_at_the_limit_is_accepted(self) -> None:
        line = b"3;" + b"a" * 60 + b"\r\n"
        assert len(line) == 64
        assert read_body(CHUNKED, [line + b"abc\r\n0\r\n\r\n"], max_chunk_line=64)[2]

    def test_oversized_trailer_section_is_refused(self) -> None:
        trailers = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 50) for i in range(10))
        assert "trailer section too large" in body_error(
            CHUNKED, b"0\r\n" + trailers + b"\r\n", max_trailer_size=300
        )

    def test_feeding_after_done_returns_everything_as_rest(self) -> None:
        reader = BodyReader(Framing("length", 1))
        assert reader.feed(b"ab") == (b"a", b"b")
        assert reader.feed(b"cd") == (b"", b"cd")


# --------------------------------------------------------------------------


@st.composite
def cuts(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at random offsets."""
    offsets = sorted(draw(st.sets(st.integers(1, max(1, len(data) - 1)), max_size=8)))
    bounds = [0, *(o for o in offsets if o < len(data)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


PIPELINE = (
    msg(b"POST /a HTTP/1.1", b"Host: h", b"Content-Length: 5")
    + b"hello"
    + msg(b"POST /b HTTP/1.1", b"Host: h", b"Transfer-Encoding: chunked")
    + CHUNKED_BODY
    + get(b"/c")
)


def run_pipeline(chunks: Iterable[bytes]) -> list[tuple[bytes, bytes]]:
    """Drive a parser and body readers as the relay does; return (head, body) pairs."""
    parser = HeadParser("request")
    out: list[tuple[bytes, bytes]] = []
    reader: BodyReader | None = None
    current = b""
    body: list[bytes] = []
    for chunk in chunks:
        data = chunk
        while data:
            if reader is None:
                head = parser.feed(data)
                if head is None:
                    break
                current = head.serialize()
                reader = BodyReader(head.framing)
                data = parser.take_rest()
            else:
                this, data = reader.feed(data)
                body.append(this)
            if reader is not None and reader.done:
                out.append((current, b"".join(body)))
                reader, body = None, []
    return out


@given(st.data())
def test_pipelined_messages_parse_the_same_at_random_splits(data: st.DataObject) -> None:
    expected = run_pipeline([PIPELINE])
    assert [h.split(b" ", 2)[1] for h, _ in expected] == [b"/a", b"/b", b"/c"]
    assert expected[0][1] == b"hello"
    assert expected[1][1] == CHUNKED_BODY
    assert run_pipeline(data.draw(cuts(PIPELINE))) == expected


# --------------------------------------------------------------------------
# Fast paths: each must decide exactly as the full check it short-cuts.

_STATUS_LINE_MODEL = re.compile(rb"HTTP/([0-9])\.([0-9]) ([0-9]{3})(?: (.*))?", re.DOTALL)


def status_line_model(line: bytes) -> tuple[object, ...] | str:
    """RFC 9112 §4 status-line, as the full pattern reads it."""
    match = _STATUS_LINE_MODEL.fullmatch(line)
    if match is None:
        return "malformed status line"
    major, minor, code, reason = match.groups()
    if major != b"1":
        return "unsupported HTTP version"
    if not 100 <= int(code) <= 599:
        return "status code out of range"
    return (b"HTTP/1.0" if minor == b"0" else b"HTTP/1.1", int(code), reason or b"")


class TestFastPaths:
    @example(b"HTTP/1.1", b" 20")
    @example(b"HTTP/1.1", b" 2000")
    @example(b"HTTP/1.0", b" 200 ")
    @example(b"HTTP/1.9", b" 099 Ok")
    @example(b"HTTP/2.0", b" 200 Ok")
    @given(
        st.sampled_from(
            [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.9", b"HTTP/2.0", b"HTTP/1.", b"HTTP/11"]
        ),
        st.binary(max_size=6).map(lambda b: bytes(b" 0123456789Ok"[x % 13] for x in b)),
    )
    def test_status_lines_are_read_as_the_full_pattern_reads_them(
        self, version: bytes, tail: bytes
    ) -> None:
        line = version + tail
        try:
            head = response(msg(line))
        except RemoteProtocolError as error:
            assert error.status_hint == 502
            expected = status_line_model(line)
            assert isinstance(expected, str) and expected in error.reason
        else:
            assert (head.version, head.status, head.reason) == status_line_model(line)

    @pytest.mark.parametrize("name", [b"Host", b"X-Learned-Name"])
    def test_a_known_field_name_without_a_colon_is_still_refused(self, name: bytes) -> None:
        request(msg(b"GET / HTTP/1.1", b"Host: h", b"X-Learned-Name: learned"))
        assert_rejected(msg(b"GET / HTTP/1.1", b"Host: h", name), 400, reason="without colon")

    def test_the_name_table_stops_growing_and_unlisted_spellings_still_count(self) -> None:
        for batch in range(40):
            names = [b"X-Filler-%d-%d: v" % (batch, i) for i in range(90)]
            request(msg(b"GET / HTTP/1.1", b"Host: h", *names))
        assert len(httphead._FIELD_NAMES) <= httphead._FIELD_NAMES_MAX
        head = request(
            msg(b"POST / HTTP/1.1", b"hOsT: h", b"cOnTeNt-LeNgTh: 3", b"CoNnEcTiOn: cLoSe")
        )
        assert (head.framing, head.close_after) == (Framing("length", 3), True)
        assert_rejected(msg(b"GET / HTTP/1.1", b"hOSt: a", b"HoSt: b"), 400, reason="Host")

    def test_empty_lines_before_a_head_count_towards_its_size_when_it_comes_whole(self) -> None:
        head = get(b"/", b"X: y")
        assert request(head, max_size=len(head)).target == b"/"
        parser = HeadParser("request", max_size=len(head) + 1)
        assert parser.feed(b"\r\n") is None
        with pytest.raises(RemoteProtocolError) as info:
            parser.feed(head)
        assert info.value.status_hint == 431

    @pytest.mark.parametrize(
        ("values", "framing"),
        [
            ([b"5"], Framing("length", 5)),
            ([b" 5\t"], Framing("length", 5)),
            ([b"5, 5"], Framing("length", 5)),
            ([b"4999"], Framing("length", 4999)),
            ([b"9" * 15], Framing("length", 10**15 - 1)),
        ],
    )
    def test_content_length_values_give_the_length(
        self, values: list[bytes], framing: Framing
    ) -> None:
        head = ResponseHead(b"HTTP/1.1", 200, b"OK", [(b"Content-Length", v) for v in values])
        assert response_framing(head, b"GET") == framing

    @pytest.mark.parametrize(
        ("value", "reason"),
        [(b"+5", "invalid"), (b"", "invalid"), (b"\xd9\xa3", "invalid"), (b"1" * 16, "too large")],
    )
    def test_content_length_values_that_are_not_short_decimals_are_refused(
        self, value: bytes, reason: str
    ) -> None:
        head = ResponseHead(b"HTTP/1.1", 200, b"OK", [(b"Content-Length", value)])
        with pytest.raises(RemoteProtocolError, match=reason):
            response_framing(head, b"GET")

    def test_framing_fields_are_found_whatever_their_case(self) -> None:
        head = ResponseHead(
            b"HTTP/1.1", 200, b"OK", [(b"Content-LengtX", b"1"), (b"TRANSFER-encoding", b"chunked")]
        )
        assert response_framing(head, b"GET") == CHUNKED

    def test_stripping_a_head_without_hop_by_hop_fields_keeps_it_as_it_is(self) -> None:
        head = request(get(b"/", b"X-Te: 1", b"Upgrades: 2", b"Keep-Alivee: 3"))
        headers = head.headers
        before = list(headers)
        strip_hop_by_hop(head, keep_upgrade=False)
        assert head.headers is headers and headers == before
