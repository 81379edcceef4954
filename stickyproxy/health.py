"""Active HTTP health checks with treq.

The checker only *reports* outcomes; :meth:`stickyproxy.pool.Pool.record_check`
owns the rise/fall counter and the state, so the rules are tested without a
network (HAProxy splits ``check.c`` from ``server.c`` the same way).

Each check is ``GET <path>`` over HTTP/1.1 with a ``Host`` header naming the
server (HAProxy sends HTTP/1.0 with no ``Host``, which name-based virtual
hosts and some frameworks refuse). A 2xx or 3xx status passes; any other
status, a connection error or no answer within ``timeout`` fails.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from stickyproxy.config import HealthConfig
from stickyproxy.pool import Pool, Server, Transition

log = Logger(namespace="stickyproxy.health")


def default_http_client(reactor: Any) -> Any:
    """A treq client that opens a fresh connection for every check.

    A persistent pool would hide a server that stopped accepting connections
    behind an old, still-open socket.
    """
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
    """Checks every server with ``check = true`` every ``interval``.

    :param pool: where outcomes are recorded.
    :param config: the ``[health]`` settings.
    :param reactor: provides ``callLater`` and ``seconds`` (and TCP for the
        default client).
    :param client: a treq ``HTTPClient``; injected by tests.
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
        self.client = client if client is not None else default_http_client(reactor)
        self._loops: dict[str, LoopingCall] = {}
        self._running: dict[str, Deferred[LoopingCall]] = {}

    def start(self) -> None:
        """Check each server now, then every ``interval``."""
        for server in self.pool.servers.values():
            if not server.config.check or server.name in self._loops:
                continue
            loop = LoopingCall(self.check, server)
            loop.clock = self.reactor
            self._loops[server.name] = loop
            self._running[server.name] = loop.start(self.config.interval, now=True)

    def stop(self) -> None:
        """Stop checking; checks in flight are abandoned."""
        for loop in self._loops.values():
            if loop.running:
                loop.stop()
        self._loops.clear()
        self._running.clear()

    @inlineCallbacks
    def check(self, server: Server) -> Any:
        """Run one check of ``server`` and record its outcome."""
        host, port = server.address
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        url = f"http://{netloc}{self.config.path}"
        try:
            # A redirect is a pass (HAProxy: 3xx passes), not something to follow.
            response = yield self.client.get(
                url, timeout=self.config.timeout, allow_redirects=False
            )
            # Read the body so the connection ends cleanly; its content is
            # not judged.
            yield response.content()
        except Exception as e:
            ok, detail = False, _describe(e)
        else:
            code = response.code
            ok = 200 <= code < 400
            detail = f"HTTP {code}"
        self._record(server, ok, detail)

    def _record(self, server: Server, ok: bool, detail: str) -> None:
        transition = self.pool.record_check(server.name, ok, self.reactor.seconds(), detail)
        if transition is not None:
            log_transition(transition)


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    if isinstance(error, Failure):
        text = error.getErrorMessage()
    name = type(error).__name__
    if "Cancelled" in name or "Timeout" in name:
        return "timeout"
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


Listener = Callable[[Transition], None]
