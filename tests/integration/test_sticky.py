"""stickyproxy end to end: a real HAProxy in TCP mode in front, real backends behind.

Clients connect from different loopback source addresses (127.0.0.N), so the
PROXY header HAProxy sends carries a different client address for each, as an
ELB would for clients on the internet.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import subprocess
import time
from collections.abc import Iterator
from typing import Literal

import pytest
import pytest_twisted  # type: ignore[import-untyped]

from .harness import (
    Backend,
    Launcher,
    Proxy,
    http_get,
    proxy_config,
    proxy_v1,
    raw_request,
    send_with_proxy_header,
    websocket_exchange,
)

pytestmark = pytest.mark.usefixtures("haproxy_binary")

COOKIE = "storify_editor_host"
MIB = 1024 * 1024


def source(n: int) -> str:
    """The n-th client address on loopback."""
    return f"127.0.{n // 250}.{n % 250 + 2}"


def get(
    port: int, path: str, *, src: str = "127.0.0.1", cookie: str | None = None
) -> http.client.HTTPResponse:
    """One GET on a new connection from ``src``; the body is read."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(src, 0))
    headers = {"Cookie": cookie} if cookie else {}
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def served_by(port: int, *, src: str = "127.0.0.1", cookie: str | None = None) -> str:
    response = get(port, "/whoami", src=src, cookie=cookie)
    assert response.status == 200
    return str(response.getheader("X-Backend"))


def states(proxy: Proxy) -> dict[str, str]:
    assert proxy.admin_port is not None
    body = http_get(proxy.admin_port, "/stats.json").body
    return {s["name"]: s["state"] for s in json.loads(body)["servers"]}


def wait_for_state(proxy: Proxy, name: str, state: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while states(proxy)[name] != state:
        assert time.monotonic() < deadline, f"{name} never became {state}: {states(proxy)}"
        time.sleep(0.1)


def set_health(backend: Backend, ok: bool) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", backend.port, timeout=5)
    conn.request("POST", f"/_health?ok={int(ok)}")
    assert conn.getresponse().status == 200
    conn.close()


@pytest.fixture
def backends(launch: Launcher) -> list[Backend]:
    return launch.backends(["s1", "s2", "s3"])


@pytest.fixture
def proxy(launch: Launcher, backends: list[Backend]) -> Proxy:
    return launch.stickyproxy(proxy_config(backends))


@pytest.fixture
def front(launch: Launcher, proxy: Proxy) -> Iterator[int]:
    """The port of HAProxy, the L4 balancer, sending PROXY v2 to stickyproxy."""
    yield launch.haproxy_l4(proxy.port, send_proxy="v2").port


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_first_response_carries_the_cookie_and_the_proxy_header_address_is_used(
    launch: Launcher, proxy: Proxy, version: Literal["v1", "v2"]
) -> None:
    port = launch.haproxy_l4(proxy.port, send_proxy=version).port
    response = get(port, "/whoami", src="127.0.0.77")
    server = response.getheader("X-Backend")
    assert response.getheader("Set-Cookie") == f"{COOKIE}={server}; path=/"
    assert response.getheader("Cache-Control") == "private"
    seen = json.loads(http_get(port, "/headers", headers={"X-Forwarded-For": "6.6.6.6"}).body)
    assert ["X-Forwarded-For", "127.0.0.1"] in seen["headers"]
    assert all(name.lower() != "cookie" for name, _ in seen["headers"])
    routed = json.loads(get_body(port, "/headers", src="127.0.0.77"))
    assert ["X-Forwarded-For", "127.0.0.77"] in routed["headers"]


def get_body(port: int, path: str, *, src: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(src, 0))
    conn.request("GET", path)
    body = conn.getresponse().read()
    conn.close()
    return body


def test_keep_alive_requests_and_new_connections_with_the_cookie_stay_on_one_server(
    front: int,
) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", front, timeout=10)
    conn.request("GET", "/whoami")
    first = conn.getresponse()
    first.read()
    server = first.getheader("X-Backend")
    cookie = str(first.getheader("Set-Cookie")).split(";")[0]
    assert cookie == f"{COOKIE}={server}"
    for _ in range(50):
        conn.request("GET", "/whoami", headers={"Cookie": f"a=1; {cookie}"})
        response = conn.getresponse()
        assert response.read() == str(server).encode()
        assert response.getheader("Set-Cookie") is None
    conn.close()
    # New connections from other addresses, same cookie: same server.
    assert {served_by(front, src=source(n), cookie=cookie) for n in range(20)} == {server}


def test_clients_without_a_cookie_spread_and_each_keeps_its_server(front: int) -> None:
    first = {n: served_by(front, src=source(n)) for n in range(30)}
    again = {n: served_by(front, src=source(n)) for n in range(30)}
    assert first == again
    assert len(set(first.values())) == 3


def test_curl_gets_the_cookie_and_is_pinned_by_it(front: int, tmp_path: object) -> None:
    jar = f"{tmp_path}/jar"
    run = ["curl", "-s", "-b", jar, "-c", jar, f"http://127.0.0.1:{front}/whoami"]
    served = {subprocess.run(run, capture_output=True, check=True).stdout for _ in range(5)}
    assert len(served) == 1
    with open(jar) as f:
        assert COOKIE in f.read()


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_treq_with_a_cookie_jar_stays_on_one_server(front: int) -> None:
    from http.cookiejar import CookieJar

    import treq
    from twisted.internet import reactor
    from twisted.web.client import Agent, CookieAgent

    jar = CookieJar()
    client = treq.client.HTTPClient(CookieAgent(Agent(reactor), jar))
    served = set()
    for _ in range(10):
        response = await client.get(f"http://127.0.0.1:{front}/whoami")
        served.add(await response.text())
    assert len(served) == 1
    assert [c.name for c in jar] == [COOKIE]


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_a_websocket_through_the_proxy_echoes_1000_messages(front: int) -> None:
    from twisted.internet import reactor

    messages: list[bytes | str] = [f"message {i}" for i in range(1000)]
    exchange = await websocket_exchange(reactor, front, messages)
    assert exchange.replies == [(m.encode(), False) for m in messages]  # type: ignore[union-attr]
    server = exchange.response_headers["x-backend"]
    assert exchange.greeting == f"hello from {server}".encode()
    assert exchange.response_headers["set-cookie"] == f"{COOKIE}={server}; path=/"


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_a_websocket_follows_the_cookie(front: int) -> None:
    from twisted.internet import reactor

    exchange = await websocket_exchange(reactor, front, ["hi"], headers={"Cookie": f"{COOKIE}=s3"})
    assert exchange.greeting == b"hello from s3"
    assert "set-cookie" not in exchange.response_headers


def test_taking_a_backend_down_moves_only_its_clients_and_they_come_back(
    front: int, proxy: Proxy, backends: list[Backend]
) -> None:
    clients = range(40)
    before = {n: served_by(front, src=source(n)) for n in clients}
    victim = max(("s1", "s2", "s3"), key=lambda s: list(before.values()).count(s))
    backend = next(b for b in backends if b.name == victim)

    set_health(backend, ok=False)
    wait_for_state(proxy, victim, "DOWN")
    during = {n: served_by(front, src=source(n)) for n in clients}
    for n in clients:
        if before[n] == victim:
            assert during[n] != victim
        else:
            assert during[n] == before[n], "a client of a healthy server moved"
    # A client pinned to the DOWN server is re-routed and re-pinned.
    response = get(front, "/whoami", cookie=f"{COOKIE}={victim}")
    assert response.getheader("X-Backend") != victim
    assert response.getheader("Set-Cookie") == f"{COOKIE}={response.getheader('X-Backend')}; path=/"

    set_health(backend, ok=True)
    wait_for_state(proxy, victim, "UP")
    assert {n: served_by(front, src=source(n)) for n in clients} == before


def test_an_open_websocket_survives_its_server_going_down(
    proxy: Proxy, backends: list[Backend]
) -> None:
    import socket

    upgrade = (
        b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Cookie: " + COOKIE.encode() + b"=s2\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    mask = b"\x01\x02\x03\x04"

    def frame(payload: bytes) -> bytes:
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return bytes([0x81, 0x80 | len(payload)]) + mask + masked

    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(proxy_v1() + upgrade)
        received = b""
        while b"hello from s2" not in received:
            received += sock.recv(4096)
        set_health(backends[1], ok=False)
        wait_for_state(proxy, "s2", "DOWN")
        sock.sendall(frame(b"still here"))
        while b"still here" not in received:
            chunk = sock.recv(4096)
            assert chunk, "the tunnel was closed"
            received += chunk


def test_no_usable_server_answers_503(front: int, proxy: Proxy, backends: list[Backend]) -> None:
    for backend in backends:
        set_health(backend, ok=False)
    for backend in backends:
        wait_for_state(proxy, backend.name, "DOWN")
    response = get(front, "/whoami")
    assert response.status == 503
    assert response.getheader("Content-Type") == "text/html"


def test_a_200_mb_upload_streams_through_with_flat_memory(front: int, proxy: Proxy) -> None:
    total = 200 * MIB
    block = hashlib.sha256(b"block").digest() * (MIB // 32)
    digest = hashlib.sha256()

    def body() -> Iterator[bytes]:
        for _ in range(total // MIB):
            digest.update(block)
            yield block

    conn = http.client.HTTPConnection("127.0.0.1", front, timeout=60)
    conn.request("POST", "/upload", body=body(), headers={"Content-Length": str(total)})
    response = conn.getresponse()
    answer = json.loads(response.read())
    conn.close()
    assert response.status == 200
    assert answer == {"bytes": total, "sha256": digest.hexdigest()}
    peak_kib = peak_rss_kib(proxy.proc.pid)
    assert peak_kib < 100 * 1024, f"the proxy's peak RSS was {peak_kib} KiB"


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_request_without_a_proxy_header_is_closed_without_a_response(proxy: Proxy) -> None:
    assert raw_request(proxy.port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n") == b""


def test_a_malformed_request_gets_400_and_other_clients_are_unaffected(
    proxy: Proxy, front: int
) -> None:
    bad = send_with_proxy_header(
        proxy.port, proxy_v1(), b"GET / HTTP/1.1\r\nHost: t\r\nBad Name: x\r\n\r\n"
    )
    assert bad.startswith(b"HTTP/1.1 400 ")
    assert b"Connection: close" in bad
    assert served_by(front) in {"s1", "s2", "s3"}
