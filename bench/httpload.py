"""HTTP load with wrk, and a correctness check of the responses before it.

wrk reports only failures it can see cheaply: socket errors, and responses with
a status of 400 or more ("Non-2xx or 3xx responses"). The origin answers
``200 ok`` to everything, so a clean wrk run means every response was a
success; :func:`check_exchange` looks at one full exchange per case first
(status, body, and whether the persistence cookie is set as HAProxy's
``insert indirect`` would), so that a proxy answering quickly with the wrong
thing cannot score.
"""

from __future__ import annotations

import http.client
import re
import subprocess
from dataclasses import dataclass

#: The persistence cookie of the seed's configuration.
COOKIE_NAME = "storify_editor_host"

#: Seconds per unit of wrk's "N requests in T" line.
_WRK_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0}


@dataclass(frozen=True)
class HttpCase:
    """One wrk scenario.

    :param name: key in the results.
    :param headers: request header fields added to every request.
    :param expect_set_cookie: whether a sticky proxy must answer with
        ``Set-Cookie`` (HAProxy ``insert indirect``: only when the client's
        cookie does not already name a usable server).
    """

    name: str
    headers: tuple[tuple[str, str], ...]
    expect_set_cookie: bool


CASES = (
    HttpCase("http_keepalive", (), expect_set_cookie=True),
    HttpCase("http_keepalive_cookie", (("Cookie", f"{COOKIE_NAME}=s1"),), expect_set_cookie=False),
    HttpCase("http_close", (("Connection", "close"),), expect_set_cookie=True),
)


class HttpCheckError(Exception):
    """A proxy's answer was not what the origin sends through a correct proxy."""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    errors: int
    non_2xx_3xx: int
    output: str

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def check_exchange(host: str, port: int, case: HttpCase, *, sticky: bool) -> None:
    """Send one request of *case*; raise :class:`HttpCheckError` describing
    the request and the response unless the answer is right.

    :param sticky: the proxy implements cookie persistence (not the relay).
    """
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", "/", headers=dict(case.headers))
        response = conn.getresponse()
        body = response.read()
        headers = response.getheaders()
    finally:
        conn.close()
    problems = []
    if response.status != 200 or body != b"ok":
        problems.append(f"expected 200 with body b'ok', got {response.status} {body[:80]!r}")
    set_cookies = [v for k, v in headers if k.lower() == "set-cookie"]
    ours = [v for v in set_cookies if v.startswith(f"{COOKIE_NAME}=")]
    if sticky and case.expect_set_cookie and not ours:
        problems.append(f"expected Set-Cookie: {COOKIE_NAME}=...")
    if sticky and not case.expect_set_cookie and ours:
        problems.append(f"expected no Set-Cookie for a valid cookie, got {ours}")
    if problems:
        sent = " ".join(f"{k}: {v}" for k, v in case.headers) or "(no extra header)"
        got = "; ".join(f"{k}: {v}" for k, v in headers)
        raise HttpCheckError(
            f"GET / with {sent} -> {response.status} {response.reason} [{got}] "
            f"body {body[:80]!r}: " + "; ".join(problems)
        )


def run_wrk(
    url: str, case: HttpCase, *, threads: int, connections: int, seconds: float
) -> WrkResult:
    """Run wrk for *seconds* and parse its summary.

    The run is bounded by wrk's own ``-d`` and, should wrk hang, by a timeout
    well above it.
    """
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s"]
    for name, value in case.headers:
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise HttpCheckError(f"wrk exited with {done.returncode}: {output}")
    total = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)\b", output)
    if total is None:
        raise HttpCheckError(f"unexpected wrk output: {output}")
    elapsed = float(total.group(2)) * _WRK_UNITS[total.group(3)]
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return WrkResult(
        requests=int(total.group(1)),
        seconds=elapsed,
        errors=sum(int(n) for n in errors.groups()) if errors else 0,
        non_2xx_3xx=int(bad.group(1)) if bad else 0,
        output=output,
    )
