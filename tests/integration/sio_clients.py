"""socket.io clients that keep no cookies, and a bounded concurrent load made of them.

Many real socket.io clients keep no cookies: Node's ``socket.io-client`` (no
jar before 4.7, and only with ``withCredentials`` since), OkHttp on Android
without a jar, browsers polling cross-origin with ``withCredentials: false``.
A proxy that sticks sessions with a cookie (RFC 6265 ``Set-Cookie``) cannot
stick theirs: each long-polling request is placed afresh, and when it reaches a
backend other than the session's, that backend refuses it as an unknown
session. The clients here behave the same way: the cookie jar accepts nothing,
and, optionally, every HTTP request goes out on a new TCP connection
(``Connection: close``, RFC 9112 section 9.6), as a browser's often do.

:func:`run_load` runs many such clients at once and reports what happened, both
as the clients saw it and as the backends counted it (see
``sio_apps.is_unknown_session_answer`` and ``GET /unknown-sessions``).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.cookiejar import DefaultCookiePolicy
from typing import Any

import aiohttp
import requests
import socketio  # type: ignore[import-untyped]

from .sio_apps import quiet_logger

#: Transports of a client that only long-polls.
POLLING = ("polling",)

#: Transports of a client that long-polls first, then upgrades to a WebSocket.
POLLING_THEN_WEBSOCKET = ("polling", "websocket")

#: How long one acknowledged ``echo`` may take before the session counts as broken.
CALL_TIMEOUT = 5.0

#: How long the namespace connection may take once engine.io is connected.
CONNECT_TIMEOUT = 5.0

#: How long a client waits for its own disconnection before leaving it behind.
CLOSE_TIMEOUT = 2.0


# -- cookie-less clients ----------------------------------------------------------------


def cookieless_requests_session(*, fresh_connections: bool = False) -> requests.Session:
    """A :class:`requests.Session` whose cookie jar stores and returns nothing.

    An empty ``allowed_domains`` list blocks every domain, so ``Set-Cookie``
    answers are ignored and no ``Cookie`` header is ever sent.

    :param fresh_connections: send ``Connection: close`` so that each request
        opens its own TCP connection.
    """
    session = cookie_keeping_requests_session(fresh_connections=fresh_connections)
    session.cookies = requests.cookies.RequestsCookieJar(DefaultCookiePolicy(allowed_domains=[]))
    return session


def cookie_keeping_requests_session(*, fresh_connections: bool = False) -> requests.Session:
    """A :class:`requests.Session` that keeps cookies as a browser would (the control)."""
    session = requests.Session()
    if fresh_connections:
        session.headers["Connection"] = "close"
    return session


def cookieless_client(session: requests.Session | None = None) -> Any:
    """A synchronous ``socketio.Client`` that never reconnects, on ``session``
    (by default a :func:`cookieless_requests_session`).

    Connect it with ``transports=list(POLLING)`` to stay on long-polling, or
    ``list(POLLING_THEN_WEBSOCKET)`` to upgrade afterwards.
    """
    return socketio.Client(
        http_session=session or cookieless_requests_session(),
        reconnection=False,
        request_timeout=CALL_TIMEOUT,
        logger=quiet_logger("sio_clients.socketio"),
        engineio_logger=quiet_logger("sio_clients.engineio"),
    )


def cookieless_aiohttp_session() -> aiohttp.ClientSession:
    """An :class:`aiohttp.ClientSession` whose jar (``DummyCookieJar``) keeps nothing."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())


def cookieless_async_client(session: aiohttp.ClientSession) -> Any:
    """An asyncio ``socketio.AsyncClient`` on ``session`` that never reconnects."""
    return socketio.AsyncClient(
        http_session=session,
        reconnection=False,
        request_timeout=CALL_TIMEOUT,
        logger=quiet_logger("sio_clients.socketio"),
        engineio_logger=quiet_logger("sio_clients.engineio"),
    )


# -- what the backends counted ----------------------------------------------------------


@dataclass(frozen=True)
class Refusals:
    """What one backend refused as an unknown session (``GET /unknown-sessions``)."""

    #: sids the backend never issued: misrouted requests.
    unknown: int
    #: sids of the backend's own sessions that had already ended.
    stale: int

    def __sub__(self, other: Refusals) -> Refusals:
        return Refusals(self.unknown - other.unknown, self.stale - other.stale)


def backend_refusals(backends: Sequence[Any], timeout: float = 5.0) -> dict[str, Refusals]:
    """Ask each backend how many requests it refused for an unknown session.

    :param backends: objects with ``name`` and ``port`` (the harness's ``Backend``);
        each is asked directly, not through a proxy.
    :return: the counts per backend name.
    """
    counts: dict[str, Refusals] = {}
    for backend in backends:
        connection = http.client.HTTPConnection("127.0.0.1", backend.port, timeout=timeout)
        try:
            connection.request("GET", "/unknown-sessions")
            report = json.loads(connection.getresponse().read())
        finally:
            connection.close()
        counts[backend.name] = Refusals(int(report["total"]), int(report["stale"]))
    return counts


# -- the load ---------------------------------------------------------------------------


@dataclass
class ClientOutcome:
    """What one client of a load saw."""

    index: int
    connected: bool = False
    sent: int = 0
    answered: int = 0
    #: Every server that greeted the client or answered one of its echoes.
    servers: set[str] = field(default_factory=set)
    #: The session ended while the client still used it.
    dropped: bool = False
    error: str | None = None

    @property
    def completed(self) -> bool:
        """Connected, and every message sent was answered, by one server."""
        return (
            self.connected
            and not self.dropped
            and self.error is None
            and self.sent == self.answered
            and len(self.servers) == 1
        )


@dataclass
class LoadResult:
    """The outcome of :func:`run_load`."""

    clients: int
    messages: int
    transports: tuple[str, ...]
    outcomes: list[ClientOutcome]
    #: Unknown-session refusals counted by each backend during the load.
    refusals: dict[str, Refusals]
    elapsed: float

    @property
    def sent(self) -> int:
        return sum(o.sent for o in self.outcomes)

    @property
    def answered(self) -> int:
        return sum(o.answered for o in self.outcomes)

    @property
    def connect_failures(self) -> int:
        return sum(not o.connected for o in self.outcomes)

    @property
    def disconnects(self) -> int:
        """Connected sessions that ended while still in use."""
        return sum(o.connected and o.dropped for o in self.outcomes)

    @property
    def one_server_sessions(self) -> int:
        """Connected sessions that saw exactly one server (a sticky session must)."""
        return sum(o.connected and len(o.servers) == 1 for o in self.outcomes)

    @property
    def completed(self) -> int:
        """Sessions that got every answer, all from one server."""
        return sum(o.completed for o in self.outcomes)

    @property
    def client_failures(self) -> int:
        """Clients that did not complete: connect failures, drops, timeouts."""
        return self.clients - self.completed

    @property
    def unknown_by_server(self) -> dict[str, int]:
        return {name: refused.unknown for name, refused in self.refusals.items()}

    @property
    def unknown_sessions(self) -> int:
        """Misrouted requests: refusals of sids the refusing backend never issued."""
        return sum(refused.unknown for refused in self.refusals.values())

    @property
    def stale_sessions(self) -> int:
        """Refusals of sids whose session had ended on the backend that issued them."""
        return sum(refused.stale for refused in self.refusals.values())

    def errors(self, limit: int = 5) -> list[str]:
        """A few of the clients' errors, for failure messages."""
        return [f"client {o.index}: {o.error}" for o in self.outcomes if o.error][:limit]


def assert_no_session_lost(result: LoadResult) -> None:
    """Fail unless no request was misrouted and every client got every answer."""
    assert result.unknown_sessions == 0, result.refusals
    assert result.completed == result.clients, result.errors()
    expected = result.clients * result.messages
    assert result.answered == result.sent == expected, (result.answered, result.sent, expected)


class _Session:
    """One client of a load; handlers run on the client's reader thread."""

    def __init__(self, index: int, http_session: requests.Session) -> None:
        self.outcome = ClientOutcome(index)
        self.client = cookieless_client(http_session)
        self.closing = False
        self.wakeup = threading.Event()
        self.client.on("hello", self._on_hello)
        self.client.on("disconnect", self._on_disconnect)

    def _on_hello(self, data: Any) -> None:
        if isinstance(data, dict) and isinstance(data.get("server"), str):
            self.outcome.servers.add(data["server"])

    def _on_disconnect(self, *reason: Any) -> None:
        if not self.closing:
            self.outcome.dropped = True
        # A call waiting for an answer that can no longer come stops waiting.
        self.wakeup.set()

    def run(self, url: str, messages: int, transports: Sequence[str], deadline: float) -> None:
        outcome = self.outcome
        try:
            self.client.connect(
                url,
                transports=list(transports),
                wait_timeout=min(CONNECT_TIMEOUT, max(0.1, deadline - time.monotonic())),
            )
        except socketio.exceptions.ConnectionError as error:
            outcome.error = f"connect: {error}"
            return
        outcome.connected = True
        for i in range(messages):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                outcome.error = "the load's time ran out"
                return
            if outcome.dropped:
                outcome.error = "the session was dropped"
                return
            outcome.sent += 1
            reply = self._call("echo", i, min(CALL_TIMEOUT, remaining))
            if reply is None:
                outcome.error = outcome.error or f"empty answer to echo {i}"
                return
            if isinstance(reply, dict) and reply.get("data") == i:
                outcome.answered += 1
                outcome.servers.add(str(reply.get("server")))
            else:
                outcome.error = f"unexpected answer {reply!r} to echo {i}"
                return

    def _call(self, event: str, data: Any, timeout: float) -> Any:
        """``client.call``, except that a dropped session stops the wait at once."""
        answers: list[tuple[Any, ...]] = []
        self.wakeup.clear()

        def answered(*args: Any) -> None:
            answers.append(args)
            self.wakeup.set()

        try:
            self.client.emit(event, data, callback=answered)
        except socketio.exceptions.SocketIOError as error:
            self.outcome.error = f"emit: {error!r}"
            return None
        self.wakeup.wait(timeout)
        if not answers:
            self.outcome.error = "dropped" if self.outcome.dropped else "no answer in time"
            return None
        return answers[0][0] if answers[0] else None

    def close(self) -> None:
        """Disconnect, waiting at most :data:`CLOSE_TIMEOUT`.

        A polling client's disconnection waits for its pending long poll, which
        a backend may hold until its next ping; past the timeout the client's
        daemon threads are left to end by themselves.
        """
        self.closing = True
        closer = threading.Thread(target=self._close_quietly, daemon=True)
        closer.start()
        closer.join(CLOSE_TIMEOUT)

    def _close_quietly(self) -> None:
        # The session may be half gone already.
        with contextlib.suppress(Exception):
            self.client.disconnect()
        http = self.client.eio.http
        if http is not None:
            http.close()


def run_load(
    url: str,
    *,
    clients: int = 30,
    messages: int = 50,
    transports: Sequence[str] = POLLING,
    timeout: float = 60.0,
    backends: Sequence[Any] = (),
    fresh_connections: bool = True,
    keep_cookies: bool = False,
) -> LoadResult:
    """Run ``clients`` cookie-less socket.io clients against ``url`` at once.

    Each client connects, then sends ``echo`` ``messages`` times, waiting for
    each acknowledgement; it stops at its first failure. The load ends by
    itself: nothing outlives ``timeout`` seconds (plus the bounded closes).

    :param url: the proxy's (or a backend's) ``http://`` address.
    :param transports: :data:`POLLING` or :data:`POLLING_THEN_WEBSOCKET`.
    :param backends: the backends behind the proxy, each with ``name`` and
        ``port``; their unknown-session counts are read before and after.
    :param fresh_connections: one TCP connection per HTTP request.
    :param keep_cookies: give every client a cookie jar after all (a control:
        cookie persistence then works).
    """
    before = backend_refusals(backends)
    started = time.monotonic()
    deadline = started + timeout
    make_http = cookie_keeping_requests_session if keep_cookies else cookieless_requests_session
    sessions = [
        _Session(index, make_http(fresh_connections=fresh_connections)) for index in range(clients)
    ]

    def drive(session: _Session) -> None:
        try:
            session.run(url, messages, transports, deadline)
        except Exception as error:
            session.outcome.error = f"{type(error).__name__}: {error}"
        finally:
            session.close()

    with ThreadPoolExecutor(max_workers=max(1, clients)) as pool:
        list(pool.map(drive, sessions))
    elapsed = time.monotonic() - started
    after = backend_refusals(backends)
    refusals = {name: after[name] - before[name] for name in after}
    return LoadResult(
        clients=clients,
        messages=messages,
        transports=tuple(transports),
        outcomes=[session.outcome for session in sessions],
        refusals=refusals,
        elapsed=elapsed,
    )
