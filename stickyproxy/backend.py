"""The server side of the relay: connections to backend servers.

A :class:`BackendConnector` makes one connection attempt to a server on behalf
of a :class:`~stickyproxy.relay.Frontend`. The :class:`Backend` it builds reads
response heads and bodies (:mod:`stickyproxy.httphead`) and hands them to that
frontend, which forwards them to the client. A backend connection serves one
client at a time: it is kept for that client's next request (keep-alive), or
spliced to it after a ``101 Switching Protocols``, when bytes flow unparsed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocol
from twisted.internet.protocol import ClientFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from stickyproxy.errors import ProtocolError
from stickyproxy.flow import Throttle, no_delay
from stickyproxy.httphead import BodyReader, Framing, HeadParser, ResponseHead

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress

    from stickyproxy.pool import Server
    from stickyproxy.relay import Frontend


# Backend states.
_B_IDLE = 0  # connected, nothing asked (or parked between requests)
_B_HEAD = 1  # waiting for a response head
_B_BODY = 2  # relaying a response body
_B_TUNNEL = 3  # spliced after a 101
_B_CLOSED = 4


@implementer(IProtocol, IHalfCloseableProtocol)
class Backend:
    """A connection to one server, serving one :class:`Frontend`."""

    __slots__ = (
        "_body",
        "_got_response",
        "_parser",
        "_reusable",
        "_state",
        "alive",
        "connector",
        "frontend",
        "server",
        "throttle",
        "transport",
    )

    throttle: Throttle

    def __init__(self, connector: BackendConnector) -> None:
        self.connector: BackendConnector | None = connector
        self.frontend: Frontend | None = connector.frontend
        self.server = connector.server
        self.transport: Any = None
        self._state = _B_IDLE
        self._parser: HeadParser[ResponseHead] | None = None
        self._body: BodyReader | None = None
        self._got_response = False
        self._reusable = True
        self.alive = False

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self.throttle = Throttle(transport)
        self.connectionMade()

    def connectionMade(self) -> None:
        self.alive = True
        no_delay(self.transport)
        connector, self.connector = self.connector, None
        frontend = self.frontend
        if frontend is None or connector is None or connector.cancelled:
            self.detach_and_close()
            return
        frontend.backend_connected(self)

    def start_response(self) -> None:
        """A request is about to be sent: expect a response head."""
        self._state = _B_HEAD
        self._got_response = False
        if self._parser is None:
            frontend = self.frontend
            assert frontend is not None
            cfg = frontend.ctx.config.proxy
            # Response heads get the same budget as request heads; a larger
            # one is answered with 502, as HAProxy does.
            self._parser = HeadParser(
                "response", max_size=cfg.max_head_size, max_headers=cfg.max_headers
            )

    def start_body(self, framing: Framing, head: bytes) -> None:
        """Send the response ``head`` and stream the body that follows."""
        assert self._parser is not None
        rest = self._parser.take_rest()
        length = framing.length
        if framing.kind == "length" and len(rest) >= length:
            # The whole body came with the head (the common small response):
            # no reader needed. Bytes beyond it mean a confused server.
            if len(rest) > length:
                self._reusable = False
            self._send(head + rest[:length])
            self._finish()
            return
        body = BodyReader(framing, error_status=502)
        if body.done:
            if rest:
                # Bytes where no body may be: never trust this connection again.
                self._reusable = False
            self._send(head)
            self._finish()
            return
        self._body = body
        self._state = _B_BODY
        if rest:
            self._feed_body(rest, head)
        else:
            self._send(head)

    def _send(self, data: bytes) -> None:
        frontend = self.frontend
        assert frontend is not None
        # Sent while handling the head, whose arrival time the frontend has.
        frontend.response_body(data, frontend.last_activity)

    def start_tunnel(self) -> None:
        """A 101 was relayed: from now on bytes flow unparsed."""
        self._state = _B_TUNNEL
        parser, self._parser = self._parser, None
        assert parser is not None
        rest = parser.take_rest()
        if rest and self.frontend is not None:
            self.frontend.tunnel_data(rest)

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        frontend = self.frontend
        if frontend is None:
            return
        if state == _B_TUNNEL:
            frontend.tunnel_data(data)
        elif state == _B_BODY:
            self._feed_body(data)
        elif state == _B_HEAD:
            self._read_head(frontend, data)
        elif state == _B_IDLE:
            # A server talking when nobody asked it anything is confused.
            self._reusable = False
            frontend.backend_lost(self, False, "unsolicited bytes")
            self.detach_and_close()

    def _read_head(self, frontend: Frontend, data: bytes) -> None:
        self._got_response = True
        parser = self._parser
        assert parser is not None
        now = frontend.server_activity()
        while True:
            try:
                head = parser.feed(data)
            except ProtocolError as e:
                self._reusable = False
                frontend.fail(502, f"bad response from {self.server.name}: {e.reason}")
                return
            if head is None:
                return
            if not head.keep_alive:
                self._reusable = False
            frontend.response_head(head, now)
            if self._state != _B_HEAD or self.frontend is None:
                return
            # That was an interim (1xx) response; the final one follows.
            data = parser.take_rest()
            if not data:
                return

    def _feed_body(self, data: bytes, head: bytes = b"") -> None:
        body = self._body
        frontend = self.frontend
        assert body is not None and frontend is not None
        try:
            out, rest = body.feed(data)
        except ProtocolError as e:
            self._reusable = False
            # With the head still held (it leaves with the first body bytes),
            # the client gets a clean 502 instead of a cut response.
            frontend.fail(
                502, f"bad response body from {self.server.name}: {e.reason}", unsent=bool(head)
            )
            return
        if out or head:
            frontend.response_body(head + out if head else out)
        if body.done:
            if rest:
                # More bytes than the framing allows: never reuse.
                self._reusable = False
            self._finish()

    def _finish(self) -> None:
        self._state = _B_IDLE
        self._body = None
        frontend = self.frontend
        assert frontend is not None
        frontend.response_done(self._reusable)

    def park(self) -> None:
        """Stay connected, idle, for the next request of the same client."""
        self._state = _B_IDLE

    def detach_and_close(self) -> None:
        """Forget the frontend and close."""
        self.frontend = None
        self._state = _B_CLOSED
        if self.alive:
            self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        """The server sent FIN."""
        frontend = self.frontend
        if frontend is not None and self._state == _B_TUNNEL:
            frontend.tunnel_server_eof()
            return
        if frontend is not None and self._state == _B_BODY and self._body is not None:
            try:
                self._body.eof()
            except ProtocolError:
                pass
            else:
                # A read-until-close body ends here (RFC 9112 §6.3 step 8).
                self._reusable = False
                self._finish()
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """Our FIN to the server went out; nothing more to do."""

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.alive = False
        frontend, self.frontend = self.frontend, None
        state, self._state = self._state, _B_CLOSED
        if frontend is None:
            return
        if state == _B_TUNNEL:
            frontend.backend_lost(self, True, "tunnel closed by the server")
        elif state == _B_BODY:
            frontend.backend_lost(self, True, "server closed in the middle of the body")
        else:
            frontend.backend_lost(
                self, self._got_response, f"{self.server.name} closed without a complete response"
            )


class BackendConnector(ClientFactory):
    """One connection attempt to a server on behalf of a frontend."""

    # One log line per backend connection would drown everything else.
    noisy = False

    def __init__(self, frontend: Frontend, server: Server) -> None:
        self.frontend = frontend
        self.server = server
        self.cancelled = False

    def buildProtocol(self, addr: IAddress) -> Backend:  # type: ignore[override]
        return Backend(self)

    def cancel(self) -> None:
        """The frontend went away: give the slot back, drop any connection."""
        if not self.cancelled:
            self.cancelled = True
            self.frontend.ctx.release(self.server)

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        if not self.cancelled:
            self.frontend.backend_connect_failed(self.server, reason)

    def clientConnectionLost(self, connector: object, reason: Failure) -> None:
        """Handled by the protocol itself."""
