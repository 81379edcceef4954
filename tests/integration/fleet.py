"""Two stickyproxy processes behind one round-robin L4 HAProxy: a fleet.

The proxies share one configuration. The L4 HAProxy in front of them runs in
``mode tcp`` with ``balance roundrobin`` and ``send-proxy-v2``, and replaces
every connection's client address by a random one, so that a client opening a
new TCP connection per request reaches either proxy, from an address neither
has seen. Used by the fleet tests and by ``bench/sio_sessions.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .harness import Haproxy, Launcher, Named, Proxy, http_get, proxy_config
from .sio_apps import launch_haproxy

#: The response header in which each proxy of a fleet names the request's
#: routing decision and server (``[proxy] decision_header``).
ROUTE_HEADER = "X-Route"

#: The longest wait for a proxy's store to notice that Redis went or came back:
#: a reconnection is tried at most every 5 s.
SETTLE_TIMEOUT = 15.0


def eventually(condition: Callable[[], bool], what: str, timeout: float = SETTLE_TIMEOUT) -> None:
    """Poll ``condition`` until it holds.

    :param what: what is waited for, in the failure's message.
    :raises AssertionError: ``timeout`` seconds passed first.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def fleet_backend_section(proxies: Sequence[Proxy]) -> str:
    """The L4 balancer's backend: round robin over the proxies, PROXY v2 to each.

    No ``check``: a health check would be a connection of its own and would
    shift the alternation of client connections.
    """
    lines = ["backend storify_editor_backend", "    mode tcp", "    balance roundrobin"]
    lines += [
        f"    server sp{i} 127.0.0.1:{proxy.port} send-proxy-v2"
        for i, proxy in enumerate(proxies, 1)
    ]
    return "\n".join(lines) + "\n"


@dataclass
class Fleet:
    """Two proxies with one configuration, and the rotating L4 balancer in front."""

    proxies: list[Proxy]
    front: Haproxy

    @property
    def port(self) -> int:
        """Where clients connect: the L4 balancer."""
        return self.front.port

    def stats(self) -> list[dict[str, Any]]:
        """Each proxy's ``/stats.json``, read from its admin port."""
        documents = []
        for proxy in self.proxies:
            assert proxy.admin_port is not None
            response = http_get(proxy.admin_port, "/stats.json", timeout=5.0)
            assert response.status == 200, response
            documents.append(json.loads(response.body))
        return documents

    def stores(self) -> list[dict[str, Any]]:
        """Each proxy's ``engineio.store`` statistics."""
        stores = [document["engineio"]["store"] for document in self.stats()]
        assert all(store is not None for store in stores), stores
        return stores

    def wait_for_stores(self, what: str = "the stores") -> None:
        """Wait until every proxy's store is connected to Redis.

        Until then a proxy's handshakes are not shared with the other.
        """
        eventually(lambda: all(store["connected"] for store in self.stores()), what)


def start_fleet(
    launch: Launcher, backends: Sequence[Named], engineio: Mapping[str, str] | None = None
) -> Fleet:
    """Two stickyproxy processes in front of ``backends`` and the L4 balancer.

    Each response carries the routing decision in :data:`ROUTE_HEADER`.

    :param engineio: ``[engineio]`` settings, the same for both proxies.
    """
    config = proxy_config(
        backends, proxy={"decision_header": ROUTE_HEADER}, engineio=engineio or {}
    )
    # A proxy takes most of a second to start; start both at once.
    with ThreadPoolExecutor(max_workers=2) as pool:
        proxies = list(pool.map(launch.stickyproxy, [config, config]))
    front = launch_haproxy(launch, fleet_backend_section(proxies), mode="tcp", rotate_source=True)
    return Fleet(proxies, front)
