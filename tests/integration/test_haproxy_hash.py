"""HAProxy cut-over: ``hash_function = haproxy`` places new clients where HAProxy does.

A real HAProxy runs ``balance source`` with ``hash-type consistent`` in front of
three demo backends. For each of a few hundred client addresses, IPv4 and IPv6,
a connection sends a PROXY v1 header with that address as the source and asks
``/whoami``; the backend that answers is HAProxy's choice. ``python -m
stickyproxy route`` must print the same server for every address, given the
same servers in the same order with the same weights.

IPv4-mapped IPv6 addresses (``::ffff:a.b.c.d``) are left out on purpose:
stickyproxy treats them as the IPv4 client they are, whereas HAProxy hashes
their 128 bits. An ELB sends IPv4 clients as ``TCP4``, so they do not occur
behind one.
"""

from __future__ import annotations

import ipaddress
import os
import random
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from .harness import (
    Backend,
    Launcher,
    Proc,
    find_haproxy,
    proxy_config,
    proxy_v1,
    raw_request,
    spawn,
)

pytestmark = pytest.mark.usefixtures("haproxy_binary")

#: Bound on each exchange through HAProxy.
READ_TIMEOUT = 5.0


def client_addresses() -> list[str]:
    """A fixed set of 300 IPv4 and 40 IPv6 client addresses, with some edge cases."""
    rnd = random.Random(20240601)
    ipv4 = [str(ipaddress.IPv4Address(rnd.getrandbits(32))) for _ in range(300)]
    ipv4 += ["0.0.0.1", "10.0.0.1", "127.0.0.1", "192.168.1.1", "255.255.255.254"]
    ipv6 = [str(ipaddress.IPv6Address(rnd.getrandbits(128))) for _ in range(40)]
    ipv6 += ["::1", "2001:db8::1", "fe80::1234", "2a00:1450:4007:80e::200e"]
    return ipv4 + [a for a in ipv6 if ipaddress.IPv6Address(a).ipv4_mapped is None]


def haproxy_choices(
    launch: Launcher,
    backends: Sequence[Backend],
    weights: Mapping[str, int],
    disabled: Sequence[str],
    addresses: Sequence[str],
) -> dict[str, str]:
    """Ask a real HAProxy which backend serves each client address."""
    executable = find_haproxy()
    assert executable is not None
    lines = [
        f"    server {b.name} {b.address} weight {weights[b.name]}"
        + (" disabled" if b.name in disabled else "")
        for b in backends
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        # Bound and listening before HAProxy starts: connections wait in the
        # backlog until it accepts them, and the port cannot be taken meanwhile.
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        port = listener.getsockname()[1]
        config = "\n".join(
            [
                "global",
                "    nbthread 1",
                "defaults",
                "    mode http",
                "    timeout connect 2s",
                "    timeout client 5s",
                "    timeout server 5s",
                "frontend fe",
                f"    bind fd@{listener.fileno()} accept-proxy",
                "    default_backend be",
                "backend be",
                "    balance source",
                "    hash-type consistent",
                *lines,
                "",
            ]
        )
        path = launch.tmp_path / f"haproxy-hash-{os.getpid()}-{len(launch.procs)}.cfg"
        path.write_text(config)
        proc = spawn(
            "haproxy",
            [executable, "-f", str(path), "-db"],
            launch.tmp_path,
            pass_fds=(listener.fileno(),),
        )
        launch.procs.append(proc)
    return {address: _served_by(proc, port, address) for address in addresses}


def _served_by(proc: Proc, port: int, address: str) -> str:
    destination = "::1" if ":" in address else "127.0.0.1"
    request = b"GET /whoami HTTP/1.0\r\n\r\n"
    answer = raw_request(port, proxy_v1(address, destination) + request, read_timeout=READ_TIMEOUT)
    head, _, body = answer.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n", 1)[0]:
        pytest.fail(f"no answer for {address}: {answer[:200]!r}; {proc.describe()}")
    return body.decode().strip()


def stickyproxy_choices(
    tmp_path: Path,
    backends: Sequence[Backend],
    weights: Mapping[str, int],
    disabled: Sequence[str],
    addresses: Sequence[str],
) -> dict[str, str]:
    """Ask ``python -m stickyproxy route`` the same question."""
    overrides = {f"server {b.name}": {"weight": str(weights[b.name])} for b in backends}
    config = proxy_config(backends, balance={"hash_function": "haproxy"}, **overrides)
    path = tmp_path / "route.ini"
    path.write_text(config)
    argv = [sys.executable, "-m", "stickyproxy", "route", "-c", str(path)]
    for name in disabled:
        argv += ["--down", name]
    result = subprocess.run(
        argv,
        input="\n".join(addresses) + "\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert result.returncode == 0, result.stderr
    return dict(line.split(" ", 1) for line in result.stdout.splitlines())


@pytest.mark.parametrize(
    ("weights", "disabled"),
    [
        ({"s1": 10, "s2": 10, "s3": 10}, ()),
        ({"s1": 1, "s2": 25, "s3": 7}, ()),
        ({"s1": 10, "s2": 10, "s3": 10}, ("s2",)),
    ],
    ids=["equal-weights", "mixed-weights", "s2-down"],
)
def test_new_clients_land_on_the_server_haproxy_chose(
    launch: Launcher,
    backends: list[Backend],
    weights: dict[str, int],
    disabled: tuple[str, ...],
) -> None:
    addresses = client_addresses()
    expected = haproxy_choices(launch, backends, weights, disabled, addresses)
    actual = stickyproxy_choices(launch.tmp_path, backends, weights, disabled, addresses)
    differing = {a: (expected[a], actual.get(a)) for a in addresses if actual.get(a) != expected[a]}
    assert differing == {}, f"{len(differing)} of {len(addresses)} differ (HAProxy, stickyproxy)"
    # A comparison that every server could pass by accident proves little:
    # every server that takes new clients gets some.
    served = Counter(expected.values())
    assert set(served) == {b.name for b in backends} - set(disabled), served
