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
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, gatherResults, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from stickyproxy.config import Config
from stickyproxy.health import HealthChecker, log_transition
from stickyproxy.pool import Pool
from stickyproxy.relay import FrontendFactory, ProxyContext

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
        self.pool = Pool(config.servers, config.health, config.balance)
        self.pool.add_listener(log_transition)
        self.context = ProxyContext(config, self.pool, reactor)
        self.context.on_count_change = self._count_changed
        self.health = HealthChecker(self.pool, config.health, reactor, client=health_client)
        self.ports: list[Any] = []
        self.admin_port: Any = None
        self._demo_ports: list[Any] = []
        self._accepting = True

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The (host, port) each listener is bound to (useful with port 0)."""
        result = []
        for port in self.ports:
            address = port.getHost()
            result.append((getattr(address, "host", ""), getattr(address, "port", 0)))
        return result

    @inlineCallbacks
    def start(self) -> Any:
        """Start the demo backends (if configured), listen, start checking."""
        if self.config.demo.backends:
            from stickyproxy.demo import listen_demo_backend

            for server in self.config.servers:
                description = f"tcp:{server.port}:interface={_endpoint_host(server.host)}"
                port = yield listen_demo_backend(server.name, description, self.reactor)
                self._demo_ports.append(port)
        factory = FrontendFactory(self.context)
        for description in self.config.proxy.listen:
            endpoint = serverFromString(self.reactor, description)
            port = yield endpoint.listen(factory)
            self.ports.append(port)
        for host, port_number in self.addresses:
            log.info("stickyproxy listening on {host}:{port}", host=host, port=port_number)
        if self.config.admin.listen:
            from stickyproxy.admin import admin_site

            endpoint = serverFromString(self.reactor, self.config.admin.listen)
            self.admin_port = yield endpoint.listen(admin_site(self.snapshot))
        self.health.start()

    def snapshot(self) -> dict[str, Any]:
        """Servers and frontend totals as plain values (what ``/stats.json`` shows)."""
        for conn in self.context.connections:
            conn.flush_bytes()
        stats = self.context.stats
        servers = []
        for entry in self.pool.snapshot():
            entry.update(stats.servers[str(entry["name"])].as_dict())
            servers.append(entry)
        frontend = stats.frontend.as_dict()
        frontend["connections"] = len(self.context.connections)
        return {"servers": servers, "frontend": frontend}

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
    def stop(self, grace: float = 10.0) -> Any:
        """Stop gracefully.

        Stop listening and checking, close idle client connections, let
        requests in flight finish for up to ``grace`` seconds, then close what
        is left (open WebSockets included).
        """
        self.health.stop()
        ports, self.ports = self.ports, []
        yield gatherResults([port.stopListening() for port in ports])
        for conn in list(self.context.connections):
            conn.close_when_idle()
        waited = 0.0
        step = 0.05
        while self.context.connections and waited < grace:
            yield deferLater(self.reactor, step, lambda: None)
            waited += step
        for conn in list(self.context.connections):
            if conn.transport is not None:
                conn.transport.abortConnection()
        others = list(self._demo_ports)
        if self.admin_port is not None:
            others.append(self.admin_port)
        self._demo_ports, self.admin_port = [], None
        yield DeferredList([port.stopListening() for port in others])


class StickyProxyService(Service):
    """The proxy as a Twisted application service (what ``twistd`` runs).

    :param ready_file: once listening, the bound addresses are written there
        as JSON (``{"listen": [[host, port], ...]}``): tests and supervisors
        use it to learn OS-chosen ports.
    """

    def __init__(self, config: Config, reactor: Any, ready_file: str | None = None) -> None:
        self.proxy = StickyProxy(config, reactor)
        self.ready_file = ready_file

    def privilegedStartService(self) -> None:
        """Bind every listener before twistd drops privileges.

        Listening happens synchronously here, so a port that cannot be bound
        stops ``twistd`` at once with the error and a non-zero exit status.
        """
        super().privilegedStartService()
        failures: list[Failure] = []
        d = self.proxy.start()
        d.addErrback(failures.append)
        if failures:
            failures[0].raiseException()
        d.addCallback(lambda _: self._write_ready())

    def _write_ready(self) -> None:
        if self.ready_file is None:
            return
        tmp = self.ready_file + ".tmp"
        with open(tmp, "w") as f:
            admin = self.proxy.admin_port
            json.dump(
                {
                    "listen": [list(a) for a in self.proxy.addresses],
                    "admin": None if admin is None else _host_port(admin.getHost()),
                },
                f,
            )
        os.replace(tmp, self.ready_file)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        return self.proxy.stop()


def _host_port(address: Any) -> list[Any]:
    return [getattr(address, "host", ""), getattr(address, "port", 0)]


def _endpoint_host(host: str) -> str:
    # Twisted endpoint strings escape colons in IPv6 addresses.
    return host.replace(":", "\\:")
