# -*- test-case-name: tests.test_sidstore,tests.integration.test_sidstore -*-
"""The engine.io session table shared by a fleet of proxies, in Redis.

An L4 balancer may send a client's successive long-polling requests to
different stickyproxy processes. Each process learns ``sid → server`` only
from the handshakes it relays itself (:mod:`stickyproxy.sidtable`), so the
others would route the session's later requests by hash and miss its server.
With ``[engineio] sid_store`` set, every process also writes what it learns
to Redis and asks Redis about sids it has not seen.

The store is an optimisation, never a dependency:

* every operation is bounded by ``timeout`` and answers with a plain value
  (``False`` or ``None`` when anything goes wrong); none of them errbacks;
* while the store is not connected, operations answer at once, so traffic
  routes from the local table without waiting for a server that is down;
* a server that does not answer within ``timeout`` is treated as down: its
  connection is dropped (a late reply would only delay the next ones, since
  Redis answers in order) and reconnected with backoff;
* state changes (connected, lost, unavailable) are logged once each, never
  per request, and no sid is ever logged; failures are counted instead.

Keys are ``key_prefix + sid``, values the server name in UTF-8, each with
Redis's own expiry (``SET key value EX ttl``), so sessions abandoned by a
whole fleet disappear without anyone sweeping them.

The wire protocol is :class:`txredisapi.RedisProtocol`; connecting,
reconnecting and timeouts are done here, on the reactor passed in, rather than
by txredisapi's connection pool, which schedules on the global reactor. The
protocol's one timer (to resume parsing after a bulk reply) is pointed at the
same reactor. txredisapi installs the global reactor when imported, so it is
imported on the first connection attempt, once the reactor has been chosen.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING, Any, Final, Literal, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
)
from twisted.internet.interfaces import IReactorTCP, IReactorTime, IReactorUNIX
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from stickyproxy.storeaddress import DEFAULT_PORT, StoreAddress, parse_store_url

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress, IDelayedCall, IStreamClientEndpoint

__all__ = ["DEFAULT_PORT", "SidStore", "StoreAddress", "parse_store_url"]

log = Logger(namespace="stickyproxy.sidstore")

#: Reconnection backoff: the first retry comes after this many seconds, and
#: each further failure doubles the delay up to ``max_retry_delay``.
_FIRST_RETRY_DELAY: Final = 0.1


# -- the store ------------------------------------------------------------------------------


class _Failed:
    """The outcome of an operation that got no usable answer."""


_FAILED: Final = _Failed()


class _RedisFactory(Factory):
    """Builds txredisapi protocols whose timers run on the store's reactor."""

    # Every reconnection attempt would otherwise log "Starting factory".
    noisy = False

    def __init__(self, reactor: IReactorTime) -> None:
        self._reactor = reactor

    def buildProtocol(self, addr: IAddress | None) -> Any:
        import txredisapi  # type: ignore[import-untyped]

        # Numbers are not converted: a server may well be named "1".
        protocol = txredisapi.RedisProtocol(charset="utf-8", convertNumbers=False)
        protocol.callLater = self._reactor.callLater
        protocol.factory = self
        return protocol


class SidStore:
    """A client of the shared ``sid → server`` table, reconnecting by itself.

    :param address: where Redis listens (see :func:`parse_store_url`).
    :param reactor: timers and connections run on it: it provides
        ``IReactorTime`` and ``IReactorTCP`` (and ``IReactorUNIX`` for a Unix
        socket address).
    :param timeout: the longest wait, in seconds, for any one operation; also
        bounds a connection attempt (at least one second for those).
    :param key_prefix: prepended to every sid to make its key.
    :param max_retry_delay: the longest pause, in seconds, between attempts to
        reconnect while the store is unreachable.
    """

    def __init__(
        self,
        address: StoreAddress,
        reactor: IReactorTime,
        *,
        timeout: float = 0.25,
        key_prefix: str = "stickyproxy:sid:",
        max_retry_delay: float = 5.0,
    ) -> None:
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        needs = IReactorUNIX if address.kind == "unix" else IReactorTCP
        provided: bool = needs.providedBy(reactor)
        if not provided:
            raise TypeError(f"the reactor must provide {needs.__name__} for {address}")
        self.address = address
        self.timeout = timeout
        self.key_prefix = key_prefix
        self.max_retry_delay = max(max_retry_delay, _FIRST_RETRY_DELAY)
        self._reactor = reactor
        self._factory = _RedisFactory(reactor)
        self._running = False
        # The connection in use, once its database is selected.
        self._redis: Any = None
        self._attempt: Deferred[None] | None = None
        self._retry: IDelayedCall | None = None
        # Failed attempts in a row, for the backoff.
        self._failures = 0
        self._connected_at = 0.0
        # Why the connection in use is about to be dropped, for the log.
        self._dropping: str | None = None
        # What was last logged, so that each state is logged once.
        self._logged: Literal["", "connected", "down"] = ""
        #: Whether operations currently go to Redis.
        self.connected = False
        #: Operations that failed: answered at once while not connected,
        #: refused by Redis, cut by a lost connection or given a bad reply.
        self.errors = 0
        #: Operations abandoned after ``timeout`` (not counted in ``errors``).
        self.timeouts = 0
        #: Lookups that found their sid.
        self.hits = 0
        #: Lookups that Redis answered with "no such key".
        self.misses = 0
        #: Sessions written (successful :meth:`put` calls).
        self.writes = 0
        #: Connection attempts that failed (refused, timed out, SELECT refused).
        self.connect_failures = 0

    # -- connection ----------------------------------------------------------------------

    def start(self) -> None:
        """Begin connecting; reconnect whenever the connection is lost. Never raises."""
        if self._running:
            return
        self._running = True
        self._connect()

    def stop(self) -> Deferred[None]:
        """Stop reconnecting, cancel pending timers and close the connection.

        Operations in flight answer ``False``/``None``.

        :returns: fires once the connection is closed.
        """
        self._running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._attempt is not None:
            self._attempt.cancel()
        redis, self._redis = self._redis, None
        self.connected = False
        if redis is None or not redis.connected:
            return succeed(None)
        closed: Deferred[None] = redis.whenDisconnected().addCallback(lambda _: None)
        redis.transport.loseConnection()
        return closed

    def _endpoint(self) -> IStreamClientEndpoint:
        address, reactor = self.address, self._reactor
        # A connection attempt gets more time than a request: it takes a few
        # round trips, and a slow one costs nothing while nobody waits for it.
        wait = max(1.0, self.timeout)
        if address.kind == "unix":
            assert address.path is not None
            unix = cast(IReactorUNIX, reactor)
            return UNIXClientEndpoint(unix, address.path, timeout=wait)  # type: ignore[no-untyped-call]
        assert address.host is not None and address.port is not None
        tcp = cast(IReactorTCP, reactor)
        ip = address.ip
        if isinstance(ip, IPv4Address):
            return TCP4ClientEndpoint(tcp, address.host, address.port, timeout=wait)
        if isinstance(ip, IPv6Address):
            return TCP6ClientEndpoint(  # type: ignore[no-untyped-call]
                tcp, address.host, address.port, timeout=wait
            )
        # Resolved on every attempt, so a store that moves is found again.
        return HostnameEndpoint(reactor, address.host, address.port, timeout=wait)

    def _connect(self) -> None:
        self._retry = None
        try:
            connecting = self._endpoint().connect(self._factory)
        except Exception as exc:
            # An endpoint that cannot even start fails like an unreachable
            # server: logged, retried.
            self._attempt_failed(Failure(exc))  # type: ignore[no-untyped-call]
            return
        attempt: Deferred[None] = connecting.addCallback(self._select)
        attempt.addCallbacks(lambda _: None, self._attempt_failed)
        self._attempt = attempt
        if attempt.called:
            self._attempt = None

    def _select(self, redis: Any) -> Deferred[None]:
        """Make a new connection usable: select its database, then adopt it."""

        def selected(reply: object) -> None:
            if reply != "OK":
                raise ValueError(f"SELECT answered {reply!r}")
            self._adopt(redis)

        def failed(failure: Failure) -> Failure:
            redis.transport.abortConnection()
            return failure

        # SELECT doubles as the check that the peer speaks RESP at all.
        selecting: Deferred[object] = redis.select(self.address.db)
        selecting.addTimeout(max(1.0, self.timeout), self._reactor)
        return selecting.addCallbacks(selected, failed)

    def _adopt(self, redis: Any) -> None:
        self._attempt = None
        if not self._running:
            redis.transport.loseConnection()
            return
        self._redis = redis
        self._connected_at = self._reactor.seconds()
        self._dropping = None
        self.connected = True
        redis.whenDisconnected().addCallback(self._lost)
        if self._logged != "connected":
            self._logged = "connected"
            log.info("sid store {address} connected", address=str(self.address))

    def _lost(self, redis: Any) -> None:
        if redis is not self._redis:
            return
        self._redis = None
        self.connected = False
        # Only a connection that lasted resets the backoff: one dropped at
        # once (a server at its client limit, say) must not be retried, and
        # logged, in a tight loop.
        if self._reactor.seconds() - self._connected_at >= self.max_retry_delay:
            self._failures = 0
        why, self._dropping = self._dropping or "connection lost", None
        if self._running:
            self._logged = "down"
            log.warn(
                "sid store {address}: {why}; routing from the local table until it is back",
                address=str(self.address),
                why=why,
            )
            self._schedule_retry()

    def _attempt_failed(self, failure: Failure) -> None:
        self._attempt = None
        if not self._running:
            return
        self.connect_failures += 1
        if self._logged != "down":
            self._logged = "down"
            log.warn(
                "sid store {address} unavailable ({why}); retrying in the background",
                address=str(self.address),
                why=failure.getErrorMessage() or repr(failure.value),
            )
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        # Exponential backoff with jitter, so that a fleet whose Redis comes
        # back does not reconnect in lockstep.
        self._failures += 1
        delay = min(_FIRST_RETRY_DELAY * 2 ** min(self._failures - 1, 32), self.max_retry_delay)
        delay *= random.uniform(0.5, 1.0)
        self._retry = self._reactor.callLater(delay, self._connect)

    # -- operations ----------------------------------------------------------------------

    def put(self, sid: str, server: str, ttl: float) -> Deferred[bool]:
        """Remember that ``server`` holds ``sid`` for ``ttl`` seconds.

        :param ttl: rounded up to whole seconds, at least one.
        :returns: fires True once Redis has stored it, False otherwise; never errbacks.
        :raises ValueError: ``ttl`` is not a finite number.
        """
        seconds = _whole_seconds(ttl)

        def stored(reply: object) -> bool:
            if reply == "OK":
                self.writes += 1
                return True
            if not isinstance(reply, _Failed):
                self.errors += 1
            return False

        key = self.key_prefix + sid
        return self._call(lambda redis: redis.set(key, server, expire=seconds)).addCallback(stored)

    def get(self, sid: str) -> Deferred[str | None]:
        """Ask which server holds ``sid``.

        :returns: fires the server's name, or None when Redis does not know
            the sid or did not answer; never errbacks.
        """

        def found(reply: object) -> str | None:
            if isinstance(reply, str) and reply:
                self.hits += 1
                return reply
            if reply is None:
                self.misses += 1
            elif not isinstance(reply, _Failed):
                # Not a name this proxy could have written (not UTF-8, say).
                self.errors += 1
            return None

        key = self.key_prefix + sid
        return self._call(lambda redis: redis.get(key)).addCallback(found)

    def touch(self, sid: str, ttl: float) -> None:
        """Extend the life of an active session to ``ttl`` seconds from now.

        Fire and forget; a sid Redis does not know stays unknown.

        :raises ValueError: ``ttl`` is not a finite number.
        """
        seconds = _whole_seconds(ttl)
        key = self.key_prefix + sid
        self._call(lambda redis: redis.expire(key, seconds))

    def forget(self, sid: str) -> None:
        """Drop ``sid``, e.g. after its server said it does not know it. Fire and forget."""
        key = self.key_prefix + sid
        self._call(lambda redis: redis.delete(key))

    def _call(self, command: Callable[[Any], Deferred[object]]) -> Deferred[object]:
        """Run one command, bounded by ``timeout``.

        :returns: fires the reply, or :data:`_FAILED`; never errbacks.
        """
        redis = self._redis
        if redis is None:
            self.errors += 1
            return succeed(_FAILED)
        try:
            sent = command(redis)
        except Exception:
            # txredisapi refuses synchronously when the connection has just
            # gone, or a value cannot be encoded.
            self.errors += 1
            return succeed(_FAILED)
        result: Deferred[object] = Deferred()

        def timed_out() -> None:
            self.timeouts += 1
            result.callback(_FAILED)
            if redis is self._redis and redis.connected:
                # Redis answers in order, so every later command on this
                # connection would wait behind the missing reply.
                self._dropping = f"no reply within {self.timeout:g} s"
                redis.transport.abortConnection()

        timer = self._reactor.callLater(self.timeout, timed_out)

        def answered(reply: object) -> None:
            if result.called:
                return  # too late: the caller was already answered
            timer.cancel()
            result.callback(reply)

        def failed(failure: Failure) -> None:
            if result.called:
                return
            timer.cancel()
            self.errors += 1
            result.callback(_FAILED)

        sent.addCallbacks(answered, failed)
        return result


def _whole_seconds(ttl: float) -> int:
    """``ttl`` as Redis's ``EX``/``EXPIRE`` wants it: whole seconds, at least one."""
    if not math.isfinite(ttl):
        raise ValueError(f"ttl must be a finite number of seconds, not {ttl!r}")
    return max(1, math.ceil(ttl))
