"""The ``[admin]`` endpoint: status page, JSON, Prometheus metrics, runtime control.

=========================================  ==========================================
request                                    answer
=========================================  ==========================================
``GET /``                                  HTML status page, one row per server; it
                                           reloads itself every 5 s with a meta
                                           refresh (no script, no external assets);
                                           ``?refresh=N`` changes the period, ``0``
                                           stops it
``GET /stats.json``                        the snapshot described below
``GET /metrics``                           Prometheus text format (OpenMetrics when
                                           the ``Accept`` header asks for it)
``POST /servers/NAME/state``               ``state=ready|drain|maint`` in the query
                                           or a form body: HAProxy's ``set server
                                           state``
``POST /servers/NAME/weight``              ``weight=N`` (0-256): HAProxy's ``set
                                           server weight``
``POST /servers/NAME/shutdown-sessions``   close every client connection served by
                                           NAME, open WebSockets included; with
                                           ``spread=30s``, WebSockets get a Close
                                           frame (1001) spread over that long
``POST /reload``                           re-read the configuration file, as
                                           SIGHUP does
=========================================  ==========================================

``/stats.json``
===============

``{"servers": [SERVER, ...], "frontend": FRONTEND, "engineio": ENGINEIO}``,
servers in configuration order. Each ``SERVER`` has:

* ``name``, ``address`` (``host:port``), ``cookie`` (its cookie value),
  ``weight``, ``maxconn`` (concurrent requests allowed, 0 = no limit),
  ``check`` (whether it is health-checked);
* ``state``: ``UP`` (takes new clients), ``DRAIN`` (keeps clients pinned by
  cookie, takes no new ones), ``DOWN`` (failed its checks) or ``MAINT`` (taken
  out by an operator); ``admin``: the operator's setting, ``ready``, ``drain``
  or ``maint``; ``status``: HAProxy's text, such as ``UP 2/3`` (two failed
  checks out of the three that take it down) or ``DOWN 1/2`` (going up);
* ``health``, ``rise``, ``fall``: the check counter behind ``status``;
  ``last_check``: the result of the last check, ``last_check_time``: when it
  ended, ``last_change``: when ``state`` last changed (seconds since the epoch,
  or ``null``); ``transitions``: how many times ``state`` changed;
  ``check_failures``: failed checks; ``observed_failures``: connections that
  failed during traffic and counted as failed checks;
* ``active``: requests being served now; ``tunnels``: upgraded (WebSocket)
  connections open now, ``tunnels_total``: all of them so far;
* ``requests``, ``bytes_in`` (from clients), ``bytes_out`` (to clients);
  ``responses``: ``{"1xx": n, ..., "5xx": n, "other": n}``;
* ``cookie_hits``: requests routed by a valid cookie; ``cookie_inserts``:
  responses that set the cookie; ``repins``: cookies naming an unusable server
  that were replaced; ``redispatches``: requests moved to another server after
  failed connection attempts; ``connect_errors``: failed connection attempts;
  ``queue_timeouts``: requests that waited for a free slot (``maxconn``) in
  vain;
* ``sid_routed``: engine.io requests routed by their session id (its tag, the
  local table or the shared store); ``unknown_sessions``: ``{DECISION: {KIND:
  n}}``, the answers by which the server said it holds no such session, by
  the routing decision that sent the request there (``sid-tag``,
  ``sid-table``, ``sid-store``, ``cookie``, ``cookie-unusable``, ``hash``,
  ``redispatch``) and the kind of answer (``polling_json``: engine.io's 400
  with code 1 to a poll; ``upgrade_text``: its plain-text 400 to a WebSocket
  upgrade; ``python_engineio``: python-engineio's "Invalid session"). Under a
  ``sid-*`` decision the session had expired on its server; under any other
  the request probably went to the wrong server (a misroute).

``FRONTEND`` has the same traffic counters for the whole proxy, plus
``connections`` (client connections open now), ``connections_total`` and
``errors``: ``{"STATUS": n}``, the error responses the proxy wrote itself.

``ENGINEIO`` describes engine.io session routing: ``path`` (the engine.io
path prefix; empty when sid routing is off), ``sid_tag``, ``sessions`` (known
to the local table now), ``max_sessions`` (its size), ``learned`` (handshakes
whose session was learned), ``tagged`` (handshakes whose sid got the server's
tag), ``expired`` and ``evicted`` (sessions the table dropped, idle or for
room), and ``store``: ``null`` without a shared store, otherwise
``{"connected": bool, "hits", "misses", "writes", "errors", "timeouts"}``.

``/metrics``
============

Per server, labelled ``server``: ``stickyproxy_server_state`` (a state set,
label ``state``: one series per UP/DOWN/DRAIN/MAINT, 1 for the current one),
gauges ``_weight``, ``_active_connections``, ``_max_connections``,
``_current_tunnels``, and counters ``_requests_total``, ``_bytes_in_total``,
``_bytes_out_total``, ``_tunnels_total``, ``_cookie_hits_total``,
``_cookie_inserts_total``, ``_cookie_repins_total``, ``_redispatches_total``,
``_connection_errors_total``, ``_queue_timeouts_total``,
``_sid_routed_total``, ``_check_failures_total``,
``_observed_failures_total``, ``_state_changes_total``,
``_responses_total`` (label ``code``: ``1xx`` to ``5xx``, ``other``) and
``_engineio_unknown_sessions_total`` (labels ``decision`` and ``kind``, as in
``unknown_sessions`` above). For the frontend, ``stickyproxy_frontend_*``:
the same traffic counters, ``_sid_routed_total`` and
``_engineio_unknown_sessions_total``, gauges ``_current_connections`` and
``_current_tunnels``, ``_connections_total`` and ``_errors_total`` (label
``status``).

For engine.io routing, ``stickyproxy_engineio_*``: gauges ``_sessions`` and
``_max_sessions``, counters ``_sessions_learned_total``,
``_sessions_tagged_total``, ``_sessions_expired_total`` and
``_sessions_evicted_total``; with a shared store, gauge ``_store_up`` (1 while
connected) and counters ``_store_hits_total``, ``_store_misses_total``,
``_store_writes_total``, ``_store_errors_total`` and
``_store_timeouts_total``. A probable misroute shows as
``increase(stickyproxy_server_engineio_unknown_sessions_total{decision!~"sid-.*"}[5m]) > 0``.

Runtime control and who may use it
==================================

Control requests need ``Authorization: Bearer TOKEN`` (RFC 6750 §2.1) when
``[admin] token`` is set: a missing token gets 401, a wrong one 403. Without a
configured token, control is allowed only on connections that arrived at a
loopback address (``127.0.0.0/8``, ``::1``) or a UNIX socket, that is from this
machine, and only when the request could not have been forged by a web page:
its ``Host`` must be an IP address or ``localhost`` (against DNS rebinding) and
an ``Origin`` header, if any, must match it (against cross-site form posts).
The read-only pages need no token. Every change is logged with the peer
address and the ``X-Requested-By`` header (or the ``User-Agent``). Answers are
JSON: ``{"server": NAME, ...}`` on success, ``{"error": TEXT}`` otherwise.

The data come from callables passed to :func:`admin_site` (the proxy's
``snapshot`` and an :class:`AdminControl`), so every page is tested without a
proxy.
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol, get_args
from urllib.parse import urlsplit

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from stickyproxy.config import parse_duration
from stickyproxy.eiopayload import UnknownSession
from stickyproxy.pool import Admin, Pool, Transition
from stickyproxy.stats import DECISIONS

__all__ = [
    "UNKNOWN_SESSION_KINDS",
    "AdminControl",
    "MetricsPage",
    "ProxyControl",
    "ServerControl",
    "SnapshotCollector",
    "StatsJSON",
    "StatusPage",
    "admin_site",
    "human_age",
    "human_bytes",
    "render_status_page",
    "requester",
]

log = Logger(namespace="stickyproxy.admin")

Snapshot = Callable[[], Mapping[str, Any]]

STATES = ("UP", "DOWN", "DRAIN", "MAINT")
ADMIN_STATES: tuple[Admin, ...] = ("ready", "drain", "maint")
RESPONSE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "other")
#: The kinds of "unknown session" answers, as the relay tells them apart.
UNKNOWN_SESSION_KINDS: tuple[UnknownSession, ...] = get_args(UnknownSession)


class AdminControl(Protocol):
    """What the admin endpoint may change. Both methods raise :exc:`KeyError`
    for an unknown server name."""

    def set_state(self, name: str, state: Admin) -> Transition | None:
        """Set a server's administrative state; return the change it caused."""

    def shutdown_sessions(self, name: str) -> int:
        """Close every client connection served by ``name``; return how many."""

    def close_tunnels(self, name: str, spread: float) -> int:
        """Send the WebSockets of ``name`` a Close frame (1001), spread over
        ``spread`` seconds; return how many."""

    def set_weight(self, name: str, weight: int) -> Transition | None:
        """Set a server's weight (0-256); return the state change it caused."""

    def reload(self) -> Deferred[bool] | None:
        """Re-read the configuration file; None when there is no file to read."""


class _Sessions(Protocol):
    def shutdown_sessions(self, server_name: str) -> int: ...

    def go_away(self, window: float, server_name: str | None = None) -> int: ...


class _Proxy(Protocol):
    """What :class:`ProxyControl` uses of a ``StickyProxy``."""

    @property
    def pool(self) -> Pool: ...

    @property
    def context(self) -> _Sessions: ...

    @property
    def reactor(self) -> IReactorTime: ...


class ProxyControl:
    """The :class:`AdminControl` of a running ``StickyProxy``.

    The pool is looked up on every call rather than kept: a reload replaces
    it, and a change must reach the servers now in use.
    """

    def __init__(self, proxy: _Proxy) -> None:
        self.proxy = proxy

    def set_state(self, name: str, state: Admin) -> Transition | None:
        return self.proxy.pool.set_admin(name, state, self.proxy.reactor.seconds())

    def shutdown_sessions(self, name: str) -> int:
        if name not in self.proxy.pool.servers:
            raise KeyError(name)
        return self.proxy.context.shutdown_sessions(name)

    def close_tunnels(self, name: str, spread: float) -> int:
        if name not in self.proxy.pool.servers:
            raise KeyError(name)
        return self.proxy.context.go_away(spread, name)

    def set_weight(self, name: str, weight: int) -> Transition | None:
        return self.proxy.pool.set_weight(name, weight, self.proxy.reactor.seconds())

    def reload(self) -> Deferred[bool] | None:
        reloader = getattr(self.proxy, "reloader", None)
        return None if reloader is None else reloader()


# -- numbers for people ----------------------------------------------------------------------


def human_bytes(count: float) -> str:
    """``1536`` → ``"1.5 KiB"``: powers of 1024, one decimal below 100."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            break
        value /= 1024
    if unit == "B":
        return f"{int(value)} B"
    return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"


def human_age(seconds: float) -> str:
    """``75`` → ``"1m15s"``: the two largest units, never negative."""
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


# -- GET / -----------------------------------------------------------------------------------

_STYLE = """
body { font: 12.5px/1.35 system-ui, sans-serif; margin: 1em; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .5em; }
table { border-collapse: collapse; margin: .8em 0; font-size: 12px; }
th, td { padding: .2em .3em; border: 1px solid #ddd; white-space: nowrap; }
th { background: #f3f3f3; font-weight: 600; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.state { font-weight: 700; padding: .1em .5em; border-radius: .3em; color: #fff; }
.UP .state { background: #2e7d32; }
.DRAIN .state { background: #1565c0; }
.DOWN .state { background: #c62828; }
.MAINT .state { background: #6d4c41; }
tr.DOWN, tr.MAINT { background: #fff3f3; }
tr.DRAIN { background: #f2f7ff; }
tfoot td { font-weight: 600; background: #fafafa; }
.muted { color: #777; }
dl { display: grid; grid-template-columns: max-content auto; gap: .1em 1em; }
dt { color: #555; } dd { margin: 0; }
"""


def _cell(text: object, numeric: bool = False, title: str | None = None) -> str:
    attributes = ' class="n"' if numeric else ""
    if title:
        attributes += f' title="{html.escape(title)}"'
    return f"<td{attributes}>{html.escape(str(text))}</td>"


def _count(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) else "-"


def _traffic_cells(entry: Mapping[str, Any]) -> str:
    """The counters shared by server rows and the frontend totals row."""
    responses = entry.get("responses", {})
    cells = [
        _cell(_count(entry.get("tunnels")), True, f"{_count(entry.get('tunnels_total'))} in all"),
        _cell(_count(entry.get("requests")), True),
        _cell(human_bytes(entry.get("bytes_in", 0)), True, f"{entry.get('bytes_in', 0)} bytes"),
        _cell(human_bytes(entry.get("bytes_out", 0)), True, f"{entry.get('bytes_out', 0)} bytes"),
    ]
    cells += [_cell(_count(responses.get(key, 0)), True) for key in RESPONSE_CLASSES]
    cells += [
        _cell(_count(entry.get(key)), True) for key in ("cookie_hits", "cookie_inserts", "repins")
    ]
    cells.append(_cell(_count(entry.get("sid_routed")), True))
    cells.append(_unknown_sessions_cell(entry.get("unknown_sessions")))
    cells += [_cell(_count(entry.get(key)), True) for key in ("redispatches", "connect_errors")]
    return "".join(cells)


def _unknown_sessions_cell(counted: object) -> str:
    """The total of "unknown session" answers; the tooltip tells them apart.

    What an answer means depends on how the request was routed: after a
    ``sid-*`` decision the session had expired on its server, after any other
    the request probably reached the wrong one. The tooltip says both sums
    first, then every decision and kind.
    """
    if not isinstance(counted, Mapping):
        return _cell("-", True)
    lines = []
    expired = misrouted = 0
    for decision, kinds in counted.items():
        for kind, count in kinds.items():
            lines.append(f"{decision} · {kind}: {count:,}")
            if str(decision).startswith("sid-"):
                expired += count
            else:
                misrouted += count
    if not lines:
        return _cell("0", True)
    summary = f"{misrouted:,} probable misroutes, {expired:,} expired sessions"
    return _cell(_count(expired + misrouted), True, "\n".join([summary, *lines]))


def _server_row(server: Mapping[str, Any], now: float) -> str:
    state = str(server.get("state", ""))
    status = str(server.get("status", state))
    state_html = f'<span class="state">{html.escape(state)}</span>'
    if status != state:
        state_html += f' <span class="muted">{html.escape(status)}</span>'
    if server.get("admin") not in (None, "ready"):
        state_html += f' <span class="muted">(admin: {html.escape(str(server["admin"]))})</span>'
    if not server.get("check", True):
        check = "not checked"
    elif server.get("last_check") is None:
        check = "pending"
    else:
        check = str(server["last_check"])
        if server.get("last_check_time") is not None:
            check += f" · {human_age(now - float(server['last_check_time']))} ago"
    changed = server.get("last_change")
    if changed is not None:
        # How long the server has been in this state, as HAProxy's "5m2s UP".
        state_html += f' <span class="muted">for {human_age(now - float(changed))}</span>'
    maxconn = server.get("maxconn")
    limit = "∞" if maxconn == 0 else _count(maxconn)
    name = html.escape(str(server.get("name", "")))
    return (
        f'<tr class="{html.escape(state)}" id="server-{name}" data-state="{html.escape(state)}">'
        f"<th scope=row>{name}</th><td>{state_html}</td>"
        + _cell(check)
        + _cell(_count(server.get("weight")), True)
        + _cell(f"{_count(server.get('active'))}/{limit}", True)
        + _traffic_cells(server)
        + _cell(_count(server.get("transitions")), True)
        + "</tr>"
    )


def render_status_page(data: Mapping[str, Any], now: float, refresh: int) -> str:
    """The HTML of ``GET /`` for one snapshot.

    :param now: the current time, on the clock of the snapshot's timestamps.
    :param refresh: seconds between reloads; 0 for none.
    """
    servers = list(data.get("servers", []))
    frontend = data.get("frontend", {})
    counts = {state: sum(1 for s in servers if s.get("state") == state) for state in STATES}
    summary = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
    alarm = counts["DOWN"] + counts["MAINT"]
    title = f"stickyproxy: {alarm} out" if alarm else "stickyproxy"
    errors = frontend.get("errors", {})
    error_text = ", ".join(f"{status}: {n:,}" for status, n in errors.items()) or "none"
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh > 0 else ""
    every = f"reloads every {refresh} s" if refresh > 0 else "automatic reload off"
    rows = "\n".join(_server_row(server, now) for server in servers)
    totals = (
        '<tr><th scope=row>Frontend</th><td colspan=2 class="muted">all servers</td><td></td>'
        + _cell(f"{_count(frontend.get('connections'))} clients", True)
        + _traffic_cells(frontend)
        + "<td></td></tr>"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">{meta}
<meta name="viewport" content="width=device-width">
<title>{html.escape(title)}</title>
<style>{_STYLE}</style></head><body>
<h1>stickyproxy</h1>
<p>{len(servers)} servers: {html.escape(summary) or "none"}.
<span class="muted">This page {every}.</span></p>
<table>
<thead><tr><th rowspan=2>Server</th><th rowspan=2>State</th><th rowspan=2>Last check</th>
<th rowspan=2>Weight</th><th rowspan=2 title="requests being served / maxconn">Active</th>
<th rowspan=2>Tunnels</th>
<th rowspan=2>Requests</th><th colspan=2>Bytes</th><th colspan=6>Responses</th>
<th colspan=3>Cookie</th><th colspan=2>engine.io</th><th colspan=2>Errors</th>
<th rowspan=2>Changes</th></tr>
<tr><th>in</th><th>out</th>{"".join(f"<th>{c}</th>" for c in RESPONSE_CLASSES)}
<th>hits</th><th>inserts</th><th>re-pins</th>
<th title="requests routed by their engine.io session id">sid</th>
<th title="unknown sessions: the server holds no such session">unknown</th>
<th title="requests redispatched">redisp.</th>
<th title="failed connection attempts">connect</th></tr></thead>
<tbody>
{rows}
</tbody>
<tfoot>{totals}</tfoot>
</table>
<dl id="frontend">
<dt>Client connections</dt><dd>{_count(frontend.get("connections"))} open,
{_count(frontend.get("connections_total"))} in all</dd>
<dt>Tunnels</dt><dd>{_count(frontend.get("tunnels"))} open,
{_count(frontend.get("tunnels_total"))} in all</dd>
<dt>Requests</dt><dd>{_count(frontend.get("requests"))}</dd>
<dt>Queue timeouts</dt><dd>{_count(frontend.get("queue_timeouts"))}</dd>
<dt>Error responses</dt><dd>{html.escape(error_text)}</dd>
{_engineio_line(data.get("engineio"))}</dl>
<p><a href="stats.json">stats.json</a> · <a href="metrics">metrics</a></p>
</body></html>
"""


def _engineio_line(engineio: object) -> str:
    """The engine.io line under the table; nothing for a snapshot without one."""
    if not isinstance(engineio, Mapping):
        return ""
    path = str(engineio.get("path") or "")
    if not path:
        text = "sid routing off"
    else:
        text = (
            f"{path}: {_count(engineio.get('sessions'))} sessions known"
            f" / {_count(engineio.get('max_sessions'))} max,"
            f" {_count(engineio.get('learned'))} learned,"
            f" {_count(engineio.get('tagged'))} tagged,"
            f" {_count(engineio.get('expired'))} expired,"
            f" {_count(engineio.get('evicted'))} evicted"
        )
    store = engineio.get("store")
    title = ""
    if isinstance(store, Mapping):
        state = "connected" if store.get("connected") else "not connected"
        text += f"; store {state}, {_count(store.get('errors'))} errors"
        title = ", ".join(
            f"{key}: {_count(store.get(key))}" for key in ("hits", "misses", "writes", "timeouts")
        )
    attribute = f' title="{html.escape(title)}"' if title else ""
    return f'<dt>engine.io</dt><dd id="engineio"{attribute}>{html.escape(text)}</dd>\n'


def _no_store(request: Request, content_type: bytes) -> None:
    request.setHeader(b"Content-Type", content_type)
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"X-Content-Type-Options", b"nosniff")


class StatusPage(Resource):
    """``GET /``: the status page.

    :param clock: gives the current time, to show how old each check is.
    :param refresh: default seconds between reloads.
    """

    isLeaf = True

    def __init__(self, snapshot: Snapshot, clock: IReactorTime, refresh: int = 5) -> None:
        super().__init__()
        self.snapshot = snapshot
        self.clock = clock
        self.refresh = refresh

    def render_GET(self, request: Request) -> bytes:
        refresh = self.refresh
        value = _argument(request, "refresh")
        if value is not None and value.isdigit():
            refresh = min(int(value), 3600)
        page = render_status_page(self.snapshot(), self.clock.seconds(), refresh)
        _no_store(request, b"text/html; charset=utf-8")
        # Nothing on the page runs or loads: forbid it all, framing included
        # (clickjacking of a page that sits next to control endpoints).
        request.setHeader(
            b"Content-Security-Policy",
            b"default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
        )
        return page.encode()


# -- GET /stats.json -------------------------------------------------------------------------


class StatsJSON(Resource):
    """``GET /stats.json``: the snapshot as JSON."""

    isLeaf = True

    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__()
        self.snapshot = snapshot

    def render_GET(self, request: Request) -> bytes:
        _no_store(request, b"application/json")
        return json.dumps(self.snapshot(), indent=1).encode()


# -- GET /metrics ----------------------------------------------------------------------------

# (snapshot key, metric name without prefix, help). Counter names get their
# ``_total`` suffix from prometheus_client.
_COUNTERS = (
    ("requests", "requests", "HTTP requests forwarded."),
    ("bytes_in", "bytes_in", "Bytes received from clients."),
    ("bytes_out", "bytes_out", "Bytes sent to clients."),
    ("tunnels_total", "tunnels", "Connections upgraded to a tunnel (WebSocket)."),
    ("cookie_hits", "cookie_hits", "Requests routed by a valid persistence cookie."),
    ("cookie_inserts", "cookie_inserts", "Responses that set the persistence cookie."),
    ("repins", "cookie_repins", "Cookies naming an unusable server, replaced."),
    ("redispatches", "redispatches", "Requests moved to another server after retries."),
    ("connect_errors", "connection_errors", "Failed connection attempts to servers."),
    ("queue_timeouts", "queue_timeouts", "Requests that waited for a server slot in vain."),
    ("sid_routed", "sid_routed", "Requests routed by their engine.io session id."),
)
_SERVER_COUNTERS = (
    ("check_failures", "check_failures", "Failed health checks."),
    ("observed_failures", "observed_failures", "Connections failed in traffic, counted as checks."),
    ("transitions", "state_changes", "Changes of the server's state."),
)
_SERVER_GAUGES = (
    ("weight", "weight", "Configured weight."),
    ("active", "active_connections", "Requests being served now."),
    ("maxconn", "max_connections", "Concurrent requests allowed, 0 for no limit."),
    ("tunnels", "current_tunnels", "Tunnels (WebSockets) open now."),
)
_FRONTEND_GAUGES = (
    ("connections", "current_connections", "Client connections open now."),
    ("tunnels", "current_tunnels", "Tunnels (WebSockets) open now."),
)
_ENGINEIO_GAUGES = (
    ("sessions", "sessions", "engine.io sessions the local table knows now."),
    ("max_sessions", "max_sessions", "The most sessions the local table remembers."),
)
_ENGINEIO_COUNTERS = (
    ("learned", "sessions_learned", "engine.io handshakes whose session was learned."),
    ("tagged", "sessions_tagged", "engine.io handshakes whose sid got the server's tag."),
    ("expired", "sessions_expired", "Sessions dropped from the local table when idle."),
    ("evicted", "sessions_evicted", "Sessions dropped from the full local table for room."),
)
_STORE_COUNTERS = (
    ("hits", "store_hits", "Shared store lookups that found the session."),
    ("misses", "store_misses", "Shared store lookups that did not."),
    ("writes", "store_writes", "Sessions written to the shared store."),
    ("errors", "store_errors", "Shared store operations that failed."),
    ("timeouts", "store_timeouts", "Shared store operations that took too long."),
)


class SnapshotCollector:
    """A prometheus_client collector that reads one snapshot per scrape.

    Names follow the Prometheus conventions (``stickyproxy_server_*`` with a
    ``server`` label, ``stickyproxy_frontend_*``; counters end in ``_total``).
    As HAProxy's exporter does for ``haproxy_server_status``, the state is a
    state set: ``stickyproxy_server_state{server, state}`` has one series per
    state, 1 for the current one and 0 for the others, so a change never
    makes a series disappear.
    """

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        data = self.snapshot()
        servers = list(data.get("servers", []))
        frontend = data.get("frontend", {})

        state = GaugeMetricFamily(
            "stickyproxy_server_state",
            "1 for the server's current state (UP, DOWN, DRAIN, MAINT), 0 for the others.",
            labels=["server", "state"],
        )
        for server in servers:
            for name in STATES:
                state.add_metric([server["name"], name], 1 if server.get("state") == name else 0)
        yield state
        yield from _families("server", servers, _SERVER_GAUGES, GaugeMetricFamily)
        yield from _families("server", servers, _COUNTERS + _SERVER_COUNTERS, CounterMetricFamily)
        yield _responses("stickyproxy_server_responses", servers)

        yield from _families("frontend", [frontend], _FRONTEND_GAUGES, GaugeMetricFamily)
        yield from _families("frontend", [frontend], _COUNTERS, CounterMetricFamily)
        yield from _families(
            "frontend",
            [frontend],
            (("connections_total", "connections", "Client connections accepted."),),
            CounterMetricFamily,
        )
        yield _responses("stickyproxy_frontend_responses", [frontend])
        errors = CounterMetricFamily(
            "stickyproxy_frontend_errors",
            "Error responses written by the proxy itself, by status.",
            labels=["status"],
        )
        for status, count in frontend.get("errors", {}).items():
            errors.add_metric([str(status)], count)
        yield errors

        engineio = data.get("engineio")
        # Older snapshots (and tests) have no engine.io part: leave it out.
        enabled = isinstance(engineio, Mapping) and bool(engineio.get("path"))
        yield _unknown_sessions("server", servers, enabled)
        yield _unknown_sessions("frontend", [frontend], enabled)
        if isinstance(engineio, Mapping):
            yield from _engineio(engineio)


def _families(
    scope: str,
    entries: list[Mapping[str, Any]],
    table: Iterable[tuple[str, str, str]],
    kind: type[GaugeMetricFamily] | type[CounterMetricFamily],
) -> Iterator[Metric]:
    labels = ["server"] if scope == "server" else []
    for key, name, help_text in table:
        family = kind(f"stickyproxy_{scope}_{name}", help_text, labels=labels)
        for entry in entries:
            value = entry.get(key)
            if isinstance(value, int | float):
                family.add_metric([entry["name"]] if labels else [], value)
        yield family


def _unknown_sessions(scope: str, entries: list[Mapping[str, Any]], enabled: bool) -> Metric:
    """``stickyproxy_{scope}_engineio_unknown_sessions_total{decision, kind}``.

    The label values form a closed set (:data:`~stickyproxy.stats.DECISIONS`
    by :data:`UNKNOWN_SESSION_KINDS`), so while sid routing is on every pair
    is exported, at 0 until it happens, rather than appearing at its first
    increment: ``increase()`` and ``rate()`` over a series that starts at 1
    miss that first answer, and the first misroute is the one an alert must
    see. It costs 21 series per server. Pairs outside the set (a newer
    proxy's decisions) are exported as they are seen.

    :param enabled: whether engine.io routing is on; when off, only pairs
        already counted are exported.
    """
    labels = ["server", "decision", "kind"] if scope == "server" else ["decision", "kind"]
    family = CounterMetricFamily(
        f"stickyproxy_{scope}_engineio_unknown_sessions",
        "Answers from a server that it holds no such engine.io session, by routing"
        " decision (sid-*: expired; others: probable misroute) and kind of answer.",
        labels=labels,
    )
    for entry in entries:
        counted = entry.get("unknown_sessions")
        if not isinstance(counted, Mapping):
            continue  # a snapshot from before these were counted
        pairs = {
            (decision, kind): count
            for decision, kinds in counted.items()
            for kind, count in kinds.items()
        }
        if enabled:
            for decision in DECISIONS:
                for kind in UNKNOWN_SESSION_KINDS:
                    pairs.setdefault((decision, kind), 0)
        prefix = [str(entry["name"])] if scope == "server" else []
        for (decision, kind), count in sorted(pairs.items(), key=_decision_order):
            family.add_metric([*prefix, str(decision), str(kind)], count)
    return family


def _decision_order(item: tuple[tuple[str, str], int]) -> tuple[int, str, str]:
    """Decisions in routing order (sid first), unknown ones last."""
    (decision, kind), _ = item
    rank = DECISIONS.index(decision) if decision in DECISIONS else len(DECISIONS)
    return rank, decision, kind


def _engineio(engineio: Mapping[str, Any]) -> Iterator[Metric]:
    """``stickyproxy_engineio_*``: the session table and the shared store."""
    for key, name, help_text in _ENGINEIO_GAUGES:
        yield _single(GaugeMetricFamily, f"stickyproxy_engineio_{name}", help_text, engineio, key)
    for key, name, help_text in _ENGINEIO_COUNTERS:
        yield _single(CounterMetricFamily, f"stickyproxy_engineio_{name}", help_text, engineio, key)
    store = engineio.get("store")
    if not isinstance(store, Mapping):
        return  # no shared store configured: no series that would read as "down"
    yield GaugeMetricFamily(
        "stickyproxy_engineio_store_up",
        "1 while the shared session store is connected, 0 otherwise.",
        value=1 if store.get("connected") else 0,
    )
    for key, name, help_text in _STORE_COUNTERS:
        yield _single(CounterMetricFamily, f"stickyproxy_engineio_{name}", help_text, store, key)


def _single(
    kind: type[GaugeMetricFamily] | type[CounterMetricFamily],
    name: str,
    help_text: str,
    values: Mapping[str, Any],
    key: str,
) -> Metric:
    """A family of one unlabelled series, empty when ``key`` is not a number."""
    family = kind(name, help_text, labels=[])
    value = values.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool):
        family.add_metric([], value)
    return family


def _responses(name: str, entries: list[Mapping[str, Any]]) -> Metric:
    scoped = name.startswith("stickyproxy_server")
    family = CounterMetricFamily(
        name, "HTTP responses by status class.", labels=["server", "code"] if scoped else ["code"]
    )
    for entry in entries:
        responses = entry.get("responses", {})
        for code in RESPONSE_CLASSES:
            labels = [entry["name"], code] if scoped else [code]
            family.add_metric(labels, responses.get(code, 0))
    return family


class MetricsPage(Resource):
    """``GET /metrics``.

    prometheus_client's own Twisted resource runs a WSGI app in a thread,
    which would read the proxy's state off the reactor thread; this one
    renders on the reactor thread from a private registry, so several proxies
    in one process never share metrics.
    """

    isLeaf = True

    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(snapshot))

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        _no_store(request, content_type.encode())
        return encoder(self.registry)


# -- POST /servers/NAME/... ------------------------------------------------------------------


def _seconds(text: str) -> float | None:
    """A duration such as ``30s`` or ``2m`` (a bare number is seconds)."""
    try:
        return float(text) if text.replace(".", "", 1).isdigit() else parse_duration(text)
    except ValueError:
        return None


def _argument(request: Request, name: str) -> str | None:
    values = (request.args or {}).get(name.encode())
    return values[0].decode("utf-8", "replace") if values else None


def _json(request: Request, code: int, body: Mapping[str, Any]) -> bytes:
    request.setResponseCode(code)
    _no_store(request, b"application/json")
    return json.dumps(body).encode() + b"\n"


def _is_local(address: object) -> bool:
    if isinstance(address, UNIXAddress):
        return True
    if isinstance(address, IPv4Address | IPv6Address):
        try:
            ip = ipaddress.ip_address(address.host.split("%", 1)[0])
        except ValueError:
            return False
        mapped = getattr(ip, "ipv4_mapped", None)
        return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))
    return False


def _host_name(authority: str) -> str:
    """``[::1]:9000`` → ``::1``; ``localhost:9000`` → ``localhost``."""
    return urlsplit(f"//{authority}").hostname or ""


def _forgeable(request: Request) -> str | None:
    """Why a request without a token might come from a hostile web page, if it might."""
    host = (request.getHeader(b"host") or b"").decode("latin-1")
    name = _host_name(host)
    if name != "localhost":
        try:
            ipaddress.ip_address(name)
        except ValueError:
            # A name other than localhost may be an attacker's DNS name that
            # now resolves to 127.0.0.1 (DNS rebinding): the page is then
            # same-origin with this endpoint.
            return f"Host {host!r} is not an IP address or localhost"
    origin = request.getHeader(b"origin")
    # Browsers send Origin with cross-site POSTs (RFC 6454 §7; Fetch): a
    # form on another site must not drive this endpoint.
    if origin is not None and urlsplit(origin.decode("latin-1")).netloc != host:
        return f"Origin {origin.decode('latin-1')!r} is not this endpoint"
    return None


def requester(request: Request) -> str:
    """Who asked, for the log: the peer and a hint of the tool or person."""
    address = request.getClientAddress()
    if isinstance(address, IPv4Address | IPv6Address):
        peer = f"{address.host}:{address.port}"
    elif isinstance(address, UNIXAddress):
        peer = "unix socket"
    else:
        peer = "unknown peer"
    hint = request.getHeader(b"x-requested-by") or request.getHeader(b"user-agent") or b"-"
    # Printable ASCII only and bounded, so a header cannot forge log lines.
    text = "".join(c if c.isprintable() else "?" for c in hint.decode("ascii", "replace"))
    return f"{peer} ({text[:80]})"


class ServerControl(Resource):
    """``POST /servers/NAME/state`` and ``POST /servers/NAME/shutdown-sessions``.

    :param token: returns the bearer token required, or ``None`` for the
        loopback rule of the module docstring.
    """

    isLeaf = True

    def __init__(self, control: AdminControl | None, token: Callable[[], str | None]) -> None:
        super().__init__()
        self.control = control
        self.token = token

    def render(self, request: Request) -> bytes:
        path = [segment.decode("utf-8", "replace") for segment in request.postpath or []]
        if len(path) != 2 or path[1] not in ("state", "weight", "shutdown-sessions"):
            return _json(
                request, 404, {"error": "use /servers/NAME/state, /weight or /shutdown-sessions"}
            )
        refused = self._gate(request)
        if refused is not None:
            return refused
        who = requester(request)
        control = self.control
        if control is None:
            return _json(request, 501, {"error": "this endpoint has no runtime control"})
        name, action = path
        spread = _argument(request, "spread")
        try:
            if action == "state":
                return _set_state(control, request, name, who)
            if action == "weight":
                return _set_weight(control, request, name, who)
            if spread is not None:
                # A drain's last step: WebSockets told to go away (1001),
                # spread out so their clients do not reconnect all at once.
                seconds = _seconds(spread)
                if seconds is None:
                    return _json(request, 400, {"error": "spread must be a duration: 30s, 2m"})
                closed = control.close_tunnels(name, seconds)
            else:
                closed = control.shutdown_sessions(name)
        except KeyError:
            return _json(request, 404, {"error": f"no server named {name!r}"})
        log.info(
            "admin: {who} shut down {closed} sessions of {server}{how}",
            who=who,
            closed=closed,
            server=name,
            how="" if spread is None else f", WebSockets closed over {spread}",
        )
        return _json(request, 200, {"server": name, "closed": closed})

    def _gate(self, request: Request) -> bytes | None:
        """The answer to a request that may not change anything, or None."""
        if request.method != b"POST":
            request.setHeader(b"Allow", b"POST")
            return _json(request, 405, {"error": "use POST"})
        refusal = self._refusal(request)
        if refusal is None:
            return None
        code, reason = refusal
        log.warn("admin: refused {who}: {reason}", who=requester(request), reason=reason)
        return _json(request, code, {"error": reason})

    def _refusal(self, request: Request) -> tuple[int, str] | None:
        token = self.token()
        if token is not None:
            scheme, _, credentials = (request.getHeader(b"authorization") or b"").partition(b" ")
            if scheme.lower() != b"bearer" or not credentials.strip():
                # RFC 6750 §3: a request without credentials gets 401 and a challenge.
                request.setHeader(b"WWW-Authenticate", b'Bearer realm="stickyproxy admin"')
                return 401, "send Authorization: Bearer TOKEN"
            if not hmac.compare_digest(credentials.strip(), token.encode()):
                return 403, "wrong token"
            return None
        if not _is_local(request.getHost()):
            return 403, "no [admin] token is configured: control is only allowed from loopback"
        forged = _forgeable(request)
        if forged is not None:
            return 403, forged
        return None


class ReloadControl(ServerControl):
    """``POST /reload``: re-read the configuration file, as SIGHUP does."""

    def render(self, request: Request) -> bytes:  # NOT_DONE_YET is an int, as twisted.web allows
        if request.postpath not in ([], [b""]):
            return _json(request, 404, {"error": "use POST /reload"})
        refused = self._gate(request)
        if refused is not None:
            return refused
        who = requester(request)
        d = None if self.control is None else self.control.reload()
        if d is None:
            return _json(request, 501, {"error": "this proxy has no configuration file to re-read"})
        log.info("admin: {who} asked for a reload", who=who)

        def answer(reloaded: bool) -> None:
            code = 200 if reloaded else 409
            body: dict[str, object] = {"reloaded": reloaded}
            if not reloaded:
                body["error"] = "the configuration has problems; see the log"
            request.write(_json(request, code, body))
            request.finish()

        d.addCallback(answer)
        return NOT_DONE_YET  # type: ignore[return-value]


def _set_weight(control: AdminControl, request: Request, name: str, who: str) -> bytes:
    text = _argument(request, "weight") or ""
    if not text.isdigit() or int(text) > 256:
        return _json(request, 400, {"error": "weight must be a whole number from 0 to 256"})
    weight = int(text)
    transition = control.set_weight(name, weight)
    log.info(
        "admin: {who} set the weight of {server} to {weight}", who=who, server=name, weight=weight
    )
    body: dict[str, Any] = {"server": name, "weight": weight}
    if transition is not None:
        body["transition"] = {"old": transition.old.value, "new": transition.new.value}
    return _json(request, 200, body)


def _set_state(control: AdminControl, request: Request, name: str, who: str) -> bytes:
    state = _argument(request, "state")
    if state not in ADMIN_STATES:
        return _json(request, 400, {"error": "state must be ready, drain or maint"})
    transition = control.set_state(name, state)
    outcome = (
        "no change" if transition is None else f"{transition.old.value} -> {transition.new.value}"
    )
    log.info(
        "admin: {who} set {server} to {state}: {outcome}",
        who=who,
        server=name,
        state=state,
        outcome=outcome,
    )
    change = None
    if transition is not None:
        change = {"old": transition.old.value, "new": transition.new.value}
    return _json(request, 200, {"server": name, "admin": state, "transition": change})


# -- the site --------------------------------------------------------------------------------


def admin_site(
    snapshot: Snapshot,
    *,
    control: AdminControl | None = None,
    token: str | Callable[[], str | None] | None = None,
    reactor: Any = None,
    refresh: int = 5,
) -> Site:
    """The admin web site (see the module docstring for what it serves).

    :param snapshot: returns the proxy's state (``StickyProxy.snapshot``).
    :param control: runtime control; without it control requests get 501.
    :param token: ``[admin] token``, or a callable that returns the current
        one (so that a reload that changes it takes effect at once).
    :param reactor: the reactor for time and connection timeouts (default:
        the global one).
    :param refresh: seconds between reloads of the status page.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    root = Resource()
    root.putChild(b"", StatusPage(snapshot, reactor, refresh))
    root.putChild(b"stats.json", StatsJSON(snapshot))
    root.putChild(b"metrics", MetricsPage(snapshot))
    current_token = token if callable(token) else lambda: token
    root.putChild(b"servers", ServerControl(control, current_token))
    root.putChild(b"reload", ReloadControl(control, current_token))
    site = Site(root, reactor=reactor)
    site.noisy = False
    return site
