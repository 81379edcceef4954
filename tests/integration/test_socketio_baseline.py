"""Cookie-less socket.io clients behind the seed's HAProxy setups: the baseline.

Real python-socketio backends (``sio_apps``) count every request they refuse
for an unknown ``sid``; real socket.io clients (``sio_clients``) keep no cookies.
What each setup shows:

- **Straight to one backend**: nothing is refused. The clients and the counting
  are sound, so any refusal below comes from the proxy in front.
- **The seed's second configuration** (``balance roundrobin`` + ``cookie
  storify_editor_host insert indirect nocache``): a client that keeps the
  cookie stays on its server; a client that keeps none is placed by round robin
  on every request, and its polls reach backends that never issued its sid.
- **The seed's first configuration** (``balance source`` behind a PROXY-protocol
  L4 balancer): sessions hold while the client's address is stable, and break
  when the address changes from one TCP connection to the next.
- **stickyproxy** behind the same rotating L4 balancer: routing engine.io
  requests by their ``sid`` keeps every cookie-less session on its server.
"""

from __future__ import annotations

import asyncio
import http.client
import json
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import requests

from .harness import Backend, Launcher, http_request, proxy_config
from .sio_apps import (
    COOKIE_NAME,
    FOREIGN_SID,
    foreign_sid_requests,
    is_unknown_session_answer,
    launch_haproxy,
    rotating_l4_backend,
    running_sio_backends,
    seed_cookie_backend,
    seed_source_backend,
)
from .sio_clients import (
    POLLING,
    POLLING_THEN_WEBSOCKET,
    LoadResult,
    assert_no_session_lost,
    cookieless_aiohttp_session,
    cookieless_async_client,
    cookieless_requests_session,
    run_load,
)

#: The backends' ping interval and timeout (ms): a held long poll, and so a
#: polling client's disconnection, lasts at most this long.
PING_MS = 2000

#: A load small enough for CI and large enough to misroute for sure: with three
#: backends and no stickiness, a polling session survives its connection only
#: with probability about 1/9, and each echo with about 1/9 again.
CLIENTS = 6
MESSAGES = 10

#: For the tests that run HAProxy: skipped where it is not installed.
needs_haproxy = pytest.mark.usefixtures("haproxy_binary")


@pytest.fixture(scope="module")
def sio_backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Backend]]:
    """Three socket.io backends, ``s1`` to ``s3``, shared by this module's tests."""
    with running_sio_backends(
        tmp_path_factory.mktemp("sio"), ping_interval_ms=PING_MS, ping_timeout_ms=PING_MS
    ) as backends:
        yield backends


def load(
    port: int,
    backends: Sequence[Backend],
    *,
    transports: Sequence[str],
    keep_cookies: bool = False,
) -> LoadResult:
    """:data:`CLIENTS` clients x :data:`MESSAGES` echoes through ``port``.

    The bound is generous: a load normally ends in a few seconds, and only a
    stuck one gets near it.
    """
    return run_load(
        f"http://127.0.0.1:{port}",
        clients=CLIENTS,
        messages=MESSAGES,
        transports=transports,
        timeout=30.0,
        backends=backends,
        keep_cookies=keep_cookies,
    )


# -- the instruments --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "unknown"),
    [
        (b'"Invalid session 7INZiSDkTTzfdGEfAAAA"', True),
        (b'"Invalid session None"', True),
        (b"\"'Session is disconnected' 7INZiSDkTTzfdGEfAAAA\"", True),
        (b'{"code":1,"message":"Session ID unknown"}', True),
        (b"Session ID unknown", True),
        (b'"Invalid transport"', False),
        (b'"Not connected"', False),
        (b'{"code":3,"message":"Bad request"}', False),
        (b"Bad Request", False),
        (b"", False),
    ],
)
def test_an_unknown_session_answer_is_recognised_by_its_body(body: bytes, unknown: bool) -> None:
    assert is_unknown_session_answer(400, body) is unknown
    assert is_unknown_session_answer(200, body) is False


def test_a_backend_counts_each_kind_of_request_for_a_sid_it_never_issued(
    sio_backends: list[Backend],
) -> None:
    backend = sio_backends[0]
    before = report(backend)
    get, post, upgrade = foreign_sid_requests(backend.port)
    for response in (get, post, upgrade):
        assert response.status == 400
        assert response.body == f'"Invalid session {FOREIGN_SID}"'.encode()
    after = report(backend)
    assert after["total"] == before["total"] + 3
    for kind in ("polling-get", "polling-post", "upgrade"):
        assert after["by_kind"][kind] == before["by_kind"][kind] + 1
    assert after["stale"] == before["stale"]


def report(backend: Backend) -> dict[str, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", backend.port, timeout=5)
    connection.request("GET", "/unknown-sessions")
    answer: dict[str, Any] = json.loads(connection.getresponse().read())
    connection.close()
    return answer


def test_a_backend_answers_the_health_check_and_names_itself_and_sets_no_cookie(
    sio_backends: list[Backend],
) -> None:
    backend = sio_backends[1]
    health = http_request(backend.port, "GET", "/status?all=1")
    assert (health.status, health.body) == (200, b"ok")
    assert http_request(backend.port, "GET", "/whoami").body == b"s2"
    handshake = http_request(backend.port, "GET", "/socket.io/?EIO=4&transport=polling")
    assert handshake.status == 200
    assert handshake.body.startswith(b'0{"sid":')
    assert handshake.headers.get("Set-Cookie") is None


@pytest.mark.parametrize("transports", [POLLING, POLLING_THEN_WEBSOCKET])
def test_cookieless_clients_straight_to_one_backend_lose_no_session(
    sio_backends: list[Backend], transports: tuple[str, ...]
) -> None:
    result = load(sio_backends[2].port, sio_backends, transports=transports)
    assert_no_session_lost(result)
    assert all(outcome.servers == {"s3"} for outcome in result.outcomes)


@needs_haproxy
def test_the_cookieless_session_neither_stores_nor_sends_the_persistence_cookie(
    launch: Launcher, sio_backends: list[Backend]
) -> None:
    seed = launch_haproxy(launch, seed_cookie_backend(sio_backends[:1]))
    session = cookieless_requests_session()
    first = session.get(f"http://127.0.0.1:{seed.port}/whoami", timeout=5)
    assert first.headers["Set-Cookie"] == f"{COOKIE_NAME}=s1; path=/"
    assert list(session.cookies) == []
    second = session.get(f"http://127.0.0.1:{seed.port}/whoami", timeout=5)
    assert "Cookie" not in second.request.headers
    # The control: an ordinary session keeps and returns it.
    ordinary = requests.Session()
    ordinary.get(f"http://127.0.0.1:{seed.port}/whoami", timeout=5)
    sent = ordinary.get(f"http://127.0.0.1:{seed.port}/whoami", timeout=5).request.headers
    assert sent["Cookie"] == f"{COOKIE_NAME}=s1"


@needs_haproxy
def test_the_asyncio_client_keeps_no_cookie_and_is_answered(
    launch: Launcher, sio_backends: list[Backend]
) -> None:
    seed = launch_haproxy(launch, seed_cookie_backend(sio_backends[:1]))

    async def session() -> tuple[object, int]:
        async with cookieless_aiohttp_session() as http_session:
            client = cookieless_async_client(http_session)
            await client.connect(f"http://127.0.0.1:{seed.port}", transports=list(POLLING))
            try:
                reply = await client.call("echo", "hi", timeout=5)
            finally:
                await client.disconnect()
            return reply, len(http_session.cookie_jar)

    reply, cookies = asyncio.run(asyncio.wait_for(session(), 10))
    assert reply == {"server": "s1", "data": "hi"}
    assert cookies == 0


# -- the seed's second configuration: round robin and the persistence cookie -----------


@needs_haproxy
def test_the_seed_cookie_setup_loses_cookieless_polling_sessions(
    launch: Launcher, sio_backends: list[Backend]
) -> None:
    seed = launch_haproxy(launch, seed_cookie_backend(sio_backends))
    result = load(seed.port, sio_backends, transports=POLLING)
    assert result.unknown_sessions > 0
    assert result.client_failures > 0
    # Refused, never moved: a session that answered at all saw one server.
    assert all(len(o.servers) <= 1 for o in result.outcomes)


@needs_haproxy
def test_the_seed_cookie_setup_keeps_the_sessions_of_clients_that_keep_the_cookie(
    launch: Launcher, sio_backends: list[Backend]
) -> None:
    seed = launch_haproxy(launch, seed_cookie_backend(sio_backends))
    assert_no_session_lost(load(seed.port, sio_backends, transports=POLLING, keep_cookies=True))


# -- the seed's first configuration: source affinity -----------------------------------


def source_affinity_front(launch: Launcher, backends: list[Backend], *, rotate: bool) -> int:
    """An L4 HAProxy sending PROXY v2 to the seed's ``balance source`` HAProxy."""
    seed = launch_haproxy(launch, seed_source_backend(backends), mode="tcp", accept_proxy=True)
    l4 = rotating_l4_backend(seed.port, send_proxy="v2")
    return launch_haproxy(launch, l4, mode="tcp", rotate_source=rotate).port


@needs_haproxy
def test_source_affinity_keeps_cookieless_sessions_while_the_address_is_stable(
    launch: Launcher, sio_backends: list[Backend]
) -> None:
    port = source_affinity_front(launch, sio_backends, rotate=False)
    assert_no_session_lost(load(port, sio_backends, transports=POLLING))


@needs_haproxy
def test_source_affinity_loses_cookieless_sessions_when_the_address_rotates(
    launch: Launcher, sio_backends: list[Backend]
) -> None:
    port = source_affinity_front(launch, sio_backends, rotate=True)
    result = load(port, sio_backends, transports=POLLING)
    assert result.unknown_sessions > 0
    assert result.client_failures > 0


# -- stickyproxy behind the same rotating balancer --------------------------------------


@needs_haproxy
@pytest.mark.parametrize("transports", [POLLING, POLLING_THEN_WEBSOCKET])
def test_stickyproxy_keeps_every_cookieless_session_when_the_address_rotates(
    launch: Launcher, sio_backends: list[Backend], transports: tuple[str, ...]
) -> None:
    proxy = launch.stickyproxy(proxy_config(sio_backends))
    front = launch_haproxy(
        launch, rotating_l4_backend(proxy.port, send_proxy="v2"), mode="tcp", rotate_source=True
    )
    assert_no_session_lost(load(front.port, sio_backends, transports=transports))
