"""Traffic counters, per server and for the frontend.

Plain integers bumped by the relay on its hot path (no locks, no
callbacks); the admin endpoint turns them into the status page, JSON and
Prometheus metrics. Server *state* lives in :mod:`stickyproxy.pool`; this
module only counts what happened.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_CLASSES = ("other", "1xx", "2xx", "3xx", "4xx", "5xx")

#: Routing decisions, as :class:`stickyproxy.pool.Decision` names them.
DECISIONS = ("sid-tag", "sid-table", "sid-store", "cookie", "cookie-unusable", "hash", "redispatch")


#: The class of every valid status code, looked up once per response.
_CLASS_OF: dict[int, str] = {status: _CLASSES[status // 100] for status in range(100, 600)}


@dataclass(slots=True, eq=False)
class Counters:
    """What one server (or the whole frontend) has seen."""

    requests: int = 0
    bytes_in: int = 0  # from clients
    bytes_out: int = 0  # to clients
    tunnels: int = 0  # currently open (WebSockets)
    tunnels_total: int = 0
    cookie_hits: int = 0  # routed by a valid cookie
    cookie_inserts: int = 0  # Set-Cookie added (hash or redispatch)
    repins: int = 0  # a cookie for an unusable server was replaced
    redispatches: int = 0
    connect_errors: int = 0
    queue_timeouts: int = 0
    sid_routed: int = 0  # routed by an engine.io session id
    #: engine.io "unknown session" answers, by (routing decision, kind of answer).
    unknown_sessions: dict[tuple[str, str], int] = field(default_factory=dict)
    responses: dict[str, int] = field(
        default_factory=lambda: {"1xx": 0, "2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0, "other": 0}
    )

    def response(self, status: int) -> None:
        """Count one response by its class."""
        self.responses[_CLASS_OF.get(status, "other")] += 1

    def unknown_sessions_by_decision(self) -> dict[str, dict[str, int]]:
        """``{decision: {kind: count}}``: which routing led to which answer."""
        result: dict[str, dict[str, int]] = {}
        for (decision, kind), count in sorted(self.unknown_sessions.items()):
            result.setdefault(decision, {})[kind] = count
        return result

    def as_dict(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "tunnels": self.tunnels,
            "tunnels_total": self.tunnels_total,
            "cookie_hits": self.cookie_hits,
            "cookie_inserts": self.cookie_inserts,
            "repins": self.repins,
            "redispatches": self.redispatches,
            "connect_errors": self.connect_errors,
            "queue_timeouts": self.queue_timeouts,
            "sid_routed": self.sid_routed,
            "unknown_sessions": self.unknown_sessions_by_decision(),
            "responses": dict(self.responses),
        }


@dataclass(slots=True, eq=False)
class FrontendCounters(Counters):
    """Frontend totals, plus what only the frontend sees."""

    connections: int = 0  # currently open
    connections_total: int = 0
    errors: dict[int, int] = field(default_factory=dict)  # the proxy's own error pages

    def error(self, status: int) -> None:
        self.errors[status] = self.errors.get(status, 0) + 1

    def as_dict(self) -> dict[str, object]:
        result = Counters.as_dict(self)
        result["connections"] = self.connections
        result["connections_total"] = self.connections_total
        result["errors"] = {str(k): v for k, v in sorted(self.errors.items())}
        return result


def count_exchange(
    frontend: Counters, server: Counters, status: int, reason: str, set_cookie: bool
) -> None:
    """Count one response relayed from ``server``, for it and the frontend.

    :param reason: how the request was routed (a :data:`DECISIONS` name).
    :param set_cookie: whether the response pins the client with our cookie.
    """
    kind = _CLASS_OF.get(status, "other")
    frontend.requests += 1
    server.requests += 1
    frontend.responses[kind] += 1
    server.responses[kind] += 1
    if reason == "cookie":
        frontend.cookie_hits += 1
        server.cookie_hits += 1
        return
    if reason[0] == "s":  # sid-tag, sid-table, sid-store
        frontend.sid_routed += 1
        server.sid_routed += 1
    if set_cookie:
        frontend.cookie_inserts += 1
        server.cookie_inserts += 1
        if reason == "cookie-unusable":
            frontend.repins += 1
            server.repins += 1
        elif reason == "redispatch":
            frontend.redispatches += 1
            server.redispatches += 1


class Stats:
    """The counters of one proxy."""

    def __init__(self, server_names: list[str]) -> None:
        self.frontend = FrontendCounters()
        self.servers: dict[str, Counters] = {name: Counters() for name in server_names}

    def server(self, name: str) -> Counters:
        """The counters of server ``name`` (created on first use, e.g. after a reload)."""
        counters = self.servers.get(name)
        if counters is None:
            counters = self.servers[name] = Counters()
        return counters

    def as_dict(self) -> dict[str, object]:
        return {
            "frontend": self.frontend.as_dict(),
            "servers": {name: c.as_dict() for name, c in self.servers.items()},
        }
