"""The admin endpoint of a real proxy, read by a real browser.

Three demo backends behind stickyproxy with its admin listener on loopback;
s2's health checks are made to fail, and once ``/stats.json`` says DOWN the
status page is loaded in headless Chromium: its DOM must show the row DOWN,
and a screenshot is kept under ``test-artifacts/`` for people to look at.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from html.parser import HTMLParser
from itertools import count
from pathlib import Path
from typing import Any

import pytest

from .harness import REPO_ROOT, Backend, Launcher, Proxy, http_get, http_request, proxy_config

#: How long the proxy may take to notice a failing backend (checks run every
#: second and one failure takes a server down).
STATE_TIMEOUT = 10.0

#: How long one Chromium run may take before it is killed.
BROWSER_TIMEOUT = 60.0

ARTIFACTS = REPO_ROOT / "test-artifacts"

_runs = count(1)


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path is not None:
            return path
    return None


@pytest.fixture
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium)")
    return path


def run_chromium(executable: str, tmp_path: Path, *arguments: str) -> bytes:
    """Run headless Chromium once with a fresh profile and return its stdout.

    Chromium starts helper processes in its own session; if the run outlives
    ``BROWSER_TIMEOUT`` that whole group, which this function started, is killed.
    """
    profile = tmp_path / f"chromium-profile-{next(_runs)}"
    argv = [
        executable,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *arguments,
    ]
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        out, err = process.communicate(timeout=BROWSER_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"Chromium took over {BROWSER_TIMEOUT}s: {err.decode(errors='replace')}")
    assert process.returncode == 0, err.decode(errors="replace")
    return out


class Rows(HTMLParser):
    """The server rows of the status page: id → (data-state, text of the row)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, tuple[str, str]] = {}
        self._current: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "tr" and (values.get("id") or "").startswith("server-"):
            self._current = str(values["id"]).removeprefix("server-")
            self._state = values.get("data-state") or ""
            self._text = []

    def handle_data(self, data: str) -> None:
        if self._current is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr" and self._current is not None:
            self.rows[self._current] = (self._state, " ".join("".join(self._text).split()))
            self._current = None


def stats(proxy: Proxy) -> dict[str, Any]:
    assert proxy.admin_port is not None
    response = http_get(proxy.admin_port, "/stats.json")
    assert response.status == 200
    data: dict[str, Any] = json.loads(response.body)
    return data


def wait_for(what: str, condition: Callable[[], bool], proxy: Proxy) -> None:
    """Poll ``condition`` until it holds; fail after ``STATE_TIMEOUT`` seconds."""
    deadline = time.monotonic() + STATE_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}: {proxy.proc.describe()}")
        time.sleep(0.05)


def state_of(proxy: Proxy, name: str) -> str:
    return next(str(s["state"]) for s in stats(proxy)["servers"] if s["name"] == name)


@pytest.fixture
def proxy_with_s2_down(launch: Launcher, backends: list[Backend]) -> Proxy:
    proxy = launch.stickyproxy(proxy_config(backends))
    assert proxy.admin_port is not None
    s2 = next(b for b in backends if b.name == "s2")
    assert http_request(s2.port, "POST", "/_health?ok=0").status == 200
    wait_for("s2 to be DOWN", lambda: state_of(proxy, "s2") == "DOWN", proxy)
    return proxy


def test_the_status_page_shows_a_failed_server_down_in_a_browser(
    proxy_with_s2_down: Proxy, chromium: str, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{proxy_with_s2_down.admin_port}/"
    parser = Rows()
    parser.feed(run_chromium(chromium, tmp_path, "--dump-dom", url).decode())
    assert set(parser.rows) == {"s1", "s2", "s3"}
    state, text = parser.rows["s2"]
    assert state == "DOWN"
    assert "DOWN" in text
    assert "HTTP 503" in text  # the last check's result
    assert parser.rows["s1"][0] == parser.rows["s3"][0] == "UP"

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "status-page.png"
    screenshot.unlink(missing_ok=True)
    run_chromium(chromium, tmp_path, f"--screenshot={screenshot}", "--window-size=1320,800", url)
    print(f"status page screenshot: {screenshot}")
    data = screenshot.read_bytes()
    # A PNG (signature, then the IHDR chunk with the width and height).
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (1320, 800)


def test_the_page_json_and_metrics_agree_about_a_failed_server(proxy_with_s2_down: Proxy) -> None:
    port = proxy_with_s2_down.admin_port
    assert port is not None
    page = http_get(port, "/").body.decode()
    assert 'id="server-s2" data-state="DOWN"' in page
    metrics = http_get(port, "/metrics").body.decode()
    assert 'stickyproxy_server_state{server="s2",state="DOWN"} 1.0' in metrics
    assert 'stickyproxy_server_state{server="s1",state="UP"} 1.0' in metrics


def ctl(proxy: Proxy, *arguments: str) -> subprocess.CompletedProcess[str]:
    admin = f"http://127.0.0.1:{proxy.admin_port}"
    return subprocess.run(
        [sys.executable, "-m", "stickyproxy", "ctl", "--admin", admin, *arguments],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO_ROOT,
        check=False,
    )


def test_ctl_status_prints_the_running_proxy_s_servers(proxy_with_s2_down: Proxy) -> None:
    result = ctl(proxy_with_s2_down, "status")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["SERVER", "STATE", "STATUS"]
    assert [line.split()[:2] for line in lines[1:4]] == [["s1", "UP"], ["s2", "DOWN"], ["s3", "UP"]]


def test_ctl_drains_and_readies_a_server_of_the_running_proxy(
    launch: Launcher, backends: list[Backend]
) -> None:
    proxy = launch.stickyproxy(proxy_config(backends))
    drained = ctl(proxy, "state", "s1", "drain")
    assert drained.returncode == 0, drained.stderr
    assert drained.stdout == "s1: UP -> DRAIN\n"
    assert state_of(proxy, "s1") == "DRAIN"
    assert ctl(proxy, "state", "s1", "ready").returncode == 0
    assert state_of(proxy, "s1") == "UP"
