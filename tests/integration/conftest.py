"""Fixtures for the integration suite: real processes on loopback.

Every test here carries the ``integration`` marker, so ``pytest -m integration``
runs only this suite and ``pytest -m "not integration"`` skips it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import Backend, Launcher, find_haproxy

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items, so only those under this folder
    # are marked.
    for item in items:
        if _HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launcher]:
    """Start processes for this test; all of them are stopped at teardown."""
    launcher = Launcher(tmp_path)
    try:
        yield launcher
    finally:
        launcher.stop_all()


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """One demo backend named ``s1``, shared by the tests of a module.

    Starting a Python process costs most of a second, so tests that only read
    from a backend share this one; a test that changes a backend's state (its
    health, say) starts its own with ``launch.backend(name)``.
    """
    launcher = Launcher(tmp_path_factory.mktemp("backend"))
    try:
        yield launcher.backend("s1")
    finally:
        launcher.stop_all()


@pytest.fixture
def backends(launch: Launcher) -> list[Backend]:
    """Three demo backends, ``s1`` to ``s3``, started in parallel."""
    return launch.backends(["s1", "s2", "s3"])


@pytest.fixture
def haproxy_binary() -> str:
    """The path of ``haproxy``; the test is skipped where it is not installed."""
    path = find_haproxy()
    if path is None:
        pytest.skip("haproxy is not installed")
    return path
