"""The admin endpoint, driven in memory: real HTTP bytes through the real Site.

Requests are written with h11 and fed to the site's HTTP channel over a
:class:`StringTransport` whose local address plays the admin listener, so the
loopback rule is tested without sockets. The snapshot comes from a real
:class:`~stickyproxy.pool.Pool` and real counters, shaped as
``StickyProxy.snapshot`` shapes them.
"""

# twisted's test transports and Failure are unannotated.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.server import Site

from stickyproxy.admin import ProxyControl, admin_site, human_age, human_bytes
from stickyproxy.config import BalanceConfig, HealthConfig, ServerConfig, parse_config
from stickyproxy.errors import ConfigError
from stickyproxy.pool import Admin, Pool, Transition
from stickyproxy.stats import Stats

TOKEN = "k7Jq-0vX_3mZ9pLw2RtY"
NOW = 1_700_000_000.0


class FakeProxy:
    """Three servers and their counters; ``snapshot`` as StickyProxy builds it."""

    def __init__(self) -> None:
        servers = [
            ServerConfig("s1", "10.0.0.1", 3030, "s1", maxconn=100),
            ServerConfig("s2", "10.0.0.2", 3030, "s2"),
            ServerConfig("s3", "10.0.0.3", 3030, "s3", maxconn=0),
        ]
        self.pool = Pool(
            servers,
            HealthConfig(rise=2, fall=3),
            # The HAProxy ring builds instantly; routing plays no part here.
            BalanceConfig(hash_function="haproxy"),
        )
        self.stats = Stats([s.name for s in servers])
        self.connections = 7
        #: ``StickyProxy._engine_snapshot``: engine.io routing on, no shared
        #: store; None plays an older snapshot without the key.
        self.engineio: dict[str, Any] | None = {
            "path": "/socket.io/",
            "sid_tag": "eio4",
            "sessions": 0,
            "max_sessions": 100_000,
            "learned": 0,
            "tagged": 0,
            "expired": 0,
            "evicted": 0,
            "store": None,
        }

    def snapshot(self) -> dict[str, Any]:
        servers = []
        for entry in self.pool.snapshot():
            entry.update(self.stats.servers[str(entry["name"])].as_dict())
            servers.append(entry)
        frontend = self.stats.frontend.as_dict()
        frontend["connections"] = self.connections
        result = {"servers": servers, "frontend": frontend}
        if self.engineio is not None:
            result["engineio"] = self.engineio
        return result

    def unknown_session(self, server: str, decision: str, kind: str, times: int = 1) -> None:
        """Count "unknown session" answers as the relay does: server and frontend."""
        for counters in (self.stats.frontend, self.stats.servers[server]):
            key = (decision, kind)
            counters.unknown_sessions[key] = counters.unknown_sessions.get(key, 0) + times


@pytest.fixture
def proxy() -> FakeProxy:
    """s1 UP with traffic, s2 DOWN after failed checks, s3 drained by an operator."""
    proxy = FakeProxy()
    pool, stats = proxy.pool, proxy.stats
    pool.record_check("s1", True, NOW - 3, "HTTP 200")
    pool.record_check("s1", False, NOW - 1, "HTTP 503")  # UP 2/3: going down
    pool.servers["s1"].active = 2
    s1 = stats.servers["s1"]
    s1.requests, s1.bytes_in, s1.bytes_out = 120, 2048, 3 * 1024 * 1024
    s1.tunnels, s1.tunnels_total, s1.cookie_hits, s1.cookie_inserts, s1.repins = 1, 4, 90, 30, 2
    for status in [200] * 100 + [302] * 15 + [503] * 5:
        s1.response(status)
    pool.record_check("s2", False, NOW - 65, "connection refused")
    pool.record_check("s2", False, NOW - 64, "<b>connection refused</b>")
    pool.set_admin("s3", "drain", NOW - 7200)
    # engine.io: s1 routes by sid; a poll routed by cookie and an upgrade
    # routed by hash met no session (probable misroutes), one routed by the
    # table found its session expired.
    s1.sid_routed = 40
    proxy.unknown_session("s1", "cookie", "polling_json", 3)
    proxy.unknown_session("s1", "sid-table", "upgrade_text")
    proxy.unknown_session("s2", "hash", "python_engineio", 2)
    front = stats.frontend
    front.requests, front.connections_total, front.tunnels = 125, 40, 1
    front.sid_routed = 41
    assert proxy.engineio is not None
    proxy.engineio.update(sessions=12, learned=30, tagged=25, expired=17, evicted=1)
    front.error(503)
    front.error(503)
    front.error(400)
    return proxy


@dataclass
class Control:
    """An AdminControl that records calls and changes a real pool."""

    pool: Pool
    calls: list[tuple[str, ...]] = field(default_factory=list)
    closed: int = 3

    def set_state(self, name: str, state: Admin) -> Transition | None:
        self.calls.append(("set_state", name, state))
        return self.pool.set_admin(name, state, NOW)

    def shutdown_sessions(self, name: str) -> int:
        self.calls.append(("shutdown_sessions", name))
        if name not in self.pool.servers:
            raise KeyError(name)
        return self.closed

    def reload(self) -> Deferred[bool] | None:
        self.calls.append(("reload",))
        return succeed(True)

    def set_weight(self, name: str, weight: int) -> Transition | None:
        self.calls.append(("set_weight", name, str(weight)))
        return self.pool.set_weight(name, weight, NOW)

    def close_tunnels(self, name: str, spread: float) -> int:
        self.calls.append(("close_tunnels", name, str(spread)))
        if name not in self.pool.servers:
            raise KeyError(name)
        return self.closed


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers["content-type"] == "application/json"
        return json.loads(self.body)


LOOPBACK = IPv4Address("TCP", "127.0.0.1", 9000)
PUBLIC = IPv4Address("TCP", "192.0.2.10", 9000)


def fetch(
    site: Site,
    method: str,
    target: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    local: Any = LOOPBACK,
    peer: Any = None,
) -> Response:
    """One HTTP/1.1 exchange with ``site`` over an in-memory connection.

    :param local: the address the connection arrived at (the admin listener).
    :param peer: the client's address.
    """
    peer = peer or IPv4Address("TCP", "127.0.0.1", 51000)
    host = f"{local.host}:{local.port}" if not isinstance(local, UNIXAddress) else "localhost"
    if isinstance(local, IPv6Address):
        host = f"[{local.host}]:{local.port}"
    sent = {"Host": host, **(headers or {})}
    if body:
        sent["Content-Length"] = str(len(body))
    client = h11.Connection(h11.CLIENT)
    data = client.send(h11.Request(method=method, target=target, headers=list(sent.items())))
    data += client.send(h11.Data(data=body)) if body else b""
    data += client.send(h11.EndOfMessage())

    transport = StringTransport(hostAddress=local, peerAddress=peer)
    protocol = site.buildProtocol(peer)
    assert protocol is not None
    protocol.makeConnection(transport)
    protocol.dataReceived(data)
    client.receive_data(transport.value())
    protocol.connectionLost(Failure(ConnectionDone()))

    head = client.next_event()
    assert isinstance(head, h11.Response), head
    chunks = []
    while isinstance(event := client.next_event(), h11.Data):
        chunks.append(event.data)
    assert isinstance(event, h11.EndOfMessage), event
    received = {k.decode(): v.decode() for k, v in head.headers}
    return Response(head.status_code, received, b"".join(chunks))


def make_site(proxy: FakeProxy, control: Control | None = None, **kwargs: Any) -> Site:
    clock = Clock()
    clock.advance(NOW)
    return admin_site(proxy.snapshot, control=control, reactor=clock, **kwargs)


# -- the status page --------------------------------------------------------------------------


def row(page: str, name: str) -> str:
    match = re.search(rf'<tr [^>]*id="server-{name}".*?</tr>', page, re.S)
    assert match is not None, page
    return match.group(0)


def test_the_status_page_has_one_row_per_server_coloured_by_state(proxy: FakeProxy) -> None:
    response = fetch(make_site(proxy), "GET", "/")
    assert response.status == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    page = response.body.decode()
    assert page.count('<tr class="') == 3
    assert 'class="UP" id="server-s1" data-state="UP"' in page
    assert 'class="DOWN" id="server-s2" data-state="DOWN"' in page
    assert 'class="DRAIN" id="server-s3" data-state="DRAIN"' in page
    assert ".DOWN .state { background" in page


def test_the_status_page_shows_haproxy_status_and_last_check_with_its_age(
    proxy: FakeProxy,
) -> None:
    page = fetch(make_site(proxy), "GET", "/").body.decode()
    assert "UP 2/3" in row(page, "s1")
    assert "HTTP 503 · 1s ago" in row(page, "s1")
    # Check results are text from the network side: escaped, never markup.
    assert "&lt;b&gt;connection refused&lt;/b&gt; · 1m4s ago" in row(page, "s2")
    assert "<b>" not in page
    assert "(admin: drain)" in row(page, "s3")
    # How long each has been in its state.
    assert "for 2h0m" in row(page, "s3")
    assert "for 1m5s" in row(page, "s2")  # DOWN since its first failed check
    assert "not checked" not in page


def test_the_status_page_shows_traffic_in_human_units(proxy: FakeProxy) -> None:
    s1 = row(fetch(make_site(proxy), "GET", "/").body.decode(), "s1")
    cells = re.findall(r'<td class="n"[^>]*>([^<]*)</td>', s1)
    # weight, active/max, tunnels, requests, in, out, 1xx..other, cookie
    # hits/inserts/re-pins, engine.io sid/unknown sessions, redispatched,
    # connect errors, state changes.
    assert cells[:6] == ["10", "2/100", "1", "120", "2.0 KiB", "3.0 MiB"]
    assert cells[6:12] == ["0", "100", "15", "0", "5", "0"]
    assert cells[12:15] == ["90", "30", "2"]
    assert cells[15:20] == ["40", "4", "0", "0", "0"]
    assert "0/∞" in row(fetch(make_site(proxy), "GET", "/").body.decode(), "s3")


def test_the_status_page_has_frontend_totals_and_errors_by_status(proxy: FakeProxy) -> None:
    page = fetch(make_site(proxy), "GET", "/").body.decode()
    panel = page.split('<dl id="frontend">', 1)[1]
    assert "7 open,\n40 in all" in panel
    assert "400: 1, 503: 2" in panel
    assert "7 clients" in page.split("<tfoot>", 1)[1]
    assert "3 servers: 1 UP, 1 DOWN, 1 DRAIN." in page
    assert "<title>stickyproxy: 1 out</title>" in page


def test_the_status_page_refreshes_itself_without_scripts_or_external_assets(
    proxy: FakeProxy,
) -> None:
    response = fetch(make_site(proxy), "GET", "/")
    page = response.body.decode()
    assert '<meta http-equiv="refresh" content="5">' in page
    assert "<script" not in page
    assert not re.search(r"(src|href)=\"?(https?:)?//", page)
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert response.headers["cache-control"] == "no-store"


def test_refresh_zero_stops_the_reloading(proxy: FakeProxy) -> None:
    page = fetch(make_site(proxy), "GET", "/?refresh=0").body.decode()
    assert "http-equiv" not in page
    assert "automatic reload off" in page
    faster = fetch(make_site(proxy), "GET", "/?refresh=2").body.decode()
    assert '<meta http-equiv="refresh" content="2">' in faster


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (10 * 1024**2, "10.0 MiB"),
        (999 * 1024**3, "999 GiB"),
        (5 * 1024**5, "5120 TiB"),
    ],
)
def test_human_bytes_uses_powers_of_1024(count: int, text: str) -> None:
    assert human_bytes(count) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(-3, "0s"), (0.9, "0s"), (59, "59s"), (75, "1m15s"), (7260, "2h1m"), (90061, "1d1h")],
)
def test_human_age_shows_the_two_largest_units(seconds: float, text: str) -> None:
    assert human_age(seconds) == text


@given(st.integers(min_value=0, max_value=2**62))
def test_human_bytes_is_always_short(count: int) -> None:
    assert len(human_bytes(count)) <= len("1023 KiB") or count >= 1024**5


# -- stats.json -------------------------------------------------------------------------------


def test_stats_json_is_the_snapshot(proxy: FakeProxy) -> None:
    response = fetch(make_site(proxy), "GET", "/stats.json")
    assert response.status == 200
    assert response.headers["cache-control"] == "no-store"
    assert response.json() == proxy.snapshot()
    assert response.json()["servers"][1]["state"] == "DOWN"


# -- metrics ---------------------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def sample(found: Mapping[Any, float], name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def test_metrics_are_prometheus_text_with_server_series(proxy: FakeProxy) -> None:
    response = fetch(make_site(proxy), "GET", "/metrics")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    found = samples(response.body.decode())
    assert sample(found, "stickyproxy_server_requests_total", server="s1") == 120
    assert sample(found, "stickyproxy_server_bytes_in_total", server="s1") == 2048
    assert sample(found, "stickyproxy_server_bytes_out_total", server="s1") == 3 * 1024**2
    assert sample(found, "stickyproxy_server_active_connections", server="s1") == 2
    assert sample(found, "stickyproxy_server_max_connections", server="s3") == 0
    assert sample(found, "stickyproxy_server_current_tunnels", server="s1") == 1
    assert sample(found, "stickyproxy_server_tunnels_total", server="s1") == 4
    assert sample(found, "stickyproxy_server_cookie_repins_total", server="s1") == 2
    assert sample(found, "stickyproxy_server_check_failures_total", server="s2") == 2
    assert sample(found, "stickyproxy_server_responses_total", server="s1", code="5xx") == 5
    assert sample(found, "stickyproxy_server_responses_total", server="s2", code="2xx") == 0
    assert sample(found, "stickyproxy_server_weight", server="s2") == 10


def test_server_state_is_a_state_set_with_one_series_per_state(proxy: FakeProxy) -> None:
    found = samples(fetch(make_site(proxy), "GET", "/metrics").body.decode())
    expected = {"s1": "UP", "s2": "DOWN", "s3": "DRAIN"}
    for server, current in expected.items():
        for state in ("UP", "DOWN", "DRAIN", "MAINT"):
            value = sample(found, "stickyproxy_server_state", server=server, state=state)
            assert value == (1 if state == current else 0), (server, state)


def test_frontend_metrics_include_connections_and_errors_by_status(proxy: FakeProxy) -> None:
    found = samples(fetch(make_site(proxy), "GET", "/metrics").body.decode())
    assert sample(found, "stickyproxy_frontend_current_connections") == 7
    assert sample(found, "stickyproxy_frontend_connections_total") == 40
    assert sample(found, "stickyproxy_frontend_requests_total") == 125
    assert sample(found, "stickyproxy_frontend_errors_total", status="503") == 2
    assert sample(found, "stickyproxy_frontend_errors_total", status="400") == 1
    assert sample(found, "stickyproxy_frontend_responses_total", code="other") == 0


def test_metrics_speak_openmetrics_when_asked(proxy: FakeProxy) -> None:
    response = fetch(
        make_site(proxy),
        "GET",
        "/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
    )
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.body.endswith(b"# EOF\n")


def test_two_proxies_in_one_process_keep_their_own_metrics() -> None:
    first, second = FakeProxy(), FakeProxy()
    second.stats.servers["s1"].requests = 9
    one = samples(fetch(make_site(first), "GET", "/metrics").body.decode())
    two = samples(fetch(make_site(second), "GET", "/metrics").body.decode())
    assert sample(one, "stickyproxy_server_requests_total", server="s1") == 0
    assert sample(two, "stickyproxy_server_requests_total", server="s1") == 9


def test_metrics_read_the_state_at_each_scrape(proxy: FakeProxy) -> None:
    site = make_site(proxy)
    fetch(site, "GET", "/metrics")
    proxy.pool.set_admin("s1", "maint")
    found = samples(fetch(site, "GET", "/metrics").body.decode())
    assert sample(found, "stickyproxy_server_state", server="s1", state="MAINT") == 1


# -- engine.io routing figures ---------------------------------------------------------------

DECISIONS = ("sid-tag", "sid-table", "sid-store", "cookie", "cookie-unusable", "hash", "redispatch")
KINDS = ("polling_json", "upgrade_text", "python_engineio")
STORE = {"connected": True, "hits": 50, "misses": 4, "writes": 31, "errors": 2, "timeouts": 1}


def series(found: Mapping[Any, float], name: str) -> dict[frozenset[tuple[str, str]], float]:
    """Every series of one metric, by its labels."""
    return {labels: value for (sample_name, labels), value in found.items() if sample_name == name}


def tooltip(cell: str) -> str:
    match = re.search(r'title="([^"]*)"', cell)
    assert match is not None, cell
    return html.unescape(match.group(1))


def test_metrics_count_requests_routed_by_session_id(proxy: FakeProxy) -> None:
    found = samples(fetch(make_site(proxy), "GET", "/metrics").body.decode())
    assert sample(found, "stickyproxy_server_sid_routed_total", server="s1") == 40
    assert sample(found, "stickyproxy_server_sid_routed_total", server="s2") == 0
    assert sample(found, "stickyproxy_frontend_sid_routed_total") == 41


def test_unknown_sessions_are_counted_by_server_routing_decision_and_kind(
    proxy: FakeProxy,
) -> None:
    found = samples(fetch(make_site(proxy), "GET", "/metrics").body.decode())
    name = "stickyproxy_server_engineio_unknown_sessions_total"
    assert sample(found, name, server="s1", decision="cookie", kind="polling_json") == 3
    assert sample(found, name, server="s1", decision="sid-table", kind="upgrade_text") == 1
    assert sample(found, name, server="s2", decision="hash", kind="python_engineio") == 2
    assert sample(found, name, server="s2", decision="cookie", kind="polling_json") == 0
    frontend = "stickyproxy_frontend_engineio_unknown_sessions_total"
    assert sample(found, frontend, decision="cookie", kind="polling_json") == 3
    assert sample(found, frontend, decision="hash", kind="python_engineio") == 2
    assert sample(found, frontend, decision="sid-tag", kind="upgrade_text") == 0


def test_every_decision_and_kind_is_exported_at_zero_before_it_happens(proxy: FakeProxy) -> None:
    # A series that appeared at 1 would hide the first misroute from increase().
    found = samples(fetch(make_site(proxy), "GET", "/metrics").body.decode())
    s3 = {
        (dict(labels)["decision"], dict(labels)["kind"]): value
        for labels, value in series(
            found, "stickyproxy_server_engineio_unknown_sessions_total"
        ).items()
        if dict(labels)["server"] == "s3"
    }
    assert s3 == {(decision, kind): 0 for decision in DECISIONS for kind in KINDS}
    frontend = series(found, "stickyproxy_frontend_engineio_unknown_sessions_total")
    assert len(frontend) == len(DECISIONS) * len(KINDS)


def test_with_engineio_routing_off_only_counted_unknown_sessions_are_exported(
    proxy: FakeProxy,
) -> None:
    assert proxy.engineio is not None
    proxy.engineio["path"] = ""
    found = samples(fetch(make_site(proxy), "GET", "/metrics").body.decode())
    server = series(found, "stickyproxy_server_engineio_unknown_sessions_total")
    assert set(server) == {
        frozenset({"server": "s1", "decision": "cookie", "kind": "polling_json"}.items()),
        frozenset({"server": "s1", "decision": "sid-table", "kind": "upgrade_text"}.items()),
        frozenset({"server": "s2", "decision": "hash", "kind": "python_engineio"}.items()),
    }


def test_metrics_describe_the_session_table(proxy: FakeProxy) -> None:
    found = samples(fetch(make_site(proxy), "GET", "/metrics").body.decode())
    assert sample(found, "stickyproxy_engineio_sessions") == 12
    assert sample(found, "stickyproxy_engineio_max_sessions") == 100_000
    assert sample(found, "stickyproxy_engineio_sessions_learned_total") == 30
    assert sample(found, "stickyproxy_engineio_sessions_tagged_total") == 25
    assert sample(found, "stickyproxy_engineio_sessions_expired_total") == 17
    assert sample(found, "stickyproxy_engineio_sessions_evicted_total") == 1
    # No store configured: no series that would read as a store down.
    assert not any(name.startswith("stickyproxy_engineio_store") for name, _ in found)


@pytest.mark.parametrize("connected", [True, False])
def test_metrics_describe_the_shared_store_when_there_is_one(
    proxy: FakeProxy, connected: bool
) -> None:
    assert proxy.engineio is not None
    proxy.engineio["store"] = {**STORE, "connected": connected}
    found = samples(fetch(make_site(proxy), "GET", "/metrics").body.decode())
    assert sample(found, "stickyproxy_engineio_store_up") == (1 if connected else 0)
    assert sample(found, "stickyproxy_engineio_store_hits_total") == 50
    assert sample(found, "stickyproxy_engineio_store_misses_total") == 4
    assert sample(found, "stickyproxy_engineio_store_writes_total") == 31
    assert sample(found, "stickyproxy_engineio_store_errors_total") == 2
    assert sample(found, "stickyproxy_engineio_store_timeouts_total") == 1


def test_the_new_metrics_are_valid_openmetrics_too(proxy: FakeProxy) -> None:
    assert proxy.engineio is not None
    proxy.engineio["store"] = STORE
    response = fetch(
        make_site(proxy),
        "GET",
        "/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
    )
    families = {f.name: f for f in openmetrics_families(response.body.decode())}
    assert families["stickyproxy_engineio_store_up"].type == "gauge"
    assert families["stickyproxy_engineio_store_errors"].type == "counter"
    assert families["stickyproxy_server_engineio_unknown_sessions"].type == "counter"


def test_a_snapshot_without_engineio_still_serves_every_page(proxy: FakeProxy) -> None:
    proxy.engineio = None
    site = make_site(proxy)
    page = fetch(site, "GET", "/")
    assert page.status == 200
    assert 'id="engineio"' not in page.body.decode()
    assert "stickyproxy_engineio" not in fetch(site, "GET", "/metrics").body.decode()
    assert "engineio" not in fetch(site, "GET", "/stats.json").json()


def test_a_snapshot_from_before_sid_routing_still_renders(proxy: FakeProxy) -> None:
    """Entries without ``sid_routed`` and ``unknown_sessions`` show dashes, export nothing."""
    snapshot = proxy.snapshot()
    del snapshot["engineio"]
    for entry in [*snapshot["servers"], snapshot["frontend"]]:
        del entry["sid_routed"], entry["unknown_sessions"]
    clock = Clock()
    clock.advance(NOW)
    site = admin_site(lambda: snapshot, reactor=clock)
    s1 = row(fetch(site, "GET", "/").body.decode(), "s1")
    assert re.findall(r'<td class="n"[^>]*>([^<]*)</td>', s1)[15:17] == ["-", "-"]
    found = samples(fetch(site, "GET", "/metrics").body.decode())
    assert not series(found, "stickyproxy_server_engineio_unknown_sessions_total")
    assert not series(found, "stickyproxy_server_sid_routed_total")
    assert sample(found, "stickyproxy_server_requests_total", server="s1") == 120


def test_the_status_page_shows_unknown_sessions_by_decision_in_a_tooltip(
    proxy: FakeProxy,
) -> None:
    page = fetch(make_site(proxy), "GET", "/").body.decode()
    cell = re.findall(r"<td[^>]*>[^<]*</td>", row(page, "s1"))[-4]
    assert cell.endswith(">4</td>")
    assert tooltip(cell).splitlines() == [
        "3 probable misroutes, 1 expired sessions",
        "cookie · polling_json: 3",
        "sid-table · upgrade_text: 1",
    ]
    s3 = re.findall(r"<td[^>]*>[^<]*</td>", row(page, "s3"))[-4]
    assert s3 == '<td class="n">0</td>'
    totals = page.split("<tfoot>", 1)[1]
    assert ">41</td>" in totals
    assert "5 probable misroutes, 1 expired sessions" in html.unescape(totals)


def test_the_status_page_has_a_line_on_engineio_sessions(proxy: FakeProxy) -> None:
    page = fetch(make_site(proxy), "GET", "/").body.decode()
    line = re.search(r'<dd id="engineio"[^>]*>([^<]*)</dd>', page)
    assert line is not None
    assert line.group(1) == (
        "/socket.io/: 12 sessions known / 100,000 max, 30 learned, 25 tagged, 17 expired, 1 evicted"
    )
    # The line sits under the table, with the frontend figures.
    assert page.index('id="engineio"') > page.index("</table>")


def test_the_engineio_line_shows_the_store_state_and_its_errors(proxy: FakeProxy) -> None:
    assert proxy.engineio is not None
    proxy.engineio["store"] = {**STORE, "connected": False}
    page = fetch(make_site(proxy), "GET", "/").body.decode()
    line = re.search(r'<dd id="engineio"[^>]*>([^<]*)</dd>', page)
    assert line is not None
    assert line.group(1).endswith("1 evicted; store not connected, 2 errors")
    assert tooltip(line.group(0)) == "hits: 50, misses: 4, writes: 31, timeouts: 1"
    proxy.engineio["path"] = ""
    off = fetch(make_site(proxy), "GET", "/").body.decode()
    assert ">sid routing off; store not connected, 2 errors</dd>" in off


def test_engineio_figures_on_the_status_page_are_escaped(proxy: FakeProxy) -> None:
    assert proxy.engineio is not None
    proxy.engineio["path"] = "/<script>io/"
    proxy.unknown_session("s3", 'x" onmouseover="alert(1)', "<b>kind</b>")
    page = fetch(make_site(proxy), "GET", "/").body.decode()
    assert "<script>" not in page and "<b>" not in page
    assert "/&lt;script&gt;io/: 12 sessions" in page
    assert 'onmouseover="' not in page
    cell = re.findall(r"<td[^>]*>[^<]*</td>", row(page, "s3"))[-4]
    assert tooltip(cell).splitlines()[1] == 'x" onmouseover="alert(1) · <b>kind</b>: 1'


@given(
    st.dictionaries(
        st.tuples(st.sampled_from(DECISIONS), st.sampled_from(KINDS)),
        st.integers(min_value=1, max_value=10**9),
        max_size=len(DECISIONS) * len(KINDS),
    )
)
def test_every_unknown_session_count_reaches_the_metrics_and_the_page(
    counts: dict[tuple[str, str], int],
) -> None:
    proxy = FakeProxy()
    for (decision, kind), count in counts.items():
        proxy.unknown_session("s2", decision, kind, count)
    site = make_site(proxy)
    found = samples(fetch(site, "GET", "/metrics").body.decode())
    for decision in DECISIONS:
        for kind in KINDS:
            name = "stickyproxy_server_engineio_unknown_sessions_total"
            value = sample(found, name, server="s2", decision=decision, kind=kind)
            assert value == counts.get((decision, kind), 0)
    cell = re.findall(r"<td[^>]*>[^<]*</td>", row(fetch(site, "GET", "/").body.decode(), "s2"))[-4]
    assert f">{sum(counts.values()):,}</td>" in cell
    if counts:
        misroutes = sum(n for (d, _), n in counts.items() if not d.startswith("sid-"))
        assert tooltip(cell).startswith(f"{misroutes:,} probable misroutes, ")
        assert len(tooltip(cell).splitlines()) == 1 + len(counts)


# -- runtime control -------------------------------------------------------------------------


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def test_setting_a_state_from_the_query_answers_with_the_transition(proxy: FakeProxy) -> None:
    control = Control(proxy.pool)
    response = fetch(make_site(proxy, control), "POST", "/servers/s1/state?state=maint")
    assert response.status == 200
    assert response.json() == {
        "server": "s1",
        "admin": "maint",
        "transition": {"old": "UP", "new": "MAINT"},
    }
    assert control.calls == [("set_state", "s1", "maint")]
    assert proxy.pool.servers["s1"].admin == "maint"


def test_a_state_can_come_from_a_form_body_and_may_change_nothing(proxy: FakeProxy) -> None:
    control = Control(proxy.pool)
    response = fetch(
        make_site(proxy, control), "POST", "/servers/s3/state", headers=FORM, body=b"state=drain"
    )
    assert response.json() == {"server": "s3", "admin": "drain", "transition": None}
    assert control.calls == [("set_state", "s3", "drain")]


def test_shutdown_sessions_answers_how_many_were_closed(proxy: FakeProxy) -> None:
    control = Control(proxy.pool)
    response = fetch(make_site(proxy, control), "POST", "/servers/s2/shutdown-sessions")
    assert response.json() == {"server": "s2", "closed": 3}
    assert control.calls == [("shutdown_sessions", "s2")]


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        ("POST", "/servers/nope/state?state=drain", 404),
        ("POST", "/servers/nope/shutdown-sessions", 404),
        ("POST", "/servers/s1/state?state=down", 400),
        ("POST", "/servers/s1/state", 400),
        ("POST", "/servers/s1/speed?value=5", 404),
        ("POST", "/servers/s1", 404),
        ("GET", "/servers/s1/state?state=drain", 405),
    ],
)
def test_bad_control_requests_get_a_json_error_and_change_nothing(
    proxy: FakeProxy, method: str, target: str, status: int
) -> None:
    response = fetch(make_site(proxy, Control(proxy.pool)), method, target)
    assert response.status == status
    assert "error" in response.json()
    assert all(s.admin == "ready" for n, s in proxy.pool.servers.items() if n != "s3")


def test_without_a_control_object_control_is_not_implemented(proxy: FakeProxy) -> None:
    response = fetch(make_site(proxy), "POST", "/servers/s1/state?state=drain")
    assert response.status == 501


def test_a_configured_token_is_required_even_on_loopback(proxy: FakeProxy) -> None:
    control = Control(proxy.pool)
    site = make_site(proxy, control, token=TOKEN)
    missing = fetch(site, "POST", "/servers/s1/state?state=drain")
    assert missing.status == 401
    assert missing.headers["www-authenticate"].startswith("Bearer ")
    wrong = fetch(
        site,
        "POST",
        "/servers/s1/state?state=drain",
        headers={"Authorization": "Bearer " + TOKEN[:-1] + "x"},
    )
    assert wrong.status == 403
    basic = fetch(
        site, "POST", "/servers/s1/state?state=drain", headers={"Authorization": "Basic " + TOKEN}
    )
    assert basic.status == 401
    assert control.calls == []


def test_the_right_token_allows_control_from_anywhere(proxy: FakeProxy) -> None:
    control = Control(proxy.pool)
    site = make_site(proxy, control, token=TOKEN)
    response = fetch(
        site,
        "POST",
        "/servers/s1/state?state=drain",
        headers={"Authorization": f"Bearer {TOKEN}", "Origin": "https://elsewhere.example"},
        local=PUBLIC,
        peer=IPv4Address("TCP", "198.51.100.9", 40000),
    )
    assert response.status == 200
    assert control.calls == [("set_state", "s1", "drain")]


def test_the_read_only_pages_need_no_token(proxy: FakeProxy) -> None:
    site = make_site(proxy, Control(proxy.pool), token=TOKEN)
    for path in ("/", "/stats.json", "/metrics"):
        assert fetch(site, "GET", path, local=PUBLIC).status == 200


@pytest.mark.parametrize(
    "local",
    [
        IPv4Address("TCP", "127.0.0.1", 9000),
        IPv4Address("TCP", "127.0.0.53", 9000),
        IPv6Address("TCP", "::1", 9000),
        IPv6Address("TCP", "::ffff:127.0.0.1", 9000),
        UNIXAddress(b"/run/stickyproxy/admin.sock"),
    ],
)
def test_without_a_token_control_is_allowed_on_a_loopback_listener(
    proxy: FakeProxy, local: Any
) -> None:
    control = Control(proxy.pool)
    response = fetch(
        make_site(proxy, control), "POST", "/servers/s1/state?state=drain", local=local
    )
    assert response.status == 200
    assert control.calls == [("set_state", "s1", "drain")]


@pytest.mark.parametrize(
    "local",
    [PUBLIC, IPv4Address("TCP", "10.1.2.3", 9000), IPv6Address("TCP", "2001:db8::1", 9000)],
)
def test_without_a_token_control_is_refused_off_loopback(proxy: FakeProxy, local: Any) -> None:
    control = Control(proxy.pool)
    response = fetch(
        make_site(proxy, control), "POST", "/servers/s1/state?state=drain", local=local
    )
    assert response.status == 403
    assert "token" in response.json()["error"]
    assert control.calls == []


@pytest.mark.parametrize(
    "headers",
    [
        {"Host": "attacker.example:9000"},  # DNS rebinding to 127.0.0.1
        {"Origin": "https://attacker.example"},  # a cross-site form post
        {"Origin": "null"},
    ],
)
def test_without_a_token_requests_a_web_page_could_forge_are_refused(
    proxy: FakeProxy, headers: dict[str, str]
) -> None:
    control = Control(proxy.pool)
    site = make_site(proxy, control)
    response = fetch(site, "POST", "/servers/s1/state?state=drain", headers=headers)
    assert response.status == 403
    assert control.calls == []


def test_without_a_token_a_same_origin_post_is_allowed(proxy: FakeProxy) -> None:
    control = Control(proxy.pool)
    response = fetch(
        make_site(proxy, control),
        "POST",
        "/servers/s1/state?state=drain",
        headers={"Origin": "http://127.0.0.1:9000", **FORM},
    )
    assert response.status == 200


@pytest.fixture
def logged() -> Iterator[list[str]]:
    lines: list[str] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_namespace") == "stickyproxy.admin":
            lines.append(formatEvent(event))

    observer = cast(ILogObserver, observe)
    globalLogPublisher.addObserver(observer)
    yield lines
    globalLogPublisher.removeObserver(observer)


def test_every_change_is_logged_with_who_asked(proxy: FakeProxy, logged: list[str]) -> None:
    site = make_site(proxy, Control(proxy.pool))
    peer = IPv4Address("TCP", "127.0.0.1", 43210)
    fetch(
        site,
        "POST",
        "/servers/s1/state?state=maint",
        headers={"X-Requested-By": "alice@ops", "User-Agent": "curl/8"},
        peer=peer,
    )
    fetch(
        site, "POST", "/servers/s1/shutdown-sessions", headers={"User-Agent": "curl/8"}, peer=peer
    )
    assert logged == [
        "admin: 127.0.0.1:43210 (alice@ops) set s1 to maint: UP -> MAINT",
        "admin: 127.0.0.1:43210 (curl/8) shut down 3 sessions of s1",
    ]


def test_refusals_are_logged_and_headers_cannot_forge_log_lines(
    proxy: FakeProxy, logged: list[str]
) -> None:
    site = make_site(proxy, Control(proxy.pool), token=TOKEN)
    fetch(
        site,
        "POST",
        "/servers/s1/state?state=maint",
        headers={"X-Requested-By": "mallory\x7fadmin: fake line"},
    )
    assert len(logged) == 1
    assert logged[0].startswith("admin: refused 127.0.0.1:51000 (mallory?admin: fake line)")


# -- ProxyControl: the AdminControl of a running proxy --------------------------------------


@dataclass
class Sessions:
    closed: list[str] = field(default_factory=list)

    def shutdown_sessions(self, server_name: str) -> int:
        self.closed.append(server_name)
        return 5

    def go_away(self, window: float, server_name: str | None = None) -> int:
        self.closed.append(f"{server_name} over {window}s")
        return 5


@dataclass
class RunningProxy:
    """The attributes of StickyProxy that ProxyControl uses."""

    pool: Pool
    context: Sessions
    reactor: Clock


def test_proxy_control_sets_states_at_the_reactor_time() -> None:
    clock = Clock()
    clock.advance(42)
    running = RunningProxy(FakeProxy().pool, Sessions(), clock)
    transition = ProxyControl(running).set_state("s2", "drain")
    assert transition is not None
    assert (transition.old.value, transition.new.value) == ("UP", "DRAIN")
    assert running.pool.servers["s2"].last_change == 42


def test_proxy_control_shuts_down_sessions_of_known_servers_only() -> None:
    running = RunningProxy(FakeProxy().pool, Sessions(), Clock())
    control = ProxyControl(running)
    assert control.shutdown_sessions("s2") == 5
    with pytest.raises(KeyError):
        control.shutdown_sessions("nope")
    with pytest.raises(KeyError):
        control.set_state("nope", "drain")
    assert running.context.closed == ["s2"]


def test_proxy_control_closes_websockets_of_known_servers_over_a_spread() -> None:
    running = RunningProxy(FakeProxy().pool, Sessions(), Clock())
    control = ProxyControl(running)
    assert control.close_tunnels("s1", 30.0) == 5
    with pytest.raises(KeyError):
        control.close_tunnels("nope", 30.0)
    assert running.context.closed == ["s1 over 30.0s"]


def test_proxy_control_follows_the_pool_a_reload_puts_in_place() -> None:
    running = RunningProxy(FakeProxy().pool, Sessions(), Clock())
    control = ProxyControl(running)
    running.pool = FakeProxy().pool
    control.set_state("s1", "maint")
    assert running.pool.servers["s1"].admin == "maint"


def test_a_token_given_as_a_callable_is_read_at_each_request(proxy: FakeProxy) -> None:
    tokens = [TOKEN]
    site = make_site(proxy, Control(proxy.pool), token=lambda: tokens[-1])
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert fetch(site, "POST", "/servers/s1/state?state=drain", headers=auth).status == 200
    tokens.append("a-new-token-after-a-reload")
    assert fetch(site, "POST", "/servers/s1/state?state=drain", headers=auth).status == 403


# -- [admin] token ---------------------------------------------------------------------------


BASE = "[server s1]\naddress = 127.0.0.1:3030\n[admin]\nlisten = tcp:0:interface=127.0.0.1\n"


def test_the_admin_token_is_read_and_kept_out_of_repr() -> None:
    config = parse_config(BASE + f"token = {TOKEN}\n")
    assert config.admin.token == TOKEN
    assert TOKEN not in repr(config)
    assert parse_config(BASE + "token =\n").admin.token is None
    assert parse_config(BASE).admin.token is None


@pytest.mark.parametrize("token", ["short", "has space in it abcdefgh", "tokén-0123456789abcdef"])
def test_a_weak_or_malformed_token_is_a_config_error_that_does_not_echo_it(token: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(BASE + f"token = {token}\n")
    (problem,) = caught.value.problems
    assert (problem.section, problem.key) == ("admin", "token")
    assert token not in str(caught.value)


def test_shutdown_sessions_with_spread_closes_websockets_gracefully(proxy: FakeProxy) -> None:
    local = IPv4Address("TCP", "127.0.0.1", 9000)
    control = Control(proxy.pool)
    site = make_site(proxy, control)
    response = fetch(site, "POST", "/servers/s1/shutdown-sessions?spread=30s", local=local)
    assert response.status == 200
    assert control.calls == [("close_tunnels", "s1", "30.0")]
    bad = fetch(site, "POST", "/servers/s1/shutdown-sessions?spread=soon", local=local)
    assert bad.status == 400


def test_a_weight_change_rebuilds_the_ring_and_weight_0_drains(proxy: FakeProxy) -> None:
    local = IPv4Address("TCP", "127.0.0.1", 9000)
    control = Control(proxy.pool)
    site = make_site(proxy, control)
    response = fetch(site, "POST", "/servers/s1/weight?weight=0", local=local)
    assert response.status == 200
    assert response.json()["transition"] == {"old": "UP", "new": "DRAIN"}
    assert proxy.pool.servers["s1"].weight == 0
    assert fetch(site, "POST", "/servers/s1/weight?weight=300", local=local).status == 400
    assert fetch(site, "POST", "/servers/nope/weight?weight=5", local=local).status == 404


def test_post_reload_rereads_the_configuration(proxy: FakeProxy) -> None:
    local = IPv4Address("TCP", "127.0.0.1", 9000)
    control = Control(proxy.pool)
    response = fetch(make_site(proxy, control), "POST", "/reload", local=local)
    assert response.status == 200 and response.json() == {"reloaded": True}
    assert control.calls == [("reload",)]
    refused = fetch(make_site(proxy, control, token=TOKEN), "POST", "/reload", local=local)
    assert refused.status == 401
