"""Active HTTP health checks.

The checker only *reports* outcomes; :meth:`stickyproxy.pool.Pool.record_check`
owns the rise/fall counter and the state, so the rules are tested without a
network (HAProxy splits ``check.c`` from ``server.c`` the same way).

Each check is ``GET <path>``. A status listed in ``[health] expect_status``
(2xx and 3xx by default, as HAProxy) passes; any other status, a response
that is not HTTP, a connection error or no complete answer within
``timeout`` fails. Redirects are a pass or a fail by their own status, never
followed.

HTTP version and ``Host``
    HAProxy's ``option httpchk`` sends ``GET /status?all=1 HTTP/1.0`` and no
    header at all. HTTP/1.1 requires a ``Host`` header (RFC 9112 §3.2), and
    servers behind name-based virtual hosts, or frameworks that check the
    host, answer a request without one with an error or with some default
    site, so the check would judge something other than the server. The
    default is therefore HTTP/1.1 (with treq) and ``Host: <host>:<port>`` of
    the server, or ``[health] host``. ``http_version = 1.0`` reproduces
    HAProxy's request byte for byte: ``Host`` is sent only when ``host`` is
    set. Twisted's ``Agent`` speaks only HTTP/1.1, so HTTP/1.0 checks use the
    small client in this module.

Scheduling
    Each checked server has its own chain of timers on the injected clock:
    the next check is scheduled when the previous one has ended, after
    :meth:`~stickyproxy.pool.Pool.check_interval` for the server's new
    health (``interval``, ``fastinter`` or ``downinter``), so two checks of
    one server are never in flight together. A server in maintenance is not
    checked (HAProxy stops checking it). When a server's state changes for
    another reason (leaving maintenance, failures seen during traffic), its
    pending check is brought forward if the interval for the new state is
    shorter: leaving maintenance is confirmed within ``fastinter``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Generator, Mapping
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
)
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from stickyproxy.config import HealthConfig
from stickyproxy.pool import Pool, Server, Transition

__all__ = [
    "HTTP10Client",
    "HealthChecker",
    "InvalidResponseError",
    "default_http_client",
    "log_transition",
]

log = Logger(namespace="stickyproxy.health")


def default_http_client(reactor: Any, http_version: str = "1.1") -> Any:
    """A client that opens a fresh connection for every check.

    A persistent pool would hide a server that stopped accepting connections
    behind an old, still-open socket.

    :param http_version: ``"1.1"`` for treq, ``"1.0"`` for :class:`HTTP10Client`.
    """
    if http_version == "1.0":
        return HTTP10Client(reactor)
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=False)
    pool._factory = _quiet_factory()
    return HTTPClient(Agent(reactor, pool=pool))


def _quiet_factory() -> Any:
    from twisted.web.client import _HTTP11ClientFactory

    class Quiet(_HTTP11ClientFactory):
        # One "Starting factory" line per check would drown the log.
        noisy = False

    return Quiet


class HealthChecker:
    """Checks every server with ``check = true``, each on its own schedule.

    Outcomes go to :meth:`~stickyproxy.pool.Pool.record_check`; the state
    changes they cause reach the pool's listeners, which is where they are
    logged (:func:`log_transition`), together with those from operators and
    from traffic.

    :param pool: where outcomes are recorded and intervals come from.
    :param config: the ``[health]`` settings.
    :param reactor: provides ``callLater`` and ``seconds`` (and TCP for the
        default client).
    :param client: anything with treq's ``get(url, headers=...,
        allow_redirects=...)`` returning a response with ``code`` and
        ``content()``; injected by tests. By default :func:`default_http_client`
        for ``config.http_version``.
    """

    def __init__(
        self,
        pool: Pool,
        config: HealthConfig,
        reactor: Any,
        client: Any | None = None,
    ) -> None:
        self.pool = pool
        self.config = config
        self.reactor = reactor
        self.client = (
            client if client is not None else default_http_client(reactor, config.http_version)
        )
        self._running = False
        self._timers: dict[str, IDelayedCall] = {}
        self._in_flight: dict[str, Deferred[None]] = {}

    def start(self) -> None:
        """Check each server now, then on its schedule."""
        if self._running:
            return
        self._running = True
        self.pool.add_listener(self._state_changed)
        for server in list(self.pool.servers.values()):
            if server.config.check:
                self._run(server)

    def stop(self) -> None:
        """Stop checking; checks in flight are cancelled and not recorded."""
        self._running = False
        self.pool.remove_listener(self._state_changed)
        timers, self._timers = self._timers, {}
        for timer in timers.values():
            if timer.active():
                timer.cancel()
        in_flight, self._in_flight = self._in_flight, {}
        for check in in_flight.values():
            check.cancel()

    def check(self, server: Server) -> Deferred[None]:
        """Run one check of ``server`` and record its outcome.

        :returns: fires once the outcome is recorded.
        """
        probe = self._probe(server)
        probe.addTimeout(self.config.timeout, self.reactor)
        outcome = probe.addErrback(self._failure)
        return outcome.addCallback(self._record, server)

    @inlineCallbacks
    def _probe(self, server: Server) -> Generator[Deferred[Any], Any, tuple[bool, str] | None]:
        host, port = server.address
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        headers = {} if self.config.host is None else {"Host": self.config.host}
        response = yield self.client.get(
            f"http://{netloc}{self.config.path}", headers=headers, allow_redirects=False
        )
        # Read the body so the connection ends cleanly; its content is not
        # judged.
        yield response.content()
        code = int(response.code)
        ok = any(low <= code <= high for low, high in self.config.expect_status)
        return ok, f"HTTP {code}"

    def _failure(self, failure: Failure) -> tuple[bool, str] | None:
        if not self._running and failure.check(CancelledError):
            return None  # abandoned by stop(): not the server's fault
        return False, _describe(failure)

    def _record(self, outcome: tuple[bool, str] | None, server: Server) -> None:
        if outcome is None or not self._running:
            return
        ok, detail = outcome
        self.pool.record_check(server.name, ok, self.reactor.seconds(), detail)

    # -- scheduling -----------------------------------------------------------

    def _run(self, server: Server) -> None:
        self._timers.pop(server.name, None)
        if not self._running:
            return
        if server.admin == "maint":
            self._schedule(server, self.config.interval)
            return
        check = self._in_flight[server.name] = self.check(server)
        check.addBoth(self._ended, server)

    def _ended(self, result: Failure | None, server: Server) -> None:
        self._in_flight.pop(server.name, None)
        if isinstance(result, Failure):
            log.failure("Health check of {server} broke", result, server=server.name)
        if self._running:
            self._schedule(server, self.pool.check_interval(server.name))

    def _schedule(self, server: Server, delay: float) -> None:
        self._timers[server.name] = self.reactor.callLater(delay, self._run, server)

    def _state_changed(self, transition: Transition) -> None:
        # A check in flight reschedules itself when it ends; only a waiting
        # timer may need to come forward.
        timer = self._timers.get(transition.server)
        if timer is None or not timer.active():
            return
        delay = self.pool.check_interval(transition.server)
        if self.reactor.seconds() + delay < timer.getTime():
            timer.reset(delay)


def _describe(failure: Failure) -> str:
    error = failure.value
    name = type(error).__name__
    if "Cancelled" in name or "Timeout" in name:
        return "timeout"
    text = str(error) or name
    return f"{name}: {text}"[:200]


def log_transition(transition: Transition) -> None:
    """Log a server state change the way operators of HAProxy expect."""
    log.info(
        "Server {server} is {new} (was {old}), reason: {reason}",
        server=transition.server,
        new=transition.new.value,
        old=transition.old.value,
        reason=transition.reason,
    )


# -- HTTP/1.0 ----------------------------------------------------------------------

# RFC 9112 §4: status-line = HTTP-version SP status-code SP [ reason-phrase ].
# The SP before an empty reason is often left out; it is not required here.
_STATUS_LINE_RE = re.compile(rb"HTTP/[0-9]\.[0-9] ([0-9]{3})(?: [^\r\n]*)?")
#: The longest status line accepted, and the most body read before closing.
MAX_STATUS_LINE = 8192
MAX_BODY = 65536


class InvalidResponseError(Exception):
    """The server's answer did not start with an HTTP status line."""


class HTTP10Response:
    """What :meth:`HTTP10Client.get` gives: the status code, then the end."""

    def __init__(self, code: int, done: Deferred[bytes]) -> None:
        self.code = code
        self._done = done

    def content(self) -> Deferred[bytes]:
        """Fire once the server has closed the connection.

        The body is discarded (and reading stops after :data:`MAX_BODY`
        bytes): checks judge the status only.
        """
        return self._done


class HTTP10Exchange(Protocol):
    """One HTTP/1.0 request, and its response read up to the status code.

    :param request: the bytes of the whole request.
    """

    def __init__(self, request: bytes) -> None:
        self.request = request
        self._buffer = b""
        self._body = 0
        self.response: Deferred[HTTP10Response] = Deferred(self._abort)
        self.done: Deferred[bytes] = Deferred(self._abort)

    def _abort(self, _: object = None) -> None:
        # ITransport has no abortConnection; the TCP transports do.
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if self.response.called:
            self._body += len(data)
            if self._body > MAX_BODY:
                self._abort()
            return
        self._buffer += data
        # RFC 9112 §2.2: a recipient may take a bare LF as the end of a line.
        line, found, _ = self._buffer.partition(b"\n")
        if not found:
            if len(self._buffer) > MAX_STATUS_LINE:
                self._fail(InvalidResponseError("status line too long"))
            return
        match = _STATUS_LINE_RE.fullmatch(line.removesuffix(b"\r"))
        if match is None:
            self._fail(InvalidResponseError(f"not an HTTP status line: {line[:60]!r}"))
            return
        self._buffer = b""
        self.response.callback(HTTP10Response(int(match[1]), self.done))

    def _fail(self, error: Exception) -> None:
        self.response.errback(error)
        self._abort()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.response.called:
            self.response.errback(InvalidResponseError("connection closed before a status line"))
        if not self.done.called:
            self.done.callback(b"")


class HTTP10Client:
    """A client for HTTP/1.0 health checks with treq's ``get`` signature.

    The request carries only the given headers, so with none it is exactly
    HAProxy's ``GET <path> HTTP/1.0\\r\\n\\r\\n``. HTTP/1.0 connections are not
    persistent: every check opens its own.

    :param reactor: provides TCP (and name resolution for host names).
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def get(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        allow_redirects: bool = False,
    ) -> Deferred[HTTP10Response]:
        """Send ``GET`` for ``url`` (``http://host:port/target``).

        Cancelling the result before the status line closes the connection.
        """
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lines = [f"GET {target} HTTP/1.0", *(f"{k}: {v}" for k, v in (headers or {}).items())]
        exchange = HTTP10Exchange(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
        connecting = connectProtocol(
            self._endpoint(parts.hostname or "", parts.port or 80), exchange
        )
        # Cancelling before the connection is made cancels the attempt;
        # afterwards it waits on exchange.response, whose canceller aborts.
        response: Deferred[HTTP10Response] = connecting.addCallback(lambda _: exchange.response)
        return response

    def _endpoint(self, host: str, port: int) -> IStreamClientEndpoint:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return HostnameEndpoint(self.reactor, host, port)
        if address.version == 6:
            return TCP6ClientEndpoint(self.reactor, host, port)
        return TCP4ClientEndpoint(self.reactor, host, port)
