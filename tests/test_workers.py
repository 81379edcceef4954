"""The worker machinery without worker processes: endpoints, plans, the pipe
protocol, the restart policy, and the master driven by a fake clock and fake
processes (its sockets are real, bound on loopback)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import tcp
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from stickyproxy.config import parse_config
from stickyproxy.workers import (
    CONTROL_FD,
    FIRST_SOCKET_FD,
    STATUS_FD,
    STOP_MARGIN,
    Backoff,
    InheritedSocket,
    InheritingReactor,
    MessageReader,
    WorkerMaster,
    WorkerPlan,
    admin_endpoint_for,
    encode_message,
    endpoint_for_worker,
    worker_config,
    worker_problems,
)
from tests.helpers import splits


def memory_reactor() -> MemoryReactorClock:
    return MemoryReactorClock()  # type: ignore[no-untyped-call]


def killed() -> Exception:
    """How a worker killed by SIGKILL ends."""
    return ProcessTerminated(signal=9)  # type: ignore[no-untyped-call]


def exited() -> Exception:
    """How a worker that exits with status 0 ends."""
    return ProcessDone(0)  # type: ignore[no-untyped-call]


SERVERS = "[server s1]\naddress = 127.0.0.1:8081\n[server s2]\naddress = 127.0.0.1:8082\n"


def config(text: str) -> Any:
    return parse_config(text + SERVERS)


# -- endpoints ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("description", "family", "host", "expected"),
    [
        ("tcp:0:interface=127.0.0.1", socket.AF_INET, "127.0.0.1", "tcp:4321:interface=127.0.0.1"),
        ("tcp:3030", socket.AF_INET, "0.0.0.0", "tcp:4321:interface=0.0.0.0"),
        ("tcp:port=0:backlog=5", socket.AF_INET, "0.0.0.0", "tcp:4321:interface=0.0.0.0"),
        ("tcp6:0:interface=\\:\\:1", socket.AF_INET6, "::1", "tcp6:4321:interface=\\:\\:1"),
        ("systemd:domain=INET:index=0", socket.AF_INET, "10.0.0.1", "tcp:4321:interface=10.0.0.1"),
        ("systemd:domain=INET6:index=0", socket.AF_INET6, "::", "tcp6:4321:interface=\\:\\:"),
        (
            "ssl:443:privateKey=/etc/k.pem:certKey=/etc/c.pem",
            socket.AF_INET,
            "0.0.0.0",
            "ssl:4321:interface=0.0.0.0:privateKey=/etc/k.pem:certKey=/etc/c.pem",
        ),
    ],
)
def test_a_worker_endpoint_names_the_bound_address_and_keeps_what_the_worker_needs(
    description: str, family: int, host: str, expected: str
) -> None:
    assert endpoint_for_worker(description, family, host, 4321) == expected


def test_a_worker_endpoint_makes_twisted_listen_on_the_inherited_address() -> None:
    reactor = memory_reactor()
    description = endpoint_for_worker("tcp6:0", socket.AF_INET6, "::1", 4321)
    serverFromString(reactor, description).listen(Factory())  # type: ignore[no-untyped-call]
    assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [(4321, "::1")]


@pytest.mark.parametrize(
    ("description", "index", "expected"),
    [
        ("tcp:9000:interface=127.0.0.1", 0, "tcp:9000:interface=127.0.0.1"),
        ("tcp:9000:interface=127.0.0.1", 3, "tcp:9003:interface=127.0.0.1"),
        ("tcp:port=9000:interface=127.0.0.1", 2, "tcp:port=9002:interface=127.0.0.1"),
        ("tcp6:9000:interface=\\:\\:1", 1, "tcp6:9001:interface=\\:\\:1"),
        ("tcp:0:interface=127.0.0.1", 5, "tcp:0:interface=127.0.0.1"),
    ],
)
def test_worker_n_has_its_status_endpoint_on_the_configured_port_plus_n(
    description: str, index: int, expected: str
) -> None:
    assert admin_endpoint_for(description, index) == expected


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("[proxy]\nlisten = unix:/run/sp.sock\n", "listen", "tcp:, tcp6:, ssl: or systemd:"),
        ("[proxy]\nlisten = systemd:domain=UNIX:index=0\n", "listen", "domain=INET"),
        ("[admin]\nlisten = unix:/run/admin.sock\n", "listen", "port + N"),
        ("[admin]\nlisten = tcp:65534\n", "listen", "65534 to 65536"),
    ],
)
def test_endpoints_that_workers_cannot_share_are_problems(
    text: str, key: str, fragment: str
) -> None:
    problems = worker_problems(config(text), 3)
    assert [p.key for p in problems] == [key]
    assert fragment in problems[0].message


def test_shareable_endpoints_are_no_problem() -> None:
    text = (
        "[proxy]\nlisten = tcp:3030, tcp6:3030, systemd:domain=INET:index=0, "
        "ssl:443:privateKey=k.pem\n[admin]\nlisten = tcp:9000:interface=127.0.0.1\n"
    )
    assert worker_problems(config(text), 64) == []


@pytest.mark.parametrize("count", [0, 65])
def test_the_number_of_workers_is_1_to_64(count: int) -> None:
    assert [p.key for p in worker_problems(config(""), count)] == ["workers"]


# -- what a worker is given --------------------------------------------------

LISTENER = InheritedSocket("tcp:4321:interface=127.0.0.1", 5, socket.AF_INET, "127.0.0.1", 4321)
ADMIN = InheritedSocket("tcp:9001:interface=127.0.0.1", 6, socket.AF_INET, "127.0.0.1", 9001)


def test_a_plan_survives_its_trip_through_the_command_line() -> None:
    plan = WorkerPlan(1, (LISTENER,), ADMIN)
    assert WorkerPlan.from_json(plan.to_json()) == plan
    assert WorkerPlan.from_json(WorkerPlan(0, (LISTENER,)).to_json()).admin is None


def test_a_worker_runs_the_file_on_the_inherited_sockets_and_leaves_the_demo_to_the_master() -> (
    None
):
    text = (
        "[proxy]\nlisten = tcp:0\nmaxconn = 7\n[admin]\nlisten = tcp:0\n"
        "token = abcdefghijklmnopqrstuvwxyz\n[demo]\nbackends = true\n"
    )
    first = worker_config(config(text), WorkerPlan(0, (LISTENER,), ADMIN))
    second = worker_config(config(text), WorkerPlan(1, (LISTENER,), ADMIN))
    assert first.proxy.listen == second.proxy.listen == (LISTENER.description,)
    assert first.admin.listen == ADMIN.description
    assert first.admin.token == "abcdefghijklmnopqrstuvwxyz"
    assert first.proxy.maxconn == 7
    assert (first.demo.backends, second.demo.backends) == (False, False)


# -- the pipes ---------------------------------------------------------------

MESSAGES = [
    {"event": "ready"},
    {"op": "config", "text": "[proxy]\nlisten = tcp:0\n", "source": "f"},
]


def test_messages_are_read_back_however_the_pipe_cuts_them() -> None:
    data = b"".join(encode_message(m) for m in MESSAGES)
    for pieces in splits(data):
        reader = MessageReader()
        assert [m for piece in pieces for m in reader.feed(piece)] == MESSAGES


@given(st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_messages_are_read_back_at_random_cuts(cuts: list[int]) -> None:
    data = b"".join(encode_message(m) for m in MESSAGES)
    reader = MessageReader()
    received = []
    start = 0
    for cut in [*sorted({min(c, len(data)) for c in cuts}), len(data)]:
        received += reader.feed(data[start:cut])
        start = cut
    assert received == MESSAGES


def test_a_line_that_is_not_a_json_object_is_reported_and_skipped() -> None:
    reader = MessageReader()
    assert reader.feed(b"nonsense\n[1]\n" + encode_message({"event": "ready"})) == [
        None,
        None,
        {"event": "ready"},
    ]


def test_an_overlong_line_is_dropped_without_being_buffered() -> None:
    reader = MessageReader(limit=10)
    assert reader.feed(b"x" * 30) == []
    assert reader.feed(b"yyy\n" + encode_message({"event": "ready"})) == [None, {"event": "ready"}]


# -- the restart policy ------------------------------------------------------


def test_the_restart_delay_doubles_up_to_its_maximum() -> None:
    backoff = Backoff(initial=0.5, maximum=30.0)
    assert [backoff.delay(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert backoff.delay(10_000) == 30.0


def test_a_worker_that_ran_long_enough_starts_the_count_afresh() -> None:
    backoff = Backoff(stable=30.0)
    assert backoff.failures(previous=5, uptime=29.9) == 6
    assert backoff.failures(previous=5, uptime=30.0) == 1


# -- adopting inherited sockets ----------------------------------------------


@pytest.fixture
def listening_fd() -> Iterator[tuple[int, int]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(5)
    port = sock.getsockname()[1]
    fd = sock.detach()
    yield fd, port
    with contextlib.suppress(OSError):
        os.close(fd)


def test_listening_on_an_inherited_address_adopts_the_socket_once(
    listening_fd: tuple[int, int],
) -> None:
    fd, port = listening_fd
    memory = memory_reactor()
    inherited = InheritedSocket(f"tcp:{port}", fd, socket.AF_INET, "127.0.0.1", port)
    reactor = InheritingReactor(memory, [inherited])
    factory = Factory()
    reactor.listenTCP(port, factory, interface="127.0.0.1")
    assert memory.adoptedPorts == [(fd, socket.AF_INET, factory)]
    # The adopted port holds its own duplicate; this one must not linger.
    with pytest.raises(OSError):
        os.fstat(fd)
    reactor.listenTCP(port, factory, interface="127.0.0.1")
    assert len(memory.adoptedPorts) == 1
    assert [(p, i) for p, _, _, i in memory.tcpServers] == [(port, "127.0.0.1")]


def test_tls_on_an_inherited_socket_wraps_the_factory(listening_fd: tuple[int, int]) -> None:
    fd, port = listening_fd
    memory = memory_reactor()
    inherited = InheritedSocket(f"ssl:{port}", fd, socket.AF_INET, "0.0.0.0", port)
    reactor = InheritingReactor(memory, [inherited])
    from twisted.internet.ssl import CertificateOptions

    reactor.listenSSL(port, Factory(), CertificateOptions(), interface="0.0.0.0")
    assert isinstance(memory.adoptedPorts[0][2], TLSMemoryBIOFactory)


def test_everything_else_goes_to_the_real_reactor() -> None:
    memory = memory_reactor()
    reactor = InheritingReactor(memory, [])
    reactor.listenTCP(8080, Factory())
    reactor.callLater(1, lambda: None)
    assert len(memory.tcpServers) == 1 and len(memory.getDelayedCalls()) == 1
    from twisted.internet.interfaces import IReactorTCP, IReactorTime

    assert IReactorTCP.providedBy(reactor) and IReactorTime.providedBy(reactor)


# -- the master, with fake processes -----------------------------------------


class Reactor(MemoryReactorClock):
    """A fake clock, and real listening sockets that nobody reads."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        listening = tcp.Port(port, factory, backlog, interface, self)
        listening.startListening()
        return listening


@dataclass
class FakeProcess:
    pid: int
    protocol: Any
    args: list[str]
    env: dict[str, str]
    child_fds: dict[int, Any]
    written: list[dict[str, Any]] = field(default_factory=list)
    signals: list[str] = field(default_factory=list)

    def writeToChild(self, fd: int, data: bytes) -> None:
        assert fd == CONTROL_FD
        self.written.append(json.loads(data))

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    @property
    def plan(self) -> WorkerPlan:
        return WorkerPlan.from_json(self.args[-1])

    def say(self, message: dict[str, Any]) -> None:
        self.protocol.childDataReceived(STATUS_FD, encode_message(message))

    def end(self, reason: Exception | None = None) -> None:
        self.protocol.processEnded(Failure(reason or exited()))  # type: ignore[no-untyped-call]


class Spawner:
    def __init__(self) -> None:
        self.spawned: list[FakeProcess] = []

    def __call__(
        self,
        protocol: Any,
        executable: str,
        args: list[str],
        env: Any,
        childFDs: Any,  # noqa: N803
    ) -> FakeProcess:
        process = FakeProcess(1000 + len(self.spawned), protocol, args, env, childFDs)
        self.spawned.append(process)
        return process


CONFIG = """
[proxy]
listen = tcp:0:interface=127.0.0.1
grace_period = 2s
close_spread_time = 3s
[admin]
listen = tcp:0:interface=127.0.0.1
[server s1]
address = 127.0.0.1:8081
"""


@dataclass
class Running:
    master: WorkerMaster
    reactor: Reactor
    spawner: Spawner
    path: Path
    ready: Path

    def latest(self, index: int) -> FakeProcess:
        return [p for p in self.spawner.spawned if p.plan.index == index][-1]


@pytest.fixture
def running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Running]:
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_PID", "1")
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    path = tmp_path / "conf.ini"
    path.write_text(CONFIG)
    reactor, spawner = Reactor(), Spawner()
    ready = tmp_path / "ready.json"
    master = WorkerMaster(
        str(path), reactor, workers=3, ready_file=str(ready), spawn=spawner, argv=["python"]
    )
    previous = signal.getsignal(signal.SIGHUP)
    master.privilegedStartService()
    master.startService()
    try:
        yield Running(master, reactor, spawner, path, ready)
    finally:
        signal.signal(signal.SIGHUP, previous)
        for bound in [*master.listeners, *(s.admin for s in master.slots if s.admin)]:
            bound.close()


def test_every_worker_inherits_the_one_listener_and_its_own_status_socket(
    running: Running,
) -> None:
    spawned = running.spawner.spawned
    assert [p.plan.index for p in spawned] == [0, 1, 2]
    listener_fds = {p.child_fds[FIRST_SOCKET_FD] for p in spawned}
    admin_fds = {p.child_fds[FIRST_SOCKET_FD + 1] for p in spawned}
    assert len(listener_fds) == 1 and len(admin_fds) == 3
    assert spawned[0].child_fds[STATUS_FD] == "r" and spawned[0].child_fds[CONTROL_FD] == "w"
    port = running.master.listeners[0].number
    assert port != 0
    assert spawned[2].plan.listen[0].description == f"tcp:{port}:interface=127.0.0.1"
    # The socket listens already: the kernel completes the handshake.
    socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_workers_get_the_file_as_the_master_read_it_and_none_of_its_systemd_variables(
    running: Running,
) -> None:
    for process in running.spawner.spawned:
        assert process.written == [{"op": "config", "text": CONFIG, "source": str(running.path)}]
        assert "LISTEN_FDS" not in process.env and "LISTEN_PID" not in process.env


def test_the_ready_file_appears_once_every_worker_is_ready(running: Running) -> None:
    for process in running.spawner.spawned[:2]:
        process.say({"event": "ready"})
    assert not running.ready.exists()
    running.spawner.spawned[2].say({"event": "ready"})
    info = json.loads(running.ready.read_text())
    slots = running.master.slots
    assert info["listen"] == [["127.0.0.1", running.master.listeners[0].number]]
    assert [w["pid"] for w in info["workers"]] == [1000, 1001, 1002]
    assert [w["admin"][1] for w in info["workers"]] == [s.admin.number for s in slots if s.admin]
    assert info["admin"] == info["workers"][0]["admin"]


def test_a_dead_worker_is_replaced_after_a_delay_that_doubles(running: Running) -> None:
    for process in running.spawner.spawned:
        process.say({"event": "ready"})
    first = running.latest(1)
    first.end(killed())
    running.reactor.advance(0.49)
    assert running.latest(1) is first
    running.reactor.advance(0.01)
    second = running.latest(1)
    assert second is not first
    assert second.child_fds[FIRST_SOCKET_FD + 1] == first.child_fds[FIRST_SOCKET_FD + 1]
    second.end(exited())
    running.reactor.advance(0.99)
    assert running.latest(1) is second
    running.reactor.advance(0.01)
    third = running.latest(1)
    third.say({"event": "ready"})
    assert json.loads(running.ready.read_text())["workers"][1]["pid"] == third.pid
    # One that served long enough is replaced quickly again.
    running.reactor.advance(60)
    third.end(killed())
    running.reactor.advance(0.5)
    assert running.latest(1) is not third


def test_reload_hands_the_new_text_to_every_worker_and_waits_for_each(running: Running) -> None:
    new = CONFIG + "[server s2]\naddress = 127.0.0.1:8082\n"
    running.path.write_text(new)
    outcome: list[bool] = []
    running.master.reload().addCallback(outcome.append)
    for process in running.spawner.spawned:
        assert process.written[-1]["text"] == new
    for process in running.spawner.spawned[:2]:
        process.say({"event": "reloaded", "ok": True})
    assert outcome == []
    running.spawner.spawned[2].say({"event": "reloaded", "ok": True})
    assert outcome == [True]


def test_a_worker_that_dies_during_a_reload_does_not_hold_it_up(running: Running) -> None:
    outcome: list[bool] = []
    running.master.reload().addCallback(outcome.append)
    running.spawner.spawned[0].say({"event": "reloaded", "ok": True})
    running.spawner.spawned[1].say({"event": "reloaded", "ok": True})
    running.spawner.spawned[2].end(killed())
    assert outcome == [False]


def test_a_bad_file_is_refused_by_the_master_alone(running: Running) -> None:
    running.path.write_text(CONFIG + "[backend editors]\n")
    outcome: list[bool] = []
    running.master.reload().addCallback(outcome.append)
    assert outcome == [False]
    assert all(len(p.written) == 1 for p in running.spawner.spawned)


def test_stop_forwards_sigterm_then_kills_what_outlives_the_bound(running: Running) -> None:
    port = running.master.listeners[0].number
    stopped: list[object] = []
    running.master.stopService().addCallback(stopped.append)
    assert [p.signals for p in running.spawner.spawned] == [["TERM"]] * 3
    # The master's own descriptors are closed at once: no worker holds the
    # (fake) processes' copies, so the port refuses now.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    running.spawner.spawned[0].end()
    running.reactor.advance(2 + 3 + STOP_MARGIN - 0.01)
    assert running.spawner.spawned[1].signals == ["TERM"]
    running.reactor.advance(0.01)
    assert [p.signals for p in running.spawner.spawned[1:]] == [["TERM", "KILL"]] * 2
    for process in running.spawner.spawned[1:]:
        process.end(killed())
    assert stopped == [None]
    running.reactor.advance(60)
    assert len(running.spawner.spawned) == 3


def test_several_workers_without_tag_or_store_are_warned_about_engine_io_sessions() -> None:
    from stickyproxy.config import parse_config
    from stickyproxy.workers import engine_sessions_warning

    base = "[server s1]\naddress = 127.0.0.1:1\n"
    config = parse_config(base)
    warning = engine_sessions_warning(config, 4)
    assert warning is not None and "4 workers" in warning and "sid_tag = eio4" in warning
    assert engine_sessions_warning(config, 1) is None
    for extra in ("sid_tag = eio4", "sid_store = redis://127.0.0.1:6379/0", "path ="):
        shared = parse_config(f"{base}[engineio]\n{extra}\n")
        assert engine_sessions_warning(shared, 4) is None
