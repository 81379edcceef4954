"""The shared sid table against a real ``redis-server``.

Redis listens on a Unix socket in a private directory (no port to race for),
except in the test of the TCP path, which binds a port the OS picked.
Servers are stopped, paused and killed by PID.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from stickyproxy.sidstore import SidStore, StoreAddress, parse_store_url

from .redis_server import REDIS, RedisServer, private_directory, running_redis

T = TypeVar("T")

pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server is not installed")

#: The longest wait for the store to notice a change in Redis's state. A
#: reconnection is tried at most every ``max_retry_delay`` (0.5 s here).
SETTLE_TIMEOUT = 10.0


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory whose path is short enough for a Unix socket's."""
    with private_directory("sidstore-") as path:
        yield path


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


@pytest.fixture
def stores() -> Iterator[Callable[..., SidStore]]:
    """Make started stores; each is stopped at teardown."""
    made: list[SidStore] = []

    def make(address: StoreAddress | str, **options: float | str) -> SidStore:
        if isinstance(address, str):
            address = parse_store_url(address)
        store = SidStore(address, reactor, **options)  # type: ignore[arg-type]
        made.append(store)
        store.start()
        return store

    yield make
    for store in made:
        pytest_twisted.blockon(store.stop())


async def eventually(condition: Callable[[], bool], timeout: float = SETTLE_TIMEOUT) -> None:
    """Let the reactor run until ``condition()`` holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition still false"
        await deferLater(reactor, 0.02, lambda: None)


def answered_at_once(d: Deferred[T]) -> T:
    """The result of a Deferred that must already have fired successfully."""
    results: list[T] = []
    d.addCallback(results.append)
    assert results, "the store kept the caller waiting"
    return results[0]


async def connected(store: SidStore) -> SidStore:
    await eventually(lambda: store.connected)
    return store


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_a_written_session_is_read_back(
    redis: RedisServer, stores: Callable[..., SidStore]
) -> None:
    store = await connected(stores(redis.url))
    assert await store.put("abcDEF123-_", "s2", 30) is True
    assert await store.get("abcDEF123-_") == "s2"
    assert (store.writes, store.hits, store.errors, store.timeouts) == (1, 1, 0, 0)


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_an_unknown_sid_is_a_miss(
    redis: RedisServer, stores: Callable[..., SidStore]
) -> None:
    store = await connected(stores(redis.url))
    assert await store.get("never-written") is None
    assert (store.misses, store.hits, store.errors) == (1, 0, 0)


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_keys_carry_the_prefix_and_a_whole_second_expiry(
    redis: RedisServer, stores: Callable[..., SidStore]
) -> None:
    store = await connected(stores(redis.url, key_prefix="fleet1:"))
    assert await store.put("sid1", "s1", 2.2)
    assert redis.command("GET", "fleet1:sid1") == "s1"
    assert redis.command("TTL", "fleet1:sid1") in (3, 2)


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_redis_expires_a_session_after_its_ttl(
    redis: RedisServer, stores: Callable[..., SidStore]
) -> None:
    store = await connected(stores(redis.url))
    assert await store.put("short-lived", "s1", 1)
    assert await store.get("short-lived") == "s1"
    gone: list[str | None] = ["s1"]

    async def poll() -> bool:
        gone[0] = await store.get("short-lived")
        return gone[0] is None

    deadline = time.monotonic() + 5
    while not await poll():
        assert time.monotonic() < deadline, "the key outlived its ttl"
        await deferLater(reactor, 0.1, lambda: None)


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_two_proxies_see_each_others_writes_touches_and_forgets(
    redis: RedisServer, stores: Callable[..., SidStore]
) -> None:
    one = await connected(stores(redis.url))
    two = await connected(stores(redis.url))
    assert await one.put("shared", "s3", 5)
    assert await two.get("shared") == "s3"

    two.touch("shared", 100)
    await eventually(lambda: redis.integer("TTL", "stickyproxy:sid:shared") > 5)

    one.forget("shared")
    await eventually(lambda: redis.integer("EXISTS", "stickyproxy:sid:shared") == 0)
    assert await two.get("shared") is None


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_the_database_in_the_url_is_selected(
    redis: RedisServer, stores: Callable[..., SidStore]
) -> None:
    store = await connected(stores(redis.database_url(3)))
    assert await store.put("in-db-3", "s1", 30)
    assert redis.integer("EXISTS", "stickyproxy:sid:in-db-3") == 0
    other = await connected(stores(redis.database_url(3)))
    assert await other.get("in-db-3") == "s1"


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_a_database_redis_does_not_have_leaves_the_store_down(
    redis: RedisServer, stores: Callable[..., SidStore]
) -> None:
    store = stores(redis.database_url(999))
    await eventually(lambda: store.connect_failures >= 2)
    assert not store.connected
    assert answered_at_once(store.put("x", "s1", 5)) is False


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_it_works_over_tcp(stores: Callable[..., SidStore]) -> None:
    with running_redis(tcp=True) as server:
        store = await connected(stores(server.database_url(1)))
        assert await store.put("over-tcp", "s2", 30)
        assert await store.get("over-tcp") == "s2"


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_a_killed_redis_is_answered_for_at_once_until_it_is_back(
    redis: RedisServer, stores: Callable[..., SidStore]
) -> None:
    store = await connected(stores(redis.url, max_retry_delay=0.5))
    assert await store.put("before", "s1", 60)

    redis.kill()
    await eventually(lambda: not store.connected)
    assert answered_at_once(store.get("before")) is None
    assert answered_at_once(store.put("during", "s2", 60)) is False
    assert store.errors == 2

    redis.start()
    await connected(store)
    assert await store.put("after", "s3", 60)
    assert await store.get("after") == "s3"
    # Redis kept nothing across the restart (no persistence).
    assert await store.get("before") is None


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_a_redis_that_stops_answering_times_out_and_is_dropped(
    redis: RedisServer, stores: Callable[..., SidStore]
) -> None:
    store = await connected(stores(redis.url, timeout=0.2, max_retry_delay=0.5))
    redis.signal(signal.SIGSTOP)
    try:
        put, get = store.put("frozen", "s1", 60), store.get("frozen")
        assert await put is False
        assert await get is None
        # The first timeout drops the connection, which may fail the other
        # command before its own timer fires.
        assert store.timeouts >= 1
        assert store.timeouts + store.errors == 2
        await eventually(lambda: not store.connected)
        assert answered_at_once(store.get("frozen")) is None
    finally:
        redis.signal(signal.SIGCONT)
    await connected(store)
    assert await store.put("thawed", "s1", 60)


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_a_store_where_nothing_listens_answers_at_once(
    workdir: Path, stores: Callable[..., SidStore]
) -> None:
    # A bound socket that does not listen: connections to it are refused, and
    # nobody else can take its port while the test runs.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        tcp = stores(f"redis://127.0.0.1:{port}")
        unix = stores(f"unix://{workdir}/nothing.sock")
        for store in (tcp, unix):
            assert answered_at_once(store.put("x", "s1", 5)) is False
            assert answered_at_once(store.get("x")) is None
        await eventually(lambda: tcp.connect_failures >= 2 and unix.connect_failures >= 2)
        for store in (tcp, unix):
            assert not store.connected
            assert answered_at_once(store.get("x")) is None
            store.touch("x", 5)
            store.forget("x")
            assert store.errors == 5


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_the_proxy_connects_its_store_and_a_reload_replaces_or_drops_it(
    redis: RedisServer,
) -> None:
    from stickyproxy.config import parse_config
    from stickyproxy.service import StickyProxy

    base = (
        "[proxy]\nlisten = tcp:0:interface=127.0.0.1\nproxy_protocol = off\n"
        "[server s1]\naddress = 127.0.0.1:9\ncheck = false\n"
    )
    with_store = parse_config(f"{base}[engineio]\nsid_store = {redis.database_url(0)}\n")
    proxy = StickyProxy(with_store, reactor)
    await proxy.start()
    try:
        first = proxy.context.store
        assert first is not None
        await eventually(lambda: first.connected)  # type: ignore[attr-defined]
        assert proxy.snapshot()["engineio"]["store"]["connected"] is True
        # The same store survives a reload that keeps it.
        await proxy.reload(with_store)
        assert proxy.context.store is first
        # Another database: a new connection; the old one is closed.
        other = parse_config(f"{base}[engineio]\nsid_store = {redis.database_url(1)}\n")
        await proxy.reload(other)
        second = proxy.context.store
        assert second is not None and second is not first
        assert not first.connected  # type: ignore[attr-defined]
        await eventually(lambda: second.connected)  # type: ignore[attr-defined]
        # No store at all.
        await proxy.reload(parse_config(base))
        assert proxy.context.store is None
        assert proxy.snapshot()["engineio"]["store"] is None
    finally:
        await proxy.stop(grace=0, spread=0)
