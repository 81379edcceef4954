"""engine.io awareness: request classification, handshake bodies, sid tags,
unknown-session answers and the learned sid table."""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Callable
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stickyproxy.engineio import (
    HANDSHAKE_LIMIT,
    MAX_SID_LENGTH,
    UNKNOWN_SESSION_BODY,
    BodyPrefix,
    Handshake,
    HandshakeError,
    HandshakeParser,
    SidError,
    UnknownSessionSniffer,
    classify,
    parse_handshake,
    redact,
    set_content_length,
    sid_from_set_cookie,
    tag_handshake_body,
    unknown_session_kind,
    untag,
    untag_target,
)
from stickyproxy.httphead import HeadParser, RequestHead, ResponseHead
from stickyproxy.sidtable import SidTable
from tests.helpers import splits

SID = "EiQ_L49_GqWIuGtBAAAA"
# What engine.io 6 sends to an EIO4 polling handshake (118 bytes).
NODE_EIO4 = (
    b'0{"sid":"EiQ_L49_GqWIuGtBAAAA","upgrades":["websocket"],'
    b'"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}'
)
# python-engineio: the same fields in another order.
PYTHON_EIO4 = (
    b'0{"sid":"EiQ_L49_GqWIuGtBAAAA","upgrades":["websocket"],'
    b'"pingTimeout":20000,"pingInterval":25000,"maxPayload":1000000}'
)
# socket.io 2.x: the open packet and the namespace CONNECT in one EIO3 payload.
SOCKETIO2_EIO3 = (
    b'96:0{"sid":"EiQ_L49_GqWIuGtBAAAA","upgrades":["websocket"],'
    b'"pingInterval":25000,"pingTimeout":5000}2:40'
)
# engine.io 6 with allowEIO3: the EIO4 packet behind a length prefix.
NODE_EIO3 = b"118:" + NODE_EIO4
# The EIO3 binary payload form of the same packet: 0, digit bytes, 0xFF.
BINARY_EIO3 = b"\x00\x01\x01\x08\xff" + NODE_EIO4

B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def request(target: bytes, method: bytes = b"GET") -> RequestHead:
    return RequestHead(method, target, b"HTTP/1.1", [(b"Host", b"example.com")])


def chunked(body: bytes, size: int) -> bytes:
    """Encode ``body`` with the chunked transfer coding, ``size`` bytes per chunk."""
    out = b""
    for i in range(0, len(body), size):
        piece = body[i : i + size]
        out += b"%x;ext=1\r\n" % len(piece) + piece + b"\r\n"
    return out + b"0\r\nTrailer: x\r\n\r\n"


def feed_all(parser: HandshakeParser, pieces: list[bytes]) -> Handshake:
    result = None
    for piece in pieces:
        result = parser.feed(piece)
    return result if result is not None else parser.eof()


@st.composite
def random_pieces(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# The sans-IO boundary of this module is checked in tests/test_core_imports.py.


class TestRedact:
    def test_shows_four_characters_of_a_default_sid(self) -> None:
        assert redact(SID) == "EiQ_…"

    def test_shows_at_most_half_of_a_short_sid(self) -> None:
        assert redact("abcd") == "ab…"
        assert redact("a") == "…"

    def test_masks_characters_that_do_not_belong_in_a_log(self) -> None:
        assert redact(b"\r\n\x00abcdefgh") == "???a…"

    @given(st.text(min_size=1, max_size=200))
    def test_never_shows_more_than_half_of_the_sid(self, sid: str) -> None:
        shown = redact(sid).removesuffix("…")
        assert len(shown) <= min(4, len(sid) // 2)


class TestClassify:
    def test_a_request_off_the_engineio_path_is_not_engineio(self) -> None:
        assert classify(request(b"/api/?sid=abc")) is None
        assert classify(request(b"/socket.io?EIO=4")) is None
        assert classify(request(b"/app/socket.io/?EIO=4")) is None
        assert classify(request(b"*", b"OPTIONS")) is None
        assert classify(request(b"example.com:443", b"CONNECT")) is None

    def test_a_get_without_sid_is_a_learnable_polling_handshake(self) -> None:
        eio = classify(request(b"/socket.io/?EIO=4&transport=polling&t=N8hyd6w"))
        assert eio is not None
        assert (eio.kind, eio.sid, eio.eio, eio.transport) == ("handshake", None, 4, "polling")
        assert eio.learnable

    def test_a_websocket_first_handshake_is_not_learnable(self) -> None:
        eio = classify(request(b"/socket.io/?EIO=4&transport=websocket"))
        assert eio is not None and eio.kind == "handshake" and not eio.learnable

    def test_a_jsonp_handshake_is_not_learnable(self) -> None:
        eio = classify(request(b"/socket.io/?EIO=3&transport=polling&j=0"))
        assert eio is not None and eio.jsonp and not eio.learnable

    @pytest.mark.parametrize("method", [b"GET", b"POST", b"OPTIONS"])
    def test_every_request_with_a_sid_belongs_to_a_session(self, method: bytes) -> None:
        target = b"/socket.io/?EIO=4&transport=polling&t=x&sid=" + SID.encode()
        eio = classify(request(target, method))
        assert eio is not None and eio.kind == "session" and eio.sid == SID

    def test_the_websocket_upgrade_of_a_session_carries_its_sid(self) -> None:
        eio = classify(request(b"/socket.io/?EIO=4&transport=websocket&sid=" + SID.encode()))
        assert eio is not None and (eio.kind, eio.transport) == ("session", "websocket")

    def test_a_preflight_without_sid_is_routed_like_any_request(self) -> None:
        eio = classify(request(b"/socket.io/?EIO=4&transport=polling", b"OPTIONS"))
        assert eio is not None and eio.kind == "other" and not eio.learnable

    @pytest.mark.parametrize(
        ("query", "version"),
        [(b"EIO=4", 4), (b"EIO=3", 3), (b"", 3), (b"EIO=5", 3), (b"EIO=4&EIO=3", 3)],
    )
    def test_every_eio_value_but_4_means_version_3(self, query: bytes, version: int) -> None:
        eio = classify(request(b"/socket.io/?" + query))
        assert eio is not None and eio.eio == version

    def test_the_sid_is_percent_decoded(self) -> None:
        eio = classify(request(b"/socket.io/?EIO=4&sid=EiQ%5FL49%5FGqWIuGtBAAAA"))
        assert eio is not None and eio.sid == SID

    def test_an_empty_sid_is_no_sid(self) -> None:
        eio = classify(request(b"/socket.io/?EIO=4&transport=polling&sid="))
        assert eio is not None and eio.kind == "handshake"

    @pytest.mark.parametrize(
        "query",
        [b"sid=abc&sid=abc", b"sid=abc&sid=def", b"sid=abc&s%69d=def", b"sid&sid=abc"],
    )
    def test_a_repeated_sid_is_refused_with_400(self, query: bytes) -> None:
        with pytest.raises(SidError) as info:
            classify(request(b"/socket.io/?EIO=4&" + query))
        assert info.value.status_hint == 400

    def test_an_oversized_sid_is_refused_without_showing_it(self) -> None:
        sid = b"A" * (MAX_SID_LENGTH + 1)
        with pytest.raises(SidError) as info:
            classify(request(b"/socket.io/?sid=" + sid))
        assert info.value.status_hint == 400
        assert "AAAAA" not in info.value.reason

    def test_a_sid_of_the_longest_length_is_accepted(self) -> None:
        eio = classify(request(b"/socket.io/?sid=" + b"A" * MAX_SID_LENGTH))
        assert eio is not None and eio.sid == "A" * MAX_SID_LENGTH

    def test_a_huge_encoded_sid_is_refused_before_decoding(self) -> None:
        with pytest.raises(SidError):
            classify(request(b"/socket.io/?sid=" + b"%41" * 10_000))

    @pytest.mark.parametrize(
        "value", [b"a+b", b"a%20b", b"%22abc%22", b"ab%0Dcd", b"caf%C3%A9", b"a%00", b"a<b"]
    )
    def test_a_sid_outside_the_alphabet_is_refused(self, value: bytes) -> None:
        with pytest.raises(SidError):
            classify(request(b"/socket.io/?sid=" + value))

    @pytest.mark.parametrize("sid", ["110ec58a-a0f2-4ac4-8393-c866d813b8d1", "a+b/c==", "n1:x.y~z"])
    def test_custom_generator_sids_are_accepted(self, sid: str) -> None:
        eio = classify(request(b"/socket.io/?sid=" + quote(sid, safe="").encode()))
        assert eio is not None and eio.sid == sid

    def test_an_absolute_form_target_is_classified_by_its_path(self) -> None:
        eio = classify(request(b"http://example.com/socket.io/?EIO=4&sid=abc"))
        assert eio is not None and eio.sid == "abc"

    def test_the_path_prefix_is_configurable(self) -> None:
        assert classify(request(b"/engine.io/?EIO=4&sid=abc")) is None
        eio = classify(request(b"/engine.io/?EIO=4&sid=abc"), prefix=b"/engine.io/")
        assert eio is not None and eio.sid == "abc"

    def test_classification_does_not_depend_on_how_the_head_arrived(self) -> None:
        raw = (
            b"GET /socket.io/?EIO=4&transport=polling&t=x&sid=" + SID.encode() + b" HTTP/1.1\r\n"
            b"Host: example.com\r\n\r\n"
        )
        for pieces in splits(raw):
            parser: HeadParser[RequestHead] = HeadParser("request")
            head = None
            for piece in pieces:
                head = parser.feed(piece) or head
            assert head is not None
            eio = classify(head)
            assert eio is not None and eio.sid == SID and eio.eio == 4


class TestHandshakeParser:
    @pytest.mark.parametrize(
        ("body", "timeout", "framing"),
        [
            (NODE_EIO4, 20000, "eio4"),
            (PYTHON_EIO4, 20000, "eio4"),
            (NODE_EIO4 + b"\x1e4hello", 20000, "eio4"),
            (SOCKETIO2_EIO3, 5000, "eio3"),
            (NODE_EIO3, 20000, "eio3"),
            (BINARY_EIO3, 20000, "eio3-binary"),
        ],
    )
    @pytest.mark.parametrize("chunk_size", [0, 1, 7, 1000])
    def test_finds_the_sid_however_the_body_is_split_and_framed(
        self, body: bytes, timeout: int, framing: str, chunk_size: int
    ) -> None:
        wire = chunked(body, chunk_size) if chunk_size else body
        for pieces in splits(wire):
            parser = HandshakeParser(chunked=bool(chunk_size))
            handshake = feed_all(parser, pieces)
            assert handshake.sid == SID
            assert (handshake.ping_interval, handshake.ping_timeout) == (25000, timeout)
            assert handshake.upgrades == ("websocket",)
            assert handshake.framing == framing

    def test_the_sid_is_known_before_the_rest_of_the_body_arrives(self) -> None:
        parser = HandshakeParser()
        assert parser.feed(SOCKETIO2_EIO3[:-4]) is not None
        parser = HandshakeParser()
        assert parser.feed(NODE_EIO4[:-1]) is None
        assert parser.feed(NODE_EIO4[-1:]) is not None

    @pytest.mark.parametrize(
        ("body", "reason"),
        [
            (b'40{"sid":"wZX3oN0bSVIhsaknAAAI"}', "not a handshake"),
            (b'4:40{"sid":"wZX3oN0bSVIhsaknAAAI"}', "not an open packet"),
            (b'2:40\x1e0{"sid":"wZX3oN0bSVIhsaknAAAI"}', "not an open packet"),
        ],
    )
    def test_the_socketio_connect_reply_is_not_a_handshake(self, body: bytes, reason: str) -> None:
        # The socket.io id in "40{...}" must never be taken for the session's.
        for pieces in splits(body):
            with pytest.raises(HandshakeError) as info:
                feed_all(HandshakeParser(), pieces)
            assert info.value.reason == reason

    @pytest.mark.parametrize(
        ("body", "reason"),
        [
            (b"", "empty body"),
            (b'___eio[0]("96:0{}");', "jsonp"),
            (b"<html>Bad gateway</html>", "not a handshake"),
            (b"ok", "not a handshake"),
            (NODE_EIO4[:50], "truncated"),
            (b"97:" + NODE_EIO4, "bad length prefix"),
            (b"\x01\x05\xff" + b"\x00" * 5, "not a handshake"),
            (b'0{"sid":"abc","pingInterval":25000,}', "bad json"),
            (b'0{"sid":"abc" "pingInterval":1}', "bad json"),
            (b'0{"sid":"a\xff","pingInterval":1,"pingTimeout":1}', "bad json"),
            (b'0{"pingInterval":25000,"pingTimeout":20000}', "bad sid"),
            (b'0{"sid":12,"pingInterval":25000,"pingTimeout":20000}', "bad sid"),
            (b'0{"sid":"a b","pingInterval":25000,"pingTimeout":20000}', "bad sid"),
            (b'0{"sid":"abc","pingInterval":true,"pingTimeout":20000}', "bad ping values"),
            (b'0{"sid":"abc","pingInterval":-1,"pingTimeout":20000}', "bad ping values"),
            (b'0{"sid":"abc","pingInterval":"25000","pingTimeout":20000}', "bad ping values"),
            (b"0[", "not an open packet"),
            (b'0{"a":' + b"[" * 5000, "too large"),
        ],
    )
    def test_gives_up_cleanly_on_anything_else(self, body: bytes, reason: str) -> None:
        for pieces in splits(body) if len(body) < 200 else [[body]]:
            with pytest.raises(HandshakeError) as info:
                feed_all(HandshakeParser(), pieces)
            assert info.value.reason == reason

    def test_gives_up_on_broken_chunked_coding(self) -> None:
        with pytest.raises(HandshakeError, match="bad chunked coding"):
            HandshakeParser(chunked=True).feed(b"zz\r\n" + NODE_EIO4)
        with pytest.raises(HandshakeError, match="bad chunked coding"):
            HandshakeParser(chunked=True).feed(b"5\r\n0{abcXX")

    def test_looks_at_no_more_than_its_limit(self) -> None:
        parser = HandshakeParser()
        body = b'0{"sid":"abc","pad":"' + b"x" * 1_000_000
        with pytest.raises(HandshakeError, match="too large"):
            parser.feed(body)
        assert len(parser._body.data) == HANDSHAKE_LIMIT

    def test_a_failure_is_final(self) -> None:
        parser = HandshakeParser()
        with pytest.raises(HandshakeError):
            parser.feed(b"<html>")
        with pytest.raises(HandshakeError):
            parser.feed(NODE_EIO4)

    def test_a_result_is_final(self) -> None:
        parser = HandshakeParser()
        first = parser.feed(NODE_EIO4)
        assert parser.feed(b"garbage") is first
        assert parser.eof() is first

    @given(
        sid=st.text(B64URL + ".~", min_size=1, max_size=64),
        interval=st.integers(1, 10**7),
        timeout=st.integers(1, 10**7),
        order=st.permutations(["sid", "upgrades", "pingInterval", "pingTimeout", "maxPayload"]),
        framing=st.sampled_from(["eio4", "eio3", "eio3-binary"]),
        chunk_size=st.integers(0, 40),
        data=st.data(),
    )
    def test_reads_any_well_formed_handshake_at_random_splits(
        self,
        *,
        sid: str,
        interval: int,
        timeout: int,
        order: list[str],
        framing: str,
        chunk_size: int,
        data: st.DataObject,
    ) -> None:
        values = {
            "sid": sid,
            "upgrades": ["websocket"],
            "pingInterval": interval,
            "pingTimeout": timeout,
            "maxPayload": 1000000,
        }
        packet = b"0" + json.dumps({k: values[k] for k in order}).encode()
        if framing == "eio4":
            body = packet
        elif framing == "eio3":
            body = b"%d:" % len(packet) + packet + b"2:40"
        else:
            body = b"\x00" + bytes(int(d) for d in str(len(packet))) + b"\xff" + packet
        wire = chunked(body, chunk_size) if chunk_size else body
        pieces = data.draw(random_pieces(wire))
        handshake = feed_all(HandshakeParser(chunked=bool(chunk_size)), pieces)
        assert (handshake.sid, handshake.ping_interval, handshake.ping_timeout) == (
            sid,
            interval,
            timeout,
        )
        assert handshake.framing == framing

    @given(body=st.binary(max_size=300), is_chunked=st.booleans(), data=st.data())
    def test_arbitrary_bytes_give_a_handshake_or_a_handshake_error(
        self, body: bytes, is_chunked: bool, data: st.DataObject
    ) -> None:
        parser = HandshakeParser(chunked=is_chunked)
        with contextlib.suppress(HandshakeError):
            feed_all(parser, data.draw(random_pieces(body)))

    @given(st.text(max_size=60))
    def test_arbitrary_text_after_the_open_type_never_escapes_as_another_error(
        self, text: str
    ) -> None:
        with contextlib.suppress(HandshakeError):
            parse_handshake(b"0{" + text.encode())


class TestBodyPrefix:
    def test_keeps_a_plain_body_up_to_its_limit(self) -> None:
        body = BodyPrefix(chunked=False, limit=4)
        body.feed(b"abcdef")
        assert (body.data, body.overflow) == (b"abcd", True)

    def test_undoes_chunked_coding_in_every_split(self) -> None:
        for pieces in splits(chunked(b"hello world", 3)):
            body = BodyPrefix(chunked=True, limit=100)
            for piece in pieces:
                body.feed(piece)
            assert (body.data, body.complete, body.broken) == (b"hello world", True, False)

    def test_refuses_data_longer_than_its_chunk(self) -> None:
        body = BodyPrefix(chunked=True, limit=100)
        body.feed(b"2\r\nabc\r\n")
        assert body.broken

    def test_refuses_an_endless_chunk_line(self) -> None:
        body = BodyPrefix(chunked=True, limit=100)
        body.feed(b"1" + b";x" * 1000)
        assert body.broken


class TestSidFromSetCookie:
    def test_finds_the_io_cookie_of_a_handshake(self) -> None:
        headers = [
            (b"Content-Type", b"text/plain; charset=UTF-8"),
            (b"Set-Cookie", b"io=" + SID.encode() + b"; Path=/; HttpOnly; SameSite=Lax"),
        ]
        assert sid_from_set_cookie(headers) == SID

    def test_ignores_other_cookies_and_other_headers(self) -> None:
        headers = [
            (b"Set-Cookie", b"storify_editor_host=s1; path=/"),
            (b"Set-Cookie", b"ioo=abc; Path=/"),
            (b"X-Set-Cookie", b"io=abc"),
        ]
        assert sid_from_set_cookie(headers) is None

    def test_accepts_quoted_and_percent_encoded_values(self) -> None:
        assert sid_from_set_cookie([(b"set-cookie", b'io="abc"')]) == "abc"
        assert sid_from_set_cookie([(b"set-cookie", b"io=a%2Bb%3D")]) == "a+b="

    def test_the_last_cookie_wins(self) -> None:
        headers = [(b"Set-Cookie", b"io=first"), (b"Set-Cookie", b"io = second ; Path=/")]
        assert sid_from_set_cookie(headers) == "second"

    def test_ignores_values_that_are_not_sids(self) -> None:
        assert sid_from_set_cookie([(b"Set-Cookie", b"io=a%20b")]) is None
        assert sid_from_set_cookie([(b"Set-Cookie", b"io=")]) is None
        assert sid_from_set_cookie([(b"Set-Cookie", b"io=" + b"A" * 200)]) is None

    def test_the_cookie_name_is_configurable(self) -> None:
        headers = [(b"Set-Cookie", b"eio=abc; Path=/")]
        assert sid_from_set_cookie(headers) is None
        assert sid_from_set_cookie(headers, name="eio") == "abc"


class TestTagging:
    def test_only_the_sid_changes(self) -> None:
        tagged = tag_handshake_body(NODE_EIO4, "s1")
        assert tagged == NODE_EIO4.replace(SID.encode(), SID.encode() + b".s1")
        assert parse_handshake(tagged).sid == SID + ".s1"

    def test_the_key_order_does_not_matter(self) -> None:
        assert parse_handshake(tag_handshake_body(PYTHON_EIO4, "s1")).sid == SID + ".s1"

    def test_packets_after_the_open_packet_are_kept(self) -> None:
        body = NODE_EIO4 + b"\x1e4hello"
        assert tag_handshake_body(body, "s1").endswith(b"\x1e4hello")

    def test_an_escaped_sid_keeps_its_escapes(self) -> None:
        body = b'0{"sid":"\\u0045iQ","pingInterval":25000,"pingTimeout":20000}'
        tagged = tag_handshake_body(body, "s1")
        assert tagged.startswith(b'0{"sid":"\\u0045iQ.s1"')
        assert parse_handshake(tagged).sid == "EiQ.s1"

    def test_a_repeated_sid_key_tags_the_one_clients_read(self) -> None:
        body = b'0{"sid":"aaa","sid":"bbb","pingInterval":25000,"pingTimeout":20000}'
        tagged = tag_handshake_body(body, "s1")
        assert json.loads(tagged[1:])["sid"] == "bbb.s1"

    def test_the_length_grows_by_the_tag_and_its_dot(self) -> None:
        assert len(tag_handshake_body(NODE_EIO4, "s12")) == len(NODE_EIO4) + 4

    @pytest.mark.parametrize(
        ("body", "eio", "reason"),
        [
            (NODE_EIO4, 3, "eio3"),
            (NODE_EIO3, 4, "eio3"),
            (SOCKETIO2_EIO3, 4, "eio3"),
            (BINARY_EIO3, 4, "eio3"),
            (
                NODE_EIO4.replace(b'["websocket"]', b'["websocket","webtransport"]'),
                4,
                "webtransport",
            ),
            (b'0{"sid":"' + b"A" * 126 + b'","pingInterval":1,"pingTimeout":1}', 4, "sid too long"),
            (b'3:40{"sid":"abc"}', 4, "not an open packet"),
            (b"\x1f\x8b\x08\x00", 4, "not a handshake"),
            (NODE_EIO4 + b" " * HANDSHAKE_LIMIT, 4, "too large"),
        ],
    )
    def test_refuses_where_a_tag_would_break_the_session(
        self, body: bytes, eio: int, reason: str
    ) -> None:
        with pytest.raises(HandshakeError) as info:
            tag_handshake_body(body, "s1", eio=eio)
        assert info.value.reason == reason

    @pytest.mark.parametrize("tag", ["", "s.1", "s 1", "é", "x" * 33])
    def test_refuses_an_invalid_tag(self, tag: str) -> None:
        with pytest.raises(ValueError, match="server tag"):
            tag_handshake_body(NODE_EIO4, tag)

    @pytest.mark.parametrize(
        ("sid", "expected"),
        [
            (SID + ".s1", ("s1", SID)),
            ("a.b.s-1_x", ("s-1_x", "a.b")),
            (SID, (None, SID)),
            (".s1", (None, ".s1")),
            ("abc.", (None, "abc.")),
            ("abc.s+1", (None, "abc.s+1")),
        ],
    )
    def test_untag_splits_at_the_last_dot(self, sid: str, expected: tuple[str | None, str]) -> None:
        assert untag(sid) == expected

    def test_untag_target_restores_the_sid_and_nothing_else(self) -> None:
        target = b"/socket.io/?EIO=4&transport=polling&t=P%2Fx&sid=" + SID.encode() + b".s1&b=2"
        tag, new = untag_target(target)
        assert tag == "s1"
        assert new == b"/socket.io/?EIO=4&transport=polling&t=P%2Fx&sid=" + SID.encode() + b"&b=2"

    def test_untag_target_leaves_a_target_without_tag_untouched(self) -> None:
        for target in (
            b"/socket.io/?EIO=4&transport=polling",
            b"/socket.io/?EIO=4&sid=" + SID.encode(),
            b"/socket.io/?EIO=4&sid=",
            b"/socket.io/",
        ):
            assert untag_target(target) == (None, target)

    def test_untag_target_ignores_tags_it_does_not_know(self) -> None:
        target = b"/socket.io/?sid=node1.abc"
        assert untag_target(target, known_tags={"s1", "s2"}) == (None, target)
        assert untag_target(b"/socket.io/?sid=a.s2", known_tags={"s1", "s2"}) == (
            "s2",
            b"/socket.io/?sid=a",
        )

    def test_untag_target_refuses_a_repeated_sid(self) -> None:
        with pytest.raises(SidError):
            untag_target(b"/socket.io/?sid=a.s1&sid=b.s1")

    def test_untag_target_encodes_what_the_client_encoded_oddly(self) -> None:
        # The client encoded the dot: the restored sid gets canonical encoding.
        assert untag_target(b"/socket.io/?sid=a%2Bb%2Es1") == ("s1", b"/socket.io/?sid=a%2Bb")

    @given(
        encode=st.sampled_from(
            [
                lambda s: quote(s, safe="-_.!~*'()"),  # JavaScript encodeURIComponent
                lambda s: quote_plus(s, safe="-_.*"),  # Java URLEncoder
                lambda s: s,  # python-engineio appends the sid raw
            ]
        ),
        sid=st.text(B64URL + "~:", min_size=1, max_size=40),
        tag=st.text(B64URL, min_size=1, max_size=8),
        before=st.lists(st.sampled_from(["EIO=4", "transport=polling", "t=N8hyd6w", "b64=1"])),
        after=st.lists(st.sampled_from(["t=x%2Fy", "x", "foo=bar+baz"])),
    )
    def test_a_tagged_sid_round_trips_through_every_client(
        self,
        encode: Callable[[str], str],
        sid: str,
        tag: str,
        before: list[str],
        after: list[str],
    ) -> None:
        body = b'0{"sid":"%s","upgrades":[],"pingInterval":25000,"pingTimeout":20000}' % (
            sid.encode()
        )
        client_sid = parse_handshake(tag_handshake_body(body, tag)).sid
        query = "&".join([*before, "sid=" + encode(client_sid), *after])
        original = "&".join([*before, "sid=" + encode(sid), *after])
        found, new = untag_target(b"/socket.io/?" + query.encode())
        assert found == tag
        assert new == b"/socket.io/?" + original.encode()

    def test_set_content_length_reframes_a_rewritten_body(self) -> None:
        head = ResponseHead(
            b"HTTP/1.1",
            200,
            b"OK",
            [(b"Transfer-Encoding", b"chunked"), (b"Content-Type", b"text/plain")],
        )
        set_content_length(head, 121)
        assert head.headers == [(b"Content-Type", b"text/plain"), (b"Content-Length", b"121")]


class TestUnknownSession:
    def sniff(self, head: ResponseHead, pieces: list[bytes], *, is_chunked: bool) -> str | None:
        sniffer = UnknownSessionSniffer.for_response(head, chunked=is_chunked)
        assert sniffer is not None
        for piece in pieces:
            sniffer.feed(piece)
        return sniffer.verdict()

    def test_recognises_engineio_polling_answer_sent_chunked(self) -> None:
        head = ResponseHead(b"HTTP/1.1", 400, b"Bad Request", [(b"Transfer-Encoding", b"chunked")])
        for pieces in splits(chunked(UNKNOWN_SESSION_BODY, 16)):
            assert self.sniff(head, pieces, is_chunked=True) == "polling_json"

    def test_recognises_the_upgrade_answer(self) -> None:
        head = ResponseHead(b"HTTP/1.1", 400, b"Bad Request", [(b"Content-Length", b"18")])
        for pieces in splits(b"Session ID unknown"):
            assert self.sniff(head, pieces, is_chunked=False) == "upgrade_text"

    def test_recognises_python_engineio(self) -> None:
        head = ResponseHead(b"HTTP/1.1", 400, b"BAD REQUEST", [])
        body = b'"Invalid session ' + SID.encode() + b'"'
        for pieces in splits(body):
            assert self.sniff(head, pieces, is_chunked=False) == "python_engineio"
        assert unknown_session_kind(400, b"Invalid session") == "python_engineio"

    @pytest.mark.parametrize(
        ("status", "body"),
        [
            (200, UNKNOWN_SESSION_BODY),
            (400, b'{"code":3,"message":"Bad request"}'),
            (400, b'{"code":true,"message":"Session ID unknown"}'),
            (400, b'{"code":"1"}'),
            (400, b"[1]"),
            (400, b'"Bad request"'),
            (400, b"Bad Request"),
            (400, b""),
            (400, b"{" * 5000),
        ],
    )
    def test_other_answers_are_not_unknown_sessions(self, status: int, body: bytes) -> None:
        assert unknown_session_kind(status, body) is None

    def test_only_uncompressed_400s_are_watched(self) -> None:
        ok = ResponseHead(b"HTTP/1.1", 200, b"OK", [])
        gzip = ResponseHead(b"HTTP/1.1", 400, b"Bad Request", [(b"Content-Encoding", b"gzip")])
        assert UnknownSessionSniffer.for_response(ok, chunked=False) is None
        assert UnknownSessionSniffer.for_response(gzip, chunked=False) is None

    def test_a_long_body_is_not_an_unknown_session(self) -> None:
        head = ResponseHead(b"HTTP/1.1", 400, b"Bad Request", [])
        body = UNKNOWN_SESSION_BODY[:-1] + b',"pad":"' + b"x" * 1000 + b'"}'
        assert self.sniff(head, [body], is_chunked=False) is None

    @given(body=st.binary(max_size=300), is_chunked=st.booleans())
    def test_arbitrary_bodies_never_raise(self, body: bytes, is_chunked: bool) -> None:
        head = ResponseHead(b"HTTP/1.1", 400, b"Bad Request", [])
        sniffer = UnknownSessionSniffer.for_response(head, chunked=is_chunked)
        assert sniffer is not None
        sniffer.feed(body)
        sniffer.verdict()


class TestSidTable:
    def test_a_learned_session_routes_to_its_server(self) -> None:
        table = SidTable()
        table.learn(SID, "s2", 25000, 20000, now=100.0)
        assert table.lookup(SID, now=101.0) == "s2"
        assert table.lookup("other", now=101.0) is None

    def test_an_entry_expires_after_ping_interval_plus_timeout_without_traffic(self) -> None:
        table = SidTable()
        table.learn(SID, "s1", 25000, 20000, now=0.0)
        assert table.lookup(SID, now=44.9) == "s1"
        assert table.lookup(SID, now=44.9 + 45.0) is None
        assert SID not in table

    def test_traffic_keeps_an_entry_alive(self) -> None:
        table = SidTable()
        table.learn(SID, "s1", 25000, 20000, now=0.0)
        for now in range(20, 1000, 20):
            assert table.lookup(SID, now=float(now)) == "s1"
        assert table.touch(SID, now=1000.0)
        assert table.lookup(SID, now=1040.0) == "s1"

    def test_relearning_a_sid_moves_it(self) -> None:
        table = SidTable()
        table.learn("a", "s1", 25000, 20000, now=0.0)
        table.learn("a", "s2", 25000, 20000, now=1.0)
        assert table.lookup("a", now=2.0) == "s2"
        assert len(table) == 1

    def test_two_thousand_abandoned_handshakes_leave_no_trace(self) -> None:
        table = SidTable()
        for i in range(2000):
            table.learn(f"sid{i}", f"s{i % 3}", 25000, 20000, now=i / 100)
        assert len(table) == 2000
        assert table.expire(now=44.0) == 0
        assert table.expire(now=19.99 + 45.0) == 2000
        assert len(table) == 0
        assert not table._lru and not table._by_ttl
        assert table.expired == 2000

    def test_new_handshakes_sweep_expired_ones_without_a_timer(self) -> None:
        table = SidTable()
        for i in range(2000):
            table.learn(f"old{i}", "s1", 25000, 20000, now=0.0)
        for i in range(500):
            table.learn(f"new{i}", "s1", 25000, 20000, now=100.0)
        assert len(table) == 500

    def test_expire_can_bound_its_work(self) -> None:
        table = SidTable()
        for i in range(10):
            table.learn(f"sid{i}", "s1", 25000, 20000, now=0.0)
        assert table.expire(now=100.0, limit=3) == 3
        assert len(table) == 7

    def test_sessions_with_different_lifetimes_expire_independently(self) -> None:
        table = SidTable()
        table.learn("long", "s1", 25000, 60000, now=0.0)  # 85 s
        table.learn("short", "s1", 25000, 5000, now=0.0)  # 30 s
        assert table.expire(now=31.0) == 1
        assert "long" in table and "short" not in table

    def test_a_full_table_forgets_the_session_idle_for_longest(self) -> None:
        table = SidTable(max_entries=2)
        table.learn("a", "s1", 25000, 20000, now=0.0)
        table.learn("b", "s1", 25000, 20000, now=1.0)
        assert table.lookup("a", now=2.0) == "s1"
        table.learn("c", "s1", 25000, 20000, now=3.0)
        assert ("a" in table, "b" in table, "c" in table) == (True, False, True)
        assert table.evicted == 1

    def test_lifetimes_are_clamped(self) -> None:
        table = SidTable(min_ttl=10.0, max_ttl=600.0)
        assert table.ttl_for(0, 1) == 10.0
        assert table.ttl_for(10**9, 10**9) == 600.0
        assert table.ttl_for(25000, 20000) == 45.0
        assert table.ttl_for(25000, 5001) == 31.0

    def test_forget_drops_one_session_and_forget_server_all_of_a_server(self) -> None:
        table = SidTable()
        for i in range(6):
            table.learn(f"sid{i}", f"s{i % 2}", 25000, 20000, now=0.0)
        assert table.forget("sid0") and not table.forget("sid0")
        assert table.forget_server("s1") == 3
        assert sorted(sid for sid in ("sid2", "sid4") if sid in table) == ["sid2", "sid4"]
        assert len(table) == 2

    def test_rejects_nonsense_settings(self) -> None:
        with pytest.raises(ValueError, match="max_entries"):
            SidTable(0)
        with pytest.raises(ValueError, match="min_ttl"):
            SidTable(min_ttl=5.0, max_ttl=1.0)

    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["learn", "lookup", "forget", "expire"]),
                st.sampled_from(["a", "b", "c", "d"]),
                st.sampled_from([(25000, 5000), (25000, 20000), (1000, 1000)]),
                st.floats(0, 20),
            ),
            max_size=60,
        )
    )
    def test_behaves_like_a_dictionary_of_deadlines(
        self, ops: list[tuple[str, str, tuple[int, int], float]]
    ) -> None:
        table = SidTable(min_ttl=1.0)
        model: dict[str, tuple[str, float, float]] = {}  # sid: (server, ttl, last seen)
        now = 0.0
        for op, sid, (interval, timeout), step in ops:
            now += step
            if op == "learn":
                table.learn(sid, "srv-" + str(interval + timeout), interval, timeout, now)
                model[sid] = ("srv-" + str(interval + timeout), (interval + timeout) / 1000, now)
            elif op == "forget":
                table.forget(sid)
                assert sid not in table
                model.pop(sid, None)
            elif op == "expire":
                table.expire(now)
                model = {s: e for s, e in model.items() if now - e[2] < e[1]}
                assert set(model) == {s for s in "abcd" if s in table}
            else:
                expected = None
                if sid in model and now - model[sid][2] < model[sid][1]:
                    expected = model[sid][0]
                    model[sid] = (expected, model[sid][1], now)
                assert table.lookup(sid, now) == expected
