"""The harness itself: demo backends, HAProxy as the L4 front, process control.

These run without stickyproxy, so they prove that the pieces the proxy tests
stand on (backends that say who they are, HAProxy started on an inherited
socket, bounded waits, clean teardown) work on their own.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, NamedTuple

import pytest
import pytest_twisted  # type: ignore[import-untyped]

from .harness import (
    Backend,
    Launcher,
    ProcessNotReadyError,
    http_get,
    http_request,
    proxy_config,
    proxy_v1,
    proxy_v2,
    raw_request,
    send_with_proxy_header,
    spawn,
    wait_for_file,
    websocket_exchange,
)

MIB = 1024 * 1024


def _pattern(size: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


def _upload_blocks(count: int) -> Iterator[bytes]:
    """``count`` distinct, reproducible 1 MiB blocks."""
    for index in range(count):
        yield hashlib.sha256(index.to_bytes(4, "big")).digest() * (MIB // 32)


class _Server(NamedTuple):
    name: str
    port: int


def _refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


# -- demo backends ---------------------------------------------------------------------------


def test_backend_names_itself_in_whoami_and_in_x_backend(backend: Backend) -> None:
    status, headers, body = http_get(backend.port, "/whoami")

    assert status == 200
    assert body == b"s1"
    assert headers["X-Backend"] == "s1"
    assert headers["Content-Type"].startswith("text/plain")


def test_headers_shows_the_request_head_as_sent_with_the_client_address(
    backend: Backend,
) -> None:
    request = (
        b"GET /headers HTTP/1.1\r\n"
        b"host: example.test\r\n"
        b"cookie: a=1; storify_editor_host=s2\r\n"
        b"X-Forwarded-For:   198.51.100.1  \r\n"
        b"Cookie: b=2\r\n"
        b"Connection: close\r\n"
        b"\r\n"
    )

    response = raw_request(backend.port, request)

    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    seen = json.loads(body)
    assert seen["headers"] == [
        ["host", "example.test"],
        ["cookie", "a=1; storify_editor_host=s2"],
        ["X-Forwarded-For", "198.51.100.1"],
        ["Cookie", "b=2"],
        ["Connection", "close"],
    ]
    assert seen["client"][0] == "127.0.0.1"


def test_upload_of_50_mib_answers_its_byte_count_and_sha256(backend: Backend) -> None:
    expected = hashlib.sha256()
    for block in _upload_blocks(50):
        expected.update(block)

    status, _, body = http_request(
        backend.port,
        "POST",
        "/upload",
        body=_upload_blocks(50),
        headers={"Content-Length": str(50 * MIB)},
        timeout=30,
    )

    assert status == 200
    assert json.loads(body) == {"bytes": 50 * MIB, "sha256": expected.hexdigest()}


def test_upload_accepts_a_chunked_body(backend: Backend) -> None:
    blocks = list(_upload_blocks(3))

    status, _, body = http_request(backend.port, "POST", "/upload", body=iter(blocks))

    assert status == 200
    assert json.loads(body) == {
        "bytes": 3 * MIB,
        "sha256": hashlib.sha256(b"".join(blocks)).hexdigest(),
    }


def test_big_streams_the_byte_pattern_with_a_content_length(backend: Backend) -> None:
    size = 3 * MIB + 7

    status, headers, body = http_get(backend.port, f"/big?size={size}")

    assert status == 200
    assert headers["Content-Length"] == str(size)
    assert body == _pattern(size)


def test_chunked_sends_the_requested_number_of_chunks(backend: Backend) -> None:
    request = b"GET /chunked?n=3 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"

    response = raw_request(backend.port, request)

    head, _, body = response.partition(b"\r\n\r\n")
    assert b"\r\nTransfer-Encoding: chunked" in head
    assert body == b"8\r\nchunk 0\n\r\n8\r\nchunk 1\n\r\n8\r\nchunk 2\n\r\n0\r\n\r\n"


def test_health_check_fails_while_health_is_off_and_recovers(launch: Launcher) -> None:
    backend = launch.backend("s1")
    assert http_get(backend.port, "/status?all=1")[:1] == (200,)

    http_request(backend.port, "POST", "/_health?ok=0")
    down = http_get(backend.port, "/status?all=1")
    http_request(backend.port, "POST", "/_health?ok=1")
    up = http_get(backend.port, "/status?all=1")

    assert (down.status, down.body) == (503, b"DOWN s1\n")
    assert (up.status, up.body) == (200, b"OK s1\n")


def test_setcookie_sends_the_proxy_cookie_and_another(backend: Backend) -> None:
    _, headers, _ = http_get(backend.port, "/setcookie")

    assert headers.get_all("Set-Cookie") == ["storify_editor_host=fromapp", "other=1"]


def test_cache_adds_last_modified_only_when_asked(backend: Backend) -> None:
    plain = http_get(backend.port, "/cache")
    dated = http_get(backend.port, "/cache?lm=1&cc=no-cache")

    assert "Last-Modified" not in plain.headers
    assert "Last-Modified" in dated.headers
    assert dated.headers["Cache-Control"] == "no-cache"


def test_close_ends_the_connection_without_a_response(backend: Backend) -> None:
    request = b"GET /close HTTP/1.1\r\nHost: t\r\n\r\n"

    assert raw_request(backend.port, request) == b""


def test_index_page_is_titled_with_the_backend_name(backend: Backend) -> None:
    status, headers, body = http_get(backend.port, "/")

    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert b"<title>Served by s1</title>" in body
    assert b'"/ws"' in body


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_websocket_greets_then_echoes_1000_messages_in_order(backend: Backend) -> None:
    from twisted.internet import reactor

    messages: list[bytes | str] = [
        f"message {index}" if index % 2 else index.to_bytes(4, "big") for index in range(1000)
    ]

    exchange = await websocket_exchange(reactor, backend.port, messages)

    assert exchange.greeting == b"hello from s1"
    assert exchange.response_headers["x-backend"] == "s1"
    assert exchange.replies == [
        (item.encode(), False) if isinstance(item, str) else (item, True) for item in messages
    ]


def _masked_text_frame(payload: bytes) -> bytes:
    # RFC 6455 section 5.2: FIN + text opcode, then a masked payload under 126 bytes.
    mask = b"\x01\x02\x03\x04"
    masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


def test_websocket_frames_sent_with_the_upgrade_request_are_echoed(backend: Backend) -> None:
    upgrade = (
        b"GET /ws HTTP/1.1\r\n"
        b"Host: t\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n"
        b"\r\n"
    )
    expected_tail = b"\x81\x0dhello from s1\x81\x05early"

    with socket.create_connection(("127.0.0.1", backend.port), timeout=5) as sock:
        sock.sendall(upgrade + _masked_text_frame(b"early"))
        received = b""
        while not received.endswith(expected_tail) and (chunk := sock.recv(4096)):
            received += chunk

    assert received.startswith(b"HTTP/1.1 101 ")
    assert received.endswith(expected_tail)


# -- HAProxy as the L4 front ---------------------------------------------------------------


@pytest.mark.usefixtures("haproxy_binary")
def test_haproxy_l4_without_proxy_header_relays_http_to_a_backend(
    launch: Launcher, backend: Backend
) -> None:
    haproxy = launch.haproxy_l4(backend.port, send_proxy="none")

    status, headers, body = http_get(haproxy.port, "/whoami")
    seen = json.loads(http_get(haproxy.port, "/headers").body)

    assert (status, body, headers["X-Backend"]) == (200, b"s1", "s1")
    assert seen["client"][0] == "127.0.0.1"
    assert "Name: HAProxy" in haproxy.command("show info")


@pytest.mark.usefixtures("haproxy_binary")
@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_haproxy_l4_relays_a_websocket(launch: Launcher, backend: Backend) -> None:
    from twisted.internet import reactor

    haproxy = launch.haproxy_l4(backend.port, send_proxy="none")

    exchange = await websocket_exchange(reactor, haproxy.port, ["one", b"\x00two"])

    assert exchange.greeting == b"hello from s1"
    assert exchange.replies == [(b"one", False), (b"\x00two", True)]


@pytest.mark.usefixtures("haproxy_binary")
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_haproxy_l4_prepends_the_proxy_header_our_builders_produce(
    launch: Launcher, version: Literal["v1", "v2"]
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as target:
        target.settimeout(5)
        haproxy = launch.haproxy_l4(target.getsockname()[1], send_proxy=version)
        with socket.create_connection(("127.0.0.1", haproxy.port), timeout=5) as client:
            client.sendall(b"payload")
            client.shutdown(socket.SHUT_WR)
            upstream, _ = target.accept()
            with upstream:
                upstream.settimeout(5)
                received = b""
                while chunk := upstream.recv(4096):
                    received += chunk
            client_port = client.getsockname()[1]

    build = proxy_v1 if version == "v1" else proxy_v2
    assert received == build("127.0.0.1", "127.0.0.1", client_port, haproxy.port) + b"payload"


# -- stickyproxy ------------------------------------------------------------------------------


def test_stickyproxy_reports_its_ports_and_serves_behind_a_proxy_header(
    launch: Launcher, backend: Backend
) -> None:
    proxy = launch.stickyproxy(proxy_config([backend]))
    request = b"GET /whoami HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"

    response = send_with_proxy_header(proxy.port, proxy_v1(), request)

    assert response.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nX-Backend: s1\r\n" in response
    assert response.endswith(b"\r\n\r\ns1")
    assert proxy.admin_port is not None
    assert not _refuses_connections(proxy.admin_port)


# -- process control ---------------------------------------------------------------------------


def test_a_process_that_exits_early_fails_with_its_status_and_output(tmp_path: Path) -> None:
    proc = spawn("early", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"], tmp_path)

    with pytest.raises(ProcessNotReadyError, match=r"(?s)status 3.*boom"):
        wait_for_file(proc, tmp_path / "never")


def test_a_silent_process_is_stopped_when_the_wait_runs_out(tmp_path: Path) -> None:
    proc = spawn("silent", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path)

    with pytest.raises(ProcessNotReadyError, match="gave up waiting"):
        wait_for_file(proc, tmp_path / "never", timeout=0.2)

    assert not proc.running()


def test_stop_kills_a_process_that_ignores_sigterm(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    script = (
        "import pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "pathlib.Path(sys.argv[1]).write_text('ok')\n"
        "time.sleep(60)\n"
    )
    proc = spawn("stubborn", [sys.executable, "-c", script, str(ready)], tmp_path)
    wait_for_file(proc, ready)

    proc.stop(timeout=0.2)

    assert proc.popen.returncode == -signal.SIGKILL


def test_launcher_stops_every_process_it_started(tmp_path: Path) -> None:
    launcher = Launcher(tmp_path)
    try:
        started = launcher.backends(["a", "b"])
    finally:
        launcher.stop_all()

    assert [backend.proc.running() for backend in started] == [False, False]
    assert all(_refuses_connections(backend.port) for backend in started)


# -- configuration text --------------------------------------------------------------------


def test_proxy_config_has_a_server_per_backend_and_merges_overrides() -> None:
    servers = [_Server("s1", 1001), _Server("s2", 1002)]

    text = proxy_config(
        servers,
        proxy={"proxy_protocol": "off", "trusted_proxies": None},
        **{"server s2": {"weight": "20"}},
    )

    ini = configparser.ConfigParser(interpolation=None)
    ini.read_string(text)
    assert ini["proxy"]["listen"] == "tcp:0:interface=127.0.0.1"
    assert ini["proxy"]["proxy_protocol"] == "off"
    assert "trusted_proxies" not in ini["proxy"]
    assert ini["health"]["interval"] == "1s"
    assert dict(ini["server s1"]) == {"address": "127.0.0.1:1001", "cookie": "s1", "weight": "10"}
    assert dict(ini["server s2"]) == {"address": "127.0.0.1:1002", "cookie": "s2", "weight": "20"}
