"""Reference cases (HAProxy semantics, section 12) that need real sockets and processes.

The cases themselves are checked in memory by ``tests/test_reference_cases.py``.
What only real processes show is whether one connection's trouble reaches
another's: a flood of malformed connections must leave well-formed clients on
other connections with correct answers ("no collateral damage"), and the
frontend ``maxconn`` must make the proxy stop accepting, leaving further
clients waiting in the kernel's backlog, instead of failing them.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from .harness import Backend, Launcher, Proxy, http_get, proxy_config, proxy_v1, raw_request

COOKIE = "storify_editor_host"


def connections(proxy: Proxy) -> int:
    """How many client connections the proxy holds, from its admin listener."""
    assert proxy.admin_port is not None
    body = http_get(proxy.admin_port, "/stats.json").body
    return int(json.loads(body)["frontend"]["connections"])


def wait_for_connections(
    proxy: Proxy, done: Callable[[int], bool], what: str, timeout: float = 10.0
) -> int:
    deadline = time.monotonic() + timeout
    while not done(count := connections(proxy)):
        assert time.monotonic() < deadline, f"the proxy never held {what} connections: {count}"
        time.sleep(0.05)
    return count


def client(port: int, source: str) -> http.client.HTTPConnection:
    """A keep-alive HTTP connection whose PROXY header names ``source``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(proxy_v1(source))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.sock = sock
    return conn


def whoami(conn: http.client.HTTPConnection, cookie: str | None = None) -> tuple[int, str]:
    conn.request("GET", "/whoami", headers={"Cookie": cookie} if cookie else {})
    response = conn.getresponse()
    return response.status, response.read().decode()


# -- no collateral damage ---------------------------------------------------------------------

_GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
_V2_VERSION_3 = b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c" + bytes(12)
_CLIENT_HELLO = bytes.fromhex("16030100f4010000f00303") + bytes(32)

#: What each kind of bad client sends, and how the proxy must answer it.
_MALFORMED: dict[str, tuple[bytes, bytes]] = {
    "no_proxy_header": (_GET, b""),
    "bad_v1_header": (b"PROXY TCP4 001.2.3.4 127.0.0.1 1 2\r\n" + _GET, b""),
    "bad_v2_header": (_V2_VERSION_3 + _GET, b""),
    "tls_hello": (_CLIENT_HELLO, b""),
    "binary_after_header": (proxy_v1() + b"\x00\x01\x02\r\n\r\n", b"HTTP/1.1 400 "),
    "conflicting_lengths": (
        proxy_v1()
        + b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 400 ",
    ),
    "smuggling_te": (
        proxy_v1() + b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 400 ",
    ),
    "oversized_head": (
        proxy_v1() + b"GET / HTTP/1.1\r\nHost: t\r\nX: " + b"x" * 16000 + b"\r\n\r\n",
        b"HTTP/1.1 431 ",
    ),
}


def _malformed(kind: str, port: int) -> tuple[str, bytes]:
    data, _ = _MALFORMED[kind]
    return kind, raw_request(port, data, read_timeout=10)


def _abandoned(port: int) -> None:
    """Half a request, then a reset instead of the rest."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(proxy_v1() + b"GET /never HTTP/1.1\r\nHost: t\r\nX-Par")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _silent(port: int) -> None:
    socket.create_connection(("127.0.0.1", port), timeout=10).close()


@pytest.fixture
def backends(launch: Launcher) -> list[Backend]:
    return launch.backends(["s1", "s2", "s3"])


def test_a_flood_of_malformed_connections_does_not_disturb_well_formed_clients(
    launch: Launcher, backends: list[Backend]
) -> None:
    proxy = launch.stickyproxy(proxy_config(backends))
    port = proxy.port
    # Where cookie-less clients from these addresses live before the flood.
    sources = [f"198.51.100.{n}" for n in range(1, 11)]
    home = {}
    for source in sources:
        conn = client(port, source)
        home[source] = whoami(conn)
        conn.close()
    pinned = client(port, "198.51.100.200")

    rounds = 60
    with ThreadPoolExecutor(max_workers=16) as pool:
        answered = [
            pool.submit(_malformed, kind, port) for _ in range(rounds) for kind in _MALFORMED
        ]
        dropped = [pool.submit(_abandoned, port) for _ in range(rounds)]
        dropped += [pool.submit(_silent, port) for _ in range(rounds)]
        flood: list[Future[Any]] = [*answered, *dropped]
        good = 0
        # Well-formed clients keep asking until the flood is over: a pinned
        # keep-alive connection, and new connections hashed by address.
        while good < 60 or not all(f.done() for f in flood):
            assert whoami(pinned, f"{COOKIE}=s2") == (200, "s2")
            source = sources[good % len(sources)]
            fresh = client(port, source)
            assert whoami(fresh) == home[source]
            fresh.close()
            good += 1
            assert good < 10000, "the flood never ended"
        for future in dropped:
            future.result()
        results = [future.result() for future in answered]

    for kind, received in results:
        expected = _MALFORMED[kind][1]
        if expected:
            assert received.startswith(expected), (kind, received[:100])
        else:
            assert received == b"", (kind, received[:100])
    assert proxy.proc.running()
    assert whoami(pinned, f"{COOKIE}=s2") == (200, "s2")
    pinned.close()
    # Every connection, good or bad, is gone: nothing leaked.
    wait_for_connections(proxy, lambda n: n == 0, "zero")


# -- frontend maxconn -------------------------------------------------------------------------


@pytest.fixture
def limited(launch: Launcher) -> Iterator[Proxy]:
    """A proxy accepting at most 4 client connections, which may idle for 30 s."""
    backend = launch.backend("s1")
    yield launch.stickyproxy(
        proxy_config([backend], proxy={"maxconn": "4", "timeout_http_request": "30s"})
    )


def _idle(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(proxy_v1())
    return sock


def _request(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(proxy_v1() + b"GET /whoami HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    return sock


def _read_all(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_at_maxconn_new_clients_wait_in_the_backlog_and_are_served_once_a_slot_frees(
    limited: Proxy,
) -> None:
    holders = [_idle(limited.port) for _ in range(4)]
    wait_for_connections(limited, lambda n: n == 4, "4")
    waiting = [_request(limited.port) for _ in range(10)]
    try:
        # Connected (the kernel completed the handshakes) but not accepted:
        # no answer and no reset, and the proxy still holds only 4.
        waiting[0].settimeout(0.5)
        with pytest.raises(TimeoutError):
            waiting[0].recv(1)
        assert connections(limited) == 4
        holders.pop().close()
        for sock in waiting:
            response = _read_all(sock)
            assert response.startswith(b"HTTP/1.1 200 "), response[:200]
            assert response.endswith(b"s1")
        wait_for_connections(limited, lambda n: n == 3, "3")
        assert limited.proc.running()
    finally:
        for sock in holders + waiting:
            sock.close()


def test_a_burst_of_connections_beyond_maxconn_is_not_accepted_all_at_once(
    limited: Proxy,
) -> None:
    # A busy proxy finds many connections in its backlog at once. Pausing it
    # while they arrive makes that happen on every run.
    os.kill(limited.proc.pid, signal.SIGSTOP)
    try:
        burst = [_idle(limited.port) for _ in range(12)]
    finally:
        os.kill(limited.proc.pid, signal.SIGCONT)
    try:
        wait_for_connections(limited, lambda n: n >= 4, "at least 4")
        assert connections(limited) == 4
    finally:
        for sock in burst:
            sock.close()
