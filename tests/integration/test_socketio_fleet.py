"""Two stickyproxy processes behind one round-robin L4 balancer: a fleet.

The topology of every test: three python-socketio backends (``sio_apps``); two
stickyproxy processes (``twistd``) with the same configuration; in front of
them an L4 HAProxy in ``mode tcp`` with ``balance roundrobin`` and
``send-proxy-v2``, which also replaces every connection's client address by a
random one. Cookie-less clients open a new TCP connection per HTTP request, so
a session's successive requests land on either proxy, and neither the client
address nor the proxy is stable from one request to the next.

Each proxy learns ``sid -> server`` only from the handshakes it relays itself.
A fleet keeps cookie-less sessions together only if the proxies share that
knowledge: through a tag in the sid (``[engineio] sid_tag = eio4``) or through
Redis (``[engineio] sid_store``). Without either, sessions break: that control
shows that the requests really do cross between proxies.

The backends' own counts of refused sids (``GET /unknown-sessions``) are the
source of truth for misrouting; the proxies' ``/stats.json`` and a routing
decision header (``[proxy] decision_header``) show how each request was routed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import websocket

from stickyproxy.config import default_tag

from .fleet import ROUTE_HEADER, Fleet, eventually, start_fleet
from .harness import Backend, HttpResponse, Launcher, http_get, http_request
from .redis_server import REDIS, RedisServer, running_redis
from .sio_apps import running_sio_backends
from .sio_clients import (
    POLLING,
    POLLING_THEN_WEBSOCKET,
    LoadResult,
    assert_no_session_lost,
    run_load,
)

#: The backends' ping interval and timeout (ms): a held long poll, and so a
#: polling client's disconnection, lasts at most this long.
PING_MS = 2000

#: Small enough for CI; large enough that a fleet without shared sessions
#: misroutes for sure (each request reaches the proxy that saw the handshake
#: with probability about 1/2, and the other proxy's hash picks the right
#: backend with probability about 1/3). Odd: a client that upgrades to a
#: WebSocket makes two connections, the handshake and the upgrade, and when
#: the clients run in step an even number of them would put each client's
#: upgrade on the proxy that relayed its handshake, the balancer alternating
#: strictly.
CLIENTS = 7
MESSAGES = 10

#: Where the proxies keep sessions in Redis (``SidStore``'s default prefix).
KEY_PREFIX = "stickyproxy:sid:"

#: How ``sio_clients`` reports a load that did not end by itself in time.
#: (A call without an answer is no sign of a stall by itself: a client whose
#: pong was refused as an unknown session only learns it has lost its
#: session when the server times the session out.)
STALLS = ("the load's time ran out",)

#: An engine.io polling request of session ``{sid}`` (EIO4, python-engineio).
POLL = "/socket.io/?EIO=4&transport=polling&sid={sid}"

#: The WebSocket upgrade of session ``{sid}``.
UPGRADE = "/socket.io/?EIO=4&transport=websocket&sid={sid}"

pytestmark = pytest.mark.usefixtures("haproxy_binary")
needs_redis = pytest.mark.skipif(REDIS is None, reason="redis-server is not installed")


# -- the fleet --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sio_backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Backend]]:
    """Three socket.io backends, ``s1`` to ``s3``, shared by this module's tests."""
    with running_sio_backends(
        tmp_path_factory.mktemp("sio-fleet"), ping_interval_ms=PING_MS, ping_timeout_ms=PING_MS
    ) as backends:
        yield backends


def load(fleet: Fleet, backends: Sequence[Backend], transports: Sequence[str]) -> LoadResult:
    """:data:`CLIENTS` clients x :data:`MESSAGES` echoes through the fleet.

    The bound is generous: a load normally ends in a few seconds, and only a
    stuck one gets near it.
    """
    return run_load(
        f"http://127.0.0.1:{fleet.port}",
        clients=CLIENTS,
        messages=MESSAGES,
        transports=transports,
        timeout=30.0,
        backends=backends,
        fresh_connections=True,
    )


# -- one session, request by request ----------------------------------------------------


@dataclass
class SessionExchange:
    """One socket.io session driven by hand, each request on a new connection."""

    sid: str
    #: The handshake's routing decision, as the decision header names it.
    handshake_route: str
    #: The decision header of every later request of the session, in order.
    routes: list[str]
    #: The packets the backend sent on the session's polls, in order.
    received: list[bytes]

    @property
    def handshake_server(self) -> str:
        return self.handshake_route.rpartition("server=")[2]

    def acknowledgements(self) -> dict[int, Any]:
        """The socket.io ACK packets received (``43<id><json>``), by id."""
        found: dict[int, Any] = {}
        for packet in self.received:
            if match := re.fullmatch(rb"43([0-9]+)(\[.*\])", packet):
                found[int(match[1])] = json.loads(match[2])
        return found


def session_exchange(port: int, echoes: int = 3) -> SessionExchange:
    """Drive one socket.io session by hand, one TCP connection per request.

    Over long-polling: the handshake, socket.io's CONNECT, a poll, ``echoes - 1``
    echoes and a poll for their acknowledgements; then the WebSocket upgrade
    (engine.io's ``2probe``/``3probe``/``5``) and the last echo over it.
    Every poll finds packets already queued (the connection answer, the
    acknowledgements), so none of them waits for the server's ping.
    """
    handshake = http_get(port, "/socket.io/?EIO=4&transport=polling")
    assert handshake.status == 200, handshake
    assert handshake.body.startswith(b"0{"), handshake.body
    sid = json.loads(handshake.body[1:])["sid"]
    routes: list[str] = []
    received: list[bytes] = []

    def send(method: str, body: bytes | None = None) -> HttpResponse:
        response = http_request(port, method, POLL.format(sid=sid), body=body)
        assert response.status == 200, (method, response)
        routes.append(response.headers[ROUTE_HEADER])
        return response

    def echo(i: int) -> bytes:
        # A socket.io EVENT (2) with acknowledgement id i in an engine.io
        # MESSAGE (4): 42i["echo", i].
        return b"42%d" % i + json.dumps(["echo", i]).encode()

    # socket.io CONNECT (packet type 0 in an engine.io MESSAGE, 4).
    assert send("POST", b"40").body == b"OK"
    # An EIO4 polling payload separates packets with the record separator (0x1E).
    received += send("GET").body.split(b"\x1e")
    for i in range(echoes - 1):
        assert send("POST", echo(i)).body == b"OK"
    received += send("GET").body.split(b"\x1e")

    ws = websocket.create_connection(
        f"ws://127.0.0.1:{port}{UPGRADE.format(sid=sid)}", timeout=5, suppress_origin=True
    )
    try:
        upgrade_headers = ws.getheaders()
        assert upgrade_headers is not None
        routes.append(upgrade_headers[ROUTE_HEADER.lower()])
        ws.send("2probe")
        assert ws.recv() == "3probe"
        ws.send("5")
        ws.send(echo(echoes - 1).decode())
        # The server may send a NOOP (6) or a PING (2) first; the socket's
        # timeout bounds the wait.
        while not received[-1].startswith(b"43%d" % (echoes - 1)):
            packet = ws.recv()
            assert isinstance(packet, str), packet
            if packet == "2":
                ws.send("3")
            received.append(packet.encode())
    finally:
        ws.close()
    return SessionExchange(sid, handshake.headers[ROUTE_HEADER], routes, received)


# -- Redis ------------------------------------------------------------------------------


@pytest.fixture
def redis_tcp() -> Iterator[RedisServer]:
    with running_redis(tcp=True) as server:
        yield server


@pytest.fixture
def redis_unix() -> Iterator[RedisServer]:
    with running_redis(tcp=False) as server:
        yield server


# -- the sid tag ------------------------------------------------------------------------


@pytest.mark.parametrize("transports", [POLLING, POLLING_THEN_WEBSOCKET])
def test_a_fleet_with_the_sid_tag_keeps_every_cookieless_session(
    launch: Launcher, sio_backends: list[Backend], transports: tuple[str, ...]
) -> None:
    fleet = start_fleet(launch, sio_backends, {"sid_tag": "eio4"})
    result = load(fleet, sio_backends, transports)
    # A backend refuses a sid it did not issue, and so a tagged one: none was
    # refused, so none reached a backend with its tag.
    assert_no_session_lost(result)
    stats = fleet.stats()
    # Every handshake was tagged, and both proxies routed sessions by sid.
    assert sum(document["engineio"]["tagged"] for document in stats) == CLIENTS
    assert all(document["frontend"]["sid_routed"] > 0 for document in stats), stats
    assert all(document["frontend"]["unknown_sessions"] == {} for document in stats), stats


def test_in_a_tagged_fleet_every_request_of_a_session_is_routed_by_its_tag(
    launch: Launcher, sio_backends: list[Backend]
) -> None:
    fleet = start_fleet(launch, sio_backends, {"sid_tag": "eio4"})
    exchange = session_exchange(fleet.port)
    server = exchange.handshake_server
    # The client sees the backend's sid with the server's tag appended.
    assert exchange.sid.endswith("." + default_tag(server)), exchange.sid
    assert exchange.routes == [f"sid-tag; server={server}"] * len(exchange.routes)
    # The backend answered under the stripped sid: the connection and both echoes.
    assert any(packet.startswith(b'40{"sid":') for packet in exchange.received)
    assert exchange.acknowledgements() == {i: [{"server": server, "data": i}] for i in range(3)}
    # Requests alternated between the proxies: each of them routed by the tag.
    assert all(document["frontend"]["sid_routed"] > 0 for document in fleet.stats())


# -- neither tag nor store: the control -------------------------------------------------


def test_a_fleet_without_tag_or_store_loses_cookieless_sessions(
    launch: Launcher, sio_backends: list[Backend]
) -> None:
    """Each proxy knows only the sessions whose handshake it relayed; requests
    reaching the other proxy are placed by the hash of a rotating address.

    This is why a fleet needs the tag or the store, and it shows that the
    tests above pass because sessions are shared, not because requests of a
    session happen to stay on one proxy.
    """
    fleet = start_fleet(launch, sio_backends)
    result = load(fleet, sio_backends, POLLING)
    assert result.unknown_sessions > 0
    assert result.client_failures > 0
    # The proxies saw the refusals too, under cookie-less hash routing.
    unknown = [document["frontend"]["unknown_sessions"] for document in fleet.stats()]
    assert any("hash" in by_decision for by_decision in unknown), unknown


# -- the shared store -------------------------------------------------------------------


@needs_redis
@pytest.mark.parametrize("transports", [POLLING, POLLING_THEN_WEBSOCKET])
def test_a_fleet_sharing_a_redis_store_keeps_every_cookieless_session(
    launch: Launcher,
    sio_backends: list[Backend],
    redis_tcp: RedisServer,
    transports: tuple[str, ...],
) -> None:
    fleet = start_fleet(launch, sio_backends, {"sid_store": redis_tcp.database_url(0)})
    fleet.wait_for_stores()
    result = load(fleet, sio_backends, transports)
    # The sids are untouched: a backend would refuse any other.
    assert_no_session_lost(result)
    stores = fleet.stores()
    # Every handshake was written; the other proxy found sessions in the store.
    assert sum(store["writes"] for store in stores) == CLIENTS, stores
    assert sum(store["hits"] for store in stores) > 0, stores
    assert sum(store["errors"] + store["timeouts"] for store in stores) == 0, stores
    assert redis_tcp.keys() > 0


@needs_redis
def test_in_a_fleet_with_a_store_the_other_proxy_finds_the_session_in_redis(
    launch: Launcher, sio_backends: list[Backend], redis_tcp: RedisServer
) -> None:
    fleet = start_fleet(launch, sio_backends, {"sid_store": redis_tcp.database_url(0)})
    fleet.wait_for_stores()
    exchange = session_exchange(fleet.port)
    server = exchange.handshake_server
    # The sid is the backend's own, and Redis names its server.
    assert "." not in exchange.sid
    assert redis_tcp.command("GET", KEY_PREFIX + exchange.sid) == server
    # The proxy that relayed the handshake routes from its own table; the
    # other asks the store once and then remembers the session itself.
    routes = [route.partition(";")[0] for route in exchange.routes]
    assert all(route.endswith(f"server={server}") for route in exchange.routes)
    assert routes.count("sid-store") == 1, routes
    assert set(routes) == {"sid-table", "sid-store"}, routes
    assert exchange.acknowledgements() == {i: [{"server": server, "data": i}] for i in range(3)}


@needs_redis
def test_a_fleet_keeps_answering_when_redis_dies_and_recovers_when_it_is_back(
    launch: Launcher, sio_backends: list[Backend], redis_unix: RedisServer
) -> None:
    """Redis is SIGKILLed while a load runs (once about half of its sessions
    are stored; should the load already be over, the kill falls between two
    loads), a second load runs during the outage, and a third once Redis is
    back on the same address.

    What is guaranteed while Redis is down, and asserted: no request waits for
    the store (the store answers at once while disconnected, so no client
    times out and each load ends on its own), the proxies stay up and serve
    ``/stats.json``, they write no error response of their own, and they count
    the failed store operations (every handshake of the second load tries a
    write). After the restart they reconnect, and a fresh load loses nothing.

    What is not guaranteed, and so not asserted: that sessions survive the
    outage. A session whose handshake one proxy knew, but that the other proxy
    had not yet looked up, exists only in the dead Redis as far as the other
    proxy is concerned; its requests there are placed by hash and may be
    refused as unknown sessions. Sessions both proxies had already seen carry on.
    """
    fleet = start_fleet(launch, sio_backends, {"sid_store": redis_unix.database_url(0)})
    fleet.wait_for_stores()

    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(load, fleet, sio_backends, POLLING)
        # Kill once about half of the sessions are in the store.
        eventually(lambda: running.done() or redis_unix.keys() >= CLIENTS // 2, "handshakes")
        redis_unix.kill()
        during_kill = running.result(timeout=60)
    eventually(lambda: not any(store["connected"] for store in fleet.stores()), "the outage")
    # Only its handshakes matter here (each tries a write), so it is short.
    during_outage = run_load(
        f"http://127.0.0.1:{fleet.port}", clients=3, messages=2, timeout=30.0, backends=sio_backends
    )

    for result in (during_kill, during_outage):
        stalled = [e for e in result.errors(CLIENTS) if e.endswith(STALLS)]
        assert stalled == [], result.errors(CLIENTS)
    assert all(proxy.proc.running() for proxy in fleet.proxies)
    # Nothing is left waiting in a proxy: once the clients are gone, every
    # request has been answered or cut (a held long poll ends within a ping).
    eventually(
        lambda: all(
            server["active"] == 0 for document in fleet.stats() for server in document["servers"]
        ),
        "requests in flight to end",
    )
    stats = fleet.stats()
    assert all(document["frontend"]["errors"] == {} for document in stats), stats
    errors = [document["engineio"]["store"]["errors"] for document in stats]
    assert sum(errors) >= during_outage.clients, errors

    redis_unix.start()
    fleet.wait_for_stores("the reconnection")
    writes_before = sum(store["writes"] for store in fleet.stores())
    after = load(fleet, sio_backends, POLLING)
    assert_no_session_lost(after)
    assert sum(store["writes"] for store in fleet.stores()) - writes_before == CLIENTS
