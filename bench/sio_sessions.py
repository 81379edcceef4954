"""Cookie-less socket.io sessions through each proxy setup: which of them survive.

::

    PYTHONPATH=. python bench/sio_sessions.py [--clients 30] [--messages 50]
        [--target haproxy-seed|haproxy-source-rotating|stickyproxy|
                  stickyproxy-fleet-tag|stickyproxy-fleet-store ...]
        [--transports polling|polling,websocket]

Starts three socket.io backends (``tests/integration/sio_apps.py``, python-socketio
on aiohttp, no cookie of their own) and, for each target, the proxies in front
of them; runs ``--clients`` cookie-less clients at once, each sending
``--messages`` acknowledged echoes; prints one row per target. Everything
listens on 127.0.0.1 on OS-chosen ports and every process is stopped by PID.

Targets:

``haproxy-seed``
    HAProxy with the seed's second configuration: ``mode http``, ``balance
    roundrobin``, ``cookie storify_editor_host insert indirect nocache``. A client
    that keeps no cookie is placed by round robin on every request, so most of
    its polls reach a backend that does not know its session.
``haproxy-source-rotating``
    The seed's first configuration, ``balance source`` behind a PROXY-protocol
    L4 balancer, with the client address rotating per TCP connection (an L4
    HAProxy rewriting it with ``tcp-request connection set-src``), as on
    networks that spread one user over several egress addresses.
``stickyproxy``
    The same rotating L4 HAProxy, sending PROXY v2, in front of stickyproxy
    (``twistd -n stickyproxy``) with its default configuration: the cookie, a
    consistent hash of the client address, and engine.io ``sid`` routing.
``stickyproxy-fleet-tag``
    Two stickyproxy processes with the same configuration and ``[engineio]
    sid_tag = eio4``, behind one rotating L4 HAProxy that sends each new
    connection to the next of them (``balance roundrobin``), so that a
    session's requests alternate between the proxies.
``stickyproxy-fleet-store``
    The same fleet sharing sessions through a ``redis-server`` (started here,
    on an OS-chosen loopback port) with ``[engineio] sid_store``.
``stickyproxy-fleet-alone`` (only when named)
    The same fleet with neither tag nor store, each proxy knowing only the
    handshakes it relayed: a control showing what the two ways to share prevent.
``stickyproxy-sid-off`` (only when named)
    The same with ``[engineio] path`` empty, i.e. without sid routing: a control
    showing that the client address does rotate and what sid routing prevents.

Columns: messages sent and answered; sessions that got every answer from one
server; connected sessions that saw exactly one server; requests refused as
unknown sessions, counted by the backends themselves (sids they never issued,
i.e. misrouted requests); client failures (connect failures, dropped sessions,
timeouts). The exit status is 0 whatever the counts: this is a measurement.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from tests.integration.fleet import start_fleet
from tests.integration.harness import Backend, Launcher, proxy_config
from tests.integration.redis_server import RedisServer
from tests.integration.sio_apps import (
    launch_haproxy,
    launch_sio_backends,
    rotating_l4_backend,
    seed_cookie_backend,
    seed_source_backend,
)
from tests.integration.sio_clients import LoadResult, run_load

TARGETS = (
    "haproxy-seed",
    "haproxy-source-rotating",
    "stickyproxy",
    "stickyproxy-fleet-tag",
    "stickyproxy-fleet-store",
)

#: A control, not run unless asked for: stickyproxy with sid routing off
#: (``[engineio] path`` empty), which must show the misroutes that sid routing
#: prevents, proving that the client address does rotate.
CONTROL = "stickyproxy-sid-off"

#: A control for the fleets, not run unless asked for: two proxies sharing
#: nothing, which must show the misroutes that the tag and the store prevent,
#: proving that a session's requests do reach both proxies.
FLEET_CONTROL = "stickyproxy-fleet-alone"

#: The backends' engine.io ping interval and timeout (ms). Short, so that a
#: held long poll (and hence a client's disconnection) lasts at most this long.
PING_MS = 2000


def front_port(target: str, launch: Launcher, backends: list[Backend]) -> int:
    """Start the proxies of ``target`` in front of ``backends``; return the client port."""
    if target == "haproxy-seed":
        return launch_haproxy(launch, seed_cookie_backend(backends)).port
    if target == "haproxy-source-rotating":
        seed = launch_haproxy(launch, seed_source_backend(backends), mode="tcp", accept_proxy=True)
        l4 = rotating_l4_backend(seed.port, send_proxy="v2")
        return launch_haproxy(launch, l4, mode="tcp", rotate_source=True).port
    if target in ("stickyproxy", CONTROL):
        sid_off = {"engineio": {"path": ""}} if target == CONTROL else {}
        proxy = launch.stickyproxy(proxy_config(backends, **sid_off))
        l4 = rotating_l4_backend(proxy.port, send_proxy="v2")
        return launch_haproxy(launch, l4, mode="tcp", rotate_source=True).port
    if target in ("stickyproxy-fleet-tag", "stickyproxy-fleet-store", FLEET_CONTROL):
        return fleet_port(target, launch, backends)
    raise ValueError(f"unknown target {target!r}")


def fleet_port(target: str, launch: Launcher, backends: list[Backend]) -> int:
    """Two proxies with one configuration behind a round-robin, rotating L4 HAProxy."""
    engineio: dict[str, str] = {}
    if target == "stickyproxy-fleet-tag":
        engineio["sid_tag"] = "eio4"
    elif target == "stickyproxy-fleet-store":
        workdir = launch.tmp_path / "redis"
        workdir.mkdir(exist_ok=True)
        redis = RedisServer(workdir, tcp=True)
        redis.start()
        assert redis.proc is not None
        launch.procs.append(redis.proc)
        engineio["sid_store"] = redis.database_url(0)
    fleet = start_fleet(launch, backends, engineio)
    if "sid_store" in engineio:
        # Until a proxy's store is connected, its handshakes are not shared.
        fleet.wait_for_stores()
    return fleet.port


def measure(
    target: str,
    work: Path,
    *,
    clients: int,
    messages: int,
    transports: Sequence[str],
    timeout: float,
) -> LoadResult:
    """Fresh backends and proxies for ``target``, one load, everything stopped after."""
    launch = Launcher(work)
    try:
        names = ["s1", "s2", "s3"]
        backends = launch_sio_backends(
            launch, names, ping_interval_ms=PING_MS, ping_timeout_ms=PING_MS
        )
        port = front_port(target, launch, backends)
        return run_load(
            f"http://127.0.0.1:{port}",
            clients=clients,
            messages=messages,
            transports=transports,
            timeout=timeout,
            backends=backends,
        )
    finally:
        launch.stop_all()


COLUMNS = (
    ("target", 24),
    ("clients", 7),
    ("sent", 6),
    ("answered", 8),
    ("completed", 9),
    ("one server", 10),
    ("unknown sid", 11),
    ("stale sid", 9),
    ("failures", 8),
    ("seconds", 7),
)


def table(rows: Sequence[tuple[str, LoadResult]]) -> str:
    """Format one line per target under a header."""
    lines = ["  ".join(name.rjust(width) for name, width in COLUMNS)]
    for target, result in rows:
        cells = (
            target,
            result.clients,
            result.sent,
            result.answered,
            result.completed,
            result.one_server_sessions,
            result.unknown_sessions,
            result.stale_sessions,
            result.client_failures,
            f"{result.elapsed:.1f}",
        )
        lines.append("  ".join(str(c).rjust(w) for c, (_, w) in zip(cells, COLUMNS, strict=True)))
    return "\n".join(lines)


def details(target: str, result: LoadResult) -> str:
    failures = f"{result.connect_failures} connect failures, {result.disconnects} dropped sessions"
    per_server = ", ".join(f"{name}={count}" for name, count in result.unknown_by_server.items())
    errors = "; ".join(result.errors(3)) or "none"
    return f"{target}: {failures}; unknown sids by backend: {per_server}; first errors: {errors}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=30, help="concurrent clients (30)")
    parser.add_argument("--messages", type=int, default=50, help="echoes per client (50)")
    parser.add_argument(
        "--target",
        action="append",
        choices=(*TARGETS, CONTROL, FLEET_CONTROL),
        help="a setup to measure; repeat for several (default: all)",
    )
    parser.add_argument(
        "--transports",
        default="polling",
        choices=("polling", "polling,websocket"),
        help="long-polling only (default), or long-polling then a WebSocket upgrade",
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds the load may last per target"
    )
    args = parser.parse_args(argv)
    if args.clients < 1 or args.messages < 0:
        parser.error("--clients must be at least 1 and --messages at least 0")
    return args


def _exit_on_sigterm(signum: int, frame: object) -> NoReturn:
    # Unwind like Ctrl-C does, so that the children are stopped.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    targets = args.target or list(TARGETS)
    transports = tuple(args.transports.split(","))
    rows: list[tuple[str, LoadResult]] = []
    with tempfile.TemporaryDirectory(prefix="stickyproxy-sio-") as work:
        for target in targets:
            print(f"{target}: {args.clients} clients x {args.messages} messages...", flush=True)
            result = measure(
                target,
                Path(work),
                clients=args.clients,
                messages=args.messages,
                transports=transports,
                timeout=args.timeout,
            )
            rows.append((target, result))
    print(f"\ntransports: {', '.join(transports)}; backends: s1, s2, s3\n")
    print(table(rows))
    print()
    for target, result in rows:
        print(details(target, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
