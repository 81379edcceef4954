"""engine.io routing against the reference implementation: Node's socket.io.

The backends are Node's ``socket.io`` server (``node/server.js``) and the
clients Node's ``socket.io-client`` (``node/client.js``), which keeps no cookies
in Node and opens a new TCP connection for every polling request. Between them:
an L4 HAProxy that gives every TCP connection a new random source address and
sends PROXY v2, then stickyproxy. Each backend counts the requests engine.io
refused as "Session ID unknown" (code 1) and the requests that carried the
persistence cookie; stickyproxy forwards that cookie here (``indirect =
false``), so a backend would see it if a client ever sent it back.

What is shown:

- routing by ``sid`` keeps every session on its server, long-polling and
  through the WebSocket upgrade;
- with ``sid_tag = eio4``, two proxies behind a round-robin balancer share the
  sessions without shared state, and the reference client takes the tagged sid
  (it contains a ``.``) as it is;
- an EIO3 session (a v4 server with ``allowEIO3``) is read and routed too;
- the control: with sid routing off, the same clients lose their sessions.

The Node packages are installed with ``npm ci`` in ``tests/integration/node``;
without them (or without ``node``) the module is skipped.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .harness import (
    Backend,
    Launcher,
    Proxy,
    http_request,
    proxy_config,
    spawn,
    wait_for_file,
)
from .sio_apps import (
    COOKIE_NAME,
    foreign_sid_requests,
    is_unknown_session_answer,
    launch_haproxy,
    rotating_l4_backend,
)

NODE_DIR = Path(__file__).resolve().parent / "node"
NODE = shutil.which("node")
INSTALL_HINT = (
    "install Node 18+ (Debian: apt-get install nodejs npm) and run "
    "`npm ci` in tests/integration/node"
)


def _missing_node() -> str | None:
    if NODE is None:
        return f"node is not installed; {INSTALL_HINT}"
    for package in ("socket.io", "socket.io-client"):
        if not (NODE_DIR / "node_modules" / package / "package.json").is_file():
            return f"the Node package {package} is not installed; {INSTALL_HINT}"
    return None


pytestmark = pytest.mark.skipif(_missing_node() is not None, reason=_missing_node() or "")

#: For the tests that run HAProxy: skipped where it is not installed.
needs_haproxy = pytest.mark.usefixtures("haproxy_binary")

#: The backends' ping interval and timeout (ms). A load lasts about a second;
#: the timeout leaves room for a pong delayed on a busy machine, since a late
#: pong closes the session on the server.
PING_MS = 5000

#: The load of each test: with three backends and no stickiness, a polling
#: session survives a request on a new address with probability about 1/3.
CLIENTS = 6
MESSAGES = 10

#: The bound of one load (ms); a load normally ends in about a second.
LOAD_TIMEOUT_MS = 12_000

#: How long the harness waits for the client process beyond its own bound.
CLIENT_GRACE = 5.0

POLLING = "polling"
POLLING_THEN_WEBSOCKET = "polling,websocket"

_serial = itertools.count(1)


# -- Node processes ----------------------------------------------------------------------


def start_node_backends(
    launch: Launcher, names: Sequence[str], *, eio3: bool = False
) -> list[Backend]:
    """Start ``node server.js`` backends at once; ``launch`` stops them by PID."""
    assert NODE is not None
    spawned = []
    for name in names:
        ready = launch.tmp_path / f"node-{name}-{next(_serial)}.port"
        argv = [NODE, str(NODE_DIR / "server.js"), "--name", name, "--ready-file", str(ready)]
        argv += ["--ping-interval", str(PING_MS), "--ping-timeout", str(PING_MS)]
        if eio3:
            argv.append("--eio3")
        proc = spawn(f"node-{name}", argv, launch.tmp_path)
        launch.procs.append(proc)
        spawned.append((name, proc, ready))
    return [Backend(name, int(wait_for_file(proc, ready)), proc) for name, proc, ready in spawned]


@pytest.fixture(scope="module")
def node_backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Backend]]:
    """Three Node socket.io backends, ``s1`` to ``s3``, shared by this module's tests.

    Loads compare the backends' counters before and after, so tests do not
    disturb one another through them.
    """
    launcher = Launcher(tmp_path_factory.mktemp("node"))
    try:
        yield start_node_backends(launcher, ["s1", "s2", "s3"])
    finally:
        launcher.stop_all()


def counters(backends: Sequence[Backend]) -> dict[str, dict[str, Any]]:
    """Each backend's ``GET /unknown-sessions`` report, asked directly."""
    reports = {}
    for backend in backends:
        answer = http_request(backend.port, "GET", "/unknown-sessions", timeout=5)
        reports[backend.name] = json.loads(answer.body)
    return reports


def _delta(after: Mapping[str, Any], before: Mapping[str, Any], key: str) -> int:
    return sum(int(after[name][key]) - int(before[name][key]) for name in after)


@dataclass
class NodeLoad:
    """What ``client.js`` reported, and what the backends counted meanwhile."""

    report: dict[str, Any]
    #: Refusals of sids the refusing backend never issued: misrouted requests.
    unknown: int
    #: Requests that reached a backend, and those carrying the persistence cookie.
    requests: int
    persistence_cookies: int

    def __getitem__(self, key: str) -> Any:
        return self.report[key]


def run_node_load(
    launch: Launcher, port: int, backends: Sequence[Backend], transports: str
) -> NodeLoad:
    """Run :data:`CLIENTS` x :data:`MESSAGES` echoes of ``client.js`` through ``port``."""
    assert NODE is not None
    before = counters(backends)
    argv = [NODE, str(NODE_DIR / "client.js"), f"http://127.0.0.1:{port}"]
    argv += ["--clients", str(CLIENTS), "--messages", str(MESSAGES)]
    argv += ["--transports", transports, "--timeout", str(LOAD_TIMEOUT_MS)]
    proc = spawn("node-client", argv, launch.tmp_path)
    launch.procs.append(proc)
    # The client bounds itself; should it not, the wait fails and teardown stops it.
    status = proc.popen.wait(LOAD_TIMEOUT_MS / 1000 + CLIENT_GRACE)
    output = proc.output(limit=200_000)
    lines = [line for line in output.splitlines() if line.startswith("{")]
    assert status == 0 and lines, proc.describe()
    after = counters(backends)
    return NodeLoad(
        report=json.loads(lines[-1]),
        unknown=_delta(after, before, "total"),
        requests=_delta(after, before, "requests"),
        persistence_cookies=_delta(after, before, "persistence_cookie_requests"),
    )


def assert_every_session_kept(load: NodeLoad) -> None:
    assert load.unknown == 0, load
    assert load["errors"] == [], load
    assert load["answered"] == load["sent"] == CLIENTS * MESSAGES, load
    assert load["completed"] == CLIENTS, load
    assert all(len(servers) == 1 for servers in load["servers_per_client"]), load


# -- stickyproxy and the rotating front ----------------------------------------------------


def sticky_config(backends: Sequence[Backend], **overrides: Mapping[str, str | None]) -> str:
    """The proxy of these tests: the persistence cookie forwarded to the backends,
    so that they can tell whether a client sent it back (RFC 6265 section 5.4).
    """
    sections: dict[str, Mapping[str, str | None]] = {"cookie": {"indirect": "false"}}
    sections.update(overrides)
    return proxy_config(backends, **sections)


def rotating_front(launch: Launcher, proxies: Sequence[Proxy]) -> int:
    """An L4 HAProxy: a random source address per connection, PROXY v2, round robin.

    :return: its port.
    """
    if len(proxies) == 1:
        section = rotating_l4_backend(proxies[0].port, send_proxy="v2")
    else:
        servers = [
            f"    server sp{i} 127.0.0.1:{proxy.port} send-proxy-v2"
            for i, proxy in enumerate(proxies, 1)
        ]
        section = "\n".join(
            ["backend storify_editor_backend", "    mode tcp", "    balance roundrobin", *servers]
        )
        section += "\n"
    return launch_haproxy(launch, section, mode="tcp", rotate_source=True).port


def proxy_stats(proxy: Proxy) -> dict[str, Any]:
    assert proxy.admin_port is not None
    stats: dict[str, Any] = json.loads(http_request(proxy.admin_port, "GET", "/stats.json").body)
    return stats


# -- the instruments -----------------------------------------------------------------------


def test_a_node_backend_counts_each_kind_of_request_for_a_sid_it_never_issued(
    node_backends: list[Backend],
) -> None:
    backend = node_backends[0]
    before = counters([backend])[backend.name]
    get, post, upgrade = foreign_sid_requests(backend.port)
    for response in (get, post):
        assert json.loads(response.body) == {"code": 1, "message": "Session ID unknown"}
    for response in (get, post, upgrade):
        assert is_unknown_session_answer(response.status, response.body), response
    after = counters([backend])[backend.name]
    assert after["total"] == before["total"] + 3
    for kind in ("polling-get", "polling-post", "upgrade"):
        assert after["by_kind"][kind] == before["by_kind"][kind] + 1
    assert after["stale"] == before["stale"]


def test_a_node_backend_answers_the_health_check_sets_no_cookie_and_counts_cookies_received(
    node_backends: list[Backend],
) -> None:
    backend = node_backends[1]
    before = counters([backend])[backend.name]
    health = http_request(backend.port, "GET", "/status?all=1")
    assert (health.status, health.body) == (200, b"ok")
    handshake = http_request(backend.port, "GET", "/socket.io/?EIO=4&transport=polling")
    assert handshake.status == 200
    assert handshake.body.startswith(b'0{"sid":')
    assert handshake.headers.get("Set-Cookie") is None
    http_request(backend.port, "GET", "/whoami", cookie=f"theme=dark; {COOKIE_NAME}=s2")
    http_request(backend.port, "GET", "/whoami", cookie="theme=dark")
    after = counters([backend])[backend.name]
    assert after["requests"] == before["requests"] + 4
    assert after["cookie_requests"] == before["cookie_requests"] + 2
    assert after["persistence_cookie_requests"] == before["persistence_cookie_requests"] + 1


@pytest.mark.parametrize("transports", [POLLING, POLLING_THEN_WEBSOCKET])
def test_node_clients_straight_to_one_backend_lose_no_session(
    launch: Launcher, node_backends: list[Backend], transports: str
) -> None:
    load = run_node_load(launch, node_backends[2].port, node_backends, transports)
    assert_every_session_kept(load)
    assert all(servers == ["s3"] for servers in load["servers_per_client"]), load
    final = "websocket" if transports == POLLING_THEN_WEBSOCKET else "polling"
    assert load["final_transports"] == [final] * CLIENTS, load


# -- one stickyproxy behind the rotating balancer -----------------------------------------


@needs_haproxy
def test_the_proxy_offers_the_persistence_cookie_and_forwards_it_when_sent_back(
    launch: Launcher, node_backends: list[Backend]
) -> None:
    # The control for the loads below: a client that kept the cookie would be
    # seen sending it by the backends.
    proxy = launch.stickyproxy(sticky_config(node_backends))
    front = rotating_front(launch, [proxy])
    handshake = http_request(front, "GET", "/socket.io/?EIO=4&transport=polling")
    assert handshake.status == 200
    offered = handshake.headers.get_all("Set-Cookie") or []
    assert any(value.startswith(f"{COOKIE_NAME}=") for value in offered), offered
    pinned = offered[0].split(";", 1)[0]
    before = counters(node_backends)
    http_request(front, "GET", "/status", cookie=pinned)
    after = counters(node_backends)
    assert _delta(after, before, "persistence_cookie_requests") == 1


@needs_haproxy
@pytest.mark.parametrize("transports", [POLLING, POLLING_THEN_WEBSOCKET])
def test_stickyproxy_keeps_every_node_client_session_when_the_address_rotates(
    launch: Launcher, node_backends: list[Backend], transports: str
) -> None:
    proxy = launch.stickyproxy(sticky_config(node_backends))
    front = rotating_front(launch, [proxy])
    load = run_node_load(launch, front, node_backends, transports)
    assert_every_session_kept(load)
    # The clients never sent the cookie the proxy offered them, in any of the
    # requests (a handshake and at least one more each) that reached a backend.
    assert load.requests >= 2 * CLIENTS
    assert load.persistence_cookies == 0
    if transports == POLLING_THEN_WEBSOCKET:
        # A misrouted upgrade fails quietly and leaves the client polling.
        assert load["upgrade_errors"] == 0
        assert load["final_transports"] == ["websocket"] * CLIENTS


@needs_haproxy
def test_without_sid_routing_node_client_sessions_break_when_the_address_rotates(
    launch: Launcher, node_backends: list[Backend]
) -> None:
    proxy = launch.stickyproxy(sticky_config(node_backends, engineio={"path": ""}))
    front = rotating_front(launch, [proxy])
    load = run_node_load(launch, front, node_backends, POLLING)
    assert load.unknown > 0 or load["failures"] > 0, load.report
    assert load.persistence_cookies == 0


# -- a fleet: two proxies, tagged sids ----------------------------------------------------


@needs_haproxy
@pytest.mark.parametrize("transports", [POLLING, POLLING_THEN_WEBSOCKET])
def test_two_proxies_route_the_node_clients_tagged_sids_without_shared_state(
    launch: Launcher, node_backends: list[Backend], transports: str
) -> None:
    config = sticky_config(node_backends, engineio={"sid_tag": "eio4"})
    proxies = [launch.stickyproxy(config), launch.stickyproxy(config)]
    front = rotating_front(launch, proxies)
    load = run_node_load(launch, front, node_backends, transports)
    assert_every_session_kept(load)
    # The reference client took the tagged sid and sent it back as it was.
    assert all("." in engine_id for engine_id in load["engine_ids"]), load["engine_ids"]
    if transports == POLLING_THEN_WEBSOCKET:
        assert load["upgrade_errors"] == 0
        assert load["final_transports"] == ["websocket"] * CLIENTS
    # Round robin spread each session's requests over both proxies, and each
    # proxy routed requests for sessions it may never have seen begin.
    stats = [proxy_stats(proxy) for proxy in proxies]
    for proxy_stat in stats:
        assert sum(server["sid_routed"] for server in proxy_stat["servers"]) > 0
    assert sum(proxy_stat["engineio"]["tagged"] for proxy_stat in stats) == CLIENTS


# -- EIO3: a v4 server with allowEIO3 -------------------------------------------------------


def eio3_packets(body: bytes) -> list[str]:
    """Split an EIO3 text payload, ``<length>:<packet>...``.

    The length counts UTF-16 code units; the packets here are ASCII.
    """
    text = body.decode("utf-8")
    packets = []
    while text:
        length, _, rest = text.partition(":")
        size = int(length)
        packets.append(rest[:size])
        text = rest[size:]
    return packets


def eio3_payload(packet: str) -> bytes:
    return f"{len(packet)}:{packet}".encode()


@needs_haproxy
def test_an_eio3_session_stays_on_its_node_server_untagged_when_the_address_rotates(
    launch: Launcher,
) -> None:
    backends = start_node_backends(launch, ["e1", "e2", "e3"], eio3=True)
    config = sticky_config(backends, engineio={"sid_tag": "eio4"})
    front = rotating_front(launch, [launch.stickyproxy(config)])
    before = counters(backends)
    handshake = http_request(front, "GET", "/socket.io/?EIO=3&transport=polling")
    assert handshake.status == 200, handshake
    opening = eio3_packets(handshake.body)[0]
    assert opening.startswith("0{")
    sid = json.loads(opening[1:])["sid"]
    # Tagging is for EIO4 polling handshakes only.
    assert "." not in sid
    session = f"/socket.io/?EIO=3&transport=polling&sid={sid}"
    # The namespace CONNECT, which a v4 server queues for EIO3 clients.
    assert eio3_packets(http_request(front, "GET", session).body) == ["40"]
    servers = set()
    for ack_id in range(1, 6):
        sent = http_request(
            front, "POST", session, body=eio3_payload(f'42{ack_id}["echo","x{ack_id}"]')
        )
        assert (sent.status, sent.body) == (200, b"ok")
        polled = http_request(front, "GET", session)
        assert polled.status == 200, polled
        (ack,) = eio3_packets(polled.body)
        prefix = f"43{ack_id}"
        assert ack.startswith(prefix)
        (reply,) = json.loads(ack[len(prefix) :])
        assert reply["data"] == f"x{ack_id}"
        servers.add(reply["server"])
    assert len(servers) == 1
    assert _delta(counters(backends), before, "total") == 0
