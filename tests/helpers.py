"""Helpers for feeding incremental parsers in every way a network might."""

from __future__ import annotations

from collections.abc import Iterator


def splits(data: bytes) -> Iterator[list[bytes]]:
    """Yield ``data`` whole, one byte at a time, and cut at every single offset."""
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    for cut in range(1, len(data)):
        yield [data[:cut], data[cut:]]
