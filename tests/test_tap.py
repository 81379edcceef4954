"""``twistd stickyproxy``: options, --check, and the plugin."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.python.usage import UsageError

from stickyproxy.tap import Options

GOOD = """
[proxy]
listen = tcp:0:interface=127.0.0.1
[server s1]
address = 127.0.0.1:8081
"""

BAD = """
[proxy]
timeout_client = 5000
[server s1]
address = 127.0.0.1:8081
cookie = same
[server s2]
address = 127.0.0.1:8082
cookie = same
[backend editors]
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "conf.ini"
    path.write_text(text)
    return str(path)


def test_a_valid_configuration_is_loaded(tmp_path: Path) -> None:
    options = Options()
    options.parseOptions(["-c", write(tmp_path, GOOD)])
    assert options.loaded.servers[0].name == "s1"


def test_the_configuration_file_is_required() -> None:
    with pytest.raises(UsageError, match="-c FILE"):
        Options().parseOptions([])


def test_an_invalid_configuration_is_a_usage_error_naming_every_problem(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as info:
        Options().parseOptions(["-c", write(tmp_path, BAD)])
    text = str(info.value)
    assert "timeout_client" in text and "[backend editors]" in text and "same" in text


def test_check_prints_ok_and_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        Options().parseOptions(["-c", write(tmp_path, GOOD), "--check"])
    assert info.value.code == 0
    assert capsys.readouterr().out.endswith(": OK\n")


def test_check_lists_every_problem_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        Options().parseOptions(["-c", write(tmp_path, BAD), "--check"])
    assert info.value.code == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3
    assert any("[proxy] timeout_client" in line for line in lines)


def test_twistd_finds_the_plugin() -> None:
    names = [maker.tapname for maker in getPlugins(IServiceMaker)]
    assert "stickyproxy" in names


def test_twistd_check_from_another_directory_exits_non_zero_on_a_bad_file(
    tmp_path: Path,
) -> None:
    twistd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
    bad = subprocess.run(
        [*twistd, "stickyproxy", "-c", write(tmp_path, BAD), "--check"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert bad.returncode != 0
    assert "same" in bad.stderr
    good_path = tmp_path / "good.ini"
    good_path.write_text(GOOD)
    good = subprocess.run(
        [*twistd, "stickyproxy", "-c", str(good_path), "--check"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert good.returncode == 0, good.stderr
