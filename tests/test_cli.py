"""``python -m stickyproxy``: check and route."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stickyproxy.cli import main

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
PROJECT = CONF_DIR.parent

THREE_SERVERS = {
    "s1": "[server s1]\naddress = 10.0.0.1:3030\n",
    "s2": "[server s2]\naddress = 10.0.0.2:3030\n",
    "s3": "[server s3]\naddress = 10.0.0.3:3030\n",
}
CLIENTS = [f"198.51.{i // 200}.{i % 200 + 1}" for i in range(300)] + [
    "2001:db8::1",
    "2001:db8::2",
    "::ffff:192.0.2.1",
]


def run(argv: list[str], stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(argv, stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def write(tmp_path: Path, text: str, name: str = "sp.ini") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture
def three(tmp_path: Path) -> str:
    return write(tmp_path, "[proxy]\nlisten = tcp:3030\n" + "".join(THREE_SERVERS.values()))


def routes(output: str) -> dict[str, str]:
    pairs = [line.split(" ") for line in output.splitlines()]
    assert all(len(pair) == 2 for pair in pairs), output
    return dict(pairs)


# --- no command ------------------------------------------------------------------


def test_no_command_prints_usage_and_fails() -> None:
    status, out, err = run([])
    assert (status, out) == (2, "")
    assert "usage: python -m stickyproxy" in err
    assert "check" in err
    assert "route" in err


def test_an_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, _ = run(["frobnicate"])
    assert status == 2
    assert "invalid choice" in capsys.readouterr().err


# --- check -------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CONF_DIR.glob("*.ini")), ids=lambda p: p.name)
def test_check_accepts_the_shipped_examples(path: Path) -> None:
    assert run(["check", "-c", str(path)]) == (0, f"{path}: OK\n", "")


def test_check_prints_every_problem_one_per_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[proxy]\ntimeout_connect = 5000\n"
        "[server s1]\naddress = a:1\ncookie = websrv1\n"
        "[server s2]\naddress = b:1\ncookie = websrv1\n",
    )
    status, out, _ = run(["check", "-c", path])
    assert status == 1
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{path}: [proxy] timeout_connect: '5000' has no unit")
    assert lines[1] == f"{path}: [server s2] cookie: value 'websrv1' is already used by [server s1]"


def test_check_reports_an_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.ini"
    status, out, _ = run(["check", "-c", str(missing)])
    assert status == 1
    assert f"cannot read {missing}" in out


def test_check_needs_a_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["check"])[0] == 2
    assert "-c/--config" in capsys.readouterr().err


# --- route -------------------------------------------------------------------------------


def test_route_prints_one_server_per_address(three: str) -> None:
    status, out, err = run(["route", "-c", three, *CLIENTS])
    assert (status, err) == (0, "")
    assert list(routes(out)) == CLIENTS
    assert set(routes(out).values()) == {"s1", "s2", "s3"}


def test_route_reads_addresses_from_stdin_when_none_are_given(three: str) -> None:
    from_args = run(["route", "-c", three, *CLIENTS])
    stdin = "\n".join(f"  {address}  " for address in CLIENTS[:150]) + "\n\n\n"
    stdin += "\n".join(CLIENTS[150:])  # the last line has no newline
    assert run(["route", "-c", three], stdin=stdin) == from_args


def test_route_is_deterministic(three: str) -> None:
    assert run(["route", "-c", three, *CLIENTS]) == run(["route", "-c", three, *CLIENTS])


def test_route_does_not_depend_on_the_order_of_server_sections(three: str, tmp_path: Path) -> None:
    shuffled = write(
        tmp_path,
        THREE_SERVERS["s3"]
        + "[proxy]\nlisten = tcp:3030\n"
        + THREE_SERVERS["s1"]
        + THREE_SERVERS["s2"],
        name="shuffled.ini",
    )
    assert run(["route", "-c", shuffled, *CLIENTS]) == run(["route", "-c", three, *CLIENTS])


def test_a_down_server_gets_no_new_clients_and_only_its_clients_move(three: str) -> None:
    before = routes(run(["route", "-c", three, *CLIENTS])[1])
    status, out, _ = run(["route", "-c", three, "--down", "s2", *CLIENTS])
    after = routes(out)
    assert status == 0
    assert "s2" not in after.values()
    assert {a: s for a, s in before.items() if s != "s2"} == {
        a: s for a, s in after.items() if before[a] != "s2"
    }


def test_a_draining_server_gets_no_new_clients(three: str) -> None:
    before = routes(run(["route", "-c", three, *CLIENTS])[1])
    after = routes(run(["route", "-c", three, "--drain", "s1", *CLIENTS])[1])
    assert "s1" not in after.values()
    assert all(after[a] == s for a, s in before.items() if s != "s1")


def test_down_and_drain_may_be_repeated(three: str) -> None:
    out = run(["route", "-c", three, "--down", "s1", "--drain", "s3", *CLIENTS])[1]
    assert set(routes(out).values()) == {"s2"}


def test_with_every_server_down_the_answer_is_a_dash(three: str) -> None:
    argv = ["route", "-c", three, "--down", "s1", "--down", "s2", "--drain", "s3", "192.0.2.1"]
    status, out, err = run(argv)
    assert (status, out) == (0, "192.0.2.1 -\n")
    assert err.startswith("192.0.2.1: no server")


def test_a_bad_address_is_reported_and_the_others_still_routed(three: str) -> None:
    status, out, err = run(["route", "-c", three, "192.0.2.1", "not-an-ip", "192.0.2.2"])
    assert status == 1
    assert list(routes(out)) == ["192.0.2.1", "192.0.2.2"]
    assert err == "not-an-ip: not an IP address\n"


def test_a_bad_address_on_stdin_fails_at_the_end(three: str) -> None:
    status, out, err = run(["route", "-c", three], stdin="192.0.2.1\n300.1.1.1\n192.0.2.2\n")
    assert status == 1
    assert list(routes(out)) == ["192.0.2.1", "192.0.2.2"]
    assert "300.1.1.1" in err


def test_an_unknown_server_name_is_a_usage_error(three: str) -> None:
    status, out, err = run(["route", "-c", three, "--down", "s9", "192.0.2.1"])
    assert (status, out) == (2, "")
    assert "s9" in err
    assert "s1, s2, s3" in err


def test_route_with_an_invalid_configuration_prints_its_problems(tmp_path: Path) -> None:
    path = write(tmp_path, "[server s1]\n")
    status, out, err = run(["route", "-c", path, "192.0.2.1"])
    assert (status, out) == (1, "")
    assert f"{path}: [server s1] address: missing" in err


def test_python_m_stickyproxy_route_reads_stdin(three: str) -> None:
    expected = run(["route", "-c", three, *CLIENTS[:20]])[1]
    result = subprocess.run(
        [sys.executable, "-m", "stickyproxy", "route", "-c", three],
        input="\n".join(CLIENTS[:20]) + "\n",
        capture_output=True,
        text=True,
        cwd=PROJECT,
        env={**os.environ, "PYTHONPATH": str(PROJECT)},
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == expected


def test_check_builds_endpoints_with_twisted(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[proxy]\nlisten = tcp:3030:interfce=127.0.0.1\n"
        "[admin]\nlisten = ssl:9000:privateKey=/nonexistent/key.pem\n" + THREE_SERVERS["s1"],
    )
    status, out, _ = run(["check", "-c", path])
    assert status == 1
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{path}: [proxy] listen: 'tcp:3030:interfce=127.0.0.1': ")
    assert lines[1].startswith(f"{path}: [admin] listen: 'ssl:9000:")


def test_check_leaves_systemd_endpoints_to_systemd(tmp_path: Path) -> None:
    path = write(tmp_path, "[proxy]\nlisten = systemd:domain=INET:index=0\n" + THREE_SERVERS["s1"])
    assert run(["check", "-c", path]) == (0, f"{path}: OK\n", "")


def test_with_a_header_hash_key_route_shows_requests_without_the_header(
    three: str, tmp_path: Path
) -> None:
    by_header = write(
        tmp_path,
        "[balance]\nhash_key = header:X-User\n" + "".join(THREE_SERVERS.values()),
        name="header.ini",
    )
    status, out, err = run(["route", "-c", by_header, *CLIENTS])
    assert status == 0
    assert err == "note: [balance] hash_key = header:x-user; showing requests without it\n"
    assert out == run(["route", "-c", three, *CLIENTS])[1]
