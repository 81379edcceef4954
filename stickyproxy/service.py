"""The public embedding API: one proxy, started and stopped on a given reactor.

::

    proxy = StickyProxy(load_config("conf.ini"), reactor)
    yield proxy.start()          # listening, health checks running
    proxy.pool.set_admin("s2", "drain")
    yield proxy.stop()           # stops accepting, finishes what is in flight

Nothing here touches the global reactor: the caller passes it in.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet import tcp
from twisted.internet.defer import Deferred, DeferredList, gatherResults, inlineCallbacks, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from stickyproxy import systemd
from stickyproxy.config import Config, load_config
from stickyproxy.context import ProxyContext
from stickyproxy.errors import ConfigError
from stickyproxy.flow import host_port
from stickyproxy.health import HealthChecker, log_transition
from stickyproxy.pool import Pool, Server
from stickyproxy.relay import FrontendFactory
from stickyproxy.sidstore import SidStore, parse_store_url

log = Logger(namespace="stickyproxy")


class StickyProxy:
    """A sticky proxy bound to a configuration and a reactor.

    :param config: a validated :class:`~stickyproxy.config.Config`.
    :param reactor: the reactor to listen, connect and keep time with.
    :param health_client: a treq ``HTTPClient`` for health checks (tests
        inject one); by default each check opens a fresh connection.
    """

    def __init__(self, config: Config, reactor: Any, *, health_client: Any = None) -> None:
        self.config = config
        self.reactor = reactor
        self._health_client = health_client
        self.pool = self._new_pool(config)
        self.context = ProxyContext(config, self.pool, reactor)
        self.context.on_count_change = self._count_changed
        self.health = HealthChecker(self.pool, config.health, reactor, client=health_client)
        self.factory = FrontendFactory(self.context)
        self.listeners: dict[str, Any] = {}  # endpoint description -> listening port
        self.admin_port: Any = None
        self._admin_description: str | None = None
        self._demo_ports: list[Any] = []
        self._accepting = True
        self._store: SidStore | None = None
        self._store_url: str | None = None
        #: Re-reads the configuration and applies it (the admin endpoint's
        #: ``POST /reload``); set by whoever knows where it came from.
        self.reloader: Callable[[], Deferred[bool]] | None = None

    @staticmethod
    def _new_pool(config: Config) -> Pool:
        pool = Pool(config.servers, config.health, config.balance)
        pool.add_listener(log_transition)
        return pool

    @property
    def ports(self) -> list[Any]:
        """The listening ports of the proxy, in configuration order."""
        return list(self.listeners.values())

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The (host, port) each listener is bound to (useful with port 0)."""
        return [host_port(port.getHost()) for port in self.ports]

    @inlineCallbacks
    def start(self) -> Any:
        """Start the demo backends (if configured), listen, start checking."""
        if self.config.demo.backends:
            from stickyproxy.demo import listen_demo_backend

            for server in self.config.servers:
                description = f"tcp:{server.port}:interface={_endpoint_host(server.host)}"
                port = yield listen_demo_backend(server.name, description, self.reactor)
                self._demo_ports.append(port)
        self._use_store(self.config)
        yield self._listen(self.config.proxy.listen)
        yield self._listen_admin(self.config.admin.listen)
        self.health.start()

    def _use_store(self, config: Config) -> Any:
        """Connect to ``[engineio] sid_store`` (or let go of a store no longer wanted).

        Traffic never waits for the store to come up: until it is connected
        the proxy routes from its own table.

        :returns: fires once a replaced store is closed.
        """
        engineio = config.engineio
        old = self._store
        wanted = engineio.sid_store if engineio.enabled else None
        if (
            old is not None
            and wanted == self._store_url
            and old.timeout == engineio.sid_store_timeout
        ):
            return succeed(None)
        store = None
        if wanted is not None:
            store = SidStore(
                parse_store_url(wanted), self.reactor, timeout=engineio.sid_store_timeout
            )
            store.start()
        self._store, self._store_url = store, wanted
        self.context.store = store
        return old.stop() if old is not None else succeed(None)

    @inlineCallbacks
    def _listen(self, descriptions: tuple[str, ...]) -> Any:
        """Listen on ``descriptions``; keep the sockets of those already open."""
        wanted = list(descriptions)
        for description in [d for d in self.listeners if d not in wanted]:
            port = self.listeners.pop(description)
            yield port.stopListening()
        for description in wanted:
            if description in self.listeners:
                continue
            endpoint = serverFromString(self.reactor, description)
            port = yield endpoint.listen(self.factory)
            _bound_accepts(port, self._free_slots)
            if not self._accepting:
                port.stopReading()
            self.listeners[description] = port
            host, number = host_port(port.getHost())
            log.info("stickyproxy listening on {host}:{port}", host=host, port=number)

    @inlineCallbacks
    def _listen_admin(self, description: str | None) -> Any:
        if self.admin_port is not None:
            port, self.admin_port = self.admin_port, None
            yield port.stopListening()
        self._admin_description = description
        if description:
            from stickyproxy.admin import ProxyControl, admin_site

            endpoint = serverFromString(self.reactor, description)
            site = admin_site(
                self.snapshot,
                control=ProxyControl(self),
                # Read at each request, so a reload that changes the token applies at once.
                token=lambda: self.config.admin.token,
                reactor=self.reactor,
            )
            self.admin_port = yield endpoint.listen(site)

    @inlineCallbacks
    def reload(self, config: Config) -> Any:
        """Switch to ``config`` without dropping anything.

        New requests, on new and kept-alive connections alike, use the new
        servers, weights, checks, cookie attributes and timeouts; requests in
        flight and open tunnels carry on untouched. Listeners whose endpoint
        did not change keep their socket, so no connection is refused. Server
        states (drain, maintenance, health) carry over by server name.
        """
        old_pool = self.pool
        pool = self._new_pool(config)
        for name, server in pool.servers.items():
            previous = old_pool.servers.get(name)
            if previous is not None:
                _carry_state(previous, server)
        self.health.stop()
        self.config = config
        self.pool = pool
        self.context.reconfigure(config, pool)
        yield self._use_store(config)
        self.health = HealthChecker(pool, config.health, self.reactor, client=self._health_client)
        yield self._listen(config.proxy.listen)
        if config.admin.listen != self._admin_description:
            yield self._listen_admin(config.admin.listen)
        self.health.start()
        log.info("configuration reloaded: {n} server(s)", n=len(pool.servers))

    def snapshot(self) -> dict[str, Any]:
        """Servers and frontend totals as plain values (what ``/stats.json`` shows)."""
        for conn in self.context.connections:
            conn.flush_bytes()
        stats = self.context.stats
        servers = []
        for entry in self.pool.snapshot():
            entry.update(stats.server(str(entry["name"])).as_dict())
            servers.append(entry)
        frontend = stats.frontend.as_dict()
        frontend["connections"] = len(self.context.connections)
        return {"servers": servers, "frontend": frontend, "engineio": self._engine_snapshot()}

    def _engine_snapshot(self) -> dict[str, Any]:
        engine = self.context.engine
        table = engine.table
        result: dict[str, Any] = {
            "path": self.config.engineio.path,
            "sid_tag": self.config.engineio.sid_tag,
            "sessions": len(table),
            "max_sessions": table.max_entries,
            "learned": engine.learned,
            "tagged": engine.tagged,
            "expired": table.expired,
            "evicted": table.evicted,
            "store": None,
        }
        store = self.context.store
        if store is not None:
            result["store"] = {
                key: getattr(store, key, 0)
                for key in ("connected", "hits", "misses", "writes", "errors", "timeouts")
            }
        return result

    def _free_slots(self) -> int:
        return self.config.proxy.maxconn - len(self.context.connections)

    def _count_changed(self, count: int) -> None:
        """Stop accepting at ``maxconn``; the kernel backlog holds the rest.

        HAProxy does the same: extra connections wait to be accepted rather
        than being refused or answered with an error.
        """
        limit = self.config.proxy.maxconn
        if self._accepting and count >= limit:
            self._accepting = False
            for port in self.ports:
                port.stopReading()
        elif not self._accepting and count < limit:
            self._accepting = True
            for port in self.ports:
                port.startReading()

    @inlineCallbacks
    def stop(self, grace: float | None = None, spread: float | None = None) -> Any:
        """Stop gracefully.

        1. Stop accepting and checking; idle client connections close now.
        2. Requests in flight get up to ``grace`` seconds (``grace_period``)
           to finish; each connection closes after its response.
        3. Open WebSockets are closed with a Close frame (1001, going away),
           spread evenly over ``spread`` seconds (``close_spread_time``), so
           their clients do not all reconnect in the same second.
        4. Whatever is still open then is cut.
        """
        cfg = self.config.proxy
        grace = cfg.grace_period if grace is None else grace
        spread = cfg.close_spread_time if spread is None else spread
        self.health.stop()
        ports, self.listeners = self.ports, {}
        yield gatherResults([port.stopListening() for port in ports])
        connections = self.context.connections
        for conn in list(connections):
            conn.close_when_idle()
        yield self._wait(lambda: all(c.in_tunnel for c in connections), grace)
        closing = self.context.go_away(spread)
        if closing:
            log.info("closing {n} WebSocket(s) over {spread}s", n=closing, spread=round(spread, 3))
        # A Close frame may wait up to a few seconds for a frame boundary.
        yield self._wait(lambda: not connections, spread + 6.0)
        for conn in list(connections):
            conn.abort()
        others = list(self._demo_ports)
        if self.admin_port is not None:
            others.append(self.admin_port)
        self._demo_ports, self.admin_port = [], None
        yield DeferredList([port.stopListening() for port in others])
        self.context.stop_timers()
        if self._store is not None:
            store, self._store = self._store, None
            self.context.store = None
            yield store.stop()

    @inlineCallbacks
    def _wait(self, done: Callable[[], bool], timeout: float) -> Any:
        """Poll ``done`` every 50 ms, for at most ``timeout`` seconds."""
        deadline = self.reactor.seconds() + timeout
        while not done() and self.reactor.seconds() < deadline:
            yield deferLater(self.reactor, 0.05, lambda: None)


class _BoundedAcceptPort(tcp.Port):
    """A TCP port that never accepts more connections than ``maxconn`` allows.

    Twisted accepts up to ``numberAccepts`` connections in one read of the
    listening socket; stopping reading at ``maxconn`` only takes effect on the
    next one, so a burst could overshoot. Bounding the batch by the free slots
    leaves the rest in the kernel backlog, where HAProxy leaves them too.
    """

    _free: Callable[[], int]
    _accepts = 100

    @property
    def numberAccepts(self) -> int:
        return max(1, min(self._accepts, self._free()))

    @numberAccepts.setter
    def numberAccepts(self, value: int) -> None:
        self._accepts = value


def _bound_accepts(port: Any, free: Callable[[], int]) -> None:
    if type(port) is tcp.Port:
        port.__class__ = _BoundedAcceptPort
        bounded = cast(_BoundedAcceptPort, port)
        bounded._free = free


def _carry_state(previous: Server, server: Server) -> None:
    """Keep what an operator and the checks decided about a server across a reload."""
    server.admin = previous.admin
    top = server.rise + server.fall - 1
    # The counter means "UP" at rise or above; keep the same side of rise.
    if previous.health >= previous.rise:
        server.health = min(top, server.rise + (previous.health - previous.rise))
    else:
        server.health = min(previous.health, server.rise - 1)
    server.active = previous.active
    server.last_check = previous.last_check
    server.last_check_time = previous.last_check_time
    server.last_change = previous.last_change


class StickyProxyService(Service):
    """The proxy as a Twisted application service (what ``twistd`` runs).

    :param config_path: the file the configuration came from; ``SIGHUP``
        re-reads it (see :meth:`reload`).
    :param ready_file: once listening, the bound addresses are written there
        as JSON (``{"listen": [[host, port], ...], "admin": [host, port]}``):
        tests and supervisors use it to learn OS-chosen ports.
    """

    def __init__(
        self,
        config: Config,
        reactor: Any,
        ready_file: str | None = None,
        config_path: str | None = None,
    ) -> None:
        self.proxy = StickyProxy(config, reactor)
        self.reactor = reactor
        self.ready_file = ready_file
        self.config_path = config_path
        if config_path is not None:
            self.proxy.reloader = self.reload
        self._bound = False
        self._watchdog: LoopingCall | None = None

    def privilegedStartService(self) -> None:
        """Bind every listener before twistd drops privileges.

        Listening happens synchronously here, so a port that cannot be bound
        stops ``twistd`` at once with the error and a non-zero exit status.
        """
        super().privilegedStartService()
        self._bind()

    def _bind(self) -> None:
        self._bound = True
        failures: list[Failure] = []
        d = self.proxy.start()
        d.addErrback(failures.append)
        if failures:
            failures[0].raiseException()

    def startService(self) -> None:
        super().startService()
        if not self._bound:
            # ``twist`` (unlike ``twistd``) has no privileged start phase.
            self._bind()
        if self.config_path is not None:
            signal.signal(signal.SIGHUP, self._on_sighup)
        # Ready once the reactor runs: twistd installs its SIGTERM handler
        # then, and a supervisor told "ready" may signal at once.
        self.reactor.callWhenRunning(self._announce_ready)

    def _announce_ready(self) -> None:
        """Write the ready file and tell systemd (``Type=notify``) we serve.

        With ``WatchdogSec=`` set, the reactor pings from then on: a loop that
        stops turning stops the pings, and systemd restarts the service.
        """
        self._write_ready()
        _notify(systemd.ready, self._listening())
        interval = systemd.watchdog_interval()
        if interval is not None and self._watchdog is None:
            self._watchdog = LoopingCall(_notify, systemd.watchdog)
            self._watchdog.clock = self.reactor
            self._watchdog.start(interval, now=False)

    def _listening(self) -> str:
        return "listening on " + ", ".join(f"{h}:{p}" for h, p in self.proxy.addresses)

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> Deferred[bool]:
        """Re-read the configuration file and apply it.

        A configuration with problems is refused: each problem is logged and
        the proxy keeps running with the configuration it had.

        :return: a Deferred firing with whether the new configuration is in use.
        """
        assert self.config_path is not None
        _notify(systemd.reloading, "reloading " + self.config_path)
        d = self._reload()
        d.addBoth(self._notify_reloaded)
        return d

    def _notify_reloaded(self, result: Any) -> Any:
        # After RELOADING=1 systemd waits for READY=1, whatever the outcome.
        outcome = "" if result is True else "; reload refused, previous configuration kept"
        _notify(systemd.ready, self._listening() + outcome)
        return result

    def _reload(self) -> Deferred[bool]:
        assert self.config_path is not None
        try:
            config = load_config(self.config_path)
        except ConfigError as e:
            for problem in e.problems:
                log.error("reload refused: {problem}", problem=str(problem))
            return succeed(False)
        d = self.proxy.reload(config)
        d.addCallback(lambda _: self._write_ready())
        d.addCallback(lambda _: True)
        return d

    def _write_ready(self) -> None:
        if self.ready_file is None:
            return
        tmp = self.ready_file + ".tmp"
        with open(tmp, "w") as f:
            admin = self.proxy.admin_port
            json.dump(
                {
                    "listen": [list(a) for a in self.proxy.addresses],
                    "admin": None if admin is None else list(host_port(admin.getHost())),
                },
                f,
            )
        os.replace(tmp, self.ready_file)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        _notify(systemd.stopping, "draining connections")
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        return self.proxy.stop()


def _notify(send: Callable[..., bool], *args: Any) -> None:
    """Tell systemd; a failure is logged, never raised into start, reload or stop."""
    try:
        send(*args)
    except OSError:
        log.failure("systemd notification failed")


def _endpoint_host(host: str) -> str:
    # Twisted endpoint strings escape colons in IPv6 addresses.
    return host.replace(":", "\\:")
