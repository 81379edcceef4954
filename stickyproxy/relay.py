"""The Twisted shell: the client side of the relay, driving the core.

One :class:`Frontend` per client connection and at most one
:class:`~stickyproxy.backend.Backend` at a time behind it. The life of a
connection:

1. PROXY header (:mod:`stickyproxy.proxyproto`), under the
   ``timeout_http_request`` deadline;
2. request head (:mod:`stickyproxy.httphead`), routed on its own
   (:meth:`stickyproxy.pool.Pool.choose`) and rewritten
   (:mod:`stickyproxy.rewrite`);
3. the request body streams to the backend and the response streams back,
   each framed by a :class:`~stickyproxy.httphead.BodyReader`; transports
   throttle each other (a full write buffer pauses the reading side);
4. the next request on a keep-alive connection is routed again; the backend
   connection is reused when it goes to the same server;
5. after a ``101 Switching Protocols`` both sockets are spliced and bytes
   flow unparsed until either side closes.

Requests pipelined behind one in flight wait, unparsed, until its response
has been relayed: a 101 may turn the rest of the stream into a tunnel.

The rest of the relay lives beside this module: :mod:`stickyproxy.backend`
(connections to the servers), :mod:`stickyproxy.context` (what all
connections of a proxy share: settings, pool, queues, the engine.io session
sweep) and :mod:`stickyproxy.flow` (writing to and throttling transports).
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from twisted.internet.error import ConnectionRefusedError as TwistedConnectionRefused
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IProtocol,
    ISSLTransport,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from stickyproxy.accesslog import RequestRecord, TunnelRecord, as_json, request_line, tunnel_line
from stickyproxy.backend import Backend, BackendConnector
from stickyproxy.cookietoken import Verified
from stickyproxy.eiopayload import UnknownSession, UnknownSessionSniffer, redact
from stickyproxy.eiorouting import HandshakeCapture, SessionRoute
from stickyproxy.engineio import SidError, redact_target
from stickyproxy.errors import ProtocolError, ProxyHeaderError
from stickyproxy.flow import Throttle, host_port, no_delay, relay_write
from stickyproxy.hashring import address_key, text_key
from stickyproxy.httphead import (
    BodyReader,
    HeadParser,
    RequestHead,
    ResponseHead,
    response_framing,
    validate_upgrade_response,
)
from stickyproxy.pool import Decision, Server, State
from stickyproxy.proxyproto import ProxyHeaderParser, ProxyInfo
from stickyproxy.rewrite import (
    error_response,
    prepare_request_bytes,
    prepare_response,
    prepare_response_bytes,
)
from stickyproxy.stats import count_exchange
from stickyproxy.wsframes import GOING_AWAY, FrameTracker, close_frame

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress

    from stickyproxy.config import IPNetwork
    from stickyproxy.context import ProxyContext

log = Logger(namespace="stickyproxy")
access_log = Logger(namespace="stickyproxy.access")


_NOBODY: frozenset[str] = frozenset()

# Frontend states.
_PROXY = 0  # waiting for the PROXY header
_IDLE = 1  # waiting for the first byte of a request head
_HEAD = 2  # reading a request head
_EXCHANGE = 3  # a request is being forwarded and answered
_TUNNEL = 4  # spliced after a 101
_CLOSED = 5

# Timer kinds: what the one timer of a connection is counting.
_T_NONE = ""  # nothing (waiting for a backend connection, which has its own)
_T_REQUEST = "request"  # total deadline for the PROXY header and a request head
_T_KEEPALIVE = "keepalive"  # idle wait for the next request
_T_CLIENT = "client"  # inactivity while the client sends a request body
_T_SERVER = "server"  # inactivity while the server answers
_T_TUNNEL = "tunnel"  # inactivity of a spliced connection
_T_QUEUE = "queue"  # waiting for a server at its maxconn
_T_GOING_AWAY = "going-away"  # waiting for a frame boundary to say goodbye
# How long a goodbye may wait for the server to finish the frame it is in.
_GOING_AWAY_WAIT = 5.0
_INACTIVITY = (_T_CLIENT, _T_SERVER, _T_TUNNEL)


@implementer(IProtocol, IHalfCloseableProtocol)
class Frontend:
    """A client connection.

    Not derived from :class:`twisted.internet.protocol.Protocol`, whose
    instances carry a ``__dict__``: with slots only, every open WebSocket
    costs less memory.
    """

    __slots__ = (
        "_backend",
        "_body",
        "_capture",
        "_client_eof",
        "_close_after",
        "_closed_by",
        "_connecting",
        "_cookie_values",
        "_ctx",
        "_deadline",
        "_decision",
        "_engine_route",
        "_exclude",
        "_first",
        "_flushed_in",
        "_flushed_out",
        "_frames",
        "_going_away",
        "_head_parser",
        "_idle_backend",
        "_in",
        "_in_mark",
        "_key",
        "_last",
        "_out",
        "_out_mark",
        "_pending",
        "_proxy_parser",
        "_request",
        "_request_bytes",
        "_request_done",
        "_response_started",
        "_retries_left",
        "_reused",
        "_server_eof",
        "_sniffer",
        "_state",
        "_status",
        "_t_head",
        "_t_request",
        "_t_response",
        "_t_routed",
        "_t_sent",
        "_throttle",
        "_timer",
        "_timer_kind",
        "_tls",
        "_tokens",
        "_trusted",
        "_tunnel_server",
        "client_ip",
        "client_port",
        "proxy_info",
        "queued",
        "transport",
    )

    _throttle: Throttle

    def __init__(self, ctx: ProxyContext) -> None:
        self._ctx = ctx
        self.transport: Any = None
        self._state = _PROXY
        self._proxy_parser: ProxyHeaderParser | None = None
        self._head_parser: HeadParser[RequestHead] | None = None
        self._pending = b""
        self._timer: IDelayedCall | None = None
        self._timer_kind = _T_NONE
        self._deadline = 0.0
        self._key: bytes | None = None
        self._last = 0.0
        self._first = True
        self._request: RequestHead | None = None
        self._request_bytes = b""
        self._request_done = False
        self._body: BodyReader | None = None
        self._decision: Decision | None = None
        self._backend: Backend | None = None
        self._idle_backend: Backend | None = None
        self._connecting: BackendConnector | None = None
        self._response_started = False
        self._close_after = False
        self._client_eof = False
        self._server_eof = False
        self._retries_left = 0
        self._exclude: Collection[str] = _NOBODY
        self._reused = False
        self.client_ip = ""
        self.client_port = 0
        self.proxy_info: ProxyInfo | None = None
        self.queued = False
        self._cookie_values: Sequence[str] = ()
        # The valid signed tokens of the current request, in order.
        self._tokens: list[Verified] = []
        # Bytes from and to the client: totals, what the counters already
        # have, and where the current request or tunnel began.
        self._in = self._out = 0
        self._flushed_in = self._flushed_out = 0
        self._in_mark = self._out_mark = 0
        # Times of the current request, for the access log.
        # -1 means "has not happened".
        self._t_head = self._t_request = self._t_routed = -1.0
        self._t_sent = self._t_response = -1.0
        self._status = 0
        self._closed_by = "client"
        self._tunnel_server: Server | None = None
        self._frames: FrameTracker | None = None
        self._going_away = 0
        # engine.io: the current request's session, a handshake response
        # being held, a watch for "unknown session" answers.
        self._engine_route: SessionRoute | None = None
        self._capture: HandshakeCapture | None = None
        self._sniffer: UnknownSessionSniffer | None = None
        # The client's connection is TLS: a TLS listener, or a trusted
        # balancer that says so (PROXY v2 SSL TLV, X-Forwarded-Proto).
        self._tls = False
        self._trusted = False

    # -- connection set-up -------------------------------------------------

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self._throttle = Throttle(transport)
        self.connectionMade()

    def connectionMade(self) -> None:
        ctx = self._ctx
        ctx.add(self)
        # Heads and bodies often leave in separate writes; with Nagle on, the
        # second waits for the client's delayed ACK (~40 ms on Linux).
        no_delay(self.transport)
        self.client_ip, self.client_port = host_port(self.transport.getPeer())
        cfg = ctx.config.proxy
        mode = cfg.proxy_protocol
        trusted = self._trusted = _is_trusted(self.client_ip, cfg.trusted_proxies)
        self._tls = ISSLTransport.providedBy(self.transport)
        if mode == "required" and not trusted:
            log.info("{client}: not a trusted proxy, connection closed", client=self.peer_text())
            self._abort()
            return
        self._head_parser = HeadParser(
            "request", max_size=cfg.max_head_size, max_headers=cfg.max_headers
        )
        if mode == "off" or not trusted:
            # Only trusted peers may vouch for another address (PROXY
            # protocol spec §5); from anyone else a header is just bad HTTP.
            self._state = _IDLE
        else:
            self._proxy_parser = ProxyHeaderParser(optional=mode == "optional")
        # The PROXY header and the first request head share one deadline,
        # like HAProxy's "timeout http-request": slowloris cannot stretch it.
        self._arm(cfg.timeout_http_request, _T_REQUEST)

    def peer_text(self) -> str:
        """The client's address and port, as logs show them."""
        if ":" in self.client_ip:
            return f"[{self.client_ip}]:{self.client_port}"
        return f"{self.client_ip}:{self.client_port}"

    # -- timers ------------------------------------------------------------

    def _arm(self, delay: float, kind: str, now: float | None = None) -> None:
        """Make the one timer of this connection count ``kind`` for ``delay``.

        Timers move lazily: a later deadline leaves the scheduled call where it
        is and the call, when it fires early, sleeps again until the deadline.
        Moving a scheduled call costs heap operations on every request; this
        costs one float.

        :param now: the time of the event being handled, if already read.
        """
        self._timer_kind = kind
        self._deadline = (self._ctx.reactor.seconds() if now is None else now) + delay
        timer = self._timer
        if timer is None:
            self._timer = self._ctx.reactor.callLater(delay, self._on_timer)
        elif timer.getTime() > self._deadline:
            timer.reset(delay)

    def _disarm(self) -> None:
        timer = self._timer
        self._timer = None
        self._timer_kind = _T_NONE
        if timer is not None and timer.active():
            timer.cancel()

    def _watch(self, kind: str, now: float | None = None) -> None:
        """Count inactivity from now: data in either direction postpones it.

        Data only records the time of the last chunk (``_last``); the timer
        checks it when it fires.
        """
        if now is None:
            now = self._ctx.reactor.seconds()
        self._last = now
        self._arm(self._timeout_of(kind), kind, now)

    def _timeout_of(self, kind: str) -> float:
        cfg = self._ctx.config.proxy
        if kind == _T_TUNNEL:
            return cfg.timeout_tunnel
        if kind == _T_CLIENT:
            return cfg.timeout_client
        return cfg.timeout_server

    def _on_timer(self) -> None:
        self._timer = None
        kind = self._timer_kind
        if kind == _T_NONE:
            return
        now = self._ctx.reactor.seconds()
        inactivity = kind in _INACTIVITY
        deadline = self._last + self._timeout_of(kind) if inactivity else self._deadline
        if now < deadline:
            self._timer = self._ctx.reactor.callLater(deadline - now, self._on_timer)
            return
        if kind == _T_REQUEST:
            if self._state == _PROXY:
                log.info("{client}: no PROXY header in time", client=self.peer_text())
                self._abort()
            elif self._state == _IDLE:
                # A connection that never sent a request byte is closed
                # silently: browsers open spare connections they never use.
                self._close()
            elif self._state == _HEAD:
                self._fail(408, "request head not complete in time")
        elif kind == _T_KEEPALIVE:
            self._close()
        elif kind == _T_TUNNEL:
            self._closed_by = "proxy"
            log.info("{client}: tunnel idle, closed", client=self.peer_text())
            self._close()
        elif kind == _T_CLIENT:
            self._fail(408, "client stalled while sending the request body")
        elif kind == _T_SERVER:
            self._fail(504, "server did not respond in time")
        elif kind == _T_GOING_AWAY:
            self._close_tunnel()
        elif kind == _T_QUEUE:
            self.queued = False
            self._ctx.stats.frontend.queue_timeouts += 1
            self._fail(503, "no server slot freed within timeout_queue")

    # -- reading from the client -------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        self._in += len(data)
        if state == _TUNNEL:
            self._last = self._ctx.reactor.seconds()
            backend = self._backend
            if backend is not None:
                relay_write(backend.transport, data)
        elif state == _EXCHANGE:
            self._last = self._ctx.reactor.seconds()
            if self._request_done:
                self._hold(data)
            else:
                self._forward_request_body(data)
        elif state == _PROXY:
            self._read_proxy_header(data)
        elif state != _CLOSED:
            self._read_head(data)

    def _read_proxy_header(self, data: bytes) -> None:
        parser = self._proxy_parser
        assert parser is not None
        try:
            result = parser.feed(data)
        except ProxyHeaderError as e:
            log.info(
                "{client}: bad PROXY header: {reason}", client=self.peer_text(), reason=e.reason
            )
            self._abort()
            return
        if result is None:
            return
        info, rest = result
        self._proxy_parser = None
        self.proxy_info = info
        if info is not None and info.ssl:
            self._tls = True
        if info is not None and not info.local and info.source is not None:
            self.client_ip, self.client_port = info.source
        self._state = _IDLE
        if rest:
            self._read_head(rest)

    def _hold(self, data: bytes) -> None:
        """Keep bytes that arrive while a response is pending (pipelining)."""
        self._pending += data
        if len(self._pending) > self._ctx.config.proxy.max_head_size:
            self._throttle.pause(Throttle.WAITING)

    def _read_head(self, data: bytes) -> None:
        parser = self._head_parser
        assert parser is not None
        # One clock read serves every timestamp and deadline of this segment.
        now = self._ctx.reactor.seconds()
        started = self._state == _IDLE
        if started:
            self._state = _HEAD
            self._t_head = now
        try:
            head = parser.feed(data)
        except ProtocolError as e:
            self._fail(e.status_hint or 400, e.reason)
            return
        if head is not None:
            # A head complete in its first segment never needs the head
            # deadline: the exchange arms its own timer at once.
            self._start_exchange(head, parser.take_rest(), now)
        elif started and not self._first:
            # The keep-alive wait is over; the head now has its deadline.
            self._arm(self._ctx.config.proxy.timeout_http_request, _T_REQUEST, now)

    # -- routing and connecting ---------------------------------------------

    def _start_exchange(self, head: RequestHead, rest: bytes, now: float) -> None:
        ctx = self._ctx
        # Connecting has its own timeout (timeout_connect, then retries).
        self._timer_kind = _T_NONE
        self._state = _EXCHANGE
        self._first = False
        self._request = head
        self._t_request = now
        self._t_routed = self._t_sent = self._t_response = -1.0
        self._status = 0
        self._out_mark = self._out
        self._response_started = False
        self._capture = None
        self._sniffer = None
        self._close_after = head.close_after or not head.keep_alive
        body = BodyReader(head.framing) if head.framing.kind != "none" else None
        self._body = body
        self._request_done = body is None or body.done
        self._pending = rest
        self._retries_left = ctx.config.proxy.retries
        self._exclude = _NOBODY
        route = None
        if ctx.engine.prefix:
            try:
                # First: untagging a sid changes the target that is forwarded.
                route = ctx.engine.inspect(head, now)
            except SidError as e:
                # Servers disagree on which of two sids wins: routing by
                # either could send the request to the wrong session.
                self._fail(400, e.reason)
                return
        self._engine_route = route
        values, self._request_bytes = prepare_request_bytes(
            head, self.client_ip, ctx.options, self.proxy_info
        )
        signer = ctx.signer
        if signer is not None:
            # A tampered, expired or unknown token is no cookie at all.
            self._tokens = signer.verify_all(values, now)
            values = [token.server_cookie for token in self._tokens]
        self._cookie_values = values
        if route is None:
            self._route(ctx.pool.choose(values, self._hash_key()), now)
            return
        if route.sid is not None and route.server is None:
            store = ctx.store
            if store is not None:
                # Another proxy of the fleet may have seen the handshake.
                self._throttle.pause(Throttle.WAITING)
                store.get(route.sid).addCallback(self._stored_session, head)
                return
        self._route(self._decide(), now)

    def _decide(self) -> Decision:
        """Route the current request: its session first, then cookie and hash."""
        ctx = self._ctx
        route = self._engine_route
        if route is not None and route.server is not None and route.reason is not None:
            decision = ctx.pool.session(route.server, route.reason, self._cookie_values)
            if decision is not None:
                self._sync_session(route)
                return decision
            # The server holding the session is down or gone, and the
            # session with it: the new server will say so and the client
            # will start a new session.
            if route.sid is not None:
                ctx.engine.table.forget(route.sid)
        return ctx.pool.choose(self._cookie_values, self._hash_key())

    def _sync_session(self, route: SessionRoute) -> None:
        """Keep a session's copy in the shared store from expiring while polls last."""
        store = self._ctx.store
        if store is None or route.sid is None or route.reason == "sid-tag":
            return
        ttl = self._ctx.engine.table.sync_due(route.sid, self._t_request)
        if ttl is not None:
            store.touch(route.sid, ttl)

    def _stored_session(self, server: str | None, head: RequestHead) -> None:
        """The shared store answered for the current request's session."""
        route = self._engine_route
        if self._state != _EXCHANGE or self._request is not head or route is None:
            return
        if server is not None and route.sid is not None:
            route.server, route.reason = server, "sid-store"
            # Later requests of the session on this proxy need no store.
            self._ctx.engine.learn_stored(route.sid, server, self._ctx.reactor.seconds())
            self._ctx.sessions_learned()
        self._route(self._decide())

    def _hash_key(self) -> bytes:
        """The bytes that place a client without a valid cookie."""
        balance = self._ctx.config.balance
        head = self._request
        if head is not None and balance.hash_key_name:
            if balance.hash_key == "header":
                value = head.get(balance.hash_key_name.lower().encode("ascii"))
                if value:
                    return text_key(value.decode("latin-1"))
            elif balance.hash_key == "query":
                _, _, query = head.target.partition(b"?")
                for name, found in parse_qsl(query.decode("latin-1")):
                    if name == balance.hash_key_name:
                        return text_key(found)
        key = self._key
        if key is None:
            # Parsing the address costs more than everything else in routing;
            # it cannot change on a connection, so once is enough.
            key = self._key = address_key(self.client_ip)
        return key

    def _route(self, decision: Decision, now: float | None = None) -> None:
        self._decision = decision
        server = decision.server
        ctx = self._ctx
        if server is None:
            if any(s.state is State.UP for s in ctx.pool.servers.values()):
                # Servers are up but every one is at its maxconn: wait for a
                # slot on any of them.
                self._enqueue(ctx.backend_queue)
            else:
                self._fail(503, "no server available")
            return
        maxconn = server.config.maxconn
        if maxconn and server.active >= maxconn:
            # A client pinned to a full server waits for that server.
            self._enqueue(ctx.queues[server.name])
            return
        ctx.pool.acquire(server)
        if now is None:
            now = ctx.reactor.seconds()
        self._t_routed = now
        idle, self._idle_backend = self._idle_backend, None
        if idle is not None:
            iserver = idle.server
            if idle.alive and (
                iserver is server
                or (iserver.name == server.name and iserver.address == server.address)
            ):
                # Still each other's producers since the last exchange.
                self._reused = True
                self._send_request(idle, now)
                return
            self._unregister(idle)
            idle.detach_and_close()
        self._reused = False
        self._connect(server)

    def _enqueue(self, queue: deque[Frontend]) -> None:
        self.queued = True
        queue.append(self)
        self._throttle.pause(Throttle.WAITING)
        self._arm(self._ctx.config.proxy.timeout_queue, _T_QUEUE)

    def leave_queue(self) -> None:
        """A slot was freed for this waiting request: route it again."""
        if not self.queued or self._state != _EXCHANGE:
            return
        self.queued = False
        self._timer_kind = _T_NONE
        self._route(self._decide())

    def _connect(self, server: Server) -> None:
        # Read nothing more from the client until there is somewhere to send
        # it. (A reused backend connection is attached at once, so requests
        # on a keep-alive connection cost no epoll_ctl round trips.)
        self._throttle.pause(Throttle.WAITING)
        connector = BackendConnector(self, server)
        self._connecting = connector
        host, port = server.address
        self._ctx.reactor.connectTCP(
            host, port, connector, timeout=self._ctx.config.proxy.timeout_connect
        )

    def backend_connect_failed(self, server: Server, reason: Failure) -> None:
        """A connection attempt to ``server`` failed."""
        self._connecting = None
        self._ctx.release(server)
        # Passive health (HAProxy's "observe layer4"): counted even when the
        # client has gone, since the server is just as unreachable.
        self._ctx.pool.observe_connect_failure(
            server.name,
            self._ctx.reactor.seconds(),
            "connection refused"
            if reason.check(TwistedConnectionRefused)
            else f"connection failed: {reason.getErrorMessage()}",
        )
        if self._state != _EXCHANGE:
            return
        cfg = self._ctx.config.proxy
        self._ctx.stats.server(server.name).connect_errors += 1
        refused = reason.check(TwistedConnectionRefused) is not None
        log.info(
            "{client}: cannot connect to {server}: {error}",
            client=self.peer_text(),
            server=server.name,
            error=reason.getErrorMessage(),
        )
        if self._retries_left > 0 and not (refused and cfg.redispatch):
            # Retry the same server after a pause of min(timeout_connect, 1s),
            # as HAProxy does. A refused connection with redispatch on moves
            # at once instead: nobody listens there, waiting will not help.
            self._retries_left -= 1
            self._ctx.pool.acquire(server)
            self._ctx.reactor.callLater(min(cfg.timeout_connect, 1.0), self._retry, server)
            return
        if cfg.redispatch:
            self._exclude = {*self._exclude, server.name}
            decision = self._ctx.pool.redispatch(self._hash_key(), self._exclude)
            if decision.server is not None:
                self._route(decision)
                return
        self._fail(503, "no server could be reached")

    def _retry(self, server: Server) -> None:
        if self._state == _EXCHANGE and self._backend is None:
            self._connect(server)
        else:
            self._ctx.release(server)

    def backend_connected(self, backend: Backend) -> None:
        """A connection attempt succeeded."""
        self._connecting = None
        if self._state != _EXCHANGE:
            self._ctx.release(backend.server)
            backend.detach_and_close()
            return
        self._attach(backend)

    def _attach(self, backend: Backend) -> None:
        """Send the request to a newly connected backend and stream the rest."""
        # Each transport throttles the other: a full write buffer on one side
        # pauses reading on the other (Twisted's portforward pattern). The
        # pairing lasts while the backend connection is kept for this client.
        backend.transport.registerProducer(self._throttle, True)
        self.transport.registerProducer(backend.throttle, True)
        self._send_request(backend, self._ctx.reactor.seconds())

    def _unregister(self, backend: Backend) -> None:
        """Undo :meth:`_attach`'s pairing of the two transports."""
        if backend.transport is not None:
            backend.transport.unregisterProducer()
        if self.transport is not None:
            self.transport.unregisterProducer()
        self._throttle.resume(Throttle.BACKPRESSURE)

    def _send_request(self, backend: Backend, now: float) -> None:
        """Send the request to ``backend``, paired with this connection."""
        self._backend = backend
        backend.start_response()
        relay_write(backend.transport, self._request_bytes)
        self._t_sent = now
        throttle = self._throttle
        if throttle.reasons & Throttle.WAITING:
            throttle.resume(Throttle.WAITING)
        pending, self._pending = self._pending, b""
        if self._request_done:
            self._last = now
            self._arm(self._ctx.config.proxy.timeout_server, _T_SERVER, now)
            if pending:
                self._hold(pending)
        else:
            self._watch(_T_CLIENT, now)
            if pending:
                self._forward_request_body(pending)

    def _forward_request_body(self, data: bytes) -> None:
        backend = self._backend
        if backend is None:
            # Still connecting: keep the bytes (reading is paused meanwhile).
            self._pending += data
            return
        body = self._body
        assert body is not None
        try:
            out, rest = body.feed(data)
        except ProtocolError as e:
            self._fail(e.status_hint or 400, e.reason)
            return
        if out:
            relay_write(backend.transport, out)
        if body.done:
            self._request_done = True
            self._timer_kind = _T_SERVER
            if rest:
                self._hold(rest)

    # -- the response --------------------------------------------------------

    def response_head(self, head: ResponseHead, now: float | None = None) -> None:
        """A complete response head arrived from the backend.

        :param now: the time it arrived, if already read.
        """
        request = self._request
        decision = self._decision
        backend = self._backend
        assert request is not None and decision is not None and backend is not None
        status = head.status
        if status == 101:
            try:
                validate_upgrade_response(request, head)
            except ProtocolError as e:
                self._fail(502, e.reason)
                return
        elif status < 200:
            # Interim responses (100 Continue, 103 Early Hints) are relayed
            # as they are; the final response follows (RFC 9110 §15.2).
            relay_write(self.transport, head.serialize())
            return
        framing = response_framing(head, request.method)
        close = self._close_after or self._client_eof
        if framing.kind == "close" and status != 101:
            # A body that ends when the server closes cannot be followed by
            # another response on this connection (RFC 9112 §6.3 step 8).
            close = True
        server = backend.server
        insert = self._cookie_to_set(server, decision)
        ctx = self._ctx
        tls = insert is not None and self._client_tls(request)
        route = self._engine_route
        decision_header = ctx.config.proxy.decision_header
        if route is None and not decision_header:
            data = prepare_response_bytes(
                head, ctx.options, insert_value=insert, close=close and status != 101, tls=tls
            )
        else:
            prepare_response(
                head, ctx.options, insert_value=insert, close=close and status != 101, tls=tls
            )
            if decision_header:
                head.add(
                    decision_header.encode("ascii"),
                    f"{decision.reason}; server={server.name}".encode("ascii"),
                )
            data = b""  # serialized below, once the engine.io handling is known
        self._response_started = True
        self._close_after = close
        self._t_response = ctx.reactor.seconds() if now is None else now
        self._status = status
        stats = ctx.stats
        count_exchange(
            stats.frontend,
            stats.server(server.name),
            status,
            decision.reason,
            decision.set_cookie,
        )
        if route is not None and status != 101:
            chunked = framing.kind == "chunked"
            if framing.kind in ("length", "chunked") and ctx.engine.capture_for(route, head):
                # Hold the handshake until the session is learned (and stored).
                self._capture = HandshakeCapture(head, chunked=chunked)
                backend.start_body(framing, b"")
                return
            if route.sid is not None:
                sniffer = UnknownSessionSniffer.for_response(head, chunked=chunked)
                if sniffer is not None:
                    # The sniffer reads the body alone: the head goes first.
                    self._sniffer = sniffer
                    data = head.serialize()
                    self._out += len(data)
                    relay_write(self.transport, data)
                    backend.start_body(framing, b"")
                    return
        if not data:
            data = head.serialize()
        if status == 101:
            relay_write(self.transport, data)
            self._start_tunnel(backend)
        else:
            # The head leaves together with the body bytes already read, in
            # one write: one segment instead of two for small responses.
            backend.start_body(framing, data)

    def _client_tls(self, request: RequestHead) -> bool:
        """Whether the client reached the balancer over TLS (``secure = auto``)."""
        if self._tls:
            return True
        return (
            self._trusted
            and self._ctx.config.proxy.trust_forwarded_proto
            and (request.get(b"x-forwarded-proto") or b"").strip().lower() == b"https"
        )

    def _cookie_to_set(self, server: Server, decision: Decision) -> str | None:
        """The persistence-cookie value the response must carry, if any."""
        if not server.cookie:
            return None
        signer = self._ctx.signer
        if signer is None:
            return server.cookie if decision.set_cookie else None
        now = self._ctx.reactor.seconds()
        if decision.set_cookie:
            return signer.issue(server.cookie, now)
        # A cookie hit: a stale token, or one signed by a retiring key, is
        # reissued with the first key, keeping the date of the first pin.
        for token in self._tokens:
            if token.server_cookie == server.cookie:
                if token.refresh:
                    return signer.issue(server.cookie, now, first_seen=token.first_seen)
                return None
        return None

    def flush_bytes(self) -> None:
        """Add this connection's byte counts to the totals."""
        stats = self._ctx.stats
        server = self._tunnel_server or (self._backend.server if self._backend else None)
        if server is None and self._decision is not None:
            server = self._decision.server
        new_in = self._in - self._flushed_in
        new_out = self._out - self._flushed_out
        frontend = stats.frontend
        frontend.bytes_in += new_in
        frontend.bytes_out += new_out
        if server is not None:
            counters = stats.server(server.name)
            counters.bytes_in += new_in
            counters.bytes_out += new_out
        self._flushed_in = self._in
        self._flushed_out = self._out

    def response_body(self, data: bytes, now: float | None = None) -> None:
        """Part of a response body, already framed: forward it.

        :param now: the time it arrived, if already read.
        """
        self._last = self._ctx.reactor.seconds() if now is None else now
        capture = self._capture
        if capture is not None:
            if capture.feed(data):
                return
            # Too big for a handshake: relay it as it came.
            self._capture = None
            data = capture.head.serialize() + bytes(capture.raw)
        sniffer = self._sniffer
        if sniffer is not None:
            sniffer.feed(data)
        self._out += len(data)
        relay_write(self.transport, data)

    def response_done(self, reusable: bool) -> None:
        """The whole response has been read from the backend."""
        capture = self._capture
        if capture is not None:
            self._capture = None
            self._release_handshake(capture, reusable)
            return
        sniffer = self._sniffer
        if sniffer is not None:
            self._sniffer = None
            kind = sniffer.verdict()
            if kind is not None:
                self._unknown_session(kind)
        self._response_relayed(reusable)

    def _release_handshake(self, capture: HandshakeCapture, reusable: bool) -> None:
        """Learn the session a handshake opens, then relay the handshake."""
        ctx = self._ctx
        engine = ctx.engine
        backend = self._backend
        route = self._engine_route
        assert backend is not None and route is not None
        server = backend.server.name
        handshake = capture.handshake(engine.config.sid_cookie)
        if handshake is None:
            data, tagged = capture.output(None, route.request.eio)
        else:
            data, tagged = capture.output(engine.tag_of(server), route.request.eio)
            ttl = engine.learn(handshake, server, ctx.reactor.seconds())
            ctx.sessions_learned()
            if tagged:
                engine.tagged += 1
            elif ctx.store is not None:
                # The client's first poll may reach another proxy of the
                # fleet: the session must be in the store before it can.
                wait = ctx.store.put(handshake.sid, server, ttl)
                wait.addCallback(lambda _: self._send_held(backend, data, reusable))
                return
        self._send_held(backend, data, reusable)

    def _send_held(self, backend: Backend, data: bytes, reusable: bool) -> None:
        if self._backend is not backend or self._state != _EXCHANGE:
            return  # the client went away meanwhile
        self._out += len(data)
        relay_write(self.transport, data)
        self._response_relayed(reusable)

    def _unknown_session(self, kind: UnknownSession) -> None:
        """A backend said it holds no such session: count it, and forget it."""
        ctx = self._ctx
        decision = self._decision
        backend = self._backend
        route = self._engine_route
        assert decision is not None and backend is not None and route is not None
        reason = decision.reason
        for counters in (ctx.stats.frontend, ctx.stats.server(backend.server.name)):
            key = (reason, kind)
            counters.unknown_sessions[key] = counters.unknown_sessions.get(key, 0) + 1
        sid = route.sid or ""
        # Under sid routing the session expired on its server; under cookie
        # or hash routing the request probably reached the wrong server.
        log.info(
            "{client}: {server} does not know session {sid} ({kind}) routed by {reason}",
            client=self.peer_text(),
            server=backend.server.name,
            sid=redact(sid),
            kind=kind,
            reason=reason,
        )
        if reason.startswith("sid-") and sid:
            ctx.engine.table.forget(sid)
            if ctx.store is not None:
                ctx.store.forget(sid)

    def _response_relayed(self, reusable: bool) -> None:
        backend = self._backend
        assert backend is not None
        self.flush_bytes()
        if self._ctx.config.proxy.access_log != "off":
            self._log_request(backend.server.name)
        keep = reusable and self._request_done and not self._close_after
        # A kept connection stays paired with this one (see _attach).
        self._release_backend(paired=keep)
        if keep:
            backend.park()
            self._idle_backend = backend
        else:
            backend.detach_and_close()
        if not self._request_done or self._close_after or self._client_eof:
            self._close()
        else:
            self._next_request(self._last)

    def _next_request(self, now: float | None = None) -> None:
        """Go back to waiting for a request on a keep-alive connection."""
        self._request = None
        self._decision = None
        self._engine_route = None
        self._body = None
        self._state = _IDLE
        self._arm(self._ctx.config.proxy.timeout_http_keep_alive, _T_KEEPALIVE, now)
        throttle = self._throttle
        if throttle.reasons & Throttle.WAITING:
            throttle.resume(Throttle.WAITING)
        pending, self._pending = self._pending, b""
        if pending:
            self._read_head(pending)

    def _release_backend(self, *, paired: bool = False) -> Backend | None:
        """Stop relaying with the current backend; give back its slot.

        :param paired: keep the transports registered as each other's
            producers, for a backend connection kept for the next request.
        """
        backend = self._backend
        if backend is None:
            return None
        self._backend = None
        self._ctx.release(backend.server)
        if not paired:
            self._unregister(backend)
        return backend

    def backend_lost(self, backend: Backend, got_response: bool, reason: str) -> None:
        """The backend closed before its response was complete."""
        if backend is self._idle_backend:
            self._idle_backend = None
            self._unregister(backend)
            return
        if backend is not self._backend:
            return
        self._release_backend()
        if self._state == _TUNNEL:
            self._closed_by = "server"
            self._close()
            return
        request = self._request
        if (
            not got_response
            and self._reused
            and request is not None
            and request.framing.kind in ("none", "length")
            and request.framing.length == 0
        ):
            # A reused keep-alive connection may be closed by the server just
            # as a new request goes out. Nothing was answered and the request
            # has no body, so it is safely sent again on a fresh connection.
            self._reused = False
            self._request_bytes = request.serialize()
            self._ctx.pool.acquire(backend.server)
            self._connect(backend.server)
            return
        self._fail(502, reason)

    # -- tunnel ----------------------------------------------------------------

    def _log_request(self, server: str, status: int = 0, error: str = "") -> None:
        """Write the access log line of the request that just ended."""
        mode = self._ctx.config.proxy.access_log
        if mode == "off":
            return
        now = self._ctx.reactor.seconds()
        t_head = self._t_head if self._t_head >= 0 else now
        t_request = self._t_request if self._t_request >= 0 else now
        t_routed = self._t_routed if self._t_routed >= 0 else t_request
        t_sent = self._t_sent if self._t_sent >= 0 else t_routed
        responded = self._t_response >= 0
        decision = self._decision
        record = RequestRecord(
            client=self.peer_text(),
            time=t_head,
            server=server,
            decision="none" if decision is None else decision.reason,
            status=status or self._status,
            bytes_out=self._out - self._out_mark,
            t_request=t_request - t_head,
            t_queue=t_routed - t_request,
            t_connect=t_sent - t_routed,
            t_response=self._t_response - t_sent if responded else -1.0,
            t_total=now - t_head,
            request_line=_request_line(self._request, self._ctx.engine.prefix),
            cookie_set=decision is not None and decision.set_cookie and responded,
            error=error,
        )
        line = as_json(record) if mode == "json" else request_line(record)
        access_log.info("{line}", line=line)

    def _log_tunnel(self, server: Server) -> None:
        mode = self._ctx.config.proxy.access_log
        if mode == "off":
            return
        now = self._ctx.reactor.seconds()
        record = TunnelRecord(
            client=self.peer_text(),
            time=self._t_response,
            server=server.name,
            duration=now - self._t_response,
            bytes_from_client=self._in - self._in_mark,
            bytes_to_client=self._out - self._out_mark,
            closed_by=self._closed_by,
        )
        line = as_json(record) if mode == "json" else tunnel_line(record)
        access_log.info("{line}", line=line)

    def _start_tunnel(self, backend: Backend) -> None:
        if self._request is not None and self._request.is_websocket_upgrade:
            # Follow the server's frames, to say goodbye between two of them.
            self._frames = FrameTracker()
        self._state = _TUNNEL
        self._tunnel_server = backend.server
        self._log_request(backend.server.name)
        self._in_mark, self._out_mark = self._in, self._out
        counters = self._ctx.stats.server(backend.server.name)
        counters.tunnels += 1
        counters.tunnels_total += 1
        self._ctx.stats.frontend.tunnels += 1
        self._ctx.stats.frontend.tunnels_total += 1
        self._request = None
        self._body = None
        self._watch(_T_TUNNEL)
        backend.start_tunnel()
        pending, self._pending = self._pending, b""
        if pending:
            # Bytes the client sent right after its upgrade request (e.g. the
            # first WebSocket frames) belong to the new protocol.
            relay_write(backend.transport, pending)

    def tunnel_data(self, data: bytes) -> None:
        """Bytes from the server side of a tunnel."""
        self._last = self._ctx.reactor.seconds()
        self._out += len(data)
        frames = self._frames
        if frames is not None:
            if self._going_away:
                cut = frames.first_boundary(data)
                if cut >= 0:
                    relay_write(self.transport, data[:cut] + close_frame(self._going_away))
                    self._close_tunnel()
                    return
            else:
                frames.feed(data)
        relay_write(self.transport, data)

    def go_away(self, code: int = GOING_AWAY) -> None:
        """Close politely: requests finish first, WebSockets get a Close frame.

        A WebSocket client is sent a Close frame with ``code`` (1001, "going
        away", by default: RFC 6455 §7.4.1), placed between two of the
        server's frames, so socket.io and other clients reconnect at once.
        """
        if self._state != _TUNNEL:
            self.close_when_idle()
            return
        self._closed_by = "proxy"
        frames = self._frames
        if frames is None:
            self._close_tunnel()
        elif frames.at_boundary:
            relay_write(self.transport, close_frame(code))
            self._close_tunnel()
        else:
            self._going_away = code
            self._arm(_GOING_AWAY_WAIT, _T_GOING_AWAY)

    def _close_tunnel(self) -> None:
        backend = self._release_backend()
        if backend is not None:
            backend.detach_and_close()
        self._close()

    def tunnel_server_eof(self) -> None:
        """The server half-closed a tunnel: pass the FIN on."""
        self._server_eof = True
        if not self._client_eof:
            self._closed_by = "server"
        if self._client_eof:
            self._close()
        else:
            self.transport.loseWriteConnection()

    # -- half-close --------------------------------------------------------------

    def readConnectionLost(self) -> None:
        """The client sent FIN."""
        if self._state == _TUNNEL:
            self._client_eof = True
            backend = self._backend
            if self._server_eof or backend is None:
                self._close()
            else:
                backend.transport.loseWriteConnection()
            return
        if self._state == _EXCHANGE and self._request_done:
            if self._long_poll_waiting():
                # engine.io ends a session whose long poll is cut ("poll
                # connection closed prematurely"); a poll held on behind a
                # vanished client would keep a dead session alive for up to
                # a ping interval. Pass the disconnect on.
                backend = self._release_backend()
                if backend is not None:
                    self._log_request(backend.server.name, 0, "client closed during a long poll")
                    backend.detach_and_close()
                self._close()
                return
            # A client may half-close once its request is sent; answer it.
            self._client_eof = True
            self._close_after = True
            return
        self._close()

    def _long_poll_waiting(self) -> bool:
        """Whether an engine.io polling GET of a session awaits its answer."""
        route = self._engine_route
        request = self._request
        return (
            route is not None
            and route.sid is not None
            and route.request.transport == "polling"
            and request is not None
            and request.method == b"GET"
            and not self._response_started
        )

    def writeConnectionLost(self) -> None:
        """Our FIN to the client went out; nothing more to do."""

    # -- ending ---------------------------------------------------------------------

    def _fail(self, status: int, reason: str) -> None:
        """Answer with the proxy's own error page if nothing was sent yet.

        The connection closes afterwards, except for a 503 when no server is
        available to a request without a body: like HAProxy, the client may
        try again on the same connection.
        """
        backend = self._release_backend()
        if self._state in (_HEAD, _EXCHANGE) and self._ctx.config.proxy.access_log != "off":
            server = "-" if backend is None else backend.server.name
            self._log_request(server, status, reason)
        else:
            log.info(
                "{client}: {status} {reason}",
                client=self.peer_text(),
                status=status,
                reason=reason,
            )
        if backend is not None:
            backend.detach_and_close()
        if self._response_started or self._state in (_CLOSED, _TUNNEL):
            self._close()
            return
        keep = (
            status == 503
            and self._state == _EXCHANGE
            and self._request_done
            and not self._close_after
        )
        self._ctx.stats.frontend.error(status)
        self._ctx.stats.frontend.response(status)
        self.transport.write(error_response(status, close=not keep))
        if keep:
            self._next_request()
        else:
            self._close()

    def _close(self) -> None:
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        self._disarm()
        idle, self._idle_backend = self._idle_backend, None
        if idle is not None:
            # A transport does not close while it has a producer registered
            # and paused (see _attach); nor is the connection needed anymore.
            self._unregister(idle)
            idle.detach_and_close()
        if self.transport is not None:
            self.transport.loseConnection()

    def _abort(self) -> None:
        self._state = _CLOSED
        self._disarm()
        self.transport.abortConnection()

    # -- what the backend side may use ---------------------------------------------

    @property
    def ctx(self) -> ProxyContext:
        """The proxy this connection belongs to."""
        return self._ctx

    @property
    def last_activity(self) -> float:
        """When either side last sent something, on the reactor's clock."""
        return self._last

    def server_activity(self) -> float:
        """The server sent something: note it, and return the time."""
        now: float = self._ctx.reactor.seconds()
        self._last = now
        return now

    def fail(self, status: int, reason: str, *, unsent: bool = False) -> None:
        """Give up on the current exchange with the proxy's own error page.

        :param unsent: the response head was handed over but never written
            (it leaves with the first body bytes), so the client can still
            get a clean error page instead of a cut response.
        """
        if unsent:
            self._response_started = False
        self._fail(status, reason)

    @property
    def in_tunnel(self) -> bool:
        """Whether this connection was upgraded (e.g. to a WebSocket)."""
        return self._state == _TUNNEL

    @property
    def server_name(self) -> str | None:
        """The server this connection is talking to now, if any."""
        server = self._tunnel_server or (self._backend.server if self._backend else None)
        return None if server is None else server.name

    def abort(self) -> None:
        """Close at once, both sides, whatever is in flight."""
        self._closed_by = "proxy"
        backend = self._release_backend()
        if backend is not None:
            backend.detach_and_close()
        self._abort()

    def close_when_idle(self) -> bool:
        """Close now if no request is in flight, else after the current one.

        :return: whether the connection was closed at once.
        """
        if self._state in (_PROXY, _IDLE, _CLOSED):
            self._close()
            return True
        self._close_after = True
        return False

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._state = _CLOSED
        self.queued = False  # a queue entry that is not queued is skipped
        self._disarm()
        self.flush_bytes()
        tunnel_server, self._tunnel_server = self._tunnel_server, None
        if tunnel_server is not None:
            self._log_tunnel(tunnel_server)
            self._ctx.stats.server(tunnel_server.name).tunnels -= 1
            self._ctx.stats.frontend.tunnels -= 1
        backend = self._release_backend()
        if backend is not None:
            backend.detach_and_close()
        idle, self._idle_backend = self._idle_backend, None
        if idle is not None:
            self._unregister(idle)
            idle.detach_and_close()
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()
        self._ctx.discard(self)


class FrontendFactory(Factory):
    """Builds a :class:`Frontend` per accepted connection."""

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx

    def buildProtocol(self, addr: IAddress) -> Frontend:  # type: ignore[override]
        return Frontend(self.ctx)


def _request_line(request: RequestHead | None, engine_prefix: bytes) -> str:
    if request is None:
        return "<BADREQ>"
    target = request.target
    if engine_prefix:
        target = redact_target(target, engine_prefix)
    if len(target) > 200:
        target = target[:200] + b"..."
    return b" ".join((request.method, target, request.version)).decode("latin-1")


def _is_trusted(ip: str, networks: tuple[IPNetwork, ...]) -> bool:
    if not networks:
        return True
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr.version == net.version and addr in net for net in networks)
