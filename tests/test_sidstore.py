# mypy: disallow-untyped-calls=False
# (twisted.internet.testing and Failure are not annotated yet.)
"""The shared sid table's client, on a fake reactor and an in-memory Redis.

Every timer runs on :class:`MemoryReactorClock`, so timeouts and backoff are
driven by advancing the clock, never by waiting. The integration suite runs
the same client against a real ``redis-server``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, capturedLogs, formatEvent
from twisted.python.failure import Failure

from stickyproxy.sidstore import SidStore, StoreAddress, parse_store_url
from tests.helpers import bulk, resp, splits

T = TypeVar("T")

ADDRESS = parse_store_url("redis://127.0.0.1:6379/2")


class FakeRedis:
    """The server end of the store's latest connection attempt."""

    def __init__(self, clock: MemoryReactorClock) -> None:
        self.clock = clock
        host, port, factory, _timeout, _bind = clock.tcpClients[-1]
        self.factory = factory
        self.protocol: Any = factory.buildProtocol(IPv4Address("TCP", host, port))
        assert self.protocol is not None
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def sent(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return bytes(data)

    def reply(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.protocol.dataReceived(chunk)
            # The client resumes parsing after a bulk reply on a timer.
            self.clock.advance(0)

    def lose(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


def refuse(clock: MemoryReactorClock) -> None:
    """Fail the store's latest connection attempt."""
    connector = clock.connectors[-1]
    _host, _port, factory, _timeout, _bind = clock.tcpClients[-1]
    factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))


def fired(d: Deferred[T]) -> T:
    """The result of a Deferred that has already fired successfully."""
    results: list[T] = []
    d.addCallback(results.append)
    assert results, "still waiting"
    return results[0]


def pending_delays(clock: MemoryReactorClock) -> list[float]:
    return [call.getTime() - clock.seconds() for call in clock.getDelayedCalls()]


#: Delays are read back as differences of clock times, a few ulps off.
EPSILON = 1e-9


@pytest.fixture
def clock() -> MemoryReactorClock:
    return MemoryReactorClock()


@pytest.fixture
def store(clock: MemoryReactorClock) -> Iterator[SidStore]:
    store = SidStore(ADDRESS, clock, timeout=0.25, max_retry_delay=2.0)
    store.start()
    yield store
    store.stop()


@pytest.fixture
def redis(clock: MemoryReactorClock, store: SidStore) -> FakeRedis:
    """A connected store: its database selected."""
    server = FakeRedis(clock)
    assert server.sent() == resp("SELECT", "2")
    server.reply(b"+OK\r\n")
    assert store.connected
    return server


# -- connecting ------------------------------------------------------------------------------


def test_it_connects_to_the_address_and_selects_the_database_first(
    clock: MemoryReactorClock, store: SidStore
) -> None:
    assert clock.tcpClients[0][:2] == ("127.0.0.1", 6379)
    server = FakeRedis(clock)
    assert server.sent() == resp("SELECT", "2")
    assert not store.connected
    server.reply(b"+OK\r\n")
    assert store.connected


def test_a_refused_select_leaves_the_store_down_and_retrying(
    clock: MemoryReactorClock, store: SidStore
) -> None:
    server = FakeRedis(clock)
    server.reply(b"-ERR DB index is out of range\r\n")
    assert not store.connected
    assert server.transport.disconnecting
    assert store.connect_failures == 1
    assert len(pending_delays(clock)) == 1


def test_a_peer_that_never_answers_select_is_given_up_on(
    clock: MemoryReactorClock, store: SidStore
) -> None:
    server = FakeRedis(clock)
    clock.advance(1.0)
    assert server.transport.disconnecting
    assert store.connect_failures == 1


def test_operations_answer_at_once_while_not_connected(
    clock: MemoryReactorClock, store: SidStore
) -> None:
    assert fired(store.put("sid1", "s1", 10)) is False
    assert fired(store.get("sid1")) is None
    store.touch("sid1", 10)
    store.forget("sid1")
    assert store.errors == 4
    assert (store.timeouts, store.hits, store.misses, store.writes) == (0, 0, 0, 0)
    assert clock.getDelayedCalls() == []


def test_failed_attempts_are_retried_with_growing_capped_delays(
    clock: MemoryReactorClock, store: SidStore
) -> None:
    delays = []
    for _ in range(8):
        refuse(clock)
        [delay] = pending_delays(clock)
        delays.append(delay)
        clock.advance(delay)
    assert len(clock.tcpClients) == 9
    assert delays[0] <= 0.1 + EPSILON
    assert all(0 < delay <= 2.0 + EPSILON for delay in delays)
    # Jitter takes at most half of a delay, which doubles after each failure.
    assert delays[-1] >= 1.0 - EPSILON
    assert store.connect_failures == 8


def test_a_connection_that_lasted_resets_the_backoff(
    clock: MemoryReactorClock, store: SidStore
) -> None:
    for _ in range(6):
        refuse(clock)
        clock.advance(pending_delays(clock)[0])
    server = FakeRedis(clock)
    server.reply(b"+OK\r\n")
    clock.advance(store.max_retry_delay + 1)
    server.lose()
    assert not store.connected
    [delay] = pending_delays(clock)
    assert delay <= 0.1 + EPSILON


def test_a_connection_dropped_at_once_keeps_backing_off(
    clock: MemoryReactorClock, store: SidStore
) -> None:
    delays = []
    for _ in range(8):
        server = FakeRedis(clock)
        server.reply(b"+OK\r\n")
        server.lose()
        [delay] = pending_delays(clock)
        delays.append(delay)
        clock.advance(delay)
    assert delays[-1] >= 1.0 - EPSILON


def test_stop_closes_the_connection_and_leaves_no_timer(
    clock: MemoryReactorClock, store: SidStore, redis: FakeRedis
) -> None:
    put = store.put("sid1", "s1", 10)
    stopped = store.stop()
    assert redis.transport.disconnecting
    assert not stopped.called
    redis.lose()
    assert fired(stopped) is None
    assert fired(put) is False
    assert clock.getDelayedCalls() == []
    assert len(clock.tcpClients) == 1


def test_stop_while_waiting_to_retry_cancels_the_retry(
    clock: MemoryReactorClock, store: SidStore
) -> None:
    refuse(clock)
    assert fired(store.stop()) is None
    assert clock.getDelayedCalls() == []


def test_stop_during_an_attempt_abandons_it(clock: MemoryReactorClock, store: SidStore) -> None:
    assert fired(store.stop()) is None
    assert clock.connectors[0].stoppedConnecting
    assert clock.getDelayedCalls() == []


def test_stop_while_select_is_pending_closes_that_connection(
    clock: MemoryReactorClock, store: SidStore
) -> None:
    server = FakeRedis(clock)
    fired(store.stop())
    assert server.transport.disconnecting
    assert clock.getDelayedCalls() == []


# -- operations ------------------------------------------------------------------------------


@pytest.mark.parametrize(("ttl", "seconds"), [(0.2, "1"), (1, "1"), (2.01, "3"), (30.0, "30")])
def test_put_sets_the_prefixed_key_with_whole_seconds_of_expiry(
    store: SidStore, redis: FakeRedis, ttl: float, seconds: str
) -> None:
    put = store.put("abc", "s1", ttl)
    assert redis.sent() == resp("SET", "stickyproxy:sid:abc", "s1", "EX", seconds)
    redis.reply(b"+OK\r\n")
    assert fired(put) is True
    assert store.writes == 1


@pytest.mark.parametrize("ttl", [math.nan, math.inf, -math.inf])
def test_a_ttl_that_is_not_a_number_of_seconds_is_refused(store: SidStore, ttl: float) -> None:
    with pytest.raises(ValueError, match="ttl must be a finite number"):
        store.put("abc", "s1", ttl)
    with pytest.raises(ValueError, match="ttl must be a finite number"):
        store.touch("abc", ttl)


@pytest.mark.parametrize("chunks", list(splits(b"$2\r\ns1\r\n")))
def test_get_reads_the_server_name_however_the_reply_is_cut(
    store: SidStore, redis: FakeRedis, chunks: list[bytes]
) -> None:
    got = store.get("abc")
    assert redis.sent() == resp("GET", "stickyproxy:sid:abc")
    redis.reply(*chunks)
    assert fired(got) == "s1"
    assert (store.hits, store.misses) == (1, 0)


def test_a_numeric_server_name_stays_a_string(store: SidStore, redis: FakeRedis) -> None:
    got = store.get("abc")
    redis.reply(b"$2\r\n10\r\n")
    assert fired(got) == "10"


def test_a_null_reply_is_a_miss(store: SidStore, redis: FakeRedis) -> None:
    got = store.get("abc")
    redis.reply(b"$-1\r\n")
    assert fired(got) is None
    assert (store.hits, store.misses, store.errors) == (0, 1, 0)


def test_a_value_that_is_not_utf8_is_not_a_server_name(store: SidStore, redis: FakeRedis) -> None:
    got = store.get("abc")
    redis.reply(b"$2\r\n\xff\xfe\r\n")
    assert fired(got) is None
    assert (store.hits, store.misses, store.errors) == (0, 0, 1)


def test_error_replies_are_counted_and_answered_false_or_none(
    store: SidStore, redis: FakeRedis
) -> None:
    put, got = store.put("abc", "s1", 5), store.get("abc")
    redis.reply(b"-OOM command not allowed\r\n", b"-WRONGTYPE wrong kind of value\r\n")
    assert fired(put) is False
    assert fired(got) is None
    assert store.errors == 2
    assert store.connected


def test_touch_extends_the_expiry_and_forget_deletes(store: SidStore, redis: FakeRedis) -> None:
    store.touch("abc", 59.5)
    store.forget("abc")
    assert redis.sent() == resp("EXPIRE", "stickyproxy:sid:abc", "60") + resp(
        "DEL", "stickyproxy:sid:abc"
    )
    redis.reply(b":1\r\n:1\r\n")
    assert store.errors == 0


def test_the_key_prefix_is_configurable(clock: MemoryReactorClock) -> None:
    store = SidStore(ADDRESS, clock, key_prefix="fleet-a/")
    store.start()
    server = FakeRedis(clock)
    server.reply(b"+OK\r\n")
    server.sent()
    store.get("abc")
    assert server.sent() == resp("GET", "fleet-a/abc")


@given(
    st.lists(
        st.none() | st.text("abcxyz0123456789-_.", min_size=1, max_size=12),
        min_size=1,
        max_size=6,
    ),
    st.data(),
)
def test_pipelined_replies_cut_anywhere_reach_their_own_callers(
    names: list[str | None], data: st.DataObject
) -> None:
    clock = MemoryReactorClock()
    store = SidStore(ADDRESS, clock)
    store.start()
    server = FakeRedis(clock)
    server.reply(b"+OK\r\n")
    gets = [store.get(f"sid{i}") for i in range(len(names))]
    stream = b"".join(bulk(name) for name in names)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=8)))
    bounds = [0, *cuts, len(stream)]
    server.reply(*(stream[a:b] for a, b in itertools.pairwise(bounds)))
    assert [fired(d) for d in gets] == names
    assert store.hits + store.misses == len(names)


# -- failures --------------------------------------------------------------------------------


def test_a_slow_reply_times_out_and_the_connection_is_dropped(
    clock: MemoryReactorClock, store: SidStore, redis: FakeRedis
) -> None:
    put = store.put("abc", "s1", 5)
    clock.advance(0.249)
    assert not put.called
    clock.advance(0.001)
    assert fired(put) is False
    assert store.timeouts == 1
    assert redis.transport.disconnecting
    # The reply turns up after all: it is ignored.
    redis.reply(b"+OK\r\n")
    assert store.writes == 0
    redis.lose()
    assert not store.connected
    assert store.errors == 0
    assert len(pending_delays(clock)) == 1


def test_a_reply_in_time_cancels_its_timer(
    clock: MemoryReactorClock, store: SidStore, redis: FakeRedis
) -> None:
    put = store.put("abc", "s1", 5)
    redis.reply(b"+OK\r\n")
    assert fired(put) is True
    assert clock.getDelayedCalls() == []


def test_a_lost_connection_fails_commands_in_flight_and_reconnects(
    clock: MemoryReactorClock, store: SidStore, redis: FakeRedis
) -> None:
    put, got = store.put("abc", "s1", 5), store.get("abc")
    redis.lose()
    assert fired(put) is False
    assert fired(got) is None
    assert store.errors == 2
    assert not store.connected
    [delay] = pending_delays(clock)
    clock.advance(delay)
    assert len(clock.tcpClients) == 2
    again = FakeRedis(clock)
    again.reply(b"+OK\r\n")
    assert store.connected


def test_state_changes_are_logged_once_each_and_sids_never(clock: MemoryReactorClock) -> None:
    sid = "Zm9vYmFyYmF6cXV4"
    store = SidStore(ADDRESS, clock)
    events: Sequence[LogEvent]
    with capturedLogs() as events:
        store.start()
        for _ in range(3):
            refuse(clock)
            clock.advance(pending_delays(clock)[0])
        server = FakeRedis(clock)
        server.reply(b"+OK\r\n")
        for _ in range(3):
            store.put(sid, "s1", 5)
            store.get(sid)
        clock.advance(1)
        server.lose()
        store.stop()
    texts = [formatEvent(event) for event in events]
    assert len(texts) == 3, texts
    assert "unavailable" in texts[0]
    assert "connected" in texts[1]
    assert "connection lost" in texts[2] or "no reply" in texts[2]
    assert all(sid not in text and sid[:8] not in text for text in texts)


def test_a_unix_address_needs_a_reactor_with_unix_sockets() -> None:
    with pytest.raises(TypeError, match="IReactorUNIX"):
        SidStore(parse_store_url("unix:///run/redis.sock"), Clock())
    with pytest.raises(TypeError, match="IReactorTCP"):
        SidStore(ADDRESS, Clock())


def test_a_unix_address_connects_to_its_path(clock: MemoryReactorClock) -> None:
    store = SidStore(parse_store_url("unix:///run/redis.sock?db=1"), clock)
    store.start()
    assert clock.unixClients[0][0] == "/run/redis.sock"
    store.stop()


def test_the_timeout_must_be_positive(clock: MemoryReactorClock) -> None:
    with pytest.raises(ValueError, match="timeout"):
        SidStore(ADDRESS, clock, timeout=0)


# -- URLs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", StoreAddress("tcp", host="127.0.0.1", port=6379, db=0)),
        ("redis://127.0.0.1:6380", StoreAddress("tcp", host="127.0.0.1", port=6380, db=0)),
        ("redis://cache.internal", StoreAddress("tcp", host="cache.internal", port=6379)),
        ("redis://cache.internal/", StoreAddress("tcp", host="cache.internal", port=6379)),
        ("REDIS://h:1/15", StoreAddress("tcp", host="h", port=1, db=15)),
        ("  redis://h:7000/3\n", StoreAddress("tcp", host="h", port=7000, db=3)),
        ("redis://[::1]:7000/2", StoreAddress("tcp", host="::1", port=7000, db=2)),
        ("redis://[2001:db8::1]", StoreAddress("tcp", host="2001:db8::1", port=6379)),
        ("unix:///run/redis.sock", StoreAddress("unix", path="/run/redis.sock")),
        ("unix:///run/redis.sock?db=4", StoreAddress("unix", path="/run/redis.sock", db=4)),
        ("unix:///tmp/a%20b.sock", StoreAddress("unix", path="/tmp/a b.sock")),
    ],
)
def test_store_urls_that_parse(url: str, expected: StoreAddress) -> None:
    address = parse_store_url(url)
    assert address == expected
    assert parse_store_url(str(address)) == address


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "scheme must be redis:// or unix://, not 'missing'"),
        ("127.0.0.1:6379", "scheme must be redis:// or unix://"),
        ("http://h:1", "not 'http'"),
        ("rediss://h:1", "TLS is not supported"),
        ("redis://", "host is missing"),
        ("redis://:6379", "host is missing"),
        ("redis://h:port", "port must be a number, not 'port'"),
        ("redis://h:", "port must be a number"),
        ("redis://h:0", "port 0 is out of range"),
        ("redis://h:70000", "port 70000 is out of range"),
        ("redis://user:secret@h:1", "credentials"),
        ("redis://h:1/x", "database must be a number, not 'x'"),
        ("redis://h:1/1/2", "database must be a number"),
        ("redis://h:1/-1", "database must be a number"),
        ("redis://h:1/99999999999", "database 99999999999 is out of range"),
        ("redis://h:1?db=2", "redis:// takes no query"),
        ("redis://h:1#top", "fragment"),
        ("redis://[::1", "not a valid URL"),
        ("redis://[::1]x", "unexpected 'x'"),
        ("redis://[cache]:1", "IPv6 address"),
        ("unix://host/run/redis.sock", "names no host"),
        ("unix:relative.sock", "not absolute"),
        ("unix:///", "missing or not absolute"),
        ("unix:///run/redis.sock?database=1", "unknown parameter 'database'"),
        ("unix:///run/redis.sock?db=1&db=2", "more than once"),
        ("unix:///run/redis.sock?db=x", "database must be a number"),
        ("unix:///run/redis.sock?db", "malformed query"),
    ],
)
def test_store_urls_that_do_not_parse_say_why(url: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_store_url(url)
    assert message in str(caught.value)
    assert repr(url.strip()) in str(caught.value)
