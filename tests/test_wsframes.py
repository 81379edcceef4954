"""WebSocket frame boundaries in a relayed stream."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from stickyproxy.wsframes import FrameTracker, close_frame


def frame(payload: bytes, *, masked: bool = False, opcode: int = 0x2) -> bytes:
    """Build a frame the way RFC 6455 §5.2 lays it out."""
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, (0x80 if masked else 0) | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, (0x80 if masked else 0) | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, (0x80 if masked else 0) | 127]) + n.to_bytes(8, "big")
    return head + (os.urandom(4) if masked else b"") + payload


sizes = st.sampled_from([0, 1, 5, 125, 126, 127, 300, 65535, 65536, 70000])


@given(st.lists(st.tuples(sizes, st.booleans()), min_size=1, max_size=6), st.data())
def test_boundaries_are_found_however_the_stream_is_split(
    frames: list[tuple[int, bool]], data: st.DataObject
) -> None:
    chunks = [frame(b"x" * size, masked=masked) for size, masked in frames]
    stream = b"".join(chunks)
    boundaries = set()
    offset = 0
    for chunk in chunks:
        offset += len(chunk)
        boundaries.add(offset)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(stream)), max_size=8)) | {len(stream)})
    tracker = FrameTracker()
    start = 0
    for cut in cuts:
        tracker.feed(stream[start:cut])
        start = cut
        assert tracker.at_boundary == (cut in boundaries or cut == 0)


@given(st.lists(sizes, min_size=2, max_size=5), st.integers(0, 10_000_000))
def test_first_boundary_points_at_the_next_frame_start(frames: list[int], where: int) -> None:
    chunks = [frame(b"y" * size) for size in frames]
    stream = b"".join(chunks)
    split = where % len(stream)
    tracker = FrameTracker()
    tracker.feed(stream[:split])
    rest = stream[split:]
    cut = tracker.first_boundary(rest)
    ends = []
    total = 0
    for chunk in chunks:
        total += len(chunk)
        ends.append(total)
    expected = min(e for e in [0, *ends] if e >= split) - split
    assert cut == expected
    assert tracker.at_boundary


def test_a_frame_split_inside_its_extended_length_is_followed() -> None:
    data = frame(b"z" * 300) + frame(b"a")
    tracker = FrameTracker()
    for i in range(len(data)):
        tracker.feed(data[i : i + 1])
        assert tracker.at_boundary == (i + 1 in (len(frame(b"z" * 300)), len(data)))


def test_no_boundary_inside_a_long_frame() -> None:
    data = frame(b"q" * 1000)
    tracker = FrameTracker()
    assert tracker.first_boundary(data[:500]) == 0  # the stream starts between frames
    tracker.feed(data[:500])
    assert tracker.first_boundary(data[500:900]) == -1
    assert not tracker.at_boundary
    assert tracker.first_boundary(data[900:]) == len(data) - 900


def test_close_frame_carries_the_code() -> None:
    assert close_frame() == b"\x88\x02\x03\xe9"
    assert close_frame(1012, b"restart") == b"\x88\x09\x03\xf4restart"
