"""The engine.io routing core: which server holds a request's session; held handshakes."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from stickyproxy.config import parse_config
from stickyproxy.eiorouting import EngineRouter, HandshakeCapture
from stickyproxy.engineio import untag
from stickyproxy.httphead import HeadParser, RequestHead, ResponseHead
from tests.helpers import splits

SID = "AbCdEfGhIjKlMnOpQrSt"
BODY = b'0{"sid":"%s","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":5000}' % (
    SID.encode()
)
CONFIG = """
[server s1]
address = 127.0.0.1:1
[server s2]
address = 127.0.0.1:2
tag = second
[engineio]
sid_tag = {tag}
"""


def router(tag: str = "eio4") -> EngineRouter:
    config = parse_config(CONFIG.format(tag=tag))
    return EngineRouter(config.engineio, config.servers)


def request(target: bytes) -> RequestHead:
    head = HeadParser("request").feed(b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % target)
    assert head is not None
    return head


def response(extra: bytes = b"") -> ResponseHead:
    head = HeadParser("response").feed(b"HTTP/1.1 200 OK\r\n%s\r\n" % extra)
    assert head is not None
    return head


def chunked(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


def test_requests_off_the_path_are_not_engine_io() -> None:
    assert router().inspect(request(b"/api?sid=x"), 0.0) is None


def test_an_empty_path_turns_sid_routing_off() -> None:
    config = parse_config(CONFIG.format(tag="off") + "path =\n")
    engine = EngineRouter(config.engineio, config.servers)
    assert not engine.enabled
    assert engine.inspect(request(b"/socket.io/?EIO=4&sid=abc"), 0.0) is None


def test_a_handshake_carries_no_sid_and_has_no_server_yet() -> None:
    route = router().inspect(request(b"/socket.io/?EIO=4&transport=polling"), 0.0)
    assert route is not None and route.sid is None and route.server is None
    assert route.request.learnable


def test_a_tagged_sid_names_its_server_and_the_target_loses_the_tag() -> None:
    head = request(b"/socket.io/?EIO=4&transport=polling&sid=%s.second&t=1" % SID.encode())
    route = router().inspect(head, 0.0)
    assert route is not None
    assert (route.sid, route.server, route.reason) == (SID, "s2", "sid-tag")
    assert head.target == b"/socket.io/?EIO=4&transport=polling&sid=%s&t=1" % SID.encode()


def test_an_unknown_tag_is_part_of_the_sid() -> None:
    head = request(b"/socket.io/?EIO=4&sid=abc.nobody")
    route = router().inspect(head, 0.0)
    assert route is not None and route.sid == "abc.nobody" and route.server is None
    assert head.target.endswith(b"sid=abc.nobody")


def test_a_learned_session_is_found_until_it_idles_past_its_heartbeat() -> None:
    engine = router("off")
    handshake = HandshakeCapture(response(b"Content-Length: %d\r\n" % len(BODY)), chunked=False)
    assert handshake.feed(BODY)
    found = handshake.handshake("io")
    assert found is not None
    assert engine.learn(found, "s1", 100.0) == 30.0  # 25 s + 5 s
    route = engine.inspect(request(b"/socket.io/?EIO=4&sid=%s" % SID.encode()), 120.0)
    assert route is not None and (route.server, route.reason) == ("s1", "sid-table")
    # Polls keep it alive; 30 s of silence end it.
    assert engine.inspect(request(b"/socket.io/?EIO=4&sid=%s" % SID.encode()), 151.0) is not None
    assert SID not in engine.table


def test_a_reload_keeps_sessions_of_servers_that_remain() -> None:
    engine = router("off")
    engine.table.learn("a" * 20, "s1", 25000, 5000, 0.0)
    engine.table.learn("b" * 20, "s2", 25000, 5000, 0.0)
    config = parse_config("[server s1]\naddress = 127.0.0.1:1\n")
    engine.reconfigure(config.engineio, config.servers)
    assert "a" * 20 in engine.table and "b" * 20 not in engine.table


@given(st.data())
def test_a_held_chunked_handshake_split_anywhere_is_found_and_tagged(data: st.DataObject) -> None:
    wire = chunked(BODY)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(wire) - 1), max_size=8)))
    capture = HandshakeCapture(response(b"Transfer-Encoding: chunked\r\n"), chunked=True)
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        assert capture.feed(wire[start:end])
    found = capture.handshake("io")
    assert found is not None and found.sid == SID
    out, tagged = capture.output("second", 4)
    head, _, body = out.partition(b"\r\n\r\n")
    assert tagged and b"Transfer-Encoding" not in head
    assert b"Content-Length: %d" % len(body) in head
    assert untag(json.loads(body[1:])["sid"]) == ("second", SID)


def test_a_held_handshake_split_at_every_byte_is_found() -> None:
    for pieces in splits(BODY):
        capture = HandshakeCapture(response(), chunked=False)
        for piece in pieces:
            capture.feed(piece)
        found = capture.handshake("io")
        assert found is not None and found.sid == SID


def test_eio3_bodies_go_out_untagged_and_byte_for_byte() -> None:
    body = b"%d:%s2:40" % (len(BODY), BODY)
    capture = HandshakeCapture(response(b"Content-Length: %d\r\n" % len(body)), chunked=False)
    capture.feed(body)
    out, tagged = capture.output("second", 3)
    assert not tagged and out.endswith(b"\r\n\r\n" + body)


def test_a_body_too_big_for_a_handshake_is_let_go() -> None:
    capture = HandshakeCapture(response(), chunked=False, limit=64)
    assert capture.feed(b"x" * 64)
    assert not capture.feed(b"x")


def test_the_io_cookie_tells_the_sid_when_the_body_cannot() -> None:
    head = response(b"Set-Cookie: io=%s; Path=/; HttpOnly\r\n" % SID.encode())
    capture = HandshakeCapture(head, chunked=False)
    capture.feed(b"not a handshake")
    found = capture.handshake("io")
    assert found is not None and found.sid == SID
    assert capture.output("second", 4) == (head.serialize() + b"not a handshake", False)
