"""The processes of a benchmark run: backends, and the three proxies under test.

* HTTP origin: HAProxy answering ``200 ok`` itself (``http-request return``),
  one thread, one listening socket per server so that each proxy sees two
  servers, ``s1`` and ``s2``.
* WebSocket origin: ``bench/ws_echo.py``, one process, one socket per server.
* Proxies: stickyproxy (``twistd -n stickyproxy``); HAProxy 2.6 with the seed's
  configuration (``mode http``, ``balance roundrobin``, ``cookie
  storify_editor_host insert indirect nocache``, default keep-alive, ``timeout
  tunnel 1h``, health checks); and ``bench/portforward_relay.py``, which relays
  to ``s1`` only.

No proxy reads a PROXY protocol header: stickyproxy runs with
``proxy_protocol = off`` and HAProxy's ``bind`` has no ``accept-proxy``.
The only departure from the seed's numbers is ``maxconn``, raised everywhere so
that thousands of idle WebSockets are accepted rather than queued.
"""

from __future__ import annotations

import http.client
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from procs import Child, ChildError, Children, listening_socket, port_of

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
SERVER_NAMES = ("s1", "s2")
PROXY_NAMES = ("stickyproxy", "haproxy", "relay")

#: Seconds a process has to start answering.
START_TIMEOUT = 20.0


@dataclass(frozen=True)
class Running:
    """A started process and the port clients connect to."""

    name: str
    child: Child
    port: int


def _haproxy_global(maxconn: int) -> str:
    return f"""global
    nbthread 1
    maxconn {maxconn}

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout tunnel 1h
"""


def origin_config(fds: Sequence[int], maxconn: int) -> str:
    """HAProxy as a fast HTTP origin: ``200 ok`` on every inherited socket."""
    binds = "".join(f"    bind fd@{fd}\n" for fd in fds)
    return (
        _haproxy_global(maxconn)
        + f"""
frontend origin
    maxconn {maxconn}
{binds}    http-request return status 200 content-type text/plain string "ok"
"""
    )


def haproxy_proxy_config(fd: int, servers: Sequence[tuple[str, int]], maxconn: int) -> str:
    """The seed's sticky configuration in front of *servers* ((name, port) pairs)."""
    lines = "".join(
        f"    server {name} 127.0.0.1:{port} maxconn {maxconn} weight 10 cookie {name} "
        "check inter 10000 rise 1 fall 3\n"
        for name, port in servers
    )
    return (
        _haproxy_global(maxconn)
        + f"""
frontend storify_editor_frontend
    bind fd@{fd}
    maxconn {maxconn}
    default_backend storify_editor_backend

backend storify_editor_backend
    timeout check 5000
    option httpchk GET /status?all=1
    balance roundrobin
    cookie storify_editor_host insert indirect nocache
{lines}"""
    )


def stickyproxy_config(servers: Sequence[tuple[str, int]], maxconn: int) -> str:
    """stickyproxy's INI for *servers*; cookie, balance and health keep their defaults."""
    sections = "".join(
        f"\n[server {name}]\naddress = 127.0.0.1:{port}\nmaxconn = 0\n" for name, port in servers
    )
    return f"""[proxy]
listen = tcp:0:interface=127.0.0.1:backlog=1024
proxy_protocol = off
maxconn = {maxconn}
timeout_tunnel = 1h
{sections}"""


def wait_answering(running: Running, timeout: float = START_TIMEOUT) -> None:
    """Wait until ``GET /`` through the process returns 200.

    Both origins answer a plain ``GET /`` with ``200 ok``, so this also waits
    for a proxy's health checks to find its servers up.
    """
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        running.child.check_alive()
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=2)
        try:
            conn.request("GET", "/")
            response = conn.getresponse()
            response.read()
            if response.status == 200:
                return
            last = f"{response.status} {response.reason}"
        except (OSError, http.client.HTTPException) as e:
            last = repr(e)
        finally:
            conn.close()
        time.sleep(0.1)
    raise ChildError(
        f"{running.name}: GET / did not return 200 in {timeout:.0f}s (last: {last})\n"
        + running.child.log_tail()
    )


class Launcher:
    """Starts the processes of a run; every one is registered in *children*.

    :param children: where started processes are recorded, to be stopped by PID.
    :param work_dir: configuration files, ready files and logs go here.
    :param maxconn: connection limit given to every proxy and origin.
    """

    def __init__(self, children: Children, work_dir: Path, maxconn: int) -> None:
        self.children = children
        self.work_dir = work_dir
        self.maxconn = maxconn

    def _haproxy(self, name: str, config: str, fds: Sequence[int]) -> Child:
        path = self.work_dir / f"{name}.cfg"
        path.write_text(config)
        # -db: stay in the foreground without a master process, so the PID is
        # the one process that does the work.
        return self.children.start(name, ["haproxy", "-db", "-f", str(path)], pass_fds=fds)

    def http_origin(self) -> list[tuple[str, int]]:
        """Start the HAProxy origin; return the (name, port) of each server."""
        socks = [listening_socket() for _ in SERVER_NAMES]
        fds = [s.fileno() for s in socks]
        child = self._haproxy("origin-http", origin_config(fds, self.maxconn), fds)
        servers = [(name, port_of(s)) for name, s in zip(SERVER_NAMES, socks, strict=True)]
        for s in socks:
            s.close()
        for _, port in servers:
            wait_answering(Running("origin-http", child, port))
        return servers

    def ws_origin(self) -> list[tuple[str, int]]:
        """Start the WebSocket echo server; return the (name, port) of each server."""
        socks = [listening_socket() for _ in SERVER_NAMES]
        argv = [sys.executable, str(BENCH_DIR / "ws_echo.py")]
        for s in socks:
            argv += ["--fd", str(s.fileno())]
        child = self.children.start("origin-ws", argv, pass_fds=[s.fileno() for s in socks])
        servers = [(name, port_of(s)) for name, s in zip(SERVER_NAMES, socks, strict=True)]
        for s in socks:
            s.close()
        for _, port in servers:
            wait_answering(Running("origin-ws", child, port))
        return servers

    def proxy(self, name: str, servers: Sequence[tuple[str, int]], tag: str) -> Running:
        """Start proxy *name* (one of :data:`PROXY_NAMES`) in front of *servers*.

        :param tag: distinguishes the files of several starts of one proxy.
        """
        label = f"{name}-{tag}"
        if name == "stickyproxy":
            child = self._stickyproxy(label, servers)
            port = 0  # known once the ready file is written
        else:
            sock = listening_socket()
            fd = sock.fileno()
            if name == "haproxy":
                child = self._haproxy(label, haproxy_proxy_config(fd, servers, self.maxconn), [fd])
            else:
                target = f"127.0.0.1:{servers[0][1]}"
                argv = [sys.executable, str(BENCH_DIR / "portforward_relay.py")]
                argv += ["--fd", str(fd), "--target", target]
                child = self.children.start(label, argv, pass_fds=[fd])
            port = port_of(sock)
            sock.close()
        try:
            if name == "stickyproxy":
                (_host, port), *_ = child.wait_ready_file(self._ready_file(label), START_TIMEOUT)
            running = Running(name, child, port)
            wait_answering(running)
        except BaseException:
            # A proxy that failed to start must not load the next measurement.
            self.children.stop(child)
            raise
        return running

    def _stickyproxy(self, label: str, servers: Sequence[tuple[str, int]]) -> Child:
        """Start ``twistd stickyproxy``; it reports its port in ``label.ready.json``."""
        config = self.work_dir / f"{label}.ini"
        config.write_text(stickyproxy_config(servers, self.maxconn))
        twistd = str(Path(sys.executable).with_name("twistd"))
        argv = [twistd, "-n", "--pidfile=", "--logfile=-", "stickyproxy"]
        argv += ["-c", str(config), "--ready-file", str(self._ready_file(label))]
        return self.children.start(label, argv, env={"PYTHONPATH": str(REPO_ROOT)})

    def _ready_file(self, label: str) -> Path:
        return self.work_dir / f"{label}.ready.json"
