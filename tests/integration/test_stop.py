"""SIGTERM: requests in flight finish, WebSockets are told to go away, then exit."""

from __future__ import annotations

import http.client
import signal
import socket
import threading
import time

from .harness import Launcher, proxy_config, proxy_v1

UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def test_sigterm_finishes_requests_and_closes_websockets_with_1001(launch: Launcher) -> None:
    backends = launch.backends(["s1", "s2"])
    proxy = launch.stickyproxy(
        proxy_config(backends, proxy={"grace_period": "5s", "close_spread_time": "1s"})
    )
    sockets = []
    for n in range(3):
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        sock.sendall(proxy_v1(source=f"198.51.100.{n}") + UPGRADE)
        received = b""
        while b"hello from" not in received:
            received += sock.recv(4096)
        sockets.append(sock)

    slow: dict[str, object] = {}

    def slow_request() -> None:
        conn = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        conn.sendall(proxy_v1() + b"GET /slow?delay=1 HTTP/1.1\r\nHost: t\r\n\r\n")
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
        slow["response"] = data
        conn.close()

    thread = threading.Thread(target=slow_request)
    thread.start()
    time.sleep(0.3)
    started = time.monotonic()
    proxy.proc.popen.send_signal(signal.SIGTERM)
    thread.join(timeout=15)
    response = slow.get("response")
    assert isinstance(response, bytes) and response.startswith(b"HTTP/1.1 200 ")
    assert b"Connection: close" in response

    for sock in sockets:
        tail = b""
        while chunk := sock.recv(4096):
            tail += chunk
        sock.close()
        assert tail.endswith(b"\x88\x02\x03\xe9"), tail
    # twistd ends by re-raising the signal; systemd counts that as a clean stop.
    assert proxy.proc.popen.wait(timeout=15) in (0, -signal.SIGTERM)
    assert time.monotonic() - started < 10
    # New connections are refused once it stopped listening.
    try:
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
    except OSError:
        pass
    else:
        raise AssertionError("still accepting after SIGTERM")


def test_no_keep_alive_connection_outlives_a_stop(launch: Launcher) -> None:
    backend = launch.backend("s1")
    proxy = launch.stickyproxy(proxy_config([backend], proxy={"proxy_protocol": "off"}))
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    conn.request("GET", "/whoami")
    assert conn.getresponse().read() == b"s1"
    proxy.proc.popen.send_signal(signal.SIGTERM)
    # twistd ends by re-raising the signal; systemd counts that as a clean stop.
    assert proxy.proc.popen.wait(timeout=15) in (0, -signal.SIGTERM)
    conn.close()
