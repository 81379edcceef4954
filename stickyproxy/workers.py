"""Several proxy processes sharing one listening socket.

A Python process runs on one core. To use more, a *master* process binds
every listening socket once and starts N *worker* processes that inherit
them; each worker runs an ordinary :class:`~stickyproxy.service.StickyProxy`
that accepts from the shared sockets, and the kernel hands each new
connection to whichever worker accepts it first. Routing needs no
coordination: the hash ring is keyed by server names and weights and the
cookie names a server, so every worker sends a given client to the same
server. engine.io sessions learned from handshakes are the exception: each
worker knows those it relayed, so several workers want ``[engineio] sid_tag``
or ``sid_store`` (:func:`engine_sessions_warning` says so at start). Each
worker runs its own health checks.

::

    python -m stickyproxy.workers --config stickyproxy.ini --workers 3 --ready-file ready.json

The master

* binds ``[proxy] listen`` (``tcp:``, ``tcp6:``, ``ssl:`` and ``systemd:``
  endpoints, through Twisted's own endpoint parser) and one ``[admin] listen``
  endpoint per worker: ``tcp:9000`` gives worker *i* port ``9000 + i``, and
  port 0 an OS-chosen port per worker. Binding happens before the workers
  start, so a port that cannot be bound fails the start at once, and a
  worker that is replaced keeps the same addresses;
* is the only reader of the configuration file: it validates the file and
  sends the very same text to every worker, at start and on ``SIGHUP``, so
  all workers run one configuration, a worker started later included, and
  a bad file is refused once;
* forwards ``SIGTERM`` (each worker drains as a single proxy does) and waits
  for every worker, for at most ``grace_period + close_spread_time`` plus a
  margin, then kills what is left;
* replaces a worker that dies, after a delay that doubles with each quick
  failure (0.5 s up to 30 s), and logs it;
* runs the ``[demo] backends`` itself, so that they listen before any
  worker checks them and need no port of their own per worker;
* speaks to systemd alone (``READY=1`` once every worker serves,
  ``RELOADING=1`` ... ``READY=1`` around a reload, ``STOPPING=1``): the unit
  keeps ``NotifyAccess=main``; workers see no ``NOTIFY_SOCKET``.

Each worker talks to the master over two pipes: it writes one JSON object per
line on :data:`STATUS_FD` (``{"event": "ready"}``, ``{"event": "reloaded",
"ok": true}``) and reads the same on :data:`CONTROL_FD` (``{"op": "config",
"text": ..., "source": ...}``). End of file on that pipe means the master is
gone, and the worker then stops gracefully instead of serving unsupervised.

Listening sockets belong to the master for its whole life: a reload that
changes ``[proxy] listen``, ``[admin] listen`` or the number of workers is
applied otherwise but keeps the sockets, with a warning; those changes need a
restart. ``unix:`` endpoints are refused with more than one worker (Twisted
changes the mode of an adopted UNIX socket and unlinks its path when one
worker stops listening).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.application.service import Service
from twisted.internet import fdesc
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from stickyproxy import systemd
from stickyproxy.config import Config, parse_config, read_config, split_endpoint
from stickyproxy.errors import ConfigError, ConfigProblem

__all__ = [
    "CONTROL_FD",
    "MAX_WORKERS",
    "STATUS_FD",
    "Backoff",
    "InheritedSocket",
    "InheritingReactor",
    "WorkerMaster",
    "WorkerPlan",
    "admin_endpoint_for",
    "endpoint_for_worker",
    "main",
    "read_config",
    "worker_config",
    "worker_problems",
]

log = Logger(namespace="stickyproxy")

#: The worker writes its status here, one JSON object per line.
STATUS_FD = 3
#: The worker reads the master's commands here; end of file: the master is gone.
CONTROL_FD = 4
#: Inherited listening sockets are numbered from here, listeners first.
FIRST_SOCKET_FD = 5
#: The most workers a master runs (``[proxy] workers`` is 1 to this).
MAX_WORKERS = 64
#: Beyond ``grace_period + close_spread_time``: a Close frame may wait a few
#: seconds for a frame boundary, and a process needs a moment to exit.
STOP_MARGIN = 10.0
#: How long a worker may take to apply a reload before the master stops waiting.
RELOAD_TIMEOUT = 30.0

# Environment variables meant for the master alone: systemd's notification
# socket and watchdog (only the main process may notify) and its socket
# activation variables (the master passes those sockets on itself).
_MASTER_ONLY_ENV = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)


# ---------------------------------------------------------------------------
# Endpoint descriptions: which the workers can share, and how each worker's
# configuration names the socket it inherits.
# ---------------------------------------------------------------------------


def _split_raw(description: str) -> list[str]:
    """Split an endpoint description, keeping escapes so the pieces join back."""
    return split_endpoint(description, keep_escapes=True)


def _escape_host(host: str) -> str:
    # Twisted endpoint strings separate arguments with colons; an IPv6
    # address escapes its own.
    return host.replace("\\", "\\\\").replace(":", "\\:")


def _port_argument(args: Sequence[str]) -> tuple[int, str] | None:
    """Where the port is in ``args``: (index, its text), or ``None``."""
    for index, arg in enumerate(args):
        name, equals, value = arg.partition("=")
        if not equals:
            return index, arg
        if name == "port":
            return index, value
    return None


def endpoint_for_worker(description: str, family: int, host: str, port: int) -> str:
    """The endpoint a worker's configuration uses for a socket bound by the master.

    It names the address the socket is bound to, so that port 0 becomes the
    port the kernel chose and a ``systemd:`` socket becomes the ``tcp:`` or
    ``tcp6:`` address it is; the options a worker still needs (an ``ssl:``
    certificate, say) are kept. :class:`InheritingReactor` recognises the
    address and adopts the socket instead of binding a new one.

    :param description: the endpoint as configured (``tcp:0:interface=::1``).
    :param family: the socket's address family (``socket.AF_INET6``...).
    :param host: the address the socket is bound to, as ``getsockname`` says.
    :param port: the port it is bound to.
    """
    kind, *args = _split_raw(description)
    if kind == "systemd":
        kind, kept = ("tcp6" if family == socket.AF_INET6 else "tcp"), []
    else:
        # Positional arguments after the port, and backlog=, only matter when
        # binding; interface= and port= are replaced by the bound address.
        kept = [
            arg
            for arg in args
            if "=" in arg and arg.partition("=")[0] not in ("port", "interface", "backlog")
        ]
    return ":".join([kind, str(port), f"interface={_escape_host(host)}", *kept])


def admin_endpoint_for(description: str, index: int) -> str:
    """Worker ``index``'s ``[admin] listen``: the configured port plus ``index``.

    Port 0 stays 0: each worker then gets a port of its own from the kernel.
    Worker 0 keeps the configured address, so tools that know only that one
    still reach a worker.
    """
    args = _split_raw(description)
    found = _port_argument(args[1:])
    if found is None:
        raise ValueError(f"{description!r} has no port")
    position, text = found
    number = int(text)
    if number == 0:
        return description
    name = "port=" if "=" in args[1 + position] else ""
    args[1 + position] = f"{name}{number + index}"
    return ":".join(args)


def worker_problems(config: Config, workers: int) -> list[ConfigProblem]:
    """What in ``config`` cannot work with ``workers`` processes.

    :return: one problem per endpoint that cannot be shared, empty when all is well.
    """
    problems: list[ConfigProblem] = []
    if not 1 <= workers <= MAX_WORKERS:
        problems.append(
            ConfigProblem(
                "proxy",
                "workers",
                f"expected a whole number from 1 to {MAX_WORKERS}, got {workers}",
            )
        )
        return problems
    for description in config.proxy.listen:
        message = _listen_problem(description)
        if message is not None:
            problems.append(ConfigProblem("proxy", "listen", message))
    if config.admin.listen is not None:
        message = _admin_problem(config.admin.listen, workers)
        if message is not None:
            problems.append(ConfigProblem("admin", "listen", message))
    return problems


def _listen_problem(description: str) -> str | None:
    kind, *args = _split_raw(description)
    if kind == "systemd":
        domains = [a.partition("=")[2] for a in args if a.startswith("domain=")]
        if domains and domains[0] not in ("INET", "INET6"):
            return (
                f"{description!r}: with several workers a systemd socket must be "
                f"domain=INET or domain=INET6"
            )
        return None
    if kind not in ("tcp", "tcp6", "ssl"):
        return (
            f"{description!r}: with several workers the listeners must be tcp:, tcp6:, "
            f"ssl: or systemd: endpoints"
        )
    return None


def _admin_problem(description: str, workers: int) -> str | None:
    kind, *args = _split_raw(description)
    if kind not in ("tcp", "tcp6", "ssl"):
        return (
            f"{description!r}: with several workers the status endpoint must be tcp:, tcp6: "
            f"or ssl: (worker N listens on its port + N)"
        )
    found = _port_argument(args)
    if found is None or not found[1].isdigit():
        return f"{description!r} has no port"
    port = int(found[1])
    if port and port + workers - 1 > 65535:
        return f"{description!r}: ports {port} to {port + workers - 1} do not all exist"
    return None


# ---------------------------------------------------------------------------
# Restart policy.
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backoff:
    """How long to wait before replacing a worker that died.

    The delay doubles with each failure in a row, from ``initial`` up to
    ``maximum``, so a worker that cannot start does not spin the CPU; a
    worker that ran for ``stable`` seconds or more starts the count afresh.
    """

    initial: float = 0.5
    maximum: float = 30.0
    stable: float = 30.0

    def failures(self, previous: int, uptime: float) -> int:
        """The failure count after a worker died after ``uptime`` seconds."""
        return 1 if uptime >= self.stable else previous + 1

    def delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` failures in a row (at least 1)."""
        exponent = min(max(failures, 1) - 1, 32)  # 2**32 * initial is past any maximum
        return float(min(self.maximum, self.initial * 2**exponent))


# ---------------------------------------------------------------------------
# What a worker is given.
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InheritedSocket:
    """A listening socket bound by the master, as a worker inherits it.

    :ivar description: the endpoint the worker's configuration uses for it
        (see :func:`endpoint_for_worker`).
    :ivar fd: its descriptor number in the worker.
    :ivar family: its address family.
    :ivar host: the address it is bound to.
    :ivar port: the port it is bound to.
    """

    description: str
    fd: int
    family: int
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    """Everything a worker needs besides the configuration text.

    :ivar index: 0 to N-1.
    :ivar listen: the proxy's listeners, in configuration order.
    :ivar admin: this worker's status endpoint, if any.
    """

    index: int
    listen: tuple[InheritedSocket, ...]
    admin: InheritedSocket | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "index": self.index,
                "listen": [_socket_dict(s) for s in self.listen],
                "admin": None if self.admin is None else _socket_dict(self.admin),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> WorkerPlan:
        data = json.loads(text)
        admin = data.get("admin")
        return cls(
            index=int(data["index"]),
            listen=tuple(InheritedSocket(**item) for item in data["listen"]),
            admin=None if admin is None else InheritedSocket(**admin),
        )


def _socket_dict(inherited: InheritedSocket) -> dict[str, Any]:
    return {
        "description": inherited.description,
        "fd": inherited.fd,
        "family": inherited.family,
        "host": inherited.host,
        "port": inherited.port,
    }


def worker_config(config: Config, plan: WorkerPlan) -> Config:
    """``config`` as worker ``plan.index`` runs it.

    The listeners and status endpoint are the inherited sockets, whatever the
    file says now (they belong to the master). The demo backends run in the
    master: they cannot share their ports, and they must listen before any
    worker checks them (a check of a port nobody listens on may connect the
    checking socket to itself and keep the port from being bound).
    """
    proxy = replace(config.proxy, listen=tuple(s.description for s in plan.listen))
    admin = replace(config.admin, listen=None if plan.admin is None else plan.admin.description)
    demo = replace(config.demo, backends=False)
    return replace(config, proxy=proxy, admin=admin, demo=demo)


def encode_message(message: Mapping[str, Any]) -> bytes:
    """One message on a master/worker pipe: a JSON object on one line."""
    return json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n"


class MessageReader:
    """Cuts a byte stream into the JSON objects it carries, one per line.

    :param limit: the longest line kept; a longer one is dropped (and
        reported as ``None``) rather than buffered without end.
    """

    def __init__(self, limit: int = 64 * 1024 * 1024) -> None:
        self._buffer = bytearray()
        self._limit = limit
        self._discarding = False

    def feed(self, data: bytes) -> list[dict[str, Any] | None]:
        """:return: each complete message, ``None`` for a line that is not one."""
        self._buffer += data
        messages: list[dict[str, Any] | None] = []
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if self._discarding:
                self._discarding = False
                messages.append(None)
                continue
            messages.append(_decode(line))
        if len(self._buffer) > self._limit:
            self._buffer.clear()
            self._discarding = True
        return messages


def _decode(line: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# ---------------------------------------------------------------------------
# The worker side.
# ---------------------------------------------------------------------------


class InheritingReactor:
    """A reactor that listens on inherited sockets instead of binding again.

    Asked to listen on the address of an inherited socket, it adopts that
    socket (``IReactorSocket.adoptStreamPort``) once, and closes its own
    descriptor of it: the adopted port has a duplicate, and a descriptor left
    open would keep the socket listening after the port stops. Everything
    else goes to ``reactor``, whose interfaces this object declares.

    :param reactor: the real reactor.
    :param sockets: the inherited sockets.
    """

    def __init__(self, reactor: Any, sockets: Iterable[InheritedSocket]) -> None:
        self._reactor = reactor
        self._sockets = {(s.host, s.port): s for s in sockets}
        # Callers (treq, endpoints) ask the reactor which interfaces it
        # provides; give the same answers as the real one.
        directlyProvides(self, providedBy(reactor))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        inherited = self._sockets.pop((interface, port), None)
        if inherited is None:
            return self._reactor.listenTCP(port, factory, backlog, interface)
        try:
            fdesc.setNonBlocking(inherited.fd)  # type: ignore[no-untyped-call]
            return self._reactor.adoptStreamPort(inherited.fd, inherited.family, factory)
        finally:
            os.close(inherited.fd)

    def listenSSL(
        self,
        port: int,
        factory: Any,
        contextFactory: Any,  # noqa: N803 - endpoints pass it by this name
        backlog: int = 50,
        interface: str = "",
    ) -> Any:
        # As Twisted's own reactors do it: TLS as a protocol wrapper on a TCP port.
        from twisted.protocols.tls import TLSMemoryBIOFactory

        wrapped = TLSMemoryBIOFactory(contextFactory, False, factory)
        return self.listenTCP(port, wrapped, backlog, interface)


class _MasterLink(Protocol):
    """The worker's end of the pipes to the master; runs the proxy it is told to."""

    def __init__(self, plan: WorkerPlan, reactor: Any) -> None:
        self.plan = plan
        self.reactor = reactor
        self.proxy: Any = None
        self.exit_status = 0
        self.stopping = False
        self._reader = MessageReader()

    def send(self, message: Mapping[str, Any]) -> None:
        if self.transport is not None:
            self.transport.write(encode_message(message))

    def dataReceived(self, data: bytes) -> None:
        for message in self._reader.feed(data):
            if message is None or message.get("op") != "config":
                log.warn(
                    "worker {index}: unreadable message from the master", index=self.plan.index
                )
                continue
            self._configure(str(message.get("text", "")), str(message.get("source", "<master>")))

    def _configure(self, text: str, source: str) -> None:
        try:
            config = worker_config(parse_config(text, source), self.plan)
        except ConfigError as e:
            # The master validated the same text; this is a bug, not a typo.
            for problem in e.problems:
                log.error("configuration refused: {problem}", problem=str(problem))
            if self.proxy is None:
                self.fail(1)
            else:
                self.send({"event": "reloaded", "ok": False})
            return
        if self.proxy is None:
            self._start(config)
        else:
            d = self.proxy.reload(config)
            d.addCallbacks(
                lambda _: self.send({"event": "reloaded", "ok": True}),
                self._reload_failed,
            )

    def _start(self, config: Config) -> None:
        from stickyproxy.service import StickyProxy

        sockets = [*self.plan.listen, *([self.plan.admin] if self.plan.admin else [])]
        self.proxy = StickyProxy(config, InheritingReactor(self.reactor, sockets))
        # The admin endpoint's reload goes to the master, which reloads everyone.
        self.proxy.reloader = _ask_master_to_reload
        d = self.proxy.start()
        d.addCallbacks(self._started, self._start_failed)

    def _started(self, _: object) -> None:
        self.reactor.addSystemEventTrigger("before", "shutdown", self.proxy.stop)
        self.send({"event": "ready"})

    def _start_failed(self, failure: Failure) -> None:
        log.failure("worker {index} could not start", failure, index=self.plan.index)
        self.fail(1)

    def _reload_failed(self, failure: Failure) -> None:
        log.failure("worker {index}: reload failed", failure, index=self.plan.index)
        self.send({"event": "reloaded", "ok": False})

    def fail(self, status: int) -> None:
        self.exit_status = status
        self.stop()

    def stop(self) -> None:
        """Stop once: the master, systemd and a terminal may all ask."""
        if not self.stopping:
            self.stopping = True
            self.reactor.stop()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.stopping:
            log.warn("worker {index}: the master is gone; stopping", index=self.plan.index)
            self.stop()


def _ask_master_to_reload() -> Deferred[bool]:
    os.kill(os.getppid(), signal.SIGHUP)
    return succeed(True)


def run_worker(plan: WorkerPlan, reactor: Any = None) -> int:
    """Run one worker until it is stopped; :return: its exit status."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    from twisted.internet import stdio

    _log_to_stdout(f"worker {plan.index}")
    link = _MasterLink(plan, reactor)
    # The pipes to the master, as a transport: stdin and stdout of a sort.
    standard_io: Any = stdio.StandardIO
    standard_io(link, stdin=CONTROL_FD, stdout=STATUS_FD, reactor=reactor)

    def stop(signum: int, frame: Any) -> None:
        reactor.callFromThread(link.stop)

    def refuse_reload(signum: int, frame: Any) -> None:
        reactor.callFromThread(
            log.warn,
            "worker {index}: reloads go through the master (pid {pid}); SIGHUP ignored",
            index=plan.index,
            pid=os.getppid(),
        )

    # Twisted's own handlers would call reactor.stop() again when systemd
    # (KillMode=control-group) and the master both send SIGTERM.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, refuse_reload)
    reactor.run(installSignalHandlers=False)
    return link.exit_status


def _log_to_stdout(tag: str | None) -> None:
    """Log as ``twistd --logfile=-`` does; a worker's lines carry ``tag``."""
    from twisted.logger import FileLogObserver, formatEventAsClassicLogText, globalLogBeginner

    def format_event(event: Mapping[str, Any]) -> str | None:
        if tag is not None:
            system = event.get("log_system")
            if system is None and event.get("log_namespace") != "log_legacy":
                level = getattr(event.get("log_level"), "name", "-")
                system = f"{event.get('log_namespace', '-')}#{level}"
            system = tag if system in (None, "-") else f"{system} {tag}"
            event = {**event, "log_system": system}
        return formatEventAsClassicLogText(dict(event))

    globalLogBeginner.beginLoggingTo([FileLogObserver(sys.stdout, format_event)])


# ---------------------------------------------------------------------------
# The master side.
# ---------------------------------------------------------------------------


@dataclass
class _Bound:
    """A listening socket the master bound, by its bare descriptor."""

    description: str
    fd: int
    family: int
    host: str
    number: int

    def close(self) -> None:
        # close(), never shutdown(): the socket is shared, and shutting it
        # down would stop it listening in every worker too.
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class _Slot:
    """One worker position: its sockets, and the process filling it now."""

    index: int
    admin: _Bound | None
    process: Any = None
    pid: int | None = None
    ready: bool = False
    started: float = 0.0
    failures: int = 0
    restart: IDelayedCall | None = None
    reloads: deque[Deferred[bool]] = field(default_factory=deque)


class _WorkerProcess(ProcessProtocol):
    def __init__(self, master: WorkerMaster, slot: _Slot) -> None:
        self.master = master
        self.slot = slot
        self._reader = MessageReader()

    def childDataReceived(self, child_fd: int, data: bytes) -> None:
        if child_fd != STATUS_FD:
            return
        for message in self._reader.feed(data):
            self.master._message(self.slot, message)

    def processEnded(self, reason: Failure) -> None:
        self.master._exited(self.slot, reason)


Spawn = Callable[..., Any]


class WorkerMaster(Service):
    """Binds the sockets and keeps ``workers`` worker processes running.

    :param config_path: the configuration file; read now and on ``SIGHUP``.
    :param reactor: the master's reactor.
    :param workers: how many worker processes (1 to :data:`MAX_WORKERS`).
    :param ready_file: once every worker serves, and whenever a worker is
        replaced, the addresses are written there as JSON: ``{"listen":
        [[host, port], ...], "admin": [host, port] | null, "workers":
        [{"index": 0, "pid": PID, "admin": [host, port] | null}, ...]}``,
        where ``admin`` is worker 0's.
    :param spawn: ``IReactorProcess.spawnProcess`` (tests pass another).
    :param argv: the command that starts a worker; the plan is appended as
        JSON.
    :raises ConfigError: the file is invalid, or cannot work with ``workers``.
    """

    def __init__(
        self,
        config_path: str,
        reactor: Any,
        *,
        workers: int,
        ready_file: str | None = None,
        spawn: Spawn | None = None,
        argv: Sequence[str] = (sys.executable, "-m", "stickyproxy.workers", "--worker"),
        backoff: Backoff = Backoff(),
    ) -> None:
        self.config_path = config_path
        self.reactor = reactor
        self.workers = workers
        self.ready_file = ready_file
        self._spawn_process: Spawn = spawn if spawn is not None else reactor.spawnProcess
        self._argv = list(argv)
        self.backoff = backoff
        self._text, self.config = read_config(config_path)
        problems = worker_problems(self.config, workers)
        if problems:
            raise ConfigError(problems, config_path)
        self.listeners: list[_Bound] = []
        self.slots: list[_Slot] = []
        self._bound = False
        self._announced = False
        self._stopping = False
        self._stopped: Deferred[None] | None = None
        self._watchdog: LoopingCall | None = None
        self._demo_ports: list[Any] = []

    # -- start ---------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Bind every socket before twistd drops privileges; fail at once if one cannot be."""
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        self._bind()

    def _bind(self) -> None:
        self._bound = True
        placeholder = Factory.forProtocol(Protocol)
        bound: list[_Bound] = []
        try:
            for description in self.config.proxy.listen:
                bound.append(_bind_now(self.reactor, description, placeholder))
            admins: list[_Bound | None] = []
            for index in range(self.workers):
                if self.config.admin.listen is None:
                    admins.append(None)
                    continue
                description = admin_endpoint_for(self.config.admin.listen, index)
                admin = _bind_now(self.reactor, description, placeholder)
                bound.append(admin)
                admins.append(admin)
        except BaseException:
            for item in bound:
                item.close()
            raise
        self.listeners = bound[: len(self.config.proxy.listen)]
        self.slots = [_Slot(index, admin) for index, admin in enumerate(admins)]
        if self.config.demo.backends:
            from stickyproxy.demo import listen_demo_backend

            for server in self.config.servers:
                description = f"tcp:{server.port}:interface={_escape_host(server.host)}"
                port = _now(listen_demo_backend(server.name, description, self.reactor))
                self._demo_ports.append(port)
        for item in self.listeners:
            log.info("stickyproxy listening on {host}:{port}", host=item.host, port=item.number)
        warning = engine_sessions_warning(self.config, self.workers)
        if warning:
            log.warn("{warning}", warning=warning)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if not self._bound:
            self._bind()
        signal.signal(signal.SIGHUP, self._on_sighup)
        for slot in self.slots:
            self._start_worker(slot)

    def _start_worker(self, slot: _Slot) -> None:
        slot.restart = None
        child_fds: dict[int, Any] = {0: 0, 1: 1, 2: 2, STATUS_FD: "r", CONTROL_FD: "w"}
        inherited: list[InheritedSocket] = []
        for number, item in enumerate(
            [*self.listeners, *([slot.admin] if slot.admin else [])], FIRST_SOCKET_FD
        ):
            child_fds[number] = item.fd
            inherited.append(
                InheritedSocket(
                    endpoint_for_worker(item.description, item.family, item.host, item.number),
                    number,
                    item.family,
                    item.host,
                    item.number,
                )
            )
        admin = inherited.pop() if slot.admin else None
        plan = WorkerPlan(slot.index, tuple(inherited), admin)
        slot.started = self.reactor.seconds()
        try:
            process = self._spawn_process(
                _WorkerProcess(self, slot),
                self._argv[0],
                [*self._argv, plan.to_json()],
                env=_worker_environment(os.environ),
                childFDs=child_fds,
            )
        except OSError:
            log.failure("could not start worker {index}", index=slot.index)
            self._exited(slot, Failure(ProcessDone(1)))  # type: ignore[no-untyped-call]
            return
        slot.process, slot.pid = process, process.pid
        log.info("worker {index} started (pid {pid})", index=slot.index, pid=slot.pid)
        self._send_config(slot)

    def _send_config(self, slot: _Slot) -> None:
        message = {"op": "config", "text": self._text, "source": self.config_path}
        slot.process.writeToChild(CONTROL_FD, encode_message(message))

    # -- what workers say ----------------------------------------------------

    def _message(self, slot: _Slot, message: dict[str, Any] | None) -> None:
        event = None if message is None else message.get("event")
        if event == "ready":
            slot.ready = True
            log.info("worker {index} ready (pid {pid})", index=slot.index, pid=slot.pid)
            if self._announced:
                self._write_ready()
                _notify(systemd.status, self._status())
            elif all(s.ready for s in self.slots):
                self._announce()
        elif event == "reloaded" and slot.reloads:
            slot.reloads.popleft().callback(bool(message and message.get("ok")))
        else:
            log.warn(
                "worker {index}: unreadable status {message!r}", index=slot.index, message=message
            )

    def _exited(self, slot: _Slot, reason: Failure) -> None:
        pid, uptime = slot.pid, self.reactor.seconds() - slot.started
        slot.process, slot.pid, slot.ready = None, None, False
        while slot.reloads:
            # A replacement gets the newest configuration when it starts.
            slot.reloads.popleft().callback(False)
        if self._stopping:
            log.info("worker {index} (pid {pid}) stopped", index=slot.index, pid=pid)
            if self._stopped is not None and all(s.process is None for s in self.slots):
                self._stopped.callback(None)
            return
        slot.failures = self.backoff.failures(slot.failures, uptime)
        delay = self.backoff.delay(slot.failures)
        log.warn(
            "worker {index} (pid {pid}) {how} after {uptime}s; starting another in {delay}s",
            index=slot.index,
            pid=pid,
            how=_describe_exit(reason),
            uptime=round(uptime, 1),
            delay=delay,
        )
        if self._announced:
            _notify(systemd.status, self._status())
        slot.restart = self.reactor.callLater(delay, self._start_worker, slot)

    def _announce(self) -> None:
        """Every worker serves: write the ready file, tell systemd, start the watchdog."""
        self._announced = True
        self._write_ready()
        _notify(systemd.ready, self._status())
        interval = systemd.watchdog_interval()
        if interval is not None and self._watchdog is None:
            self._watchdog = LoopingCall(_notify, systemd.watchdog)
            self._watchdog.clock = self.reactor
            self._watchdog.start(interval, now=False)

    def _status(self) -> str:
        serving = sum(s.ready for s in self.slots)
        listening = ", ".join(f"{b.host}:{b.number}" for b in self.listeners)
        return f"{serving}/{len(self.slots)} workers serving; listening on {listening}"

    def ready_info(self) -> dict[str, Any]:
        """What the ready file says (see the class docstring)."""
        workers = [
            {
                "index": slot.index,
                "pid": slot.pid,
                "admin": None if slot.admin is None else [slot.admin.host, slot.admin.number],
            }
            for slot in self.slots
        ]
        return {
            "listen": [[b.host, b.number] for b in self.listeners],
            "admin": workers[0]["admin"] if workers else None,
            "workers": workers,
        }

    def _write_ready(self) -> None:
        if self.ready_file is None:
            return
        tmp = self.ready_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.ready_info(), f)
        # Readers see the old file or the new one, never half of one.
        os.replace(tmp, self.ready_file)

    # -- reload --------------------------------------------------------------

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> Deferred[bool]:
        """Re-read the configuration and hand it to every running worker.

        A file with problems is refused once, here, each problem logged, and
        the workers keep the configuration they run. Workers waiting to be
        replaced get the new one when they start.

        :return: a Deferred firing, once every worker has answered, with
            whether they all use the new configuration.
        """
        _notify(systemd.reloading, "reloading " + self.config_path)
        try:
            text, config = read_config(self.config_path)
        except ConfigError as e:
            for problem in e.problems:
                log.error("reload refused: {problem}", problem=str(problem))
            _notify(systemd.ready, self._status() + "; reload refused, previous configuration kept")
            return succeed(False)
        self._warn_fixed(config)
        self._text, self.config = text, config
        waits: list[Deferred[bool]] = []
        for slot in self.slots:
            if slot.process is None:
                continue
            d: Deferred[bool] = Deferred()
            slot.reloads.append(d)
            waits.append(d)
            self._send_config(slot)
        done = DeferredList(waits).addTimeout(RELOAD_TIMEOUT, self.reactor)
        return done.addBoth(self._reloaded, len(waits))

    def _reloaded(self, results: Any, asked: int) -> bool:
        if isinstance(results, Failure):
            log.error("reload: not every worker answered within {t}s", t=RELOAD_TIMEOUT)
            ok = False
        else:
            applied = sum(1 for success, value in results if success and value)
            ok = applied == asked
            log.info("configuration reloaded by {n} of {asked} worker(s)", n=applied, asked=asked)
        outcome = "" if ok else "; reload incomplete, see the log"
        _notify(systemd.ready, self._status() + outcome)
        return ok

    def _warn_fixed(self, config: Config) -> None:
        """Say which changes wait for a restart: the master's sockets stay as they are."""
        if config.proxy.listen != self.config.proxy.listen:
            log.warn("[proxy] listen changed: the listening sockets change at the next restart")
        if config.admin.listen != self.config.admin.listen:
            log.warn("[admin] listen changed: the status endpoints change at the next restart")
        workers = config.proxy.workers
        if workers != self.workers:
            log.warn(
                "[proxy] workers changed to {n}: still running {m} until the next restart",
                n=workers,
                m=self.workers,
            )

    # -- stop ----------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        """Stop every worker gracefully; kill those still running past the bound."""
        super().stopService()  # type: ignore[no-untyped-call]
        self._stopping = True
        _notify(systemd.stopping, "draining connections")
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        # The workers have their own descriptors of these sockets: closing the
        # master's lets the kernel refuse new connections once the last worker
        # stops listening, instead of queueing them for nobody.
        for item in [*self.listeners, *(s.admin for s in self.slots if s.admin)]:
            item.close()
        running = [slot for slot in self.slots if slot.process is not None]
        for slot in self.slots:
            if slot.restart is not None and slot.restart.active():
                slot.restart.cancel()
            slot.restart = None
        if not running:
            return self._stop_demo()
        self._stopped = Deferred()
        for slot in running:
            _signal(slot, "TERM")
        cfg = self.config.proxy
        bound = cfg.grace_period + cfg.close_spread_time + STOP_MARGIN
        kill = self.reactor.callLater(bound, self._kill_remaining)
        stopped = self._stopped

        def cancel_kill(result: None) -> None:
            if kill.active():
                kill.cancel()

        stopped.addCallback(cancel_kill)
        # The demo backends serve the workers' requests until the last one ends.
        stopped.addCallback(lambda _: self._stop_demo())
        return stopped

    def _stop_demo(self) -> Deferred[None]:
        ports, self._demo_ports = self._demo_ports, []
        return DeferredList([port.stopListening() for port in ports]).addCallback(lambda _: None)

    def _kill_remaining(self) -> None:
        for slot in self.slots:
            if slot.process is not None:
                log.warn(
                    "worker {index} (pid {pid}) still running; killing it",
                    index=slot.index,
                    pid=slot.pid,
                )
                _signal(slot, "KILL")


def _bind_now(reactor: Any, description: str, factory: Factory[Any]) -> _Bound:
    """Listen on ``description`` at once, and leave accepting to the workers.

    Twisted's endpoint parser reads the description, so every option means
    what it means to a single proxy. The descriptor is then taken from the
    port: a Twisted port that stops listening shuts its socket down, which
    would stop it in the workers as well.
    """
    endpoint = serverFromString(reactor, description)  # type: ignore[no-untyped-call]
    port = _now(endpoint.listen(factory))
    # The master never accepts: a connection it took would never be served.
    port.stopReading()
    address = port.getHost()
    family = int(port.socket.family)
    return _Bound(description, port.socket.detach(), family, str(address.host), int(address.port))


def _now(d: Deferred[Any]) -> Any:
    """The result of a Deferred that has one already (endpoints listen at once)."""
    results: list[Any] = []
    d.addBoth(results.append)
    if not results:  # pragma: no cover - every endpoint type allowed listens synchronously
        raise RuntimeError("an endpoint did not listen synchronously")
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def _signal(slot: _Slot, name: str) -> None:
    try:
        slot.process.signalProcess(name)
    except Exception:  # the process exited between our check and the signal
        log.debug("worker {index} already gone", index=slot.index)


def _describe_exit(reason: Failure) -> str:
    value = reason.value
    signal_number = getattr(value, "signal", None)
    if signal_number is not None:
        return f"was killed by signal {signal_number}"
    return f"exited with status {getattr(value, 'exitCode', None)}"


def _worker_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The master's environment minus what is the master's alone.

    The directory this package was loaded from goes first on ``PYTHONPATH``,
    so that workers run the same code as their master.
    """
    env = {k: v for k, v in environ.items() if k not in _MASTER_ONLY_ENV}
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env


def _notify(send: Callable[..., bool], *args: Any) -> None:
    """Tell systemd; a failure is logged, never raised into start, reload or stop."""
    try:
        send(*args)
    except OSError:
        log.failure("systemd notification failed")


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stickyproxy.workers``: run a master, or (``--worker``) one worker."""
    parser = argparse.ArgumentParser(
        prog="python -m stickyproxy.workers",
        description="Run several stickyproxy processes sharing the listening sockets.",
    )
    parser.add_argument("-c", "--config", metavar="FILE", help="configuration file")
    parser.add_argument("--workers", type=int, help="worker processes (default: [proxy] workers)")
    parser.add_argument("--ready-file", metavar="PATH", help="write the addresses here as JSON")
    parser.add_argument("--worker", metavar="PLAN", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return run_worker(WorkerPlan.from_json(args.worker))
    if not args.config:
        parser.error("a configuration file is required: -c FILE")
    from twisted.internet import reactor

    try:
        _, config = read_config(args.config)
        workers = args.workers or config.proxy.workers
        master = WorkerMaster(args.config, reactor, workers=workers, ready_file=args.ready_file)
        _log_to_stdout(None)
        master.privilegedStartService()
    except ConfigError as e:
        for problem in e.problems:
            print(f"{args.config}: {problem}", file=sys.stderr)
        return 1
    except Exception as e:
        print(f"stickyproxy: {e}", file=sys.stderr)
        return 1
    master.startService()
    reactor.addSystemEventTrigger("before", "shutdown", master.stopService)
    reactor.run()
    return 0


def engine_sessions_warning(config: Config, workers: int) -> str | None:
    """What to say when several workers learn engine.io sessions each on its own.

    Each worker keeps its own table of the sessions whose handshakes it
    relayed; a later request of the session accepted by another worker is
    routed by cookie and hash instead. Clients that keep the cookie, or keep
    their address, do not notice; cookie-less clients whose address changes
    do. The sid tag or a shared store makes the workers a fleet.
    """
    engineio = config.engineio
    if workers < 2 or not engineio.enabled or engineio.sid_tag != "off" or engineio.sid_store:
        return None
    return (
        f"{workers} workers learn engine.io sessions each on its own: set [engineio] "
        "sid_tag = eio4 or sid_store so that every worker routes every session "
        "(cookie-less clients whose address changes need it)"
    )


if __name__ == "__main__":
    sys.exit(main())
