"""The relay protocols, driven in memory: no sockets, time from a fake clock."""

from __future__ import annotations

import pytest

from stickyproxy.backend import Backend
from stickyproxy.hashring import address_key
from stickyproxy.proxyproto import PP2_TYPE_AUTHORITY, PP2_TYPE_UNIQUE_ID, format_v1, format_v2
from tests.relay_harness import CONFIG, SWITCH, UPGRADE, FakeTCP, Harness, ok

# -- routing and cookies ----------------------------------------------------------


def test_first_request_is_hashed_on_the_proxy_header_address_and_gets_the_cookie() -> None:
    h = Harness()
    h.proxy_header("203.0.113.7")
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n")
    server = h.server_of()
    expected = h.pool.choose([], address_key("203.0.113.7"))
    assert expected.server is not None and server == expected.server.name
    _, backend = h.accept()
    assert backend.value() == b"GET / HTTP/1.1\r\nHost: app\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n"
    h.backends[0][0].dataReceived(ok())
    out = h.output()
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[-2:] == [
        b"Set-Cookie: storify_editor_host=%s; path=/" % server.encode(),
        b"Cache-Control: private",
    ]
    assert body == b"hi"
    assert not h.client.disconnecting


def test_a_valid_cookie_routes_and_is_stripped_byte_exactly() -> None:
    h = Harness()
    h.proxy_header()
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\nCookie: a=1; storify_editor_host=s3; b=2\r\n\r\n")
    assert h.server_of() == "s3"
    backend, transport = h.accept()
    assert b"\r\nCookie: a=1; b=2\r\n" in transport.value()
    backend.dataReceived(ok())
    assert b"Set-Cookie" not in h.output()


def test_pipelined_requests_are_each_routed_on_their_own() -> None:
    """Case 40: none, s3, s1 on one connection; only the first gets a cookie."""
    h = Harness()
    h.proxy_header()
    h.send(
        b"GET /1 HTTP/1.1\r\nHost: app\r\n\r\n"
        b"GET /2 HTTP/1.1\r\nHost: app\r\nCookie: storify_editor_host=s3\r\n\r\n"
        b"GET /3 HTTP/1.1\r\nHost: app\r\nCookie: storify_editor_host=s1\r\n\r\n"
    )
    first = h.server_of()
    backend, transport = h.accept()
    assert transport.value().startswith(b"GET /1 ")
    backend.dataReceived(ok(b"one"))
    served = [first]
    answers = [h.output()]
    for index, body in ((1, b"two"), (2, b"three")):
        if len(h.attempts()) > index:
            served.append(h.server_of(index))
            backend, transport = h.accept(index)
        else:  # the kept-alive backend connection was reused
            served.append(served[-1])
        backend.dataReceived(ok(body))
        answers.append(h.output())
    assert served[1:] == ["s3", "s1"]
    assert b"Set-Cookie" in answers[0]
    assert b"Set-Cookie" not in answers[1] + answers[2]
    assert answers[2].endswith(b"three")


def test_keep_alive_reuses_the_backend_connection_for_the_same_server() -> None:
    h = Harness()
    h.proxy_header()
    for n in range(5):
        h.send(b"GET /%d HTTP/1.1\r\nHost: app\r\nCookie: storify_editor_host=s2\r\n\r\n" % n)
        if n == 0:
            h.accept()
        backend, transport = h.backends[0]
        assert transport.value().startswith(b"GET /%d " % n)
        transport.clear()
        backend.dataReceived(ok())
        assert h.output().endswith(b"hi")
    assert len(h.attempts()) == 1


def test_a_kept_backend_connection_stays_paired_with_its_client_until_dropped() -> None:
    """Each transport throttles the other while the backend is kept (parked)."""
    h = Harness()
    h.proxy_header()
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\nCookie: storify_editor_host=s1\r\n\r\n")
    first, first_transport = h.accept()
    first.dataReceived(ok())
    assert h.client.producer is first.throttle
    assert first_transport.producer is not None
    # A request for another server: the kept connection is closed, unpaired.
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\nCookie: storify_editor_host=s2\r\n\r\n")
    assert first_transport.producer is None and first_transport.disconnecting
    second, second_transport = h.accept()
    assert h.client.producer is second.throttle
    second.dataReceived(ok())
    # The client leaves: nothing may hold its transport open.
    h.frontend.readConnectionLost()
    assert h.client.producer is None and h.client.disconnecting
    assert second_transport.producer is None and second_transport.disconnecting


def test_a_kept_backend_connection_closed_by_its_server_is_unpaired() -> None:
    h = Harness()
    h.proxy_header()
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\nCookie: storify_editor_host=s1\r\n\r\n")
    backend, _ = h.accept()
    backend.dataReceived(ok())
    backend.connectionLost()
    assert h.client.producer is None
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\nCookie: storify_editor_host=s1\r\n\r\n")
    assert len(h.attempts()) == 2
    again, _ = h.accept()
    assert h.client.producer is again.throttle


def test_a_backend_set_cookie_with_our_name_is_dropped() -> None:
    h = Harness()
    h.proxy_header()
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\nCookie: storify_editor_host=s1\r\n\r\n")
    backend, _ = h.accept()
    backend.dataReceived(
        ok(extra=b"Set-Cookie: storify_editor_host=fromapp\r\nSet-Cookie: other=1\r\n")
    )
    out = h.output()
    assert b"fromapp" not in out
    assert b"Set-Cookie: other=1\r\n" in out


def test_a_cookie_for_a_server_in_maintenance_is_rerouted_with_a_new_cookie() -> None:
    h = Harness()
    h.pool.set_admin("s2", "maint")
    h.proxy_header()
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\nCookie: storify_editor_host=s2\r\n\r\n")
    assert h.server_of() != "s2"
    backend, _ = h.accept()
    backend.dataReceived(ok())
    assert b"Set-Cookie: storify_editor_host=%s; path=/" % h.server_of().encode() in h.output()


# -- errors --------------------------------------------------------------------------


def test_no_server_available_answers_503_and_keeps_the_connection() -> None:
    h = Harness()
    for name in ("s1", "s2", "s3"):
        h.pool.set_admin(name, "maint")
    h.proxy_header()
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
    out = h.output()
    assert out.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"Connection: close" not in out
    assert not h.client.disconnecting
    h.pool.set_admin("s1", "ready")
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
    assert h.server_of() == "s1"


def test_a_refused_connection_is_redispatched_at_once_and_the_cookie_rewritten() -> None:
    """Case 45, the faster equivalent: no waiting on a port nobody listens on."""
    h = Harness()
    h.proxy_header()
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\nCookie: storify_editor_host=s1\r\n\r\n")
    assert h.server_of() == "s1"
    h.refuse()
    assert len(h.attempts()) == 2 and h.server_of() != "s1"
    other = h.server_of()
    backend, _ = h.accept()
    backend.dataReceived(ok())
    assert b"Set-Cookie: storify_editor_host=%s; path=/" % other.encode() in h.output()


def test_without_redispatch_a_refused_server_is_retried_then_503() -> None:
    h = Harness(redispatch=False)
    h.proxy_header()
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\nCookie: storify_editor_host=s1\r\n\r\n")
    for _ in range(2):
        h.refuse()
        h.reactor.advance(1.0)
        assert h.server_of() == "s1"
    h.refuse()
    assert len(h.attempts()) == 3
    assert h.output().startswith(b"HTTP/1.1 503 ")
    assert all(s.active == 0 for s in h.pool.servers.values())


def test_a_backend_closing_without_a_response_gives_502() -> None:
    h = Harness()
    h.proxy_header()
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
    backend, _ = h.accept()
    backend.connectionLost(None)
    out = h.output()
    assert out.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"Connection: close" in out and h.client.disconnecting


def test_a_silent_backend_gives_504_after_timeout_server() -> None:
    h = Harness()
    h.proxy_header()
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
    h.accept()
    h.reactor.advance(9.9)
    assert h.output() == b""
    h.reactor.advance(0.2)
    assert h.output().startswith(b"HTTP/1.1 504 ")


def test_a_malformed_request_gets_400_and_close() -> None:
    h = Harness()
    h.proxy_header()
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\nBad Header: x\r\n\r\n")
    out = h.output()
    assert out.startswith(b"HTTP/1.1 400 ")
    assert b"Connection: close" in out and h.client.disconnecting
    assert h.attempts() == []


# -- PROXY header and slow clients ----------------------------------------------------


def test_the_proxy_header_may_arrive_one_byte_at_a_time() -> None:
    h = Harness()
    for byte in format_v1(("198.51.100.9", 1234), ("10.0.0.1", 80)):
        h.send(bytes([byte]))
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
    _, transport = h.accept()
    assert b"X-Forwarded-For: 198.51.100.9\r\n" in transport.value()


def test_a_bad_proxy_header_closes_without_a_response() -> None:
    h = Harness()
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
    assert h.client.aborted and h.output() == b""


def test_a_peer_outside_trusted_proxies_is_closed_without_a_response() -> None:
    h = Harness(peer="192.0.2.1")
    assert h.client.aborted and h.output() == b""


def test_a_connection_that_sends_nothing_is_closed_silently() -> None:
    h = Harness()
    h.proxy_header()
    h.reactor.advance(3.1)
    assert h.client.disconnecting and h.output() == b""


def test_slowloris_gets_408_when_the_head_deadline_passes() -> None:
    """Case 67: one byte every half second does not stretch the deadline."""
    h = Harness()
    h.proxy_header()
    for byte in b"GET / HTTP/1.1\r\nHost: a":
        h.send(bytes([byte]))
        h.reactor.advance(0.5)
        if h.client.disconnecting:
            break
    out = h.output()
    assert out.startswith(b"HTTP/1.1 408 ")
    assert h.reactor.seconds() <= 3.5


def test_an_idle_keep_alive_connection_closes_silently() -> None:
    h = Harness()
    h.proxy_header()
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
    backend, _ = h.accept()
    backend.dataReceived(ok())
    h.output()
    h.reactor.advance(4.9)
    assert not h.client.disconnecting
    h.reactor.advance(0.2)
    assert h.client.disconnecting and h.output() == b""


# -- bodies and flow control ---------------------------------------------------------------


def test_a_chunked_upload_streams_verbatim_and_the_backend_throttles_the_client() -> None:
    h = Harness()
    h.proxy_header()
    h.send(b"POST /up HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    backend, transport = h.accept()
    assert transport.value().endswith(b"\r\n\r\n5\r\nhello\r\n")
    # The client transport is the backend's producer: a full backend buffer
    # pauses reading from the client.
    assert transport.producer is not None
    transport.producer.pauseProducing()
    assert h.client.producerState == "paused"
    transport.producer.resumeProducing()
    assert h.client.producerState == "producing"
    h.send(b"0\r\n\r\n")
    assert transport.value().endswith(b"5\r\nhello\r\n0\r\n\r\n")
    backend.dataReceived(ok(b"stored"))
    assert h.output().endswith(b"stored")


def test_a_response_body_until_close_ends_the_client_connection() -> None:
    h = Harness()
    h.proxy_header()
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
    backend, _ = h.accept()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\n\r\npart one, ")
    backend.dataReceived(b"part two")
    backend.readConnectionLost()
    out = h.output()
    assert b"Connection: close\r\n" in out
    assert out.endswith(b"part one, part two")
    assert h.client.disconnecting


# -- WebSocket ------------------------------------------------------------------------------


def test_an_upgrade_becomes_a_tunnel_and_early_client_bytes_follow_the_101() -> None:
    h = Harness()
    h.proxy_header()
    h.send(UPGRADE + b"EARLY")
    backend, transport = h.accept()
    # Hop-by-hop headers go, except the upgrade pair (RFC 9110 §7.6.1).
    sent = transport.value()
    assert sent.startswith(b"GET /ws HTTP/1.1\r\nHost: app\r\n")
    assert b"\r\nUpgrade: websocket\r\n" in sent
    assert b"\r\nConnection: upgrade\r\n" in sent
    assert sent.endswith(b"\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n")
    transport.clear()
    backend.dataReceived(SWITCH + b"server-frame")
    out = h.output()
    assert out.startswith(b"HTTP/1.1 101 ")
    assert b"Set-Cookie: storify_editor_host=" in out
    assert b"Cache-Control" not in out
    assert out.endswith(b"\r\n\r\nserver-frame")
    assert transport.value() == b"EARLY"
    h.send(b"raw bytes, not HTTP\r\n\r\n")
    assert transport.value().endswith(b"raw bytes, not HTTP\r\n\r\n")


def test_half_close_is_passed_on_inside_a_tunnel() -> None:
    h = Harness()
    h.proxy_header()
    h.send(UPGRADE)
    backend, transport = h.accept()
    backend.dataReceived(SWITCH)
    h.frontend.readConnectionLost()
    assert transport.write_closed and not h.client.disconnecting
    backend.dataReceived(b"last words")
    assert h.output().endswith(b"last words")
    backend.readConnectionLost()
    assert h.client.disconnecting


def test_an_idle_tunnel_closes_after_timeout_tunnel_not_timeout_client() -> None:
    h = Harness()
    h.proxy_header()
    h.send(UPGRADE)
    backend, _ = h.accept()
    backend.dataReceived(SWITCH)
    for _ in range(5):
        h.reactor.advance(20)
        h.send(b"ping")
    assert not h.client.disconnecting
    h.reactor.advance(30.1)
    assert h.client.disconnecting


def test_a_refused_upgrade_keeps_the_connection_usable() -> None:
    """Case 64."""
    h = Harness()
    h.proxy_header()
    h.send(UPGRADE)
    backend, transport = h.accept()
    backend.dataReceived(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    assert h.output().startswith(b"HTTP/1.1 403 ")
    transport.clear()
    h.send(b"GET /next HTTP/1.1\r\nHost: app\r\n\r\n")
    assert transport.value().startswith(b"GET /next ")


@pytest.mark.parametrize(
    "response",
    [
        SWITCH.replace(b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n", b""),
        SWITCH.replace(b"Connection: Upgrade\r\n", b""),
    ],
    ids=["no-accept", "no-connection-upgrade"],
)
def test_an_invalid_101_gives_502(response: bytes) -> None:
    """Case 63."""
    h = Harness()
    h.proxy_header()
    h.send(UPGRADE)
    backend, _ = h.accept()
    backend.dataReceived(response)
    assert h.output().startswith(b"HTTP/1.1 502 ")


def test_server_slots_are_given_back_when_the_client_leaves() -> None:
    h = Harness()
    h.proxy_header()
    h.send(UPGRADE)
    backend, _ = h.accept()
    backend.dataReceived(SWITCH)
    assert sum(s.active for s in h.pool.servers.values()) == 1
    h.frontend.connectionLost(None)
    assert sum(s.active for s in h.pool.servers.values()) == 0


def test_proxy_v2_authority_and_unique_id_reach_the_backend_when_enabled() -> None:
    config = CONFIG.format(redispatch="true").replace(
        "redispatch = true", "redispatch = true\nproxy_tlv_headers = true"
    )
    h = Harness(config=config)
    tlvs = [(PP2_TYPE_AUTHORITY, b"editor.example.com"), (PP2_TYPE_UNIQUE_ID, b"\x00\x01\xff")]
    h.send(format_v2(("198.51.100.4", 5000), ("10.0.0.1", 443), tlvs=tlvs))
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\nX-Unique-ID: forged\r\n\r\n")
    _, transport = h.accept()
    sent = transport.value()
    assert b"forged" not in sent
    assert b"\r\nX-Proxy-Authority: editor.example.com\r\n" in sent
    assert b"\r\nX-Unique-ID: 0001ff\r\n" in sent


def test_proxy_v2_tlvs_are_not_passed_on_by_default() -> None:
    h = Harness()
    h.send(format_v2(("198.51.100.4", 5000), ("10.0.0.1", 443), tlvs=[(PP2_TYPE_AUTHORITY, b"x")]))
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
    _, transport = h.accept()
    assert b"X-Proxy-Authority" not in transport.value()
    assert b"X-Forwarded-For: 198.51.100.4\r\n" in transport.value()


# -- server maxconn and queues ----------------------------------------------------------------

QUEUE_CONFIG = (
    CONFIG.format(redispatch="true").replace(
        "timeout_connect = 2s", "timeout_connect = 2s\ntimeout_queue = 1500ms"
    )
    + "\n"
).replace("address = 10.1.0.1:80", "address = 10.1.0.1:80\nmaxconn = 1")


def test_a_pinned_request_to_a_full_server_waits_for_its_slot() -> None:
    h = Harness(config=QUEUE_CONFIG)
    h.proxy_header()
    h.send(b"GET /slow HTTP/1.1\r\nHost: app\r\nCookie: storify_editor_host=s1\r\n\r\n")
    first, _ = h.accept()
    other, other_transport = h.another_client()
    other.dataReceived(format_v1(("198.51.100.1", 1), ("10.0.0.1", 80)))
    other.dataReceived(b"GET /2 HTTP/1.1\r\nHost: app\r\nCookie: storify_editor_host=s1\r\n\r\n")
    assert len(h.attempts()) == 1 and other.queued
    first.dataReceived(ok())
    h.reactor.advance(0)
    assert not other.queued and h.server_of() == "s1"
    backend, transport = h.accept()
    assert transport.value().startswith(b"GET /2 ")
    backend.dataReceived(ok(b"second"))
    assert other_transport.value().endswith(b"second")


def test_a_queued_request_gets_503_after_timeout_queue() -> None:
    """Case 57: server maxconn 1, a slow request in flight, the next one waits, then 503."""
    h = Harness(config=QUEUE_CONFIG)
    h.proxy_header()
    h.send(b"GET /slow HTTP/1.1\r\nHost: app\r\nCookie: storify_editor_host=s1\r\n\r\n")
    h.accept()
    other, other_transport = h.another_client()
    other.dataReceived(format_v1(("198.51.100.1", 1), ("10.0.0.1", 80)))
    other.dataReceived(b"GET /2 HTTP/1.1\r\nHost: app\r\nCookie: storify_editor_host=s1\r\n\r\n")
    h.reactor.advance(1.4)
    assert other_transport.value() == b""
    h.reactor.advance(0.2)
    assert other_transport.value().startswith(b"HTTP/1.1 503 ")
    assert not other.queued


def test_a_client_without_a_cookie_skips_a_full_server() -> None:
    config = QUEUE_CONFIG.replace("address = 10.1.0.2:80", "address = 10.1.0.2:80\nmaxconn = 1")
    config = config.replace("address = 10.1.0.3:80", "address = 10.1.0.3:80\nmaxconn = 1")
    h = Harness(config=config)
    clients = []
    for n in range(3):
        frontend, _ = h.another_client()
        frontend.dataReceived(format_v1(("198.51.100.9", 1), ("10.0.0.1", 80)))
        frontend.dataReceived(b"GET /%d HTTP/1.1\r\nHost: app\r\n\r\n" % n)
        clients.append(frontend)
    assert sorted(h.server_of(i) for i in range(3)) == ["s1", "s2", "s3"]
    waiting, _ = h.another_client()
    waiting.dataReceived(format_v1(("198.51.100.9", 1), ("10.0.0.1", 80)))
    waiting.dataReceived(b"GET /4 HTTP/1.1\r\nHost: app\r\n\r\n")
    assert waiting.queued


# -- counters -------------------------------------------------------------------------------


def test_counters_record_decisions_responses_bytes_and_tunnels() -> None:
    h = Harness()
    h.proxy_header()
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
    server = h.server_of()
    backend, _ = h.accept()
    backend.dataReceived(ok(b"0123456789"))
    h.send(UPGRADE)
    backend.dataReceived(SWITCH)
    h.send(b"12345")
    stats = h.ctx.stats
    counters = stats.servers[server]
    assert counters.requests == 2 and counters.responses["2xx"] == 1
    assert counters.responses["1xx"] == 1
    assert counters.cookie_inserts == 2 and counters.cookie_hits == 0
    assert counters.tunnels == 1 and stats.frontend.tunnels == 1
    h.frontend.flush_bytes()
    assert counters.bytes_in > 5 and counters.bytes_out > 10
    h.frontend.connectionLost(None)
    assert counters.tunnels == 0 and stats.frontend.tunnels == 0 and counters.tunnels_total == 1


def test_counters_record_the_proxy_error_pages() -> None:
    h = Harness()
    h.proxy_header()
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\nBad Name: x\r\n\r\n")
    assert h.ctx.stats.frontend.errors == {400: 1}


def test_shutdown_sessions_closes_the_tunnels_of_one_server_only() -> None:
    h = Harness()
    h.proxy_header()
    h.send(UPGRADE.replace(b"Host: app\r\n", b"Host: app\r\nCookie: storify_editor_host=s2\r\n"))
    backend, _ = h.accept()
    backend.dataReceived(SWITCH)
    assert h.ctx.shutdown_sessions("s1") == 0 and not h.client.aborted
    assert h.ctx.shutdown_sessions("s2") == 1 and h.client.aborted


# -- going away -------------------------------------------------------------------------------


def _tunnel(h: Harness) -> tuple[Backend, FakeTCP]:
    h.proxy_header()
    h.send(UPGRADE)
    backend, transport = h.accept()
    backend.dataReceived(SWITCH)
    h.output()
    return backend, transport


def test_going_away_between_frames_sends_close_1001_at_once() -> None:
    h = Harness()
    backend, transport = _tunnel(h)
    backend.dataReceived(b"\x81\x02hi")
    h.output()
    h.frontend.go_away()
    assert h.output() == b"\x88\x02\x03\xe9"
    assert h.client.disconnecting and transport.disconnecting


def test_going_away_inside_a_frame_waits_for_its_end() -> None:
    h = Harness()
    backend, _ = _tunnel(h)
    backend.dataReceived(b"\x81\x05hel")
    assert h.output() == b"\x81\x05hel"
    h.frontend.go_away()
    assert h.output() == b"" and not h.client.disconnecting
    backend.dataReceived(b"lo\x81\x03new")
    assert h.output() == b"lo\x88\x02\x03\xe9"
    assert h.client.disconnecting


def test_going_away_gives_up_waiting_for_a_frame_boundary() -> None:
    h = Harness()
    backend, _ = _tunnel(h)
    backend.dataReceived(b"\x82\x7e\x10\x00partial")
    h.frontend.go_away()
    h.reactor.advance(5.1)
    assert h.client.disconnecting


def test_tunnels_are_closed_spread_over_the_window() -> None:
    h = Harness()
    _tunnel(h)
    others = []
    for n in range(3):
        frontend, transport = h.another_client()
        frontend.dataReceived(format_v1((f"198.51.100.{n}", 1), ("10.0.0.1", 80)))
        frontend.dataReceived(UPGRADE)
        backend, _ = h.accept()
        backend.dataReceived(SWITCH)
        others.append(transport)
    clients = [h.client, *others]
    assert h.ctx.go_away(4.0) == 4
    h.reactor.advance(0)
    closed = []
    for _ in range(5):
        closed.append(sum(1 for c in clients if c.disconnecting))
        h.reactor.advance(1.0)
    assert closed == [1, 2, 3, 4, 4]
    assert all(c.value().endswith(b"\x88\x02\x03\xe9") for c in clients)


# -- signed cookies ---------------------------------------------------------------------------

SIGNED = CONFIG.format(redispatch="true") + (
    "\n[cookie]\nsecret = 3f9c1b7e5a2d48c6b0e4f17a9d2c63b58e1f04a7\n"
)


def test_with_a_secret_the_cookie_is_a_signed_token_that_routes() -> None:
    h = Harness(config=SIGNED)
    h.proxy_header()
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
    server = h.server_of()
    backend, _ = h.accept()
    backend.dataReceived(ok())
    out = h.output()
    token = out.split(b"Set-Cookie: storify_editor_host=", 1)[1].split(b";", 1)[0]
    assert len(token) == 44 and server.encode() not in token
    other = "s1" if server != "s1" else "s2"
    # The token routes; the plain server name, as a client might forge it, does not.
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\nCookie: storify_editor_host=" + token + b"\r\n\r\n")
    backend.dataReceived(ok())
    assert b"Set-Cookie" not in h.output()
    client, _ = h.another_client()
    client.dataReceived(format_v1(("203.0.113.7", 1), ("10.0.0.1", 80)))
    client.dataReceived(
        b"GET / HTTP/1.1\r\nHost: app\r\nCookie: storify_editor_host="
        + other.encode()
        + b"\r\n\r\n"
    )
    assert h.server_of() == server


# -- secure = auto -------------------------------------------------------------------


def _auto_secure(extra: str = "") -> str:
    return (
        CONFIG.format(redispatch="true").replace("[proxy]\n", f"[proxy]\n{extra}", 1)
        + "\n[cookie]\nsecure = auto\nsamesite = None\nsamesite_legacy = true\n"
    )


def _set_cookies(out: bytes) -> list[bytes]:
    head = out.partition(b"\r\n\r\n")[0]
    return [line for line in head.split(b"\r\n") if line.startswith(b"Set-Cookie: ")]


def test_secure_auto_marks_the_cookie_secure_when_the_balancer_reports_tls() -> None:
    h = Harness(config=_auto_secure())
    ssl = bytes([0x01]) + bytes(4)  # PP2_CLIENT_SSL, verify = 0 (PROXY spec §2.2.6)
    h.send(format_v2(("198.51.100.4", 5000), ("10.0.0.1", 443), tlvs=[(0x20, ssl)]))
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
    server = h.server_of()
    h.accept()[0].dataReceived(ok())
    assert _set_cookies(h.output()) == [
        b"Set-Cookie: storify_editor_host=%s; path=/; Secure; SameSite=None" % server.encode(),
        b"Set-Cookie: storify_editor_host_legacy=%s; path=/; Secure" % server.encode(),
    ]


def test_secure_auto_over_plain_http_sets_one_cookie_without_secure_or_samesite() -> None:
    h = Harness(config=_auto_secure())
    h.proxy_header()
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\nX-Forwarded-Proto: https\r\n\r\n")
    server = h.server_of()
    h.accept()[0].dataReceived(ok())
    # X-Forwarded-Proto is only believed with trust_forwarded_proto.
    assert _set_cookies(h.output()) == [
        b"Set-Cookie: storify_editor_host=%s; path=/" % server.encode()
    ]


def test_secure_auto_believes_x_forwarded_proto_from_a_trusted_balancer_when_told_to() -> None:
    h = Harness(config=_auto_secure("trust_forwarded_proto = true\n"))
    h.proxy_header()
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\nX-Forwarded-Proto: https\r\n\r\n")
    h.accept()[0].dataReceived(ok())
    assert all(b"; Secure" in line for line in _set_cookies(h.output()))


def test_the_twin_cookie_alone_routes_like_the_main_one() -> None:
    h = Harness(config=_auto_secure())
    h.proxy_header()
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\nCookie: storify_editor_host_legacy=s2\r\n\r\n")
    assert h.server_of() == "s2"
    _, transport = h.accept()
    assert b"Cookie" not in transport.value()


def test_a_bad_body_arriving_with_the_head_gets_a_clean_502() -> None:
    h = Harness()
    h.proxy_header()
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
    backend, _ = h.accept()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    # Head and body would have left together: nothing of them did.
    assert h.output().startswith(b"HTTP/1.1 502 Bad Gateway\r\n")


def test_a_bad_body_after_the_head_went_out_cuts_the_response() -> None:
    h = Harness()
    h.proxy_header()
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
    backend, _ = h.accept()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    backend.dataReceived(b"zz\r\n")
    out = h.output()
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and b"502" not in out
    assert h.client.disconnecting
