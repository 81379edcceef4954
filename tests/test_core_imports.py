"""The protocol core is sans-IO: it imports neither Twisted nor a reactor."""

from __future__ import annotations

import subprocess
import sys

import pytest

CORE = [
    "errors",
    "proxyproto",
    "httphead",
    "cookies",
    "cookietoken",
    "hashring",
    "pool",
    "config",
    "rewrite",
    "stats",
    "wsframes",
    "accesslog",
    "engineio",
    "eiopayload",
    "sidtable",
    "eiorouting",
    "storeaddress",
]


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_no_twisted(module: str) -> None:
    code = (
        f"import sys, stickyproxy.{module}; "
        "roots = ('twisted', 'treq', 'autobahn'); "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in roots); "
        "print(bad); raise SystemExit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_importing_the_package_installs_no_reactor() -> None:
    code = (
        "import sys, stickyproxy; stickyproxy.StickyProxy; "
        "raise SystemExit(1 if 'twisted.internet.reactor' in sys.modules else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, timeout=60)
    assert result.returncode == 0
