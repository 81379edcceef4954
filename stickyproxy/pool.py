"""The backend servers, their state, and the choice of a server per request.

State follows HAProxy's model (``doc/management.txt``; ``src/check.c``):

* An *administrative* state set by operators: ``ready``, ``drain`` or
  ``maint``.
* A *health* counter driven by checks, from 0 to ``rise + fall - 1``. The
  server is operational while ``health >= rise``. A failed check decrements
  it and drops it straight to 0 once it falls below ``rise``; a passed check
  increments it and lifts it straight to the top once it reaches ``rise``.
  At startup and when leaving maintenance the counter is ``rise``: the
  server is up, but the first failure takes it down.
* *Passive* observation (HAProxy's ``observe layer4``): with ``[health]
  observe = layer4``, a connection to the server that fails during traffic
  moves the counter exactly like a failed check, so ``fall`` refused
  connections in a row take the server down. HAProxy's default reaction
  (``on-error fastinter``) only brings the next check forward and needs
  ``error-limit`` (10) errors; counting each failure as a failed check is
  simpler to reason about and reacts within ``fall`` failures. Successful
  connections are not counted as passed checks: accepting a connection says
  little about whether the application behind it is healthy.

How often a server is checked depends on its counter, as HAProxy's
``srv_getinter``: ``interval`` at the top, ``downinter`` at 0, and
``fastinter`` in between, while it is going up or down.

From these, the effective :class:`State` and what traffic a server takes:

========  ======================  ===========================
state     new (hashed) clients    clients pinned by cookie
========  ======================  ===========================
UP        yes, below ``maxconn``  yes
DRAIN     no                      yes
DOWN      no                      no: re-hashed, new cookie
MAINT     no                      no: re-hashed, new cookie
========  ======================  ===========================
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from stickyproxy.config import BalanceConfig, HealthConfig, ServerConfig
from stickyproxy.hashring import HAProxyRing, HashRing, Ring

__all__ = ["Admin", "Decision", "Pool", "Server", "State", "Transition"]

Admin = Literal["ready", "drain", "maint"]
#: Why a request went where it went. ``sid-*``: an engine.io session, found
#: by the server tag in its sid, in the local sid table, or in the shared store.
Reason = Literal[
    "sid-tag", "sid-table", "sid-store", "cookie", "cookie-unusable", "hash", "redispatch", "none"
]


class State(enum.Enum):
    """The effective state of a server, as shown to operators."""

    UP = "UP"
    DOWN = "DOWN"
    DRAIN = "DRAIN"
    MAINT = "MAINT"


@dataclass(slots=True, eq=False)
class Server:
    """One backend server and its run-time state."""

    config: ServerConfig
    rise: int
    fall: int
    admin: Admin = "ready"
    health: int = 0
    active: int = 0
    last_check: str | None = None
    last_check_time: float | None = None
    last_change: float | None = None
    requests: int = 0
    check_failures: int = 0
    observed_failures: int = 0
    transitions: int = 0
    #: A weight set at run time (HAProxy's ``set server weight``), or None.
    weight_override: int | None = None
    # Copies of the configuration's, read on every request: plain attributes
    # cost less than properties.
    name: str = field(init=False)
    cookie: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = self.config.name
        self.cookie = self.config.cookie

    @property
    def address(self) -> tuple[str, int]:
        return (self.config.host, self.config.port)

    @property
    def weight(self) -> int:
        override = self.weight_override
        return self.config.weight if override is None else override

    @property
    def operational(self) -> bool:
        """Whether health checks (if any) currently consider the server up."""
        return not self.config.check or self.health >= self.rise

    @property
    def state(self) -> State:
        # Read on every routed request: ``operational`` and ``weight`` are
        # spelled out rather than called.
        admin = self.admin
        if admin == "maint":
            return State.MAINT
        config = self.config
        if config.check and self.health < self.rise:
            return State.DOWN
        override = self.weight_override
        if admin == "drain" or (config.weight if override is None else override) == 0:
            return State.DRAIN
        return State.UP

    @property
    def accepts_new(self) -> bool:
        """Whether a client without a usable cookie may be placed here."""
        maxconn = self.config.maxconn
        return self.state is State.UP and (maxconn == 0 or self.active < maxconn)

    @property
    def accepts_pinned(self) -> bool:
        """Whether a client whose cookie names this server may keep using it."""
        return self.state in (State.UP, State.DRAIN)

    @property
    def status(self) -> str:
        """HAProxy's status text: ``UP``, ``UP 2/3`` (going down), ``DOWN 1/2`` (going up)…"""
        state = self.state
        if not self.config.check and state is State.UP:
            return "no check"
        if state is State.MAINT or not self.config.check:
            return state.name
        if state is State.DOWN:
            return "DOWN" if self.health == 0 else f"DOWN {self.health}/{self.rise}"
        top = self.rise + self.fall - 1
        if self.health == top:
            return state.name
        return f"{state.name} {self.health - self.rise + 1}/{self.fall}"


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a request goes, why, and whether the response must set our cookie."""

    server: Server | None
    reason: Reason
    set_cookie: bool


_NO_DECISION: Final = Decision(None, "none", set_cookie=False)
#: How many client keys :class:`Pool` remembers the first choice of.
_FIRST_CHOICES_MAX: Final = 65536


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of a server's effective state."""

    server: str
    old: State
    new: State
    reason: str


@dataclass(slots=True)
class _Bound:
    """Bounded-load limits for one request (Mirrokni et al., as HAProxy applies them)."""

    factor: int
    total_active: int
    total_weight: int

    def allows(self, server: Server) -> bool:
        # ceil((served + 1) * factor / 100 * weight / total_weight), at least 1.
        numerator = (self.total_active + 1) * self.factor * server.weight
        denominator = 100 * self.total_weight
        limit = max(1, -(-numerator // denominator))
        return server.active < limit


class Pool:
    """The configured servers and the routing decisions made over them.

    :param servers: in configuration order (HAProxy ring ids are 1-based
        positions in this order).
    :param health: ``rise``/``fall`` for the health counter.
    :param balance: ring choice and bounded-load factor.
    """

    def __init__(
        self,
        servers: Sequence[ServerConfig],
        health: HealthConfig,
        balance: BalanceConfig,
    ) -> None:
        self.servers: dict[str, Server] = {}
        self._by_cookie: dict[str, Server] = {}
        for config in servers:
            if config.name in self.servers:
                raise ValueError(f"duplicate server name {config.name!r}")
            server = Server(config, rise=health.rise, fall=health.fall, health=health.rise)
            self.servers[config.name] = server
            if config.cookie:
                self._by_cookie.setdefault(config.cookie, server)
        self.health_config = health
        # Whether any server has a connection limit that can pass it over.
        self._limited = any(config.maxconn for config in servers)
        # Decisions are immutable: one per server and reason is enough.
        self._decisions: dict[tuple[Server, Reason], Decision] = {}
        self._balance_factor = balance.hash_balance_factor
        self._hash_function = balance.hash_function
        self.ring: Ring = self._build_ring()
        # The first server of each key's preference order on ``_first_ring``:
        # when it is up and has room, it is the lookup's answer, and the key
        # need not be hashed again.
        self._first: dict[bytes, str | None] = {}
        self._first_ring: Ring | None = None
        self._listeners: list[Callable[[Transition], None]] = []

    def _build_ring(self) -> Ring:
        servers = list(self.servers.values())
        if self._hash_function == "haproxy":
            return HAProxyRing([(s.name, i + 1, s.weight) for i, s in enumerate(servers)])
        return HashRing({s.name: s.weight for s in servers})

    def set_weight(self, name: str, weight: int, now: float | None = None) -> Transition | None:
        """Change a server's weight at run time (HAProxy's ``set server weight``).

        The ring is rebuilt, so clients without a cookie move as they would
        after the same change in the configuration; pinned clients stay.
        Weight 0 drains the server.

        :raises KeyError: for an unknown server; ValueError outside 0..256.
        """
        server = self.servers[name]
        if not 0 <= weight <= 256:
            raise ValueError("a weight is between 0 and 256")
        if weight == server.weight:
            return None
        old = server.state
        server.weight_override = weight
        self.ring = self._build_ring()
        return self._changed(server, old, f"weight set to {weight}", now)

    # -- routing --------------------------------------------------------------

    def by_cookie(self, value: str) -> Server | None:
        """Return the server whose cookie value is exactly ``value``.

        Matching is case-sensitive and an empty value never matches, so a
        client can never stick to a server that has no cookie value.
        """
        return self._by_cookie.get(value) if value else None

    def choose(
        self,
        cookie_values: Sequence[str],
        key: bytes,
        *,
        exclude: Collection[str] = (),
    ) -> Decision:
        """Route one request.

        :param cookie_values: our cookie's values from the request, in order.
            The first one naming a known server decides: that server if it
            still takes pinned clients, else the request is hashed.
        :param key: the hash key (:func:`stickyproxy.hashring.address_key`…).
        :param exclude: servers not to use for this request.
        """
        pinned_elsewhere = False
        for value in cookie_values:
            server = self.by_cookie(value)
            if server is None:
                continue
            if server.accepts_pinned and server.name not in exclude:
                return self._decision(server, "cookie")
            pinned_elsewhere = True
            break
        server = self._hash(key, exclude)
        if server is None:
            return _NO_DECISION
        return self._decision(server, "cookie-unusable" if pinned_elsewhere else "hash")

    def _decision(self, server: Server, reason: Reason) -> Decision:
        """The decision to send a request to ``server`` for ``reason``."""
        decision = self._decisions.get((server, reason))
        if decision is None:
            decision = Decision(server, reason, set_cookie=reason != "cookie")
            self._decisions[(server, reason)] = decision
        return decision

    def session(self, name: str, reason: Reason, cookie_values: Sequence[str]) -> Decision | None:
        """Route to the server known to hold the request's session, if it can take it.

        A session is pinned as firmly as a cookie: a draining server keeps
        it, a server down or in maintenance has lost it anyway (the caller
        then routes as if the session were unknown). The response sets the
        cookie unless the client already has the right one.

        :param name: the server holding the session.
        :param reason: how it was found (``sid-tag``, ``sid-table``, ``sid-store``).
        """
        server = self.servers.get(name)
        if server is None or not server.accepts_pinned:
            return None
        return Decision(server, reason, set_cookie=server.cookie not in cookie_values)

    def redispatch(self, key: bytes, exclude: Collection[str]) -> Decision:
        """Pick another server after ``exclude`` failed to take the request."""
        server = self._hash(key, exclude)
        if server is None:
            return _NO_DECISION
        return self._decision(server, "redispatch")

    def _hash(self, key: bytes, exclude: Collection[str]) -> Server | None:
        servers = self.servers
        if not exclude and self._balance_factor <= 0:
            first = self._first_choice(key)
            if first is not None:
                server = servers[first]
                maxconn = server.config.maxconn
                if server.state is State.UP and (maxconn == 0 or server.active < maxconn):
                    return server

        # Only UP servers are on the ring; excluded and full ones are walked
        # past, as HAProxy walks past its ``avoid`` server and saturated ones.
        def on_ring(name: str) -> bool:
            return servers[name].state is State.UP

        def passed_over(name: str) -> bool:
            # Asked only about servers on the ring, so UP: ``accepts_new``
            # comes down to room below maxconn.
            if name in exclude:
                return True
            server = servers[name]
            maxconn = server.config.maxconn
            return maxconn > 0 and server.active >= maxconn

        if not exclude and not self._limited and self._balance_factor <= 0:
            # Nothing can pass over a server that is on the ring.
            name = self.ring.lookup(key, on_ring)
            return None if name is None else servers[name]

        if self._balance_factor > 0:
            usable = [s for s in servers.values() if s.state is State.UP]
            bound = _Bound(
                factor=self._balance_factor,
                total_active=sum(s.active for s in servers.values()),
                total_weight=sum(s.weight for s in usable),
            )
            if bound.total_weight > 0:
                name = self.ring.lookup(
                    key,
                    on_ring,
                    skip=lambda n: passed_over(n) or not bound.allows(servers[n]),
                )
                if name is not None:
                    return servers[name]
            # The bound can only exclude everyone when exclusions or maxconn
            # remove the servers under it; serving beats refusing then.
        name = self.ring.lookup(key, on_ring, skip=passed_over)
        return None if name is None else servers[name]

    def _first_choice(self, key: bytes) -> str | None:
        """The first server in ``key``'s preference order on the current ring."""
        first_of = self._first
        if self._first_ring is not self.ring:
            first_of.clear()
            self._first_ring = self.ring
        try:
            return first_of[key]
        except KeyError:
            pass
        first = next(iter(self.ring.sequence(key)), None)
        if len(first_of) >= _FIRST_CHOICES_MAX:
            first_of.clear()
        first_of[key] = first
        return first

    def acquire(self, server: Server) -> None:
        """Count a request or connection now assigned to ``server``."""
        server.active += 1
        server.requests += 1

    def release(self, server: Server) -> None:
        """Count the end of a request or connection on ``server``."""
        if server.active > 0:
            server.active -= 1

    # -- state ----------------------------------------------------------------

    def add_listener(self, callback: Callable[[Transition], None]) -> None:
        """Call ``callback`` with every :class:`Transition` from now on."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[Transition], None]) -> None:
        """Stop calling ``callback``; a callback never added is ignored."""
        if callback in self._listeners:
            self._listeners.remove(callback)

    def check_interval(self, name: str) -> float:
        """Return the delay before the next health check of server ``name``.

        HAProxy's rule (``srv_getinter`` in ``src/check.c``): a server fully up
        is checked every ``interval``, one fully down every ``downinter``, and
        one in between (going up or down, or just started or out of
        maintenance with the counter at ``rise``) every ``fastinter``, so
        that a change is confirmed or denied quickly.

        :raises KeyError: for an unknown server.
        """
        server = self.servers[name]
        config = self.health_config
        if server.health >= server.rise + server.fall - 1:
            return config.interval
        if server.health == 0:
            return config.interval if config.downinter is None else config.downinter
        return config.interval if config.fastinter is None else config.fastinter

    def record_check(self, name: str, ok: bool, now: float, detail: str) -> Transition | None:
        """Apply one health-check outcome to server ``name``.

        :param now: the time of the check (seconds, any epoch).
        :param detail: a short description shown to operators.
        :returns: the state change it caused, if any.
        :raises KeyError: for an unknown server.
        """
        server = self.servers[name]
        server.last_check = detail
        server.last_check_time = now
        # Servers without checks never change health; in maintenance HAProxy
        # stops checking, so late results are ignored.
        if not server.config.check or server.admin == "maint":
            return None
        old = server.state
        if ok:
            _passed(server)
        else:
            server.check_failures += 1
            _failed(server)
        reason = f"health check {'passed' if ok else 'failed'}: {detail}"
        return self._changed(server, old, reason, now)

    def observe_connect_failure(self, name: str, now: float, detail: str) -> Transition | None:
        """Count a connection to server ``name`` that failed during traffic.

        With ``[health] observe = layer4`` the failure moves the health counter
        as a failed check does. Servers without checks have no counter, and
        servers in maintenance are not judged, so neither is affected; nor is
        anything with ``observe = none``.

        :param now: the time of the failure (seconds, any epoch).
        :param detail: what went wrong, such as ``connection refused``.
        :returns: the state change it caused, if any.
        :raises KeyError: for an unknown server.
        """
        server = self.servers[name]
        if (
            self.health_config.observe != "layer4"
            or not server.config.check
            or server.admin == "maint"
        ):
            return None
        server.observed_failures += 1
        old = server.state
        _failed(server)
        # How far along the way down the server is, as HAProxy's "UP 2/3":
        # failures so far out of the ``fall`` that take it down.
        top = server.rise + server.fall - 1
        progress = min(server.fall, top - server.health)
        reason = f"{detail} during traffic ({progress}/{server.fall})"
        return self._changed(server, old, reason, now)

    def set_admin(self, name: str, admin: Admin, now: float | None = None) -> Transition | None:
        """Set server ``name``'s administrative state (``ready``/``drain``/``maint``).

        Leaving maintenance restarts the health counter at ``rise``, as
        HAProxy does: up, but down again at the first failed check.

        :raises KeyError: for an unknown server.
        """
        if admin not in ("ready", "drain", "maint"):
            raise ValueError(f"unknown administrative state {admin!r}")
        server = self.servers[name]
        old = server.state
        if server.admin == "maint" and admin != "maint":
            server.health = server.rise
        server.admin = admin
        return self._changed(server, old, f"admin state set to {admin}", now)

    def _changed(
        self, server: Server, old: State, reason: str, now: float | None
    ) -> Transition | None:
        new = server.state
        if new is old:
            return None
        server.transitions += 1
        if now is not None:
            server.last_change = now
        transition = Transition(server.name, old, new, reason)
        for callback in list(self._listeners):
            callback(transition)
        return transition

    def snapshot(self) -> list[dict[str, object]]:
        """Return every server's state as plain values, in configuration order."""
        return [
            {
                "name": s.name,
                "address": f"{s.config.host}:{s.config.port}",
                "cookie": s.cookie,
                "weight": s.weight,
                "state": s.state.value,
                "status": s.status,
                "admin": s.admin,
                "check": s.config.check,
                "health": s.health,
                "rise": s.rise,
                "fall": s.fall,
                "active": s.active,
                "maxconn": s.config.maxconn,
                "requests": s.requests,
                "check_failures": s.check_failures,
                "observed_failures": s.observed_failures,
                "transitions": s.transitions,
                "last_check": s.last_check,
                "last_check_time": s.last_check_time,
                "last_change": s.last_change,
            }
            for s in self.servers.values()
        ]


def _passed(server: Server) -> None:
    """Move the counter up: straight to the top once it reaches ``rise``."""
    top = server.rise + server.fall - 1
    if server.health < top:
        server.health += 1
        if server.health >= server.rise:
            server.health = top


def _failed(server: Server) -> None:
    """Move the counter down: straight to 0 once it falls below ``rise``."""
    if server.health > 0:
        server.health -= 1
        if server.health < server.rise:
            server.health = 0
