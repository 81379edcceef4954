"""Several worker processes behind one listening socket: real processes, real signals.

The master is run as ``python -m stickyproxy.workers``; its ready file names
the shared listener and each worker's pid and status endpoint, and each
worker's ``/stats.json`` shows what that worker served.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from .harness import (
    Backend,
    Launcher,
    Proc,
    http_get,
    proxy_config,
    proxy_v1,
    spawn,
    wait_for_file,
)

COOKIE = "storify_editor_host"
UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
#: A WebSocket Close frame with status 1001, "going away" (RFC 6455 §5.5.1, §7.4.1).
CLOSE_1001 = b"\x88\x02\x03\xe9"
WAIT = 15.0


@dataclass
class Master:
    proc: Proc
    config: Path
    ready: Path

    def info(self) -> dict[str, Any]:
        return dict(json.loads(self.ready.read_text()))

    @property
    def port(self) -> int:
        return int(self.info()["listen"][0][1])

    def admin_ports(self) -> list[int]:
        return [int(w["admin"][1]) for w in self.info()["workers"]]

    def pids(self) -> list[int]:
        return [int(w["pid"]) for w in self.info()["workers"]]

    def stats(self) -> list[dict[str, Any]]:
        """Each worker's ``/stats.json``, in worker order."""
        return [json.loads(http_get(port, "/stats.json").body) for port in self.admin_ports()]

    def log(self) -> str:
        return self.proc.log_path.read_text()


@pytest.fixture
def workers(launch: Launcher, tmp_path: Path) -> Iterator[Any]:
    """Start a master with N workers; every worker still running at teardown is killed."""
    started: list[Master] = []

    def start(config_text: str, count: int = 3) -> Master:
        config = tmp_path / f"workers-{len(started)}.ini"
        config.write_text(config_text)
        ready = tmp_path / f"workers-{len(started)}.ready"
        argv = [sys.executable, "-m", "stickyproxy.workers", "-c", str(config)]
        argv += ["--workers", str(count), "--ready-file", str(ready)]
        proc = spawn("workers", argv, tmp_path)
        launch.procs.append(proc)
        master = Master(proc, config, ready)
        started.append(master)
        wait_for_file(proc, ready)
        return master

    try:
        yield start
    finally:
        # The launcher stops each master by pid, and a master stops its
        # workers; these are the workers any test saw, in case one outlived it.
        seen: set[int] = set()
        for master in started:
            master.proc.stop()
            seen.update(_pids_in_log(master.log()))
        for pid in seen:
            _kill_worker(pid)


def _pids_in_log(text: str) -> set[int]:
    pids = set()
    for line in text.splitlines():
        if "started (pid " in line:
            pids.add(int(line.rsplit("(pid ", 1)[1].rstrip(")")))
    return pids


def _kill_worker(pid: int) -> None:
    try:
        process = psutil.Process(pid)
        if "--worker" in process.cmdline():
            process.kill()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        pass


def _gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def wait_until(condition: Any, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def plain(backends: list[Backend], **overrides: Any) -> str:
    """A configuration without the PROXY header, for plain HTTP clients."""
    proxy = {"proxy_protocol": "off", **overrides.pop("proxy", {})}
    return proxy_config(backends, proxy=proxy, **overrides)


def test_new_connections_are_spread_over_several_workers(workers: Any, launch: Launcher) -> None:
    backends = launch.backends(["s1", "s2"])
    master = workers(plain(backends))
    assert len(set(master.pids())) == 3
    for _ in range(60):
        assert http_get(master.port, "/whoami").status == 200
    served = [s["frontend"]["connections_total"] for s in master.stats()]
    assert sum(served) == 60
    assert sum(1 for n in served if n > 0) >= 2, served


def test_routing_is_the_same_whichever_worker_serves(workers: Any, launch: Launcher) -> None:
    backends = launch.backends(["s1", "s2", "s3"])
    config = proxy_config(backends)
    master = workers(config)
    single = launch.stickyproxy(config)

    def whoami(port: int, source: str, cookie: str | None = None) -> bytes:
        request = b"GET /whoami HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
        if cookie is not None:
            request += f"Cookie: {COOKIE}={cookie}\r\n".encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(proxy_v1(source=source) + request + b"\r\n")
            response = b""
            while chunk := sock.recv(4096):
                response += chunk
        return response.rpartition(b"\r\n\r\n")[2]

    sources = [f"198.51.100.{n}" for n in range(1, 9)]
    for source in sources:
        expected = whoami(single.port, source)
        # Eight connections each: the kernel hands them to different workers.
        assert {whoami(master.port, source) for _ in range(8)} == {expected}, source
    for name in ("s1", "s2", "s3"):
        assert {whoami(master.port, "203.0.113.9", cookie=name) for _ in range(6)} == {
            name.encode()
        }
    served = [s["frontend"]["connections_total"] for s in master.stats()]
    assert sum(1 for n in served if n > 0) >= 2, served


def test_sighup_reloads_every_worker_with_the_same_file(workers: Any, launch: Launcher) -> None:
    backends = launch.backends(["s1", "s2", "s3"])
    master = workers(plain(backends[:2]))
    master.config.write_text(plain(backends))
    os.kill(master.proc.pid, signal.SIGHUP)
    wait_until(lambda: "reloaded by 3 of 3 worker(s)" in master.log(), "the reload")
    for stats in master.stats():
        assert [s["name"] for s in stats["servers"]] == ["s1", "s2", "s3"]
    lines = master.log().splitlines()
    for index in range(3):
        assert any(
            f"worker {index}]" in line and "configuration reloaded: 3 server(s)" in line
            for line in lines
        ), index
    assert {http_get(master.port, "/whoami", cookie=f"{COOKIE}=s3").body for _ in range(9)} == {
        b"s3"
    }

    # A bad file is refused once, by the master; the workers keep the old one.
    master.config.write_text(plain(backends) + "\n[backend editors]\n")
    os.kill(master.proc.pid, signal.SIGHUP)
    wait_until(lambda: "reload refused" in master.log(), "the refusal")
    assert master.log().count("[backend editors]") == 1
    for stats in master.stats():
        assert len(stats["servers"]) == 3


def test_sigterm_drains_every_worker_and_the_master_exits(workers: Any, launch: Launcher) -> None:
    backends = launch.backends(["s1", "s2"])
    master = workers(
        proxy_config(backends, proxy={"grace_period": "2s", "close_spread_time": "1s"})
    )
    pids = master.pids()
    tunnels = []
    for n in range(6):
        sock = socket.create_connection(("127.0.0.1", master.port), timeout=10)
        sock.sendall(proxy_v1(source=f"198.51.100.{n}") + UPGRADE)
        received = b""
        while b"hello from" not in received:
            received += sock.recv(4096)
        tunnels.append(sock)
    started = time.monotonic()
    master.proc.popen.send_signal(signal.SIGTERM)
    for sock in tunnels:
        tail = b""
        while chunk := sock.recv(4096):
            tail += chunk
        sock.close()
        # Told to go away by whichever worker held it, not cut by a kill.
        assert tail.endswith(CLOSE_1001), tail
    assert master.proc.popen.wait(timeout=WAIT) == 0
    assert time.monotonic() - started < 10
    assert all(_gone(pid) for pid in pids)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", master.port), timeout=2).close()


def test_a_killed_worker_is_replaced_on_the_same_addresses(workers: Any, launch: Launcher) -> None:
    backend = launch.backend("s1")
    master = workers(plain([backend]))
    before = master.info()["workers"][1]
    os.kill(before["pid"], signal.SIGKILL)
    wait_until(
        lambda: master.info()["workers"][1]["pid"] not in (before["pid"], None),
        "a new worker 1",
    )
    after = master.info()["workers"][1]
    assert after["admin"] == before["admin"]
    assert f"worker 1 (pid {before['pid']}) was killed by signal 9" in master.log()
    stats = json.loads(http_get(after["admin"][1], "/stats.json").body)
    assert stats["servers"][0]["name"] == "s1"
    for _ in range(20):
        assert http_get(master.port, "/whoami").body == b"s1"


def test_workers_stop_when_their_master_dies(workers: Any, launch: Launcher) -> None:
    backend = launch.backend("s1")
    master = workers(plain([backend]), count=2)
    pids = master.pids()
    master.proc.popen.kill()
    master.proc.popen.wait(timeout=WAIT)
    wait_until(lambda: all(_gone(pid) for pid in pids), "the orphaned workers to exit")


def test_a_port_that_cannot_be_bound_fails_the_start(tmp_path: Path, launch: Launcher) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = tmp_path / "taken.ini"
        config.write_text(
            proxy_config([], proxy={"listen": f"tcp:{port}:interface=127.0.0.1"})
            + "[server s1]\naddress = 127.0.0.1:9\n"
        )
        argv = [sys.executable, "-m", "stickyproxy.workers", "-c", str(config), "--workers", "2"]
        proc = spawn("workers", argv, tmp_path)
        launch.procs.append(proc)
        assert proc.popen.wait(timeout=WAIT) == 1
    assert "Address already in use" in proc.output()
    assert "started (pid" not in proc.output()


def test_only_the_master_talks_to_systemd_and_only_once_all_workers_serve(
    workers: Any, launch: Launcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = launch.backend("s1")
    with tempfile.TemporaryDirectory(prefix="sd-") as directory:
        # Like systemd, ask the kernel who sent each datagram (NotifyAccess=main).
        manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        manager.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        manager.bind(f"{directory}/notify")
        manager.settimeout(WAIT)
        monkeypatch.setenv("NOTIFY_SOCKET", f"{directory}/notify")

        def receive() -> tuple[int, str]:
            data, ancillary, _, _ = manager.recvmsg(4096, socket.CMSG_SPACE(12))
            pid = next(
                struct.unpack("3i", value[:12])[0]
                for level, kind, value in ancillary
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
            )
            return pid, data.decode()

        with manager:
            master = workers(plain([backend]))
            pid, text = receive()
            assert pid == master.proc.pid
            assert text.startswith("READY=1\nSTATUS=3/3 workers serving; listening on 127.0.0.1:")
            os.kill(master.proc.pid, signal.SIGHUP)
            pid, reloading = receive()
            assert pid == master.proc.pid and reloading.startswith("RELOADING=1\n")
            assert receive() == (master.proc.pid, text)
            master.proc.popen.send_signal(signal.SIGTERM)
            assert receive() == (master.proc.pid, "STOPPING=1\nSTATUS=draining connections")
            assert master.proc.popen.wait(timeout=WAIT) == 0
            manager.setblocking(False)
            with pytest.raises(BlockingIOError):
                manager.recv(4096)


def test_twistd_with_workers_in_the_configuration_runs_a_master(launch: Launcher) -> None:
    backends = launch.backends(["s1", "s2"])
    proxy = launch.stickyproxy(plain(backends, proxy={"workers": "2"}))
    ready = json.loads(next(Path(proxy.log_path).parent.glob("stickyproxy-*.ready")).read_text())
    assert len(ready["workers"]) == 2
    assert http_get(proxy.port, "/whoami", cookie=f"{COOKIE}=s2").body == b"s2"
    proxy.proc.popen.send_signal(signal.SIGTERM)
    assert proxy.proc.popen.wait(timeout=WAIT + 10) in (0, -signal.SIGTERM)
    for worker in ready["workers"]:
        wait_until(lambda pid=worker["pid"]: _gone(pid), f"worker {worker['pid']} to exit")
