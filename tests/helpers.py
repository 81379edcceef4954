"""Helpers for feeding incremental parsers in every way a network might."""

from __future__ import annotations

from collections.abc import Iterator


def splits(data: bytes) -> Iterator[list[bytes]]:
    """Yield ``data`` whole, one byte at a time, and cut at every single offset."""
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    for cut in range(1, len(data)):
        yield [data[:cut], data[cut:]]


def bulk(value: str | None) -> bytes:
    """A RESP2 bulk string (length-prefixed), or the null bulk string for None."""
    if value is None:
        return b"$-1\r\n"
    data = value.encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def resp(*args: str) -> bytes:
    """One command as a client sends it: a RESP2 array of bulk strings."""
    return b"*%d\r\n" % len(args) + b"".join(bulk(arg) for arg in args)
