"""Moving bytes between the two sides of the relay.

Helpers for the transports of :mod:`stickyproxy.relay` (client connections)
and :mod:`stickyproxy.backend` (server connections): a write that goes
straight to an idle socket, a pause switch that holds a transport for several
reasons at once (each side's transport is the streaming producer of the other,
so a full write buffer pauses reading on the other side), Nagle's algorithm
off, and the host and port of a Twisted address.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

# A plain TCP transport whose write buffer is empty can take bytes straight
# to the socket: Twisted's write() only queues them and sends them on a later
# reactor turn, after an extra epoll round, which costs as much as the
# forwarding itself. Anything else (TLS, UNIX sockets, a paused or buffered
# transport) takes the ordinary path.
_FAST_TRANSPORTS = (tcp.Server, tcp.Client)


def relay_write(transport: Any, data: bytes) -> None:
    """Write ``data`` to ``transport``, sending at once when nothing is queued."""
    if (
        type(transport) in _FAST_TRANSPORTS
        and not transport.dataBuffer
        and not transport._tempDataBuffer
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnecting
    ):
        try:
            sent = transport.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            # Let Twisted find the error on its own path and report it.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


@implementer(IPushProducer)
class Throttle:
    """Pauses a transport for several independent reasons at once.

    A transport is registered as the streaming producer of its peer, so a full
    peer buffer pauses it; the proxy also pauses it itself while it waits for a
    backend or holds a pipelined request. Each reason is a bit: reading resumes
    only once every reason is gone.
    """

    BACKPRESSURE = 1
    WAITING = 2

    __slots__ = ("reasons", "transport")

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.reasons = 0

    def pause(self, reason: int) -> None:
        if not self.reasons:
            self.transport.pauseProducing()
        self.reasons |= reason

    def resume(self, reason: int) -> None:
        if self.reasons & reason:
            self.reasons &= ~reason
            if not self.reasons:
                self.transport.resumeProducing()

    def pauseProducing(self) -> None:
        self.pause(self.BACKPRESSURE)

    def resumeProducing(self) -> None:
        self.resume(self.BACKPRESSURE)

    def stopProducing(self) -> None:
        # The peer went away; closing is decided by the protocols, which see
        # both ends, not by the transport that noticed first.
        pass


def no_delay(transport: Any) -> None:
    """Send small writes at once (``TCP_NODELAY``), where the transport is TCP."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        set_no_delay(True)


def host_port(address: object) -> tuple[str, int]:
    """The host and port of a Twisted address (``("0.0.0.0", 0)`` for a UNIX one)."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", 0)
    if isinstance(host, str):
        return host, int(port)
    return "0.0.0.0", 0
