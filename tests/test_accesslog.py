"""Access log lines, as text and as JSON, and what the relay records."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.logger import globalLogPublisher

from stickyproxy.accesslog import RequestRecord, TunnelRecord, as_json, request_line, tunnel_line
from tests.relay_harness import CONFIG, SWITCH, UPGRADE, Harness, ok

RECORD = RequestRecord(
    client="203.0.113.7:40000",
    time=1795761612.345,
    server="s2",
    decision="hash",
    status=200,
    bytes_out=119,
    t_request=0.0004,
    t_queue=0.0,
    t_connect=0.0012,
    t_response=0.0025,
    t_total=0.0041,
    request_line="GET /x HTTP/1.1",
    cookie_set=True,
)


def test_the_text_line_reads_like_haproxy_httplog() -> None:
    assert request_line(RECORD) == (
        "203.0.113.7:40000 [27/Nov/2026:06:40:12.345] stickyproxy s2 0/0/1/2/4 200 119 hash "
        '+cookie "GET /x HTTP/1.1"'
    )


def test_json_carries_every_field() -> None:
    fields = json.loads(as_json(RECORD))
    assert fields["type"] == "request" and fields["server"] == "s2"
    assert fields["status"] == 200 and fields["decision"] == "hash"


def test_a_tunnel_line_says_who_closed() -> None:
    record = TunnelRecord("1.2.3.4:5", 1795761612.0, "s1", 61.5, 100, 2000, "server")
    assert tunnel_line(record).endswith("s1 tunnel 61500ms in=100 out=2000 closed-by=server")


LOGGING = CONFIG.format(redispatch="true").replace(
    "redispatch = true", "redispatch = true\naccess_log = httplog"
)


@pytest.fixture
def lines() -> Any:
    seen: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "stickyproxy.access":
            seen.append(event["line"])

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


def test_the_relay_logs_each_request_with_its_decision_and_timers(lines: list[str]) -> None:
    h = Harness(config=LOGGING)
    h.proxy_header("198.51.100.7")
    h.send(b"GET /a HTTP/1.1\r\nHost: app\r\n\r\n")
    h.reactor.advance(0.002)
    backend, _ = h.accept()
    h.reactor.advance(0.003)
    backend.dataReceived(ok(b"12345"))
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith("198.51.100.7:40000 [01/Jan/1970:00:00:00.000] stickyproxy ")
    assert " 0/0/2/3/5 200 " in line and " hash +cookie " in line
    assert line.endswith('"GET /a HTTP/1.1"')


def test_errors_and_tunnels_are_logged(lines: list[str]) -> None:
    h = Harness(config=LOGGING)
    h.proxy_header()
    h.send(UPGRADE)
    backend, _ = h.accept()
    backend.dataReceived(SWITCH)
    h.send(b"abc")
    backend.dataReceived(b"defgh")
    backend.readConnectionLost()
    backend.connectionLost(None)
    h.frontend.connectionLost(None)
    assert " 101 " in lines[0]
    assert lines[1].endswith("tunnel 0ms in=3 out=5 closed-by=server")
    bad = Harness(config=LOGGING)
    bad.proxy_header()
    bad.send(b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n")
    assert "400 " in lines[2] and "<BADREQ>" in lines[2]


def test_access_log_is_off_by_default(lines: list[str]) -> None:
    h = Harness()
    h.proxy_header()
    h.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
    backend, _ = h.accept()
    backend.dataReceived(ok())
    assert lines == []


def test_engine_io_requests_are_logged_with_their_decision_and_never_a_whole_sid(
    lines: list[str],
) -> None:
    h = Harness(config=LOGGING)
    h.proxy_header()
    h.send(b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: app\r\n\r\n")
    backend, _ = h.accept()
    body = b'0{"sid":"SecretSessionId12345","pingInterval":25000,"pingTimeout":20000}'
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    h.send(b"GET /socket.io/?EIO=4&transport=polling&sid=SecretSessionId12345 HTTP/1.1\r\n")
    h.send(b"Host: app\r\n\r\n")
    backend.dataReceived(ok(b"6"))
    assert " sid-table " in lines[1]
    assert lines[1].endswith('"GET /socket.io/?EIO=4&transport=polling&sid=Secr... HTTP/1.1"')
    # A refused request (two sids) is logged without either.
    h.send(b"GET /socket.io/?EIO=4&sid=SecretSessionId12345&sid=OtherSecretSid678 HTTP/1.1\r\n")
    h.send(b"Host: app\r\n\r\n")
    assert " 400 " in lines[2]
    assert "SecretSession" not in lines[2] and "OtherSecret" not in lines[2]
