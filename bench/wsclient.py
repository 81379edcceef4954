"""Raw-socket WebSocket load for the benchmark (asyncio).

Each connection sends an RFC 6455 opening handshake, checks the ``101`` and its
``Sec-WebSocket-Accept``, then either stays idle, plays ping-pong with one small
masked frame (the echo backend returns the very bytes it got, which the client
compares), or streams large frames and counts the bytes coming back.

Client-to-server frames are masked as RFC 6455 section 5.3 requires, so a proxy
that did look at frames would see valid ones. The client parses nothing it
receives after the handshake: it only needs to know that the echo is complete
and correct.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct

from ws_echo import accept_value

#: Handshakes in flight at once while opening many connections, to stay within
#: the proxies' accept queues and keep connection setup off the critical path.
OPEN_CONCURRENCY = 200


class WebSocketError(Exception):
    """A handshake was refused or an echo did not come back intact."""


def masked_frame(payload: bytes) -> bytes:
    """One final binary frame, masked with a random key (RFC 6455 section 5.2)."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x82, 0x80 | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", 0x82, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x82, 0x80 | 127, length)
    return header + mask + masked


class ClientProtocol(asyncio.Protocol):
    """One client WebSocket: handshake, then ping-pong or bulk echo."""

    def __init__(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.received = 0
        self._key = base64.b64encode(os.urandom(16))
        self._request = (
            f"GET /echo HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {self._key.decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        self._buffer = bytearray()
        self._frame = b""
        self._rounds_left = 0
        self._bulk_chunk = b""
        self._bulk_left = 0
        self._bulk_expected = 0
        self._paused = False
        self._closing = False

    # -- asyncio callbacks ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        if not self.opened.done():
            self._handshake_data(data)
        elif self._bulk_expected:
            self.received += len(data)
            if self.received >= self._bulk_expected:
                self._finish()
        else:
            self._echo_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closing:
            return
        failure = WebSocketError(f"connection closed: {exc or 'by peer'}")
        if not self.opened.done():
            self.opened.set_exception(failure)
        # Only a started exchange has someone waiting for ``done``.
        if (self._frame or self._bulk_expected) and not self.done.done():
            self.done.set_exception(failure)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._write_bulk()

    # -- handshake -----------------------------------------------------------

    def _handshake_data(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self._buffer[:end]).lower()
        extra = bytes(self._buffer[end + 4 :])
        self._buffer.clear()
        expected = b"sec-websocket-accept: " + accept_value(self._key).lower()
        if not head.startswith(b"http/1.1 101 ") or expected not in head:
            self.opened.set_exception(WebSocketError(f"bad handshake response: {head[:200]!r}"))
            return
        if extra:
            self.opened.set_exception(WebSocketError(f"bytes after the 101: {extra[:50]!r}"))
            return
        self.opened.set_result(None)

    # -- ping-pong -----------------------------------------------------------

    def start_rounds(self, frame: bytes, rounds: int) -> None:
        """Send *frame*, wait for its echo, *rounds* times; then :attr:`done`."""
        assert self.transport is not None
        self._frame = frame
        self._rounds_left = rounds
        self.transport.write(frame)

    def _echo_data(self, data: bytes) -> None:
        assert self.transport is not None
        self._buffer += data
        size = len(self._frame)
        if len(self._buffer) < size:
            return
        if self._buffer != self._frame:
            self._fail(f"echo differs from the frame sent: {bytes(self._buffer[:50])!r}")
            return
        self._buffer.clear()
        self._rounds_left -= 1
        if self._rounds_left > 0:
            self.transport.write(self._frame)
        else:
            self._finish()

    # -- bulk ----------------------------------------------------------------

    def start_bulk(self, chunk: bytes, count: int) -> None:
        """Send *chunk* *count* times; :attr:`done` once as many bytes came back."""
        self._bulk_chunk = chunk
        self._bulk_left = count
        self._bulk_expected = len(chunk) * count
        self._write_bulk()

    def _write_bulk(self) -> None:
        assert self.transport is not None
        while self._bulk_left and not self._paused:
            self._bulk_left -= 1
            self.transport.write(self._bulk_chunk)

    # -- end -----------------------------------------------------------------

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def _fail(self, message: str) -> None:
        if not self.done.done():
            self.done.set_exception(WebSocketError(message))
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Close on purpose: what is still awaited is no longer a failure."""
        self._closing = True
        if self.transport is not None:
            self.transport.close()


async def open_one(host: str, port: int, timeout: float) -> ClientProtocol:
    """Connect and complete the opening handshake within *timeout* seconds."""
    loop = asyncio.get_running_loop()
    _transport, protocol = await asyncio.wait_for(
        loop.create_connection(lambda: ClientProtocol(host, port), host, port), timeout
    )
    try:
        await asyncio.wait_for(protocol.opened, timeout)
    except BaseException:
        protocol.close()
        raise
    return protocol


async def open_many(host: str, port: int, count: int, timeout: float) -> list[ClientProtocol]:
    """Open *count* WebSockets, :data:`OPEN_CONCURRENCY` handshakes at a time.

    On any failure the connections already open are closed and the error raised.
    """
    limit = asyncio.Semaphore(OPEN_CONCURRENCY)

    async def one() -> ClientProtocol:
        async with limit:
            return await open_one(host, port, timeout)

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    opened = [r for r in results if isinstance(r, ClientProtocol)]
    errors = [r for r in results if not isinstance(r, ClientProtocol)]
    if errors:
        close_all(opened)
        raise WebSocketError(f"{len(errors)} of {count} handshakes failed; first: {errors[0]!r}")
    return opened


async def ping_pong(clients: list[ClientProtocol], payload: int, rounds: int) -> None:
    """Every client does *rounds* round trips of a *payload*-byte frame, all at once."""
    for client in clients:
        client.start_rounds(masked_frame(os.urandom(payload)), rounds)
    await asyncio.gather(*(client.done for client in clients))


async def bulk_echo(client: ClientProtocol, total: int, frame_payload: int = 65_000) -> int:
    """Stream about *total* bytes of frames through *client*, wait for the echo.

    :return: the number of bytes sent (and received back).
    """
    chunk = masked_frame(os.urandom(frame_payload))
    count = max(1, total // len(chunk))
    client.start_bulk(chunk, count)
    await client.done
    return len(chunk) * count


def close_all(clients: list[ClientProtocol]) -> None:
    for client in clients:
        client.close()
