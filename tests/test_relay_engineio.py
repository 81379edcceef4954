"""engine.io sessions through the relay, in memory: learned, tagged, routed, counted."""

from __future__ import annotations

import json

from twisted.internet.defer import Deferred

from stickyproxy.engineio import untag
from tests.helpers import splits
from tests.relay_harness import CONFIG, Harness

SID = "AbCdEfGhIjKlMnOpQrSt"
OPEN = (
    b'0{"sid":"%s","upgrades":["websocket"],'
    b'"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}'
)
HANDSHAKE = b"GET /socket.io/?EIO=4&transport=polling&t=Px1 HTTP/1.1\r\nHost: app\r\n\r\n"


def config(**engineio: str) -> str:
    text = CONFIG.format(redispatch="true").replace(
        "[proxy]\n", "[proxy]\ndecision_header = X-Route\n", 1
    )
    lines = "".join(f"{key} = {value}\n" for key, value in engineio.items())
    return text + "\n[engineio]\n" + lines


def handshake_response(sid: str = SID, *, chunked: bool = False) -> bytes:
    body = OPEN % sid.encode()
    if chunked:
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=UTF-8\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        )
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=UTF-8\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


def poll(sid: str, extra: bytes = b"") -> bytes:
    return b"GET /socket.io/?EIO=4&transport=polling&sid=%s HTTP/1.1\r\nHost: app\r\n%s\r\n" % (
        sid.encode(),
        extra,
    )


def open_session(h: Harness, source: str = "203.0.113.7", **kw: bool) -> tuple[str, bytes]:
    """Run a handshake through ``h``; return the server and what the client got."""
    h.proxy_header(source)
    h.send(HANDSHAKE)
    server = h.server_of()
    backend, _ = h.accept()
    backend.dataReceived(handshake_response(**kw))
    return server, h.output()


def body_of(response: bytes) -> bytes:
    return response.partition(b"\r\n\r\n")[2]


def other_client(h: Harness, source: str) -> tuple[object, object]:
    frontend, transport = h.another_client()
    frontend.dataReceived(b"PROXY TCP4 %s 10.0.0.1 40000 80\r\n" % source.encode())
    return frontend, transport


def test_a_poll_from_another_address_reaches_the_server_that_opened_the_session() -> None:
    h = Harness(config=config())
    server, first = open_session(h)
    assert body_of(first) == OPEN % SID.encode()
    assert b"X-Route: hash; server=" in first
    # A client without cookies, whose egress address changed: the sid decides.
    for source in ("198.51.100.1", "198.51.100.2", "192.0.2.200", "203.0.113.99"):
        frontend, _ = other_client(h, source)
        frontend.dataReceived(poll(SID))  # type: ignore[attr-defined]
        assert h.server_of() == server
    assert h.ctx.engine.learned == 1


def test_a_chunked_handshake_split_anywhere_is_learned_before_it_is_relayed() -> None:
    h = Harness(config=config())
    for index, pieces in enumerate(splits(handshake_response(f"Split{0:015d}", chunked=True))):
        sid = f"Split{index:015d}"
        response = handshake_response(sid, chunked=True)
        cuts = [len(piece) for piece in pieces]
        frontend, transport = other_client(h, "203.0.113.7")
        frontend.dataReceived(HANDSHAKE)  # type: ignore[attr-defined]
        server = h.server_of()
        backend, _ = h.accept()
        at = 0
        for size in cuts[:-1]:
            backend.dataReceived(response[at : at + size])
            at += size
            # Nothing reaches the client before the session is known.
            assert transport.value() == b""  # type: ignore[attr-defined]
        backend.dataReceived(response[at:])
        out = transport.value()  # type: ignore[attr-defined]
        assert out.endswith(b"0\r\n\r\n") and (OPEN % sid.encode()) in out
        assert h.ctx.engine.table.lookup(sid, h.reactor.seconds()) == server


def test_a_stale_cookie_pointing_elsewhere_loses_to_the_sid() -> None:
    h = Harness(config=config())
    server, _ = open_session(h)
    other = next(name for name in ("s1", "s2", "s3") if name != server)
    frontend, transport = other_client(h, "198.51.100.1")
    frontend.dataReceived(poll(SID, b"Cookie: storify_editor_host=%s\r\n" % other.encode()))  # type: ignore[attr-defined]
    assert h.server_of() == server
    backend, _ = h.accept()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n6")
    out = transport.value()  # type: ignore[attr-defined]
    assert b"X-Route: sid-table; server=%s" % server.encode() in out
    # The cookie is put right for the clients that keep one.
    assert b"Set-Cookie: storify_editor_host=%s" % server.encode() in out


def test_duplicate_and_oversized_sids_get_400_without_showing_the_sid() -> None:
    for target in (
        b"/socket.io/?EIO=4&transport=polling&sid=abc&sid=def",
        b"/socket.io/?EIO=4&transport=polling&sid=" + b"A" * 400,
        b"/socket.io/?EIO=4&transport=polling&sid=ab%22cd",
    ):
        h = Harness(config=config())
        h.proxy_header()
        h.send(b"GET %s HTTP/1.1\r\nHost: app\r\n\r\n" % target)
        out = h.output()
        assert out.startswith(b"HTTP/1.1 400 ")
        assert h.attempts() == []


def test_off_the_engine_io_path_a_sid_parameter_means_nothing() -> None:
    h = Harness(config=config())
    h.proxy_header()
    h.send(b"GET /api/?sid=abc&sid=def HTTP/1.1\r\nHost: app\r\n\r\n")
    assert len(h.attempts()) == 1


def test_with_sid_tag_any_proxy_of_the_fleet_routes_the_session_without_shared_state() -> None:
    text = config(sid_tag="eio4")
    first = Harness(config=text)
    server, out = open_session(first)
    head, _, body = out.partition(b"\r\n\r\n")
    opened = json.loads(body[1:])
    tag, original = untag(opened["sid"])
    assert original == SID and tag is not None
    assert b"Content-Length: %d\r\n" % len(body) in head + b"\r\n"
    assert first.ctx.engine.tagged == 1
    # A second proxy with the same configuration, which never saw the handshake.
    second = Harness(config=text)
    second.proxy_header("198.51.100.5")
    second.send(poll(opened["sid"]))
    assert second.server_of() == server
    _, transport = second.accept()
    # The backend sees its own sid.
    assert transport.value().startswith(
        b"GET /socket.io/?EIO=4&transport=polling&sid=%s HTTP/1.1\r\n" % SID.encode()
    )


def test_a_chunked_handshake_is_tagged_and_reframed_by_length() -> None:
    h = Harness(config=config(sid_tag="eio4"))
    _, out = open_session(h, chunked=True)
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head
    assert b"Content-Length: %d" % len(body) in head
    assert json.loads(body[1:])["sid"].startswith(SID + ".")


def test_eio3_handshakes_are_learned_but_never_tagged() -> None:
    h = Harness(config=config(sid_tag="eio4"))
    h.proxy_header()
    h.send(b"GET /socket.io/?EIO=3&transport=polling HTTP/1.1\r\nHost: app\r\n\r\n")
    server = h.server_of()
    backend, _ = h.accept()
    packet = b'0{"sid":"%s","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":5000}' % (
        SID.encode()
    )
    body = b"%d:%s2:40" % (len(packet), packet)
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert body_of(h.output()) == body
    assert h.ctx.engine.table.lookup(SID, h.reactor.seconds()) == server
    assert h.ctx.engine.tagged == 0


def test_unknown_session_answers_are_counted_by_decision_and_forget_the_session() -> None:
    h = Harness(config=config())
    server, _ = open_session(h)
    frontend, transport = other_client(h, "198.51.100.1")
    frontend.dataReceived(poll(SID))  # type: ignore[attr-defined]
    backend, _ = h.accept()
    answer = b'{"code":1,"message":"Session ID unknown"}'
    backend.dataReceived(
        b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
        % (len(answer), answer)
    )
    assert answer in transport.value()  # type: ignore[attr-defined]
    counters = h.ctx.stats.server(server)
    assert counters.unknown_sessions == {("sid-table", "polling_json"): 1}
    assert h.ctx.stats.frontend.as_dict()["unknown_sessions"] == {"sid-table": {"polling_json": 1}}
    # Expired on its server: the next poll is routed as if unknown.
    assert SID not in h.ctx.engine.table


def test_an_unknown_session_under_hash_routing_is_counted_as_such() -> None:
    h = Harness(config=config())
    h.proxy_header()
    h.send(poll("NeverSeenBeforeSid00"))
    backend, _ = h.accept()
    backend.dataReceived(
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 18\r\n\r\nSession ID unknown"
    )
    server = h.server_of()
    assert h.ctx.stats.server(server).unknown_sessions == {("hash", "upgrade_text"): 1}


def test_a_session_on_a_server_that_went_down_is_routed_afresh() -> None:
    h = Harness(config=config())
    server, _ = open_session(h)
    h.pool.set_admin(server, "maint")
    frontend, _ = other_client(h, "198.51.100.1")
    frontend.dataReceived(poll(SID))  # type: ignore[attr-defined]
    assert h.server_of() != server
    assert SID not in h.ctx.engine.table


def test_two_thousand_abandoned_handshakes_leave_no_trace_after_their_lifetime() -> None:
    h = Harness(config=config())
    h.proxy_header()
    h.send(HANDSHAKE)
    backend, _ = h.accept()
    for index in range(2000):
        if index:
            h.send(HANDSHAKE)  # keep-alive: the same backend connection answers
        backend.dataReceived(handshake_response(f"Abandoned{index:011d}"))
        h.output()
    assert len(h.ctx.engine.table) == 2000
    # pingInterval + pingTimeout = 45 s, then at most one sweep interval.
    h.reactor.advance(45)
    h.reactor.advance(5)
    assert len(h.ctx.engine.table) == 0
    # And the sweep stops with nothing left to sweep.
    assert not h.reactor.getDelayedCalls() or all(
        call.getTime() > h.reactor.seconds() + 5 for call in h.reactor.getDelayedCalls()
    )


class SlowStore:
    """A shared table answering when the test says so (the protocol is tested elsewhere)."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.pending: list[tuple[Deferred[object], object]] = []
        self.touched: list[tuple[str, float]] = []

    def get(self, sid: str) -> Deferred[str | None]:
        d: Deferred[str | None] = Deferred()
        self.pending.append((d, self.data.get(sid)))  # type: ignore[arg-type]
        return d

    def put(self, sid: str, server: str, ttl: float) -> Deferred[bool]:
        self.data[sid] = server
        d: Deferred[bool] = Deferred()
        self.pending.append((d, True))  # type: ignore[arg-type]
        return d

    def touch(self, sid: str, ttl: float) -> None:
        self.touched.append((sid, ttl))

    def forget(self, sid: str) -> None:
        self.data.pop(sid, None)

    def answer(self) -> None:
        pending, self.pending = self.pending, []
        for d, value in pending:
            d.callback(value)


def test_with_a_store_the_handshake_waits_for_the_write_and_other_proxies_find_it() -> None:
    store = SlowStore()
    first = Harness(config=config())
    first.ctx.store = store
    first.proxy_header()
    first.send(HANDSHAKE)
    server = first.server_of()
    backend, _ = first.accept()
    backend.dataReceived(handshake_response())
    assert first.output() == b""  # held until the store has the session
    store.answer()
    assert body_of(first.output()) == OPEN % SID.encode()
    assert store.data == {SID: server}

    second = Harness(config=config())
    second.ctx.store = store
    second.proxy_header("198.51.100.9")
    second.send(poll(SID))
    assert second.attempts() == []  # asking the store
    store.answer()
    assert second.server_of() == server
    backend, _ = second.accept()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n6")
    assert b"X-Route: sid-store; server=" in second.output()
    # Later polls on that proxy need no store.
    assert SID in second.ctx.engine.table


def test_a_store_that_knows_nothing_falls_back_to_cookie_and_hash() -> None:
    store = SlowStore()
    h = Harness(config=config())
    h.ctx.store = store
    h.proxy_header()
    h.send(poll(SID, b"Cookie: storify_editor_host=s2\r\n"))
    store.answer()
    assert h.server_of() == "s2"


def test_a_client_that_cuts_its_long_poll_cuts_it_at_the_backend_too() -> None:
    h = Harness(config=config())
    open_session(h)
    h.send(poll(SID))
    _, transport = h.backends[-1]
    assert transport.value().startswith(b"GET /socket.io/")  # the same kept-alive connection
    h.frontend.readConnectionLost()
    # The backend sees the poll end, as it would without a proxy.
    assert transport.disconnecting
    assert h.client.disconnecting


def test_a_half_close_after_an_ordinary_request_still_gets_its_answer() -> None:
    h = Harness(config=config())
    h.proxy_header()
    h.send(b"GET /api HTTP/1.1\r\nHost: app\r\n\r\n")
    backend, transport = h.accept()
    h.frontend.readConnectionLost()
    assert not transport.disconnecting
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert h.output().endswith(b"ok")
