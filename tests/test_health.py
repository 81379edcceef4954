"""Health checks: the checker reports outcomes; the pool applies rise/fall.

The backend is a twisted.web resource served in memory by treq's StubTreq, so
the test decides every status code and no socket is opened.
"""

from __future__ import annotations

from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import Request

from stickyproxy.config import parse_config
from stickyproxy.health import HealthChecker
from stickyproxy.pool import Pool, State

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


class StatusResource(Resource):
    """Answers every request with ``code`` and remembers what it was asked."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.code = 200
        self.seen: list[tuple[bytes, bytes]] = []

    def render(self, request: Request) -> bytes:
        self.seen.append((request.method, request.uri))
        request.setResponseCode(self.code)
        return b"status"


def make(resource: Resource | None = None, client: Any = None) -> tuple[Pool, HealthChecker, Clock]:
    config = parse_config(CONFIG)
    pool = Pool(config.servers, config.health, config.balance)
    clock = Clock()
    checker = HealthChecker(
        pool, config.health, clock, client=client if client is not None else StubTreq(resource)
    )
    return pool, checker, clock


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


def test_2xx_and_3xx_pass_anything_else_fails() -> None:
    for code, up in ((200, True), (204, True), (302, True), (404, False), (503, False)):
        resource = StatusResource()
        resource.code = code
        pool, checker, _ = make(resource)
        checker.start()
        # At start-up one failure is enough to mark a server DOWN, as HAProxy.
        assert (pool.servers["s1"].state is State.UP) is up, code
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
        def get(self, url: str, timeout: float, allow_redirects: bool) -> Deferred[Any]:
            return fail(ConnectionRefusedError("refused"))

    pool, checker, _ = make(client=Refusing())
    checker.start()
    server = pool.servers["s1"]
    assert server.state is State.DOWN
    assert server.last_check is not None and "refused" in server.last_check
    checker.stop()


def test_the_check_url_brackets_ipv6_addresses() -> None:
    urls: list[str] = []

    class Recording:
        def get(self, url: str, timeout: float, allow_redirects: bool) -> Deferred[Any]:
            urls.append(url)
            return Deferred()

    config = parse_config(CONFIG.replace("127.0.0.1:8081", "[::1]:8081"))
    pool = Pool(config.servers, config.health, config.balance)
    HealthChecker(pool, config.health, Clock(), client=Recording()).start()
    assert urls == ["http://[::1]:8081/status?all=1"]
