"""Health checks: the checker reports outcomes; the pool applies rise/fall.

The backend is a twisted.web resource served in memory by treq's StubTreq, so
the test decides every status code and no socket is opened. The HTTP/1.0
client runs on a memory reactor, with the bytes on the wire in the test's
hands. Time is a :class:`~twisted.internet.task.Clock`.
"""

# Twisted's testing helpers (MemoryReactorClock, StringTransport, Failure)
# have no type annotations.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request

from stickyproxy.config import parse_config
from stickyproxy.health import (
    HealthChecker,
    HTTP10Client,
    HTTP10Exchange,
    HTTP10Response,
    InvalidResponseError,
    default_http_client,
    log_transition,
)
from stickyproxy.pool import Pool, State
from tests.helpers import splits

CONFIG = """
[health]
path = /status?all=1
interval = 10s
timeout = 5s
rise = 1
fall = 3

[server s1]
address = 127.0.0.1:8081

[server s2]
address = 127.0.0.1:8082
check = false
"""


def config_text(**health: str) -> str:
    """``CONFIG`` with ``[health]`` keys added or replaced."""
    lines = [
        line
        for line in CONFIG.splitlines()
        if line.partition(" =")[0] not in health or line.startswith("address")
    ]
    at = lines.index("[health]") + 1
    lines[at:at] = [f"{key} = {value}" for key, value in health.items()]
    return "\n".join(lines) + "\n"


class StatusResource(Resource):
    """Answers every request with ``code`` and remembers what it was asked, and when."""

    isLeaf = True

    def __init__(self, clock: Clock | None = None) -> None:
        super().__init__()
        self.code = 200
        self.clock = clock
        self.seen: list[tuple[bytes, bytes]] = []
        self.hosts: list[bytes | None] = []
        self.times: list[float] = []

    def render(self, request: Request) -> bytes:
        self.seen.append((request.method, request.uri))
        self.hosts.append(request.getHeader(b"host"))
        if self.clock is not None:
            self.times.append(self.clock.seconds())
        request.setResponseCode(self.code)
        return b"status"


class Pending:
    """A client whose checks stay unanswered until the test answers them."""

    def __init__(self) -> None:
        self.calls: list[Deferred[Any]] = []
        self.cancelled = 0

    def get(self, url: str, **kwargs: Any) -> Deferred[Any]:
        def cancel(_: Deferred[Any]) -> None:
            self.cancelled += 1

        d: Deferred[Any] = Deferred(cancel)
        self.calls.append(d)
        return d


class Answer:
    """A response as treq gives it: a code, then the body."""

    def __init__(self, code: int) -> None:
        self.code = code

    def content(self) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        d.callback(b"")
        return d


def make(
    resource: Resource | None = None,
    client: Any = None,
    text: str = CONFIG,
    clock: Clock | None = None,
) -> tuple[Pool, HealthChecker, Clock]:
    config = parse_config(text)
    pool = Pool(config.servers, config.health, config.balance)
    clock = clock if clock is not None else Clock()
    checker = HealthChecker(
        pool, config.health, clock, client=client if client is not None else StubTreq(resource)
    )
    return pool, checker, clock


@pytest.fixture
def timed() -> Iterator[tuple[Pool, HealthChecker, Clock, StatusResource]]:
    """interval 10s, fastinter 2s, downinter 30s, rise 2, fall 3; all checks timed."""
    clock = Clock()
    resource = StatusResource(clock)
    text = config_text(fastinter="2s", downinter="30s", rise="2")
    pool, checker, _ = make(resource, text=text, clock=clock)
    yield pool, checker, clock, resource
    checker.stop()


# -- what a check sends and how it is judged -----------------------------------------


def test_checks_get_the_configured_path_of_checked_servers_only() -> None:
    resource = StatusResource()
    pool, checker, clock = make(resource)
    checker.start()
    assert resource.seen == [(b"GET", b"/status?all=1")]
    clock.advance(10)
    assert len(resource.seen) == 2
    assert pool.servers["s1"].last_check == "HTTP 200"
    assert pool.servers["s2"].last_check is None
    checker.stop()


@pytest.mark.parametrize(
    ("expect", "code", "up"),
    [
        (None, 200, True),
        (None, 204, True),
        (None, 302, True),
        (None, 399, True),
        (None, 400, False),
        (None, 404, False),
        (None, 503, False),
        ("200,204,300-399", 204, True),
        ("200,204,300-399", 201, False),
        ("200,204,300-399", 301, True),
        ("404", 404, True),
        ("404", 200, False),
    ],
)
def test_statuses_listed_in_expect_status_pass_and_others_fail(
    expect: str | None, code: int, up: bool
) -> None:
    resource = StatusResource()
    resource.code = code
    text = CONFIG if expect is None else config_text(expect_status=expect)
    pool, checker, _ = make(resource, text=text)
    checker.start()
    # At start-up one failure is enough to mark a server DOWN, as HAProxy.
    assert (pool.servers["s1"].state is State.UP) is up
    assert pool.servers["s1"].last_check == f"HTTP {code}"
    checker.stop()


def test_fall_3_takes_three_failures_one_interval_apart_and_rise_1_one_pass() -> None:
    resource = StatusResource()
    pool, checker, clock = make(resource)
    checker.start()
    resource.code = 503
    statuses = []
    for _ in range(3):
        clock.advance(10)
        statuses.append(pool.servers["s1"].status)
    assert statuses == ["UP 2/3", "UP 1/3", "DOWN"]
    resource.code = 200
    clock.advance(10)
    assert pool.servers["s1"].state is State.UP
    checker.stop()


def test_a_connection_error_is_a_failed_check() -> None:
    class Refusing:
        def get(self, url: str, **kwargs: Any) -> Deferred[Any]:
            return fail(ConnectionRefusedError("refused"))

    pool, checker, _ = make(client=Refusing())
    checker.start()
    server = pool.servers["s1"]
    assert server.state is State.DOWN
    assert server.last_check is not None and "refused" in server.last_check
    checker.stop()


def test_no_answer_within_timeout_fails_and_cancels_the_request() -> None:
    client = Pending()
    pool, checker, clock = make(client=client)
    checker.start()
    clock.advance(4.9)
    assert pool.servers["s1"].status == "UP 1/3"  # not judged yet
    clock.advance(0.1)
    assert pool.servers["s1"].status == "DOWN"
    assert pool.servers["s1"].last_check == "timeout"
    assert client.cancelled == 1
    checker.stop()


def test_a_slow_body_counts_against_the_timeout() -> None:
    body: Deferred[bytes] = Deferred()

    class SlowBody:
        code = 200

        def content(self) -> Deferred[bytes]:
            return body

    client = Pending()
    pool, checker, clock = make(client=client)
    checker.start()
    client.calls[0].callback(SlowBody())
    clock.advance(5)
    assert pool.servers["s1"].last_check == "timeout"
    assert pool.servers["s1"].state is State.DOWN
    checker.stop()


def test_the_check_url_brackets_ipv6_addresses() -> None:
    urls: list[str] = []

    class Recording:
        def get(self, url: str, **kwargs: Any) -> Deferred[Any]:
            urls.append(url)
            return Deferred()

    _, checker, _ = make(client=Recording(), text=CONFIG.replace("127.0.0.1:8081", "[::1]:8081"))
    checker.start()
    assert urls == ["http://[::1]:8081/status?all=1"]
    checker.stop()


def test_http_1_1_names_the_server_in_host_by_default() -> None:
    resource = StatusResource()
    _, checker, _ = make(resource)
    checker.start()
    assert resource.hosts == [b"127.0.0.1:8081"]
    checker.stop()


def test_the_host_key_replaces_the_host_header() -> None:
    resource = StatusResource()
    _, checker, _ = make(resource, text=config_text(host="editor.example.com"))
    checker.start()
    assert resource.hosts == [b"editor.example.com"]
    checker.stop()


# -- scheduling ------------------------------------------------------------------------


def test_intervals_follow_health_interval_fastinter_downinter(
    timed: tuple[Pool, HealthChecker, Clock, StatusResource],
) -> None:
    """HAProxy's srv_getinter: UP 100% inter, going up/down fastinter, DOWN 100% downinter."""
    pool, checker, clock, resource = timed
    checker.start()  # t=0: health rise=2 of 0..4 → pass → top (UP): next in 10s
    clock.advance(10)
    resource.code = 503
    clock.advance(10)  # t=20: fail → UP 2/3: next in 2s
    assert pool.servers["s1"].status == "UP 2/3"
    clock.advance(2)  # t=22: fail → UP 1/3: next in 2s
    assert pool.servers["s1"].status == "UP 1/3"
    clock.advance(2)  # t=24: fail → below rise → DOWN: next in 30s
    assert pool.servers["s1"].status == "DOWN"
    resource.code = 200
    clock.advance(30)  # t=54: pass → DOWN 1/2: next in 2s
    assert pool.servers["s1"].status == "DOWN 1/2"
    clock.advance(2)  # t=56: pass → UP: next in 10s
    assert pool.servers["s1"].status == "UP"
    clock.advance(10)
    assert resource.times == [0, 10, 20, 22, 24, 54, 56, 66]


def test_fastinter_and_downinter_default_to_interval() -> None:
    clock = Clock()
    resource = StatusResource(clock)
    resource.code = 503
    _, checker, _ = make(resource, text=config_text(rise="2", fall="2"), clock=clock)
    checker.start()
    for _ in range(3):
        clock.advance(10)
    assert resource.times == [0, 10, 20, 30]
    checker.stop()


def test_never_two_checks_of_one_server_at_once() -> None:
    client = Pending()
    _, checker, clock = make(client=client, text=config_text(interval="1s"))
    checker.start()
    clock.advance(3)
    assert len(client.calls) == 1  # still waiting for the answer (timeout 5s)
    client.calls[0].callback(Answer(200))
    assert len(client.calls) == 1
    clock.advance(1)  # the next check comes one interval after the end of the last
    assert len(client.calls) == 2
    checker.stop()


def test_a_server_in_maintenance_is_not_checked(
    timed: tuple[Pool, HealthChecker, Clock, StatusResource],
) -> None:
    pool, checker, clock, resource = timed
    checker.start()
    pool.set_admin("s1", "maint")
    clock.advance(60)
    assert len(resource.seen) == 1
    assert pool.servers["s1"].state is State.MAINT


def test_leaving_maintenance_is_checked_within_fastinter_and_one_failure_takes_it_down(
    timed: tuple[Pool, HealthChecker, Clock, StatusResource],
) -> None:
    """Case 54: after MAINT health restarts at rise, so the first failure is enough."""
    pool, checker, clock, resource = timed
    checker.start()
    pool.set_admin("s1", "maint")
    clock.advance(15)  # t=15; the next check would be at t=20
    resource.code = 503
    pool.set_admin("s1", "ready")
    assert pool.servers["s1"].status == "UP 1/3"
    clock.advance(2)  # fastinter: t=17
    assert pool.servers["s1"].status == "DOWN"
    assert resource.times == [0, 17]


def test_a_state_change_seen_in_traffic_brings_the_next_check_forward(
    timed: tuple[Pool, HealthChecker, Clock, StatusResource],
) -> None:
    pool, checker, clock, resource = timed
    checker.start()  # UP at the top: next check at t=10
    clock.advance(1)
    for _ in range(3):
        pool.observe_connect_failure("s1", clock.seconds(), "connection refused")
    assert pool.servers["s1"].state is State.DOWN
    clock.advance(30)  # downinter from t=1
    assert resource.times == [0, 31]
    assert pool.servers["s1"].status == "DOWN 1/2"


def test_stop_cancels_checks_in_flight_and_records_nothing() -> None:
    client = Pending()
    pool, checker, clock = make(client=client)
    checker.start()
    checker.stop()
    assert client.cancelled == 1
    assert clock.getDelayedCalls() == []
    assert pool.servers["s1"].last_check is None
    assert pool.servers["s1"].state is State.UP


def test_stop_cancels_the_pending_check() -> None:
    resource = StatusResource()
    _, checker, clock = make(resource)
    checker.start()
    checker.stop()
    clock.advance(100)
    assert len(resource.seen) == 1


def test_every_state_change_is_logged_with_its_reason() -> None:
    resource = StatusResource()
    resource.code = 503
    pool, checker, _ = make(resource)
    pool.add_listener(log_transition)
    with capturedLogs() as events:
        checker.start()
        pool.set_admin("s1", "ready")
    assert [e["reason"] for e in events if "reason" in e] == ["health check failed: HTTP 503"]
    assert events[0]["server"] == "s1"
    assert (events[0]["old"], events[0]["new"]) == ("UP", "DOWN")
    checker.stop()


# -- HTTP/1.0 ----------------------------------------------------------------------------


def test_default_client_follows_http_version() -> None:
    assert isinstance(default_http_client(Clock(), "1.0"), HTTP10Client)
    assert not isinstance(default_http_client(MemoryReactorClock(), "1.1"), HTTP10Client)


def connect(reactor: MemoryReactorClock, index: int = 0) -> tuple[Any, StringTransport]:
    """Complete the ``index``-th TCP connection attempt made on ``reactor``."""
    factory: Any = reactor.tcpClients[index][2]
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


@pytest.mark.parametrize(
    ("host", "request_bytes"),
    [
        (None, b"GET /status?all=1 HTTP/1.0\r\n\r\n"),
        ("editor", b"GET /status?all=1 HTTP/1.0\r\nHost: editor\r\n\r\n"),
    ],
)
def test_http_1_0_sends_haproxys_request_and_host_only_when_configured(
    host: str | None, request_bytes: bytes
) -> None:
    """Case 51: HAProxy's httpchk request is exactly GET ... HTTP/1.0 and a blank line."""
    reactor = MemoryReactorClock()
    text = config_text(http_version="1.0", **({} if host is None else {"host": host}))
    config = parse_config(text)
    pool = Pool(config.servers, config.health, config.balance)
    checker = HealthChecker(pool, config.health, reactor)
    checker.start()
    assert [(h, p) for h, p, *_ in reactor.tcpClients] == [("127.0.0.1", 8081)]
    protocol, transport = connect(reactor)
    assert transport.value() == request_bytes
    protocol.dataReceived(b"HTTP/1.0 503 Service Unavailable\r\n\r\ndown")
    # Not judged yet (health still at rise, 1 of 0..3): the body is read to the end first.
    assert pool.servers["s1"].status == "UP 1/3"
    protocol.connectionLost(Failure(ConnectionDone()))
    assert pool.servers["s1"].status == "DOWN"
    assert pool.servers["s1"].last_check == "HTTP 503"
    checker.stop()


def test_http_1_0_checks_time_out_and_close_the_connection() -> None:
    reactor = MemoryReactorClock()
    config = parse_config(config_text(http_version="1.0"))
    pool = Pool(config.servers, config.health, config.balance)
    checker = HealthChecker(pool, config.health, reactor)
    checker.start()
    _, transport = connect(reactor)
    reactor.advance(5)
    assert transport.disconnected
    assert pool.servers["s1"].last_check == "timeout"
    checker.stop()


def exchange_results(chunks: list[bytes]) -> tuple[list[Any], StringTransport, HTTP10Exchange]:
    exchange = HTTP10Exchange(b"GET / HTTP/1.0\r\n\r\n")
    results: list[Any] = []
    exchange.response.addBoth(results.append)
    transport = StringTransport()
    exchange.makeConnection(transport)
    for chunk in chunks:
        exchange.dataReceived(chunk)
    return results, transport, exchange


@pytest.mark.parametrize(
    ("response", "code"),
    [
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", 200),
        (b"HTTP/1.1 302 Found\r\nLocation: /\r\n\r\n", 302),
        (b"HTTP/1.0 503\r\n\r\n", 503),
        (b"HTTP/1.0 204 \n\n", 204),
    ],
)
def test_http_1_0_status_line_is_read_in_any_pieces(response: bytes, code: int) -> None:
    for chunks in splits(response):
        results, _, exchange = exchange_results(chunks)
        assert len(results) == 1 and isinstance(results[0], HTTP10Response), chunks
        assert results[0].code == code
        done: list[bytes] = []
        results[0].content().addCallback(done.append)
        assert done == []
        exchange.connectionLost(Failure(ConnectionDone()))
        assert done == [b""]


@pytest.mark.parametrize(
    "response",
    [
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"HTTP/1.0 20 OK\r\n",
        b"HTTP/1.0 2000 OK\r\n",
        b"http/1.0 200\r\n",
    ],
)
def test_http_1_0_anything_but_a_status_line_fails_and_closes(response: bytes) -> None:
    for chunks in splits(response):
        results, transport, _ = exchange_results(chunks)
        assert len(results) == 1 and isinstance(results[0], Failure), chunks
        assert results[0].check(InvalidResponseError)
        assert transport.disconnected


def test_http_1_0_closed_before_a_status_line_fails() -> None:
    results, _, exchange = exchange_results([b"HTTP/1.0 2"])
    assert results == []
    exchange.connectionLost(Failure(ConnectionDone()))
    assert isinstance(results[0], Failure) and results[0].check(InvalidResponseError)


def test_http_1_0_endless_status_line_or_body_is_cut_off() -> None:
    results, transport, _ = exchange_results([b"HTTP/1.0 200 " + b"x" * 9000])
    assert isinstance(results[0], Failure) and transport.disconnected
    results, transport, _ = exchange_results([b"HTTP/1.0 200 OK\r\n\r\n", b"x" * 70000])
    assert isinstance(results[0], HTTP10Response) and transport.disconnected


def test_http_1_0_cancelling_closes_the_connection() -> None:
    reactor = MemoryReactorClock()
    response = HTTP10Client(reactor).get("http://[::1]:8081/status")
    assert reactor.tcpClients[0][:2] == ("::1", 8081)
    _, transport = connect(reactor)
    assert transport.value() == b"GET /status HTTP/1.0\r\n\r\n"
    response.addErrback(lambda _: None)
    response.cancel()
    assert transport.disconnected
