"""WebSocket echo backend for the benchmark.

Completes the RFC 6455 opening handshake (section 4.2.2: ``Sec-WebSocket-Accept``
is the base64 SHA-1 of the client's key and the protocol GUID), then echoes
every byte it receives, unparsed. Frames are not decoded: the client sends
masked frames and reads back exactly the bytes it sent, which is all a relay
benchmark needs. Requests without ``Upgrade: websocket`` (health checks) get
``200 ok`` and the connection is closed.

The server is the same behind every proxy under test, so its own cost cancels
out of the comparison; the benchmark measures the proxy's CPU.

Usage (by ``bench/run.py``)::

    python bench/ws_echo.py --fd 5 --fd 6

Each ``--fd`` is an inherited listening socket.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import signal
import socket

#: RFC 6455 section 1.3: the GUID appended to the client's key.
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

#: Largest request head accepted before giving up on a connection.
MAX_HEAD = 16 * 1024


def accept_value(key: bytes) -> bytes:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key`` (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


def _headers(head: bytes) -> dict[bytes, bytes]:
    """Header fields of a request head, names lower-cased (RFC 9110 section 5.1)."""
    fields: dict[bytes, bytes] = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            fields[name.strip().lower()] = value.strip()
    return fields


class EchoProtocol(asyncio.Protocol):
    """Reads one request head; after a 101, echoes with flow control."""

    __slots__ = ("_head", "_tunnel", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._head = bytearray()
        self._tunnel = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self._tunnel:
            self.transport.write(data)
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HEAD:
                self.transport.close()
            return
        head, rest = bytes(self._head[:end]), bytes(self._head[end + 4 :])
        self._head = bytearray()
        fields = _headers(head)
        key = fields.get(b"sec-websocket-key")
        if fields.get(b"upgrade", b"").lower() != b"websocket" or key is None:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
                b"Connection: close\r\n\r\nok"
            )
            self.transport.close()
            return
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept_value(key) + b"\r\n\r\n"
        )
        self._tunnel = True
        if rest:
            self.transport.write(rest)

    # Stop reading while the peer is not reading our echo, so that a bulk
    # stream is bounded by TCP flow control instead of this process's memory.
    def pause_writing(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()

    def eof_received(self) -> bool:
        # Pass the client's half-close on once everything has been echoed.
        return False


async def serve(fds: list[int]) -> None:
    """Serve on each inherited listening socket until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    servers = [
        await loop.create_server(EchoProtocol, sock=socket.socket(fileno=fd), backlog=1024)
        for fd in fds
    ]
    await stop.wait()
    for server in servers:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fd", type=int, action="append", required=True, help="listening fd")
    args = parser.parse_args()
    asyncio.run(serve(args.fd))


if __name__ == "__main__":
    main()
