"""``python -m stickyproxy ctl``: the admin endpoint's command-line client.

The client talks to a small stdlib HTTP server on loopback that records each
request and answers as the admin endpoint would; the real endpoint is driven
end to end in ``tests/integration/test_status_page.py``.
"""

from __future__ import annotations

import io
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from stickyproxy.cli import main

TOKEN = "k7Jq-0vX_3mZ9pLw2RtY"

SNAPSHOT = {
    "servers": [
        {
            "name": "s1",
            "state": "UP",
            "status": "UP",
            "weight": 10,
            "active": 2,
            "maxconn": 100,
            "tunnels": 1,
            "requests": 120,
            "last_check": "HTTP 200",
        },
        {
            "name": "editor-2",
            "state": "DOWN",
            "status": "DOWN",
            "weight": 10,
            "active": 0,
            "maxconn": 0,
            "tunnels": 0,
            "requests": 0,
            "last_check": "connection refused",
        },
    ],
    "frontend": {"connections": 7, "tunnels": 1, "requests": 125, "errors": {"503": 2}},
}


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeAdmin:
    """Canned answers by (method, path); every request is recorded."""

    url: str
    answers: dict[tuple[str, str], tuple[int, Any]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)


@pytest.fixture(scope="module")
def server() -> Iterator[FakeAdmin]:
    """One server for the module: stopping one waits out its poll interval."""
    fake = FakeAdmin("")

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            fake.seen.append(Seen(self.command, self.path, headers, body))
            status, answer = fake.answers.get((self.command, self.path), (404, {"error": "?"}))
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def admin(server: FakeAdmin) -> FakeAdmin:
    """The module's server, with no answers and no requests seen yet."""
    server.answers.clear()
    server.seen.clear()
    return server


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(["ctl", *argv], stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def test_status_prints_a_compact_table_and_the_frontend_totals(admin: FakeAdmin) -> None:
    admin.answers[("GET", "/stats.json")] = (200, SNAPSHOT)
    status, out, err = run("--admin", admin.url, "status")
    assert (status, err) == (0, "")
    assert out.splitlines() == [
        "SERVER    STATE  STATUS  WEIGHT  ACTIVE  TUNNELS  REQUESTS  CHECK",
        "s1        UP     UP      10      2/100   1        120       HTTP 200",
        "editor-2  DOWN   DOWN    10      0/-     0        0         connection refused",
        "frontend: 7 connections, 1 tunnels, 125 requests, errors: 503=2",
    ]
    (request,) = admin.seen
    assert request.method == "GET"
    assert request.headers["user-agent"].startswith("stickyproxy-ctl/")
    assert "via stickyproxy ctl" in request.headers["x-requested-by"]
    assert "authorization" not in request.headers


def test_state_posts_a_form_with_the_token_and_prints_the_transition(admin: FakeAdmin) -> None:
    answer = {"server": "s1", "admin": "drain", "transition": {"old": "UP", "new": "DRAIN"}}
    admin.answers[("POST", "/servers/s1/state")] = (200, answer)
    status, out, _ = run("--admin", admin.url, "--token", TOKEN, "state", "s1", "drain")
    assert (status, out) == (0, "s1: UP -> DRAIN\n")
    (request,) = admin.seen
    assert request.body == b"state=drain"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert request.headers["authorization"] == f"Bearer {TOKEN}"


def test_state_says_when_nothing_changed(admin: FakeAdmin) -> None:
    answer = {"server": "s1", "admin": "ready", "transition": None}
    admin.answers[("POST", "/servers/s1/state")] = (200, answer)
    assert run("--admin", admin.url, "state", "s1", "ready")[:2] == (
        0,
        "s1: ready (state unchanged)\n",
    )


def test_shutdown_sessions_prints_how_many_were_closed(admin: FakeAdmin) -> None:
    answer = {"server": "s1", "closed": 4}
    admin.answers[("POST", "/servers/s1/shutdown-sessions")] = (200, answer)
    status, out, _ = run("--admin", admin.url, "shutdown-sessions", "s1")
    assert (status, out) == (0, "s1: closed 4 connection(s)\n")
    assert admin.seen[0].method == "POST"


def test_a_refusal_exits_1_with_the_endpoint_s_reason(admin: FakeAdmin) -> None:
    admin.answers[("POST", "/servers/s1/state")] = (403, {"error": "wrong token"})
    status, out, err = run("--admin", admin.url, "--token", "nope", "state", "s1", "maint")
    assert (status, out) == (1, "")
    assert err == "stickyproxy ctl state: 403 wrong token\n"


def test_an_unknown_server_exits_1(admin: FakeAdmin) -> None:
    status, _, err = run("--admin", admin.url, "shutdown-sessions", "a/b")
    assert status == 1
    assert admin.seen[0].path == "/servers/a%2Fb/shutdown-sessions"
    assert "404" in err


def test_an_unreachable_endpoint_exits_1() -> None:
    # A port that was just free: nothing listens there.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    status, _, err = run("--admin", f"http://127.0.0.1:{port}", "--timeout", "5", "status")
    assert status == 1
    assert f"cannot reach http://127.0.0.1:{port}" in err


def test_the_endpoint_and_token_can_come_from_the_environment(
    admin: FakeAdmin, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin.answers[("GET", "/stats.json")] = (200, SNAPSHOT)
    monkeypatch.setenv("STICKYPROXY_ADMIN", admin.url.removeprefix("http://") + "/")
    monkeypatch.setenv("STICKYPROXY_ADMIN_TOKEN", TOKEN)
    assert run("status")[0] == 0
    assert admin.seen[0].path == "/stats.json"
    assert admin.seen[0].headers["authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["state", "s1"],
        ["state", "s1", "down"],
        ["shutdown-sessions"],
        ["weight", "s1", "heavy"],
    ],
)
def test_usage_errors_exit_2_without_a_request(admin: FakeAdmin, argv: list[str]) -> None:
    assert run("--admin", admin.url, *argv)[0] == 2
    assert admin.seen == []
