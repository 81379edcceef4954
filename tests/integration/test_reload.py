"""Reloading the configuration with SIGHUP drops nothing."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

from .harness import Backend, Launcher, Proxy, http_get, proxy_config, proxy_v1

COOKIE = "storify_editor_host"
UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def frame(payload: bytes) -> bytes:
    """A masked text frame (RFC 6455 §5.2), as a client sends it."""
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


def config_file(proxy: Proxy) -> Path:
    return next(Path(proxy.log_path).parent.glob("stickyproxy-*.ini"))


def reload(proxy: Proxy, timeout: float = 10.0) -> None:
    """Send SIGHUP and wait until the proxy logged the outcome."""
    log = Path(proxy.log_path)
    before = log.read_text().count("configuration reloaded") + log.read_text().count(
        "reload refused"
    )
    os.kill(proxy.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text()
        if text.count("configuration reloaded") + text.count("reload refused") > before:
            return
        assert time.monotonic() < deadline, "no reload logged"
        time.sleep(0.05)


def server_names(proxy: Proxy) -> list[str]:
    assert proxy.admin_port is not None
    return [
        s["name"] for s in json.loads(http_get(proxy.admin_port, "/stats.json").body)["servers"]
    ]


def test_a_websocket_open_across_ten_reloads_keeps_echoing(launch: Launcher) -> None:
    backends = launch.backends(["s1", "s2"])
    proxy = launch.stickyproxy(proxy_config(backends))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(proxy_v1() + UPGRADE)
        received = b""
        while b"hello from" not in received:
            received += sock.recv(4096)
        for n in range(10):
            reload(proxy)
            payload = b"after reload %d" % n
            sock.sendall(frame(payload))
            while payload not in received:
                chunk = sock.recv(4096)
                assert chunk, f"the tunnel closed at reload {n}"
                received += chunk


def test_keep_alive_load_across_a_reload_sees_no_error(launch: Launcher) -> None:
    backends = launch.backends(["s1", "s2", "s3"])
    proxy = launch.stickyproxy(proxy_config(backends[:2], proxy={"proxy_protocol": "off"}))
    errors: list[str] = []
    served: list[str] = []
    stop = threading.Event()

    def load() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                conn.request("GET", "/whoami")
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    errors.append(f"status {response.status}")
                served.append(body.decode())
            except (OSError, http.client.HTTPException) as e:
                errors.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        conn.close()

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        path = config_file(proxy)
        path.write_text(proxy_config(backends, proxy={"proxy_protocol": "off"}))
        reload(proxy)
        time.sleep(0.5)
        reload(proxy)
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert errors == []
    assert len(served) > 20
    assert server_names(proxy) == ["s1", "s2", "s3"]


def test_a_bad_configuration_is_refused_and_the_old_one_kept(launch: Launcher) -> None:
    backend: Backend = launch.backend("s1")
    proxy = launch.stickyproxy(proxy_config([backend], proxy={"proxy_protocol": "off"}))
    path = config_file(proxy)
    good = path.read_text()
    path.write_text(good + "\n[backend editors]\nbalance = source\n")
    reload(proxy)
    log = Path(proxy.log_path).read_text()
    assert "reload refused" in log and "[backend editors]" in log
    assert http_get(proxy.port, "/whoami").body == b"s1"


def test_a_reload_changes_routing_for_new_requests(launch: Launcher) -> None:
    backends = launch.backends(["s1", "s2"])
    proxy = launch.stickyproxy(proxy_config(backends[:1], proxy={"proxy_protocol": "off"}))
    assert http_get(proxy.port, "/whoami", cookie=f"{COOKIE}=s2").body == b"s1"
    config_file(proxy).write_text(proxy_config(backends, proxy={"proxy_protocol": "off"}))
    reload(proxy)
    assert http_get(proxy.port, "/whoami", cookie=f"{COOKIE}=s2").body == b"s2"


def test_the_admin_reload_command_reloads(launch: Launcher) -> None:
    import subprocess
    import sys

    backends = launch.backends(["s1", "s2"])
    proxy = launch.stickyproxy(proxy_config(backends[:1], proxy={"proxy_protocol": "off"}))
    config_file(proxy).write_text(proxy_config(backends, proxy={"proxy_protocol": "off"}))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stickyproxy",
            "ctl",
            "--admin",
            f"127.0.0.1:{proxy.admin_port}",
            "reload",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "reloaded\n"
    assert server_names(proxy) == ["s1", "s2"]
