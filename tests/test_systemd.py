"""systemd integration: the notify protocol, and socket activation end to end.

The unit tests play the service manager with a datagram socket of their own;
the process tests run ``twistd stickyproxy`` with ``NOTIFY_SOCKET`` or an
inherited listening socket, as systemd would start it.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.python.systemd import ListenFDs

from stickyproxy import systemd
from tests.integration.harness import (
    Launcher,
    Proc,
    proxy_config,
    proxy_v1,
    send_with_proxy_header,
    spawn,
    wait_for_file,
)

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="sd_notify and abstract sockets are Linux's"
)

#: The longest a test waits for one notification.
WAIT = 10.0

SERVICE_SOURCE = Path(__file__).resolve().parents[1] / "stickyproxy" / "service.py"

#: Skips the process tests until the service calls this module.
needs_wiring = pytest.mark.skipif("systemd" not in SERVICE_SOURCE.read_text(), reason="not wired")


@dataclass
class Message:
    """One notification: its assignments in order, and the sender's PID."""

    fields: list[tuple[str, str]]
    pid: int

    @property
    def keys(self) -> dict[str, str]:
        return dict(self.fields)


class Manager:
    """The service manager's end: a datagram socket that notifications reach.

    Like systemd it asks the kernel for the sender's credentials
    (``SO_PASSCRED``), which is how ``NotifyAccess=main`` tells the main
    process from its children.
    """

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)

    def close(self) -> None:
        self.sock.close()

    def receive(self, timeout: float = WAIT, proc: Proc | None = None) -> Message:
        """The next notification; fails after ``timeout`` or once ``proc`` has exited."""
        deadline = time.monotonic() + timeout
        while True:
            # Short slices, so that a dead process fails the test at once.
            self.sock.settimeout(0.1)
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
                break
            except TimeoutError:
                pass
            if proc is not None and not proc.running():
                pytest.fail(f"no notification: {proc.describe()}")
            if time.monotonic() > deadline:
                extra = "" if proc is None else f": {proc.describe()}"
                pytest.fail(f"no notification within {timeout}s{extra}")
        pid = 0
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _uid, _gid = struct.unpack("3i", value[:12])
        text = data.decode("utf-8")
        fields = [tuple(line.split("=", 1)) for line in text.split("\n") if line]
        assert all(len(field) == 2 for field in fields), text
        return Message([(key, value) for key, value in fields], pid)

    def nothing_pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        return False


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory whose socket paths fit in sun_path (108 bytes, unix(7))."""
    with tempfile.TemporaryDirectory(prefix="sd-") as name:
        yield Path(name)


@pytest.fixture
def manager(short_dir: Path) -> Iterator[tuple[Manager, dict[str, str]]]:
    """A manager bound to a path, and the environment that names it."""
    path = str(short_dir / "notify")
    receiver = Manager(path)
    try:
        yield receiver, {"NOTIFY_SOCKET": path}
    finally:
        receiver.close()


# -- notify() ------------------------------------------------------------------------------


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}])
def test_without_a_notify_socket_nothing_is_sent_and_false_returned(
    environ: dict[str, str],
) -> None:
    assert systemd.notify("READY=1", environ=environ) is False
    assert systemd.ready(environ=environ) is False
    assert systemd.stopping(environ=environ) is False


def test_notify_sends_the_state_unchanged_as_one_datagram(
    manager: tuple[Manager, dict[str, str]],
) -> None:
    receiver, environ = manager
    assert systemd.notify("READY=1\nSTATUS=up", environ=environ) is True
    message = receiver.receive()
    assert message.fields == [("READY", "1"), ("STATUS", "up")]
    assert message.pid == os.getpid()
    assert receiver.nothing_pending()


def test_an_at_sign_names_a_socket_in_the_abstract_namespace() -> None:
    name = f"stickyproxy-test-{os.getpid()}"
    receiver = Manager(b"\0" + name.encode())
    try:
        assert systemd.notify("READY=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert receiver.receive().fields == [("READY", "1")]
    finally:
        receiver.close()


def test_the_process_environment_is_read_by_default(
    manager: tuple[Manager, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver, environ = manager
    monkeypatch.setenv("NOTIFY_SOCKET", environ["NOTIFY_SOCKET"])
    assert systemd.stopping() is True
    assert receiver.receive().fields == [("STOPPING", "1")]


def test_a_socket_nobody_listens_on_is_an_oserror(short_dir: Path) -> None:
    with pytest.raises(FileNotFoundError):
        systemd.notify("READY=1", environ={"NOTIFY_SOCKET": str(short_dir / "absent")})


@pytest.mark.parametrize("address", ["vsock:2:9999", "run/notify"])
def test_an_address_that_is_not_a_unix_socket_is_an_oserror(address: str) -> None:
    with pytest.raises(OSError) as info:
        systemd.notify("READY=1", environ={"NOTIFY_SOCKET": address})
    assert info.value.errno == errno.EAFNOSUPPORT


@contextmanager
def fails_if_blocked(seconds: float) -> Iterator[None]:
    """Turn a send that would block forever into an error (SIGALRM interrupts it)."""

    def alarm(signum: int, frame: FrameType | None) -> None:
        raise AssertionError(f"still blocked after {seconds}s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_manager_that_stops_reading_gets_an_error_not_a_blocked_event_loop(
    manager: tuple[Manager, dict[str, str]],
) -> None:
    _, environ = manager
    with fails_if_blocked(WAIT), pytest.raises(BlockingIOError):
        # The receive queue holds net.unix.max_dgram_qlen datagrams (512 by default).
        for _ in range(100_000):
            systemd.status("x" * 1000, environ=environ)


# -- the messages --------------------------------------------------------------------------


def test_ready_without_status_is_just_ready(manager: tuple[Manager, dict[str, str]]) -> None:
    receiver, environ = manager
    systemd.ready(environ=environ)
    assert receiver.receive().fields == [("READY", "1")]


def test_ready_with_status_carries_both(manager: tuple[Manager, dict[str, str]]) -> None:
    receiver, environ = manager
    systemd.ready("listening on 0.0.0.0:3030", environ=environ)
    assert receiver.receive().fields == [("READY", "1"), ("STATUS", "listening on 0.0.0.0:3030")]


def test_stopping_says_stopping(manager: tuple[Manager, dict[str, str]]) -> None:
    receiver, environ = manager
    systemd.stopping("draining 3 connections", environ=environ)
    assert receiver.receive().fields == [("STOPPING", "1"), ("STATUS", "draining 3 connections")]


def test_reloading_carries_clock_monotonic_in_microseconds(
    manager: tuple[Manager, dict[str, str]],
) -> None:
    receiver, environ = manager
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    systemd.reloading(environ=environ)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    message = receiver.receive()
    assert [key for key, _ in message.fields] == ["RELOADING", "MONOTONIC_USEC"]
    assert message.keys["RELOADING"] == "1"
    assert before <= int(message.keys["MONOTONIC_USEC"]) <= after


def test_a_reload_is_reloading_then_ready(manager: tuple[Manager, dict[str, str]]) -> None:
    receiver, environ = manager
    systemd.reloading("reloading configuration", environ=environ, monotonic_usec=123456789)
    systemd.ready("listening on 0.0.0.0:3030", environ=environ)
    assert receiver.receive().fields == [
        ("RELOADING", "1"),
        ("MONOTONIC_USEC", "123456789"),
        ("STATUS", "reloading configuration"),
    ]
    assert receiver.receive().keys == {"READY": "1", "STATUS": "listening on 0.0.0.0:3030"}


def test_status_sends_only_a_status(manager: tuple[Manager, dict[str, str]]) -> None:
    receiver, environ = manager
    systemd.status("2 of 2 servers up", environ=environ)
    assert receiver.receive().fields == [("STATUS", "2 of 2 servers up")]


@given(text=st.text())
def test_status_text_never_adds_an_assignment(text: str) -> None:
    # One manager per example: fixtures are not reset between hypothesis examples.
    with tempfile.TemporaryDirectory(prefix="sd-") as name:
        path = os.path.join(name, "notify")
        receiver = Manager(path)
        try:
            systemd.status(text, environ={"NOTIFY_SOCKET": path})
            data = receiver.sock.recv(65536)
        finally:
            receiver.close()
    lines = data.split(b"\n")
    assert len(lines) == 1
    assert lines[0].startswith(b"STATUS=")
    assert b"\0" not in data


def test_watchdog_says_watchdog(manager: tuple[Manager, dict[str, str]]) -> None:
    receiver, environ = manager
    systemd.watchdog(environ=environ)
    assert receiver.receive().fields == [("WATCHDOG", "1")]


# -- watchdog_interval() -------------------------------------------------------------------


def test_the_watchdog_is_pinged_at_half_its_timeout() -> None:
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0


def test_a_watchdog_for_this_process_counts() -> None:
    environ = {"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": str(os.getpid())}
    assert systemd.watchdog_interval(environ) == 2.5


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"WATCHDOG_USEC": ""},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "-5"},
        {"WATCHDOG_USEC": "30s"},
        {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"},
    ],
)
def test_there_is_no_watchdog_unless_it_is_set_for_this_process(
    environ: dict[str, str],
) -> None:
    assert systemd.watchdog_interval(environ) is None


# -- socket activation ---------------------------------------------------------------------

#: Run as ``python -c ACTIVATE FD PYTHON-ARGS...``: what systemd does for a
#: socket unit before it execs the service: the listening socket becomes
#: descriptor 3 and LISTEN_* describe it, with LISTEN_PID the PID that the
#: exec keeps.
ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(
    LISTEN_FDS="1", LISTEN_FDNAMES="stickyproxy", LISTEN_PID=str(os.getpid())
)
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""

TWISTD = [
    "-c",
    "from twisted.scripts.twistd import run; run()",
    "--nodaemon",
    "--pidfile=",
    "--logfile=-",
    "stickyproxy",
]


def test_twisted_adopts_listen_fds_only_when_listen_fdnames_matches() -> None:
    # systemd 227 and later always set LISTEN_FDNAMES; Twisted relies on it.
    pid = str(os.getpid())
    named = {"LISTEN_FDS": "1", "LISTEN_PID": pid, "LISTEN_FDNAMES": "stickyproxy"}
    assert ListenFDs.fromEnvironment(environ=named).inheritedDescriptors() == [3]
    unnamed = {"LISTEN_FDS": "1", "LISTEN_PID": pid}
    assert ListenFDs.fromEnvironment(environ=unnamed).inheritedDescriptors() == []
    other = {"LISTEN_FDS": "1", "LISTEN_PID": "1", "LISTEN_FDNAMES": "stickyproxy"}
    assert ListenFDs.fromEnvironment(environ=other).inheritedDescriptors() == []


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    started = Launcher(tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


@pytest.mark.integration
def test_a_listening_socket_passed_by_systemd_serves_requests(
    launcher: Launcher, tmp_path: Path
) -> None:
    backend = launcher.backend("s1")
    config = tmp_path / "activated.ini"
    config.write_text(proxy_config([backend], proxy={"listen": "systemd:domain=INET:index=0"}))
    ready = tmp_path / "activated.ready"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        argv = [sys.executable, "-c", ACTIVATE, str(listener.fileno()), *TWISTD]
        argv += ["-c", str(config), "--ready-file", str(ready)]
        proc = spawn("activated", argv, tmp_path, pass_fds=(listener.fileno(),))
        launcher.procs.append(proc)
    # Only the proxy holds the socket now: had it not adopted it, connections
    # would be refused or left waiting in a backlog nobody accepts from.
    info = json.loads(wait_for_file(proc, ready))
    assert info["listen"] == [["127.0.0.1", port]]
    request = b"GET /whoami HTTP/1.1\r\nHost: example\r\nConnection: close\r\n\r\n"
    response = send_with_proxy_header(port, proxy_v1(), request)
    assert response.startswith(b"HTTP/1.1 200 "), response
    assert response.endswith(b"s1"), response


# -- the service manager's view of a running proxy ----------------------------------------


def start_notifying_proxy(
    launcher: Launcher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, notify_socket: str
) -> tuple[Proc, Path]:
    """Start twistd with ``NOTIFY_SOCKET`` set; return it and its ready file's path."""
    backend = launcher.backend("s1")
    config = tmp_path / "notify.ini"
    config.write_text(proxy_config([backend]))
    ready = tmp_path / "notify.ready"
    argv = [sys.executable, *TWISTD, "-c", str(config), "--ready-file", str(ready)]
    # spawn() hands this process's environment on to the child.
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket)
    proc = spawn("notifying", argv, tmp_path)
    launcher.procs.append(proc)
    return proc, ready


def until(manager: Manager, key: str, proc: Proc) -> tuple[Message, list[Message]]:
    """Read notifications up to the first carrying ``key``; also return those before it."""
    before: list[Message] = []
    while True:
        message = manager.receive(proc=proc)
        if key in message.keys:
            return message, before
        before.append(message)


def lifecycle_keys(messages: list[Message]) -> list[str]:
    wanted = ("READY", "RELOADING", "STOPPING")
    return [key for message in messages for key, _ in message.fields if key in wanted]


@pytest.mark.integration
@needs_wiring
def test_ready_comes_once_listening_and_stopping_on_sigterm(
    launcher: Launcher,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    manager: tuple[Manager, dict[str, str]],
) -> None:
    receiver, environ = manager
    proc, ready_file = start_notifying_proxy(
        launcher, tmp_path, monkeypatch, environ["NOTIFY_SOCKET"]
    )

    ready, before = until(receiver, "READY", proc)
    assert ready.keys["READY"] == "1"
    assert lifecycle_keys(before) == []
    # NotifyAccess=main: systemd only listens to the process it started.
    assert ready.pid == proc.pid
    # By READY=1 the listeners are bound: the ready file is there, connections are accepted.
    port = json.loads(ready_file.read_text())["listen"][0][1]
    socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()

    proc.popen.send_signal(signal.SIGTERM)
    stopping, between = until(receiver, "STOPPING", proc)
    assert stopping.keys["STOPPING"] == "1"
    assert stopping.pid == proc.pid
    assert lifecycle_keys(between) == []
    # twistd ends by re-raising the signal it stopped on; systemd counts an
    # exit by SIGTERM as a clean one (SuccessExitStatus=, systemd.service(5)).
    assert proc.popen.wait(WAIT) in (0, -signal.SIGTERM)


@pytest.mark.integration
@needs_wiring
def test_sighup_reports_reloading_then_ready_and_keeps_serving(
    launcher: Launcher,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    manager: tuple[Manager, dict[str, str]],
) -> None:
    receiver, environ = manager
    proc, ready_file = start_notifying_proxy(
        launcher, tmp_path, monkeypatch, environ["NOTIFY_SOCKET"]
    )
    until(receiver, "READY", proc)

    proc.popen.send_signal(signal.SIGHUP)
    reloading, before = until(receiver, "RELOADING", proc)
    assert lifecycle_keys(before) == []
    assert reloading.keys["RELOADING"] == "1"
    assert int(reloading.keys["MONOTONIC_USEC"]) > 0
    assert reloading.pid == proc.pid
    ready, between = until(receiver, "READY", proc)
    assert lifecycle_keys(between) == []
    assert ready.pid == proc.pid
    port = json.loads(ready_file.read_text())["listen"][0][1]
    socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()


@pytest.mark.integration
@needs_wiring
def test_a_refused_reload_still_ends_with_ready(
    launcher: Launcher,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    manager: tuple[Manager, dict[str, str]],
) -> None:
    # systemd holds the unit in "reloading" until READY=1, and a bad file
    # leaves the proxy running as it was: it must say so.
    receiver, environ = manager
    proc, _ = start_notifying_proxy(launcher, tmp_path, monkeypatch, environ["NOTIFY_SOCKET"])
    until(receiver, "READY", proc)
    (tmp_path / "notify.ini").write_text("[proxy]\nmaxconn = lots\n")

    proc.popen.send_signal(signal.SIGHUP)
    until(receiver, "RELOADING", proc)
    ready, between = until(receiver, "READY", proc)
    assert ready.keys["READY"] == "1"
    assert lifecycle_keys(between) == []
    assert proc.running()
