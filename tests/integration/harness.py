"""Real processes on loopback for the integration suite.

Every server listens on 127.0.0.1 on a port the OS picks, and reports when it is
ready through a file or a socket; every wait is bounded and fails with the
process's own output. Processes are stopped by PID (SIGTERM, then SIGKILL)
by :class:`Launcher`, which the ``launch`` fixture tears down after each test.

HAProxy cannot be told to pick a port and report it, so the listening socket is
created here (bound to port 0) and inherited by HAProxy as ``bind fd@N``: the
port is known before HAProxy starts and cannot be taken by anyone else.
"""

from __future__ import annotations

import http.client
import io
import itertools
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple, Protocol

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

#: The repository root, put on the children's PYTHONPATH so that they import
#: this working copy and Twisted finds ``twisted/plugins/stickyproxy_plugin.py``.
REPO_ROOT = Path(__file__).resolve().parents[2]

#: How long a process may take to become ready before the test fails.
READY_TIMEOUT = 10.0

#: How long a stopped process gets to exit after SIGTERM before SIGKILL.
STOP_TIMEOUT = 5.0

_POLL_INTERVAL = 0.02
_serial = itertools.count(1)


def find_haproxy() -> str | None:
    """:return: the ``haproxy`` executable (often in /usr/sbin, off a user's PATH)."""
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")


class ProcessNotReadyError(RuntimeError):
    """A process exited or stayed silent instead of becoming ready."""


@dataclass
class Proc:
    """One child process, its merged stdout/stderr going to ``log_path``."""

    popen: subprocess.Popen[bytes]
    name: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def output(self, limit: int = 8000) -> str:
        """:return: the end of what the process has written so far."""
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-limit:].decode("utf-8", "replace")

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Terminate the process by PID, kill it if it lingers, and reap it.

        Safe to call more than once.
        """
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)

    def describe(self) -> str:
        status = self.popen.poll()
        state = "still running" if status is None else f"exited with status {status}"
        return f"{self.name} (pid {self.pid}) {state}; its output:\n{self.output()}"


@dataclass
class Backend:
    """A ``python -m stickyproxy.demo`` process."""

    name: str
    port: int
    proc: Proc

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Proxy:
    """A stickyproxy process; ``port`` is its first listener."""

    port: int
    admin_port: int | None
    proc: Proc
    log_path: Path


@dataclass
class Haproxy:
    """An HAProxy process in ``mode tcp``, with the address of its runtime API socket."""

    port: int
    proc: Proc
    stats_address: bytes

    def command(self, line: str, timeout: float = 5.0) -> str:
        """Run one HAProxy runtime API command (such as ``show info``)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(self.stats_address)
            sock.sendall(line.encode() + b"\n")
            return _read_until_close(sock).decode("utf-8", "replace")


def spawn(name: str, argv: Sequence[str], tmp_path: Path, **popen: Any) -> Proc:
    """Start ``argv`` with its output in ``tmp_path/NAME-N.log``.

    :param popen: extra :class:`subprocess.Popen` arguments (``pass_fds``...).
    """
    log_path = tmp_path / f"{name}-{next(_serial)}.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    with open(log_path, "wb") as log:
        # The child keeps its own copy of the descriptor; ours can go at once.
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=env,
            **popen,
        )
    return Proc(process, name, log_path)


def wait_for_file(proc: Proc, path: Path, timeout: float = READY_TIMEOUT) -> str:
    """Wait until ``path`` exists and return its text.

    Readers rely on the writer renaming a complete file into place.

    :raises ProcessNotReadyError: the process exited or ``timeout`` passed first;
        the process is stopped before raising.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return path.read_text()
        except FileNotFoundError:
            pass
        _check_progress(proc, deadline, f"{path.name} to appear")
        time.sleep(_POLL_INTERVAL)


def _check_progress(proc: Proc, deadline: float, what: str) -> None:
    if not proc.running():
        raise ProcessNotReadyError(f"waiting for {what}: {proc.describe()}")
    if time.monotonic() > deadline:
        proc.stop()
        raise ProcessNotReadyError(f"gave up waiting for {what}: {proc.describe()}")


def _spawn_backend(name: str, tmp_path: Path) -> tuple[Proc, Path]:
    ready = tmp_path / f"backend-{name}-{next(_serial)}.port"
    argv = [sys.executable, "-m", "stickyproxy.demo", "--name", name, "--ready-file", str(ready)]
    return spawn(f"backend-{name}", argv, tmp_path), ready


def start_backend(name: str, tmp_path: Path) -> Backend:
    """Start one demo backend and wait until it listens."""
    return start_backends([name], tmp_path)[0]


def start_backends(names: Iterable[str], tmp_path: Path) -> list[Backend]:
    """Start several demo backends at once (they boot in parallel)."""
    return wait_for_backends([(name, *_spawn_backend(name, tmp_path)) for name in names])


def wait_for_backends(spawned: Sequence[tuple[str, Proc, Path]]) -> list[Backend]:
    """Wait until each spawned backend has written its port to its ready file.

    :param spawned: each backend's name, process and ready file.
    :raises ProcessNotReadyError: a backend failed to start; all of them are
        stopped before raising, so that none outlives a failed start.
    """
    backends: list[Backend] = []
    try:
        for name, proc, ready in spawned:
            backends.append(Backend(name, int(wait_for_file(proc, ready)), proc))
    except BaseException:
        for _, proc, _ in spawned:
            proc.stop()
        raise
    return backends


def start_stickyproxy(config_text: str, tmp_path: Path) -> Proxy:
    """Run ``twistd -n stickyproxy -c CONF --ready-file READY`` and wait for READY.

    READY is JSON: ``{"listen": [[host, port], ...], "admin": [host, port] | null}``.
    """
    serial = next(_serial)
    config_path = tmp_path / f"stickyproxy-{serial}.ini"
    config_path.write_text(config_text)
    ready = tmp_path / f"stickyproxy-{serial}.ready"
    # twistd, the documented way to run the proxy, through this interpreter.
    # (``python -m twisted``, i.e. ``twist``, never calls a service's
    # privilegedStartService, so it is not equivalent.) Foreground, no pid
    # file, log to stdout, which spawn() captures.
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
    argv += ["--nodaemon", "--pidfile=", "--logfile=-", "stickyproxy"]
    argv += ["-c", str(config_path), "--ready-file", str(ready)]
    proc = spawn("stickyproxy", argv, tmp_path)
    text = wait_for_file(proc, ready)
    try:
        info = json.loads(text)
        port = int(info["listen"][0][1])
        admin = info.get("admin")
        admin_port = int(admin[1]) if admin else None
    except (ValueError, LookupError, TypeError) as error:
        proc.stop()
        message = f"unreadable {ready.name} {text!r} ({error}): {proc.describe()}"
        raise ProcessNotReadyError(message) from error
    return Proxy(port=port, admin_port=admin_port, proc=proc, log_path=proc.log_path)


def _render_ini(sections: Mapping[str, Mapping[str, str]]) -> str:
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {value}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


class Named(Protocol):
    """Anything with a name and a loopback port, such as a :class:`Backend`."""

    @property
    def name(self) -> str: ...

    @property
    def port(self) -> int: ...


def proxy_config(backends: Sequence[Named], **overrides: Mapping[str, str | None]) -> str:
    """Build a stickyproxy INI file in front of ``backends``.

    The defaults suit tests: an OS-chosen port on loopback, the PROXY header
    required, short timeouts, a health check every second that takes a server
    out after one failure, and one ``[server NAME]`` per backend with the
    backend's name as its cookie value.

    :param overrides: ``section={"key": "value"}`` merged over the defaults;
        a value of ``None`` removes the key; ``**{"server s1": {...}}`` reaches
        a server section.
    """
    sections: dict[str, dict[str, str]] = {
        "proxy": {
            "listen": "tcp:0:interface=127.0.0.1",
            "proxy_protocol": "required",
            "trusted_proxies": "127.0.0.0/8",
            "timeout_connect": "2s",
            "timeout_http_request": "3s",
            "timeout_client": "10s",
            "timeout_server": "10s",
            "timeout_tunnel": "30s",
        },
        "cookie": {
            "name": "storify_editor_host",
            "mode": "insert",
            "indirect": "true",
            "nocache": "true",
        },
        "health": {
            "path": "/status?all=1",
            "interval": "1s",
            "timeout": "1s",
            "rise": "1",
            "fall": "1",
        },
        "admin": {"listen": "tcp:0:interface=127.0.0.1"},
    }
    for backend in backends:
        sections[f"server {backend.name}"] = {
            "address": f"127.0.0.1:{backend.port}",
            "cookie": backend.name,
            "weight": "10",
        }
    for section, values in overrides.items():
        merged = sections.setdefault(section, {})
        for key, value in values.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
    return _render_ini(sections)


def start_haproxy(
    render: Callable[[str, str], str], tmp_path: Path, *, backlog: int = 128
) -> Haproxy:
    """Run HAProxy on a configuration built around a listener bound here.

    The listener is bound to an OS-chosen loopback port before HAProxy starts
    and inherited as ``bind fd@N``. The runtime API socket is in the abstract
    namespace: it needs no file and has no path-length limit. The call returns
    once HAProxy answers ``show info`` there.

    :param render: builds the whole configuration from the listener's bind
        address (``fd@N``) and the runtime API socket's (``abns@NAME``), to be
        written as ``bind ADDRESS`` and ``stats socket ADDRESS``.
    :param backlog: the listener's accept queue.
    """
    executable = find_haproxy()
    if executable is None:
        raise FileNotFoundError("haproxy is not installed")
    serial = next(_serial)
    stats_name = f"stickyproxy-test-{os.getpid()}-{serial}"
    # HAProxy pads "abns@" names with NULs to the full sun_path (108 bytes on
    # Linux), so the address we connect to is padded the same way.
    stats_address = ("\0" + stats_name).encode().ljust(108, b"\0")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(backlog)
        port = listener.getsockname()[1]
        fd = listener.fileno()
        config_path = tmp_path / f"haproxy-{serial}.cfg"
        config_path.write_text(render(f"fd@{fd}", f"abns@{stats_name}"))
        proc = spawn(
            "haproxy", [executable, "-f", str(config_path), "-db"], tmp_path, pass_fds=(fd,)
        )
    # Our copy of the listener is closed: if HAProxy dies, connections are refused
    # instead of waiting in a backlog nobody accepts from.
    haproxy = Haproxy(port, proc, stats_address)
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            if "Name: HAProxy" in haproxy.command("show info", timeout=1.0):
                return haproxy
        except OSError:
            pass
        _check_progress(proc, deadline, "HAProxy's stats socket")
        time.sleep(_POLL_INTERVAL)


def start_haproxy_l4(
    target_port: int,
    tmp_path: Path,
    send_proxy: Literal["v1", "v2", "none"] = "v2",
) -> Haproxy:
    """Run HAProxy in ``mode tcp`` in front of ``127.0.0.1:target_port``.

    This is the L4 balancer of production (the ELB): it passes bytes through
    and, unless ``send_proxy`` is ``"none"``, prepends a PROXY header.
    """
    option = {"v1": " send-proxy", "v2": " send-proxy-v2", "none": ""}[send_proxy]

    def render(listener: str, stats_socket: str) -> str:
        return (
            "global\n"
            "    nbthread 1\n"
            f"    stats socket {stats_socket} level user\n"
            "    log stderr format raw local0 info\n"
            "defaults\n"
            "    mode tcp\n"
            "    log global\n"
            "    option tcplog\n"
            "    timeout connect 5s\n"
            "    timeout client 60s\n"
            "    timeout server 60s\n"
            "frontend l4\n"
            f"    bind {listener}\n"
            "    default_backend stickyproxy\n"
            "backend stickyproxy\n"
            f"    server sp 127.0.0.1:{target_port}{option}\n"
        )

    return start_haproxy(render, tmp_path)


class Launcher:
    """Starts processes for one test and stops every one of them afterwards."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[Proc] = []

    def backend(self, name: str) -> Backend:
        return self.backends([name])[0]

    def backends(self, names: Iterable[str]) -> list[Backend]:
        started = start_backends(names, self.tmp_path)
        self.procs.extend(backend.proc for backend in started)
        return started

    def stickyproxy(self, config_text: str) -> Proxy:
        proxy = start_stickyproxy(config_text, self.tmp_path)
        self.procs.append(proxy.proc)
        return proxy

    def haproxy_l4(
        self, target_port: int, send_proxy: Literal["v1", "v2", "none"] = "v2"
    ) -> Haproxy:
        haproxy = start_haproxy_l4(target_port, self.tmp_path, send_proxy)
        self.procs.append(haproxy.proc)
        return haproxy

    def stop_all(self) -> None:
        """Stop in reverse order of start: front ends before what they front."""
        while self.procs:
            self.procs.pop().stop()


# -- clients -------------------------------------------------------------------------------


def _read_until_close(sock: socket.socket) -> bytes:
    received = io.BytesIO()
    try:
        while chunk := sock.recv(65536):
            received.write(chunk)
    except TimeoutError:
        pass
    except ConnectionResetError:
        pass
    return received.getvalue()


def raw_request(port: int, data: bytes, *, read_timeout: float = 5.0) -> bytes:
    """Send ``data`` on a new connection and return all bytes read until the
    peer closes (or resets) the connection or ``read_timeout`` passes in silence.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        sock.sendall(data)
        return _read_until_close(sock)


def send_with_proxy_header(
    port: int, header: bytes, request: bytes, *, read_timeout: float = 5.0
) -> bytes:
    """Send a PROXY protocol header and then a request on one connection."""
    return raw_request(port, header + request, read_timeout=read_timeout)


class HttpResponse(NamedTuple):
    """``headers`` is case-insensitive; ``headers.get_all(name)`` gives repeats."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes


def http_get(
    port: int,
    path: str,
    *,
    cookie: str | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> HttpResponse:
    """One ``GET`` on a new connection to ``127.0.0.1:port``.

    :param cookie: the ``Cookie`` header value, if any.
    """
    return http_request(port, "GET", path, cookie=cookie, headers=headers, timeout=timeout)


def http_request(
    port: int,
    method: str,
    path: str,
    *,
    body: bytes | Iterable[bytes] | IO[bytes] | None = None,
    cookie: str | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> HttpResponse:
    """One request on a new connection; an iterable body is sent as it is
    produced (chunked unless ``headers`` carries a ``Content-Length``).
    """
    sent = dict(headers or {})
    if cookie is not None:
        sent["Cookie"] = cookie
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=sent)
        response = connection.getresponse()
        return HttpResponse(response.status, response.headers, response.read())
    finally:
        connection.close()


@dataclass
class WebSocketExchange:
    """What a WebSocket client saw: the handshake headers and every message."""

    response_headers: dict[str, Any] = field(default_factory=dict)
    messages: list[tuple[bytes, bool]] = field(default_factory=list)

    @property
    def greeting(self) -> bytes:
        """The first message the server sent (the demo's ``hello from NAME``)."""
        return self.messages[0][0]

    @property
    def replies(self) -> list[tuple[bytes, bool]]:
        return self.messages[1:]


class _ExchangeProtocol(WebSocketClientProtocol):
    factory: _ExchangeFactory

    def onConnect(self, response: Any) -> None:
        self.factory.exchange.response_headers = dict(response.headers)

    def onOpen(self) -> None:
        for payload, is_binary in self.factory.outgoing:
            self.sendMessage(payload, is_binary)  # type: ignore[no-untyped-call]
        self._check_complete()

    def onMessage(self, payload: bytes, is_binary: bool) -> None:
        self.factory.exchange.messages.append((payload, is_binary))
        self._check_complete()

    def _check_complete(self) -> None:
        if len(self.factory.exchange.messages) >= self.factory.expected:
            self.sendClose(1000)

    def onClose(self, was_clean: bool, code: int | None, reason: str | None) -> None:
        factory = self.factory
        if factory.done.called:
            return
        if len(factory.exchange.messages) >= factory.expected:
            factory.done.callback(factory.exchange)
        else:
            message = f"WebSocket closed early (code {code}, {reason!r}) after {factory.exchange}"
            factory.done.errback(ConnectionError(message))


class _ExchangeFactory(WebSocketClientFactory):
    protocol = _ExchangeProtocol  # type: ignore[assignment]

    def __init__(
        self, url: str, outgoing: list[tuple[bytes, bool]], headers: Mapping[str, str], reactor: Any
    ) -> None:
        super().__init__(url, headers=dict(headers), reactor=reactor)  # type: ignore[no-untyped-call]
        self.outgoing = outgoing
        # The server's greeting, then one echo per message sent.
        self.expected = len(outgoing) + 1
        self.exchange = WebSocketExchange()
        self.done: Deferred[WebSocketExchange] = Deferred()

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.done.called:
            self.done.errback(reason)


def websocket_exchange(
    reactor: Any,
    port: int,
    messages: Sequence[bytes | str],
    *,
    path: str = "/ws",
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> Deferred[WebSocketExchange]:
    """Open a WebSocket to ``127.0.0.1:port``, send ``messages`` (``str`` as
    text, ``bytes`` as binary), collect the greeting and one reply per message,
    then close. Fails if the exchange is not complete within ``timeout``.
    """
    outgoing = [
        (item.encode("utf-8"), False) if isinstance(item, str) else (item, True)
        for item in messages
    ]
    factory = _ExchangeFactory(f"ws://127.0.0.1:{port}{path}", outgoing, headers or {}, reactor)
    connector = reactor.connectTCP("127.0.0.1", port, factory, timeout=timeout)

    def give_up(reason: Failure) -> Failure:
        connector.disconnect()
        return reason

    factory.done.addTimeout(timeout, reactor)
    factory.done.addErrback(give_up)
    return factory.done


# -- PROXY protocol headers, built independently of stickyproxy's parser ------------------


def proxy_v1(
    source: str = "203.0.113.7",
    destination: str = "127.0.0.1",
    source_port: int = 40000,
    destination_port: int = 80,
) -> bytes:
    """A PROXY protocol v1 line (spec section 2.1) for TCP4 or TCP6."""
    family = "TCP6" if ":" in source else "TCP4"
    return f"PROXY {family} {source} {destination} {source_port} {destination_port}\r\n".encode()


PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v2(
    source: str = "203.0.113.7",
    destination: str = "127.0.0.1",
    source_port: int = 40000,
    destination_port: int = 80,
    *,
    local: bool = False,
) -> bytes:
    """A PROXY protocol v2 header (spec section 2.2): PROXY or LOCAL, TCP over IPv4/6."""
    if local:
        # Version 2, command LOCAL, family UNSPEC, no address block.
        return PROXY_V2_SIGNATURE + b"\x20\x00\x00\x00"
    if ":" in source:
        family = socket.AF_INET6
        family_byte = 0x21  # AF_INET6, STREAM
    else:
        family = socket.AF_INET
        family_byte = 0x11  # AF_INET, STREAM
    addresses = socket.inet_pton(family, source) + socket.inet_pton(family, destination)
    addresses += struct.pack("!HH", source_port, destination_port)
    return PROXY_V2_SIGNATURE + struct.pack("!BBH", 0x21, family_byte, len(addresses)) + addresses
