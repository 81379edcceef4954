"""Where WebSocket frames begin and end in a relayed byte stream.

The proxy relays WebSocket bytes unparsed, but to say goodbye politely
(a Close frame with code 1001, "going away", RFC 6455 §7.4.1) it must put
that frame *between* two of the server's frames, never inside one. The
:class:`FrameTracker` follows the frame headers of one direction (RFC 6455
§5.2) at the cost of reading a few header bytes per frame; payloads are
skipped, never copied or unmasked.
"""

from __future__ import annotations

GOING_AWAY = 1001
SERVICE_RESTART = 1012


def close_frame(code: int = GOING_AWAY, reason: bytes = b"") -> bytes:
    """An unmasked Close frame, as a server sends it (RFC 6455 §5.5.1)."""
    payload = code.to_bytes(2, "big") + reason
    if len(payload) > 125:
        raise ValueError("a control frame payload is at most 125 bytes")
    return bytes([0x88, len(payload)]) + payload


class FrameTracker:
    """Follows frame boundaries in one direction of a WebSocket stream."""

    __slots__ = ("_header", "_remaining")

    def __init__(self) -> None:
        self._remaining = 0  # payload bytes of the current frame still to come
        self._header = b""  # the start of a frame header split across reads

    @property
    def at_boundary(self) -> bool:
        """Whether the bytes seen so far end exactly between two frames."""
        return self._remaining == 0 and not self._header

    def feed(self, data: bytes) -> None:
        """Account for ``data``, the next bytes of the stream."""
        self.first_boundary(data, stop=False)

    def first_boundary(self, data: bytes, *, stop: bool = True) -> int:
        """Account for ``data`` up to the first frame boundary in it.

        :return: the offset in ``data`` of the first point between two frames
            (0 if the stream is already there), or -1 if ``data`` ends inside a
            frame. With ``stop`` false, all of ``data`` is accounted for and
            the return value is meaningless.
        """
        if stop and self.at_boundary:
            return 0
        pos = 0
        end = len(data)
        while pos < end:
            if self._remaining:
                step = min(self._remaining, end - pos)
                self._remaining -= step
                pos += step
                if not self._remaining and not self._header and stop:
                    return pos
                continue
            header = self._header + data[pos : pos + 14]
            size = _header_size(header)
            if size is None or len(header) < size:
                # Not enough bytes to read the whole header yet.
                taken = len(header) - len(self._header)
                self._header = header
                pos += taken
                continue
            taken = size - len(self._header)
            self._header = b""
            pos += taken
            self._remaining = _payload_length(header)
            if not self._remaining and stop:
                return pos
        return -1 if stop else 0


def _header_size(header: bytes) -> int | None:
    """The full header size of the frame starting ``header``, once knowable."""
    if len(header) < 2:
        return None
    length = header[1] & 0x7F
    size = 2 + (4 if header[1] & 0x80 else 0)
    if length == 126:
        size += 2
    elif length == 127:
        size += 8
    return size


def _payload_length(header: bytes) -> int:
    length = header[1] & 0x7F
    if length == 126:
        return int.from_bytes(header[2:4], "big")
    if length == 127:
        return int.from_bytes(header[2:10], "big")
    return length
