"""An in-memory harness for the relay: one proxy, one client, scripted backends.

Connection attempts land in ``MemoryReactorClock.tcpClients``; a test plays
each backend by building its protocol on a string transport, so every byte
either side sees can be asserted exactly, and time only moves when the test
advances the clock.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError as TwistedConnectionRefused
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from stickyproxy.backend import Backend
from stickyproxy.config import parse_config
from stickyproxy.context import ProxyContext
from stickyproxy.pool import Pool
from stickyproxy.proxyproto import format_v1
from stickyproxy.relay import Frontend, FrontendFactory

CONFIG = """
[proxy]
listen = tcp:0
proxy_protocol = required
trusted_proxies = 127.0.0.0/8
timeout_http_request = 3s
timeout_http_keep_alive = 5s
timeout_server = 10s
timeout_client = 10s
timeout_tunnel = 30s
timeout_connect = 2s
retries = 2
redispatch = {redispatch}

[server s1]
address = 10.1.0.1:80

[server s2]
address = 10.1.0.2:80

[server s3]
address = 10.1.0.3:80
"""

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: app\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)


class FakeTCP(StringTransport):
    """A string transport with the TCP extras the relay uses."""

    def __init__(self, peer: IPv4Address | None = None) -> None:
        super().__init__(peerAddress=peer)
        self.write_closed = False
        self.aborted = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class Harness:
    """One proxy, one client connection, and the backends it opened."""

    def __init__(
        self, *, redispatch: bool = True, peer: str = "127.0.0.1", config: str | None = None
    ) -> None:
        text = CONFIG.format(redispatch=str(redispatch).lower()) if config is None else config
        config_ = parse_config(text)
        self.reactor = MemoryReactorClock()
        self.pool = Pool(config_.servers, config_.health, config_.balance)
        self.ctx = ProxyContext(config_, self.pool, self.reactor)
        self.client = FakeTCP(IPv4Address("TCP", peer, 40000))
        self.frontend: Frontend = FrontendFactory(self.ctx).buildProtocol(None)  # type: ignore[arg-type]
        self.frontend.makeConnection(self.client)
        self.backends: list[tuple[Backend, FakeTCP]] = []

    def send(self, data: bytes) -> None:
        self.frontend.dataReceived(data)

    def another_client(self, peer: str = "127.0.0.1") -> tuple[Frontend, FakeTCP]:
        """A second client connection to the same proxy."""
        transport = FakeTCP(IPv4Address("TCP", peer, 40001))
        frontend: Frontend = FrontendFactory(self.ctx).buildProtocol(None)  # type: ignore[arg-type]
        frontend.makeConnection(transport)
        return frontend, transport

    def proxy_header(self, source: str = "203.0.113.7") -> None:
        self.send(format_v1((source, 40000), ("10.0.0.1", 80)))

    def attempts(self) -> list[tuple[str, int, Any]]:
        return [(host, port, factory) for host, port, factory, *_ in self.reactor.tcpClients]

    def accept(self, index: int = -1) -> tuple[Backend, FakeTCP]:
        """Let the connection attempt number ``index`` succeed."""
        _, _, factory = self.attempts()[index]
        backend = factory.buildProtocol(None)
        transport = FakeTCP()
        backend.makeConnection(transport)
        self.backends.append((backend, transport))
        return backend, transport

    def refuse(self, index: int = -1) -> None:
        _, _, factory = self.attempts()[index]
        factory.clientConnectionFailed(None, Failure(TwistedConnectionRefused()))

    def server_of(self, index: int = -1) -> str:
        host, _, _ = self.attempts()[index]
        return {"10.1.0.1": "s1", "10.1.0.2": "s2", "10.1.0.3": "s3"}[host]

    def output(self) -> bytes:
        data = self.client.value()
        self.client.clear()
        return data


def ok(body: bytes = b"hi", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)
