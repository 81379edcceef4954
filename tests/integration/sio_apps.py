"""socket.io backends on loopback, and HAProxy set up in front of them as the seed did.

Run one backend with::

    python -m tests.integration.sio_apps --name s1 --ready-file PATH \\
        [--ping-interval MS] [--ping-timeout MS]

It is a python-socketio ``AsyncServer`` on aiohttp, bound to 127.0.0.1 on a port
the OS picks; the port is written to ``PATH`` (renamed into place, so a reader
never sees half of it) once the server listens. The server sets no cookie of its
own (``cookie=None``), so any stickiness must come from the proxy in front.

- event ``echo``: acknowledged with ``{"server": NAME, "data": DATA}``;
- on connect the server emits ``hello`` with ``{"server": NAME}``;
- ``GET /status`` (any query, e.g. the seed's ``/status?all=1``): ``200 ok``;
- ``GET /whoami``: the server's name;
- ``GET /unknown-sessions``: how many requests python-engineio refused because it
  does not know their ``sid``, as JSON ``{"server": NAME, "total": N, "by_kind":
  {"polling-get": N, "polling-post": N, "upgrade": N}, "stale": N}``. ``total``
  counts sids this server never issued (misrouted requests); ``stale`` counts
  sids of its own sessions that had already ended.

The last one is the source of truth for misrouting: python-engineio answers a
polling GET, a polling POST or a WebSocket upgrade that carries a ``sid`` it
does not hold with ``400`` and the JSON string ``"Invalid session <sid>"``
(node's engine.io says ``{"code":1,"message":"Session ID unknown"}`` instead).
A client only sees that its session broke; the backend sees why.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import engineio  # type: ignore[import-untyped]
import socketio  # type: ignore[import-untyped]
from aiohttp import web

if TYPE_CHECKING:
    # The harness (Twisted, autobahn) is imported only by the helpers that start
    # processes, so that a backend process starts quickly.
    from .harness import Backend, Haproxy, HttpResponse, Launcher, Named

#: The persistence cookie of the seed's second HAProxy configuration.
COOKIE_NAME = "storify_editor_host"

#: What the seed's health check asks for (``option httpchk GET /status?all=1``).
HEALTH_PATH = "/status?all=1"

#: The kinds of engine.io request a backend counts refusals for.
UnknownKind = Literal["polling-get", "polling-post", "upgrade"]

_ready_serial = iter(range(1, 1 << 62))


# -- recognising "unknown session" answers ----------------------------------------------


def is_unknown_session_answer(status: int, body: bytes) -> bool:
    """Whether an engine.io server refused a request because it does not know its sid.

    python-engineio's body is a JSON string: ``"Invalid session <sid>"`` (a
    request whose ``sid`` is not in its table; ``"Invalid session None"`` for a
    POST without one), or ``"'Session not found' <sid>"`` / ``"'Session is
    disconnected' <sid>"`` from its race-time lookup. node's engine.io answers
    ``{"code":1,...}`` to polling and plain text ``Session ID unknown`` to an
    upgrade.

    :param status: the HTTP status code of the answer.
    :param body: the answer's body, decoded of any transfer coding.
    """
    if status != 400:
        return False
    text = body.decode("utf-8", "replace").strip()
    if text == "Session ID unknown":
        return True
    try:
        decoded = json.loads(text)
    except ValueError:
        return False
    if isinstance(decoded, dict):
        return decoded.get("code") == 1
    if isinstance(decoded, str):
        return decoded.startswith("Invalid session ") or decoded.startswith(
            ("'Session not found' ", "'Session is disconnected' ")
        )
    return False


class CountingEngineIOServer(engineio.AsyncServer):  # type: ignore[misc]
    """python-engineio's server, counting the requests it refuses for an unknown sid.

    The count is taken from the response python-engineio built, after the fact,
    so the server's behaviour is exactly the stock one. A refused sid that this
    server issued itself belongs to a session it has already closed (a client's
    poll racing its own disconnection, say) and is counted apart as *stale*; any
    other refused sid was created elsewhere, so the request was misrouted.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unknown_sessions: Counter[str] = Counter()
        self.stale_sessions: Counter[str] = Counter()
        # Every sid handed out; a test backend lives for minutes, not months.
        self.issued: set[str] = set()

    def generate_id(self) -> str:
        sid = str(super().generate_id())
        self.issued.add(sid)
        return sid

    async def handle_request(self, *args: Any, **kwargs: Any) -> Any:
        response = await super().handle_request(*args, **kwargs)
        # A WebSocket response has no body attribute; a refusal always does.
        status: int = getattr(response, "status", 0)
        body = getattr(response, "body", None)
        if isinstance(body, bytes) and is_unknown_session_answer(status, body):
            request: web.Request = args[0]
            kind = _request_kind(request)
            if request.query.get("sid") in self.issued:
                self.stale_sessions[kind] += 1
            else:
                self.unknown_sessions[kind] += 1
        return response


def _request_kind(request: web.Request) -> UnknownKind:
    if request.query.get("transport") == "websocket":
        return "upgrade"
    return "polling-post" if request.method == "POST" else "polling-get"


class CountingSocketIOServer(socketio.AsyncServer):  # type: ignore[misc]
    """python-socketio's server on top of :class:`CountingEngineIOServer`."""

    def _engineio_server_class(self) -> type[CountingEngineIOServer]:
        return CountingEngineIOServer


# -- the backend application ------------------------------------------------------------


def quiet_logger(name: str) -> logging.Logger:
    """The logger ``name``, silenced: python-socketio and python-engineio log
    every refusal and every dropped poll, which a load makes by the thousand.
    """
    logger = logging.getLogger(name)
    logger.setLevel(logging.CRITICAL)
    logger.propagate = False
    # A handler, so that even a critical record does not reach logging's
    # last-resort handler on stderr; one, however many clients ask.
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    return logger


def make_app(
    name: str, *, ping_interval_ms: int = 25000, ping_timeout_ms: int = 20000
) -> web.Application:
    """Build the aiohttp application of one backend called ``name``."""
    sio = CountingSocketIOServer(
        async_mode="aiohttp",
        cors_allowed_origins="*",
        # No "io" cookie: the session id must not give a cookie-aware proxy
        # anything to route on; only the proxy's own mechanisms are tested.
        cookie=None,
        ping_interval=ping_interval_ms / 1000,
        ping_timeout=ping_timeout_ms / 1000,
        # python-engineio logs each kind of refusal once even with logging off;
        # the refusals are counted at /unknown-sessions instead.
        logger=quiet_logger("sio_apps.socketio"),
        engineio_logger=quiet_logger("sio_apps.engineio"),
    )

    @sio.event  # type: ignore[untyped-decorator]
    async def connect(sid: str, environ: dict[str, Any]) -> None:
        await sio.emit("hello", {"server": name}, to=sid)

    @sio.event  # type: ignore[untyped-decorator]
    async def echo(sid: str, data: Any) -> dict[str, Any]:
        return {"server": name, "data": data}

    async def status(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def whoami(request: web.Request) -> web.Response:
        return web.Response(text=name)

    async def unknown_sessions(request: web.Request) -> web.Response:
        eio: CountingEngineIOServer = sio.eio
        kinds = ("polling-get", "polling-post", "upgrade")
        report = {
            "server": name,
            "total": sum(eio.unknown_sessions.values()),
            "by_kind": {kind: eio.unknown_sessions[kind] for kind in kinds},
            "stale": sum(eio.stale_sessions.values()),
        }
        return web.json_response(report)

    app = web.Application()
    app.router.add_get("/status", status)
    app.router.add_get("/whoami", whoami)
    app.router.add_get("/unknown-sessions", unknown_sessions)
    sio.attach(app)
    return app


async def serve(
    name: str, ready_file: Path, *, ping_interval_ms: int, ping_timeout_ms: int
) -> None:
    """Serve until SIGTERM or SIGINT, announcing the port through ``ready_file``."""
    app = make_app(name, ping_interval_ms=ping_interval_ms, ping_timeout_ms=ping_timeout_ms)
    # No access log: a load test makes thousands of requests, and the count of
    # refusals is served at /unknown-sessions instead. A short shutdown
    # timeout: held long polls must not delay a stop.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    port = _bound_port(runner)
    partial = ready_file.with_name(ready_file.name + ".partial")
    partial.write_text(str(port))
    os.replace(partial, ready_file)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await runner.cleanup()


def _bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    raise RuntimeError(f"no TCP address among {runner.addresses!r}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--name", required=True, help="the server's name, as answered")
    parser.add_argument("--ready-file", required=True, type=Path, help="where to write the port")
    parser.add_argument("--ping-interval", type=int, default=25000, metavar="MS")
    parser.add_argument("--ping-timeout", type=int, default=20000, metavar="MS")
    args = parser.parse_args(argv)
    asyncio.run(
        serve(
            args.name,
            args.ready_file,
            ping_interval_ms=args.ping_interval,
            ping_timeout_ms=args.ping_timeout,
        )
    )


# -- starting backends from tests and benchmarks ----------------------------------------


def start_sio_backend(
    name: str,
    tmp_path: Path,
    *,
    ping_interval_ms: int | None = None,
    ping_timeout_ms: int | None = None,
) -> Backend:
    """Start one socket.io backend and wait until it listens.

    The result is the harness's :class:`Backend`, so ``harness.proxy_config``
    and the :class:`Launcher` accept it like a demo backend.
    """
    return start_sio_backends(
        [name], tmp_path, ping_interval_ms=ping_interval_ms, ping_timeout_ms=ping_timeout_ms
    )[0]


def start_sio_backends(
    names: Iterable[str],
    tmp_path: Path,
    *,
    ping_interval_ms: int | None = None,
    ping_timeout_ms: int | None = None,
) -> list[Backend]:
    """Start several socket.io backends at once (they boot in parallel)."""
    from .harness import spawn, wait_for_backends

    spawned = []
    for name in names:
        ready = tmp_path / f"sio-{name}-{next(_ready_serial)}.port"
        argv = [sys.executable, "-m", "tests.integration.sio_apps"]
        argv += ["--name", name, "--ready-file", str(ready)]
        if ping_interval_ms is not None:
            argv += ["--ping-interval", str(ping_interval_ms)]
        if ping_timeout_ms is not None:
            argv += ["--ping-timeout", str(ping_timeout_ms)]
        spawned.append((name, spawn(f"sio-{name}", argv, tmp_path), ready))
    return wait_for_backends(spawned)


def launch_sio_backends(
    launch: Launcher, names: Iterable[str], **opts: int | None
) -> list[Backend]:
    """Start socket.io backends that ``launch`` stops at teardown."""
    started = start_sio_backends(names, launch.tmp_path, **opts)
    launch.procs.extend(backend.proc for backend in started)
    return started


@contextmanager
def running_sio_backends(
    tmp_path: Path, names: Iterable[str] = ("s1", "s2", "s3"), **opts: int | None
) -> Iterator[list[Backend]]:
    """socket.io backends for the duration of a ``with`` block.

    For fixtures that share backends between the tests of a module: loads
    compare the backends' counters before and after, so tests do not disturb
    one another through them.
    """
    from .harness import Launcher

    launcher = Launcher(tmp_path)
    try:
        yield launch_sio_backends(launcher, names, **opts)
    finally:
        launcher.stop_all()


# -- HAProxy in front of the backends ---------------------------------------------------


def seed_cookie_backend(backends: Sequence[Named]) -> str:
    """The seed's second backend section: round robin plus the persistence cookie.

    HAProxy inserts ``storify_editor_host=sN`` into the first response and
    routes by it afterwards; a client that does not send it back is placed by
    round robin on every request.
    """
    lines = [
        "    mode http",
        "    balance roundrobin",
        f"    cookie {COOKIE_NAME} insert indirect nocache",
    ]
    return _backend_section(lines, backends, cookie=True)


def seed_source_backend(backends: Sequence[Named]) -> str:
    """The seed's first backend section: ``balance source`` in TCP mode.

    Every TCP connection is placed by a hash of its client address, which
    HAProxy takes from the PROXY header when the bind has ``accept-proxy``.
    """
    return _backend_section(["    mode tcp", "    balance source"], backends, cookie=False)


def _backend_section(lines: list[str], backends: Sequence[Named], *, cookie: bool) -> str:
    # The seed's health check and server options, with its timings.
    section = ["backend storify_editor_backend", *lines]
    section += ["    timeout check 5000", f"    option httpchk GET {HEALTH_PATH}"]
    for backend in backends:
        server = f"    server {backend.name} 127.0.0.1:{backend.port} maxconn 1000 weight 10"
        if cookie:
            server += f" cookie {backend.name}"
        section.append(server + " check inter 10000 rise 1 fall 3")
    return "\n".join(section) + "\n"


def start_haproxy(
    backend_section: str,
    tmp_path: Path,
    *,
    mode: Literal["http", "tcp"] = "http",
    accept_proxy: bool = False,
    rotate_source: bool = False,
) -> Haproxy:
    """Run HAProxy with one frontend in front of ``backend_section``.

    The listener and the runtime API socket are set up by
    ``harness.start_haproxy``; this adds the seed's global settings and frontend.

    :param backend_section: a ``backend storify_editor_backend`` section, such as
        :func:`seed_cookie_backend` builds.
    :param accept_proxy: read a PROXY header on each accepted connection (the
        seed's frontend, behind ELB).
    :param rotate_source: replace each connection's client address by a random
        one in 127.0.0.2-127.0.0.251 (``tcp-request connection set-src``), as a
        network that spreads one user's connections over many egress addresses.
        The replaced address is what ``balance source`` hashes and what a
        ``send-proxy`` server line sends on.
    """
    from . import harness

    def render(listener: str, stats_socket: str) -> str:
        frontend = ["frontend storify_editor_frontend", f"    mode {mode}"]
        frontend.append(f"    bind {listener}" + (" accept-proxy" if accept_proxy else ""))
        frontend.append("    maxconn 1000")
        if rotate_source:
            # rand(250) is an integer in [0, 250); 2130706434 is 127.0.0.2. The
            # sum is cast from integer to IPv4 address.
            frontend.append("    tcp-request connection set-src rand(250),add(2130706434)")
        frontend.append("    default_backend storify_editor_backend")
        return (
            "global\n"
            "    nbthread 1\n"
            "    maxconn 4000\n"
            f"    stats socket {stats_socket} level user\n"
            "defaults\n"
            "    timeout connect 5s\n"
            "    timeout client 60s\n"
            "    timeout server 60s\n"
            "    timeout tunnel 1h\n" + "\n".join(frontend) + "\n" + backend_section
        )

    return harness.start_haproxy(render, tmp_path, backlog=1024)


def rotating_l4_backend(target_port: int, send_proxy: Literal["v1", "v2"] = "v2") -> str:
    """An L4 backend section: one server, ``target_port``, sent a PROXY header."""
    option = {"v1": "send-proxy", "v2": "send-proxy-v2"}[send_proxy]
    return (
        "backend storify_editor_backend\n"
        "    mode tcp\n"
        "    balance roundrobin\n"
        f"    server next 127.0.0.1:{target_port} {option}\n"
    )


def launch_haproxy(launch: Launcher, backend_section: str, **options: Any) -> Haproxy:
    """:func:`start_haproxy`, stopped by ``launch`` at teardown."""
    haproxy = start_haproxy(backend_section, launch.tmp_path, **options)
    launch.procs.append(haproxy.proc)
    return haproxy


if __name__ == "__main__":
    main()


#: A sid no backend ever issued.
FOREIGN_SID = "NotFromThisServer000"


def foreign_sid_requests(port: int) -> tuple[HttpResponse, HttpResponse, HttpResponse]:
    """A poll, a post and a WebSocket upgrade for :data:`FOREIGN_SID`, straight to ``port``.

    Each is one kind of "unknown session" answer an engine.io server gives.
    """
    from .harness import http_request

    query = f"/socket.io/?EIO=4&transport={{}}&sid={FOREIGN_SID}"
    get = http_request(port, "GET", query.format("polling"))
    post = http_request(port, "POST", query.format("polling"), body=b"40")
    upgrade_headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    upgrade = http_request(port, "GET", query.format("websocket"), headers=upgrade_headers)
    return get, post, upgrade
