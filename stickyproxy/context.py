"""What every connection of one proxy shares.

A :class:`ProxyContext` holds the settings, the server pool, the reactor, the
counters and the set of open client connections. It serves the queues of
requests waiting for a server at its maxconn, sweeps idle engine.io sessions
on a timer that runs only while sessions are known, and closes client
connections in bulk (graceful stop, drain, ``shutdown sessions``). A reload
swaps the settings and the pool in place; connections keep their context.

:class:`SessionStore` is what the context expects of a fleet's shared table
of engine.io sessions (:mod:`stickyproxy.sidstore`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.interfaces import IDelayedCall

from stickyproxy.cookietoken import CookieSigner
from stickyproxy.eiorouting import EngineRouter
from stickyproxy.pool import Pool, Server
from stickyproxy.rewrite import ForwardOptions
from stickyproxy.stats import Stats

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from stickyproxy.config import Config
    from stickyproxy.relay import Frontend


def _forward_options(config: Config) -> ForwardOptions:
    return ForwardOptions(
        cookie=config.cookie,
        forwarded_for=config.proxy.forwarded_for,
        proxy_tlv_headers=config.proxy.proxy_tlv_headers,
    )


def _signer(config: Config) -> CookieSigner | None:
    cookie = config.cookie
    if not cookie.secret:
        return None
    return CookieSigner(
        cookie.secret,
        servers=[server.cookie for server in config.servers],
        maxidle=cookie.maxidle,
        maxlife=cookie.maxlife,
    )


class SessionStore(Protocol):
    """A table of engine.io sessions shared by a fleet of proxies.

    Every operation is bounded in time and never fails: a store that is
    down answers at once, with None or False (see :mod:`stickyproxy.sidstore`).
    """

    def get(self, sid: str) -> Deferred[str | None]: ...

    def put(self, sid: str, server: str, ttl: float) -> Deferred[bool]: ...

    def touch(self, sid: str, ttl: float) -> None: ...

    def forget(self, sid: str) -> None: ...


#: How often idle engine.io sessions are swept while any are known.
_EXPIRY_INTERVAL = 5.0


class ProxyContext:
    """What every connection of one proxy shares: settings, servers, clock."""

    def __init__(self, config: Config, pool: Pool, reactor: Any) -> None:
        self.config = config
        self.pool = pool
        self.reactor = reactor
        self.options = _forward_options(config)
        self.signer = _signer(config)
        self.engine = EngineRouter(config.engineio, config.servers)
        #: The shared session table of a fleet, when ``[engineio] sid_store`` is set.
        self.store: SessionStore | None = None
        self._expiry: IDelayedCall | None = None
        self.connections: set[Frontend] = set()
        self.on_count_change: Callable[[int], None] | None = None
        # Requests waiting for a server at its maxconn (HAProxy's queues): one
        # queue per server for clients pinned to it, one for everybody else.
        self.queues: dict[str, deque[Frontend]] = {name: deque() for name in pool.servers}
        self.backend_queue: deque[Frontend] = deque()
        self.stats = Stats(list(pool.servers))

    def reconfigure(self, config: Config, pool: Pool) -> None:
        """Use ``config`` and ``pool`` for every request from now on (a reload)."""
        self.config = config
        self.pool = pool
        self.options = _forward_options(config)
        self.signer = _signer(config)
        self.engine.reconfigure(config.engineio, config.servers)
        for name in pool.servers:
            self.queues.setdefault(name, deque())

    def sessions_learned(self) -> None:
        """Sweep idle engine.io sessions from now on, while any are known.

        No timer runs for a proxy that never sees engine.io traffic; with
        traffic, abandoned handshakes are forgotten within their lifetime
        plus one sweep interval even when nothing else happens.
        """
        if self._expiry is None:
            self._expiry = self.reactor.callLater(_EXPIRY_INTERVAL, self._expire_sessions)

    def _expire_sessions(self) -> None:
        self._expiry = None
        table = self.engine.table
        table.expire(self.reactor.seconds())
        if len(table):
            self.sessions_learned()

    def stop_timers(self) -> None:
        """Cancel the session sweep (the proxy stops)."""
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None

    def release(self, server: Server) -> None:
        """A request on ``server`` ended: give its slot to a waiting one.

        Requests pinned to the server go first, then those any server may
        take, each in arrival order (HAProxy serves its queues the same way).
        The slot is given back by name: a request that started before a
        reload holds the server object of the old pool.
        """
        current = self.pool.servers.get(server.name)
        self.pool.release(current if current is not None else server)
        pinned = self.queues.get(server.name)
        if not pinned and not self.backend_queue:
            return
        for queue in (pinned, self.backend_queue):
            while queue:
                waiting = queue.popleft()
                if waiting.queued:
                    # Not from inside the release: the caller is mid-update.
                    self.reactor.callLater(0, waiting.leave_queue)
                    return

    def go_away(self, window: float, server_name: str | None = None) -> int:
        """Close open WebSockets politely, spread evenly over ``window`` seconds.

        Closing thousands of WebSockets at once makes their clients reconnect
        in the same second; spreading the closes spreads the reconnections.

        :param server_name: only the tunnels to this server (drain), or all.
        :return: how many tunnels will be closed.
        """
        tunnels = [
            conn
            for conn in self.connections
            if conn.in_tunnel and (server_name is None or conn.server_name == server_name)
        ]
        for index, conn in enumerate(tunnels):
            self.reactor.callLater(window * index / len(tunnels), conn.go_away)
        return len(tunnels)

    def shutdown_sessions(self, server_name: str) -> int:
        """Close every client connection now served by ``server_name``.

        HAProxy's ``shutdown sessions server``: open WebSockets included.
        :return: how many connections were closed.
        """
        closed = 0
        for conn in list(self.connections):
            if conn.server_name == server_name:
                conn.abort()
                closed += 1
        return closed

    def add(self, conn: Frontend) -> None:
        self.connections.add(conn)
        self.stats.frontend.connections_total += 1
        if self.on_count_change is not None:
            self.on_count_change(len(self.connections))

    def discard(self, conn: Frontend) -> None:
        self.connections.discard(conn)
        if self.on_count_change is not None:
            self.on_count_change(len(self.connections))
