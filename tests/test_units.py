"""The systemd units in conf/: what they promise, and what systemd makes of them.

Unit files are not INI files (keys repeat, and an empty assignment resets a
list), so they are read here line by line, as systemd.syntax(7) describes.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from twisted.scripts import twistd

from stickyproxy.config import ProxyConfig, load_config

CONF = Path(__file__).resolve().parents[1] / "conf"
SERVICE = CONF / "stickyproxy.service"
SOCKET = CONF / "stickyproxy.socket"

INSTALLED_TWISTD = "/opt/stickyproxy/bin/twistd"
INSTALLED_CONFIG = "/etc/stickyproxy/stickyproxy.ini"

Unit = dict[str, list[tuple[str, str]]]

#: twistd's command line (this platform's options, then the plugin's); the
#: module re-exports it without type information.
ServerOptions: Any = twistd.ServerOptions  # type: ignore[attr-defined]


def read_unit(path: Path) -> Unit:
    """Sections, each a list of (key, value) in file order."""
    unit: Unit = {}
    section: list[tuple[str, str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], [])
            continue
        key, equals, value = line.partition("=")
        assert equals and section is not None, f"{path.name}: stray line {line!r}"
        section.append((key.strip(), value.strip()))
    return unit


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def value(unit: Unit, section: str, key: str) -> str:
    """The setting in force: for single-valued keys the last assignment wins."""
    found = values(unit, section, key)
    assert found, f"[{section}] {key}= is missing"
    return found[-1]


def seconds(span: str) -> float:
    """A systemd time span (systemd.time(7)) such as ``60s``, ``1min 30s`` or ``90``."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "": 1}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span):
        total += float(number) * units[unit]
    return total


@pytest.fixture(scope="module")
def service() -> Unit:
    return read_unit(SERVICE)


@pytest.fixture(scope="module")
def socket_unit() -> Unit:
    return read_unit(SOCKET)


@pytest.fixture
def valid_config(tmp_path: Path) -> str:
    path = tmp_path / "stickyproxy.ini"
    path.write_text(
        "[proxy]\nlisten = tcp:0:interface=127.0.0.1\n[server s1]\naddress = 127.0.0.1:8081\n"
    )
    return str(path)


def twistd_argv(command: str, config: str) -> list[str]:
    """The arguments twistd gets, the installed config file replaced by ``config``."""
    argv = shlex.split(command)
    assert argv[0] == INSTALLED_TWISTD
    assert INSTALLED_CONFIG in argv
    return [config if arg == INSTALLED_CONFIG else arg for arg in argv[1:]]


# -- stickyproxy.service -------------------------------------------------------------------


def test_the_service_tells_systemd_when_it_is_ready(service: Unit) -> None:
    # notify-reload needs systemd 253; notify plus ExecReload works everywhere.
    assert value(service, "Service", "Type") == "notify"
    # twistd runs in the foreground: the notifying process is the main one.
    assert value(service, "Service", "NotifyAccess") == "main"


def test_start_runs_twistd_in_the_foreground_without_a_pid_file(
    service: Unit, valid_config: str
) -> None:
    options = ServerOptions()
    options.parseOptions(twistd_argv(value(service, "Service", "ExecStart"), valid_config))
    assert options["nodaemon"]
    assert options["pidfile"] == ""
    assert options.subCommand == "stickyproxy"
    assert options.subOptions["config"] == valid_config
    assert not options.subOptions["check"]


def test_the_configuration_is_checked_before_each_start(service: Unit, valid_config: str) -> None:
    (check,) = values(service, "Service", "ExecStartPre")
    options = ServerOptions()
    with pytest.raises(SystemExit) as info:
        options.parseOptions(twistd_argv(check, valid_config))
    assert info.value.code == 0
    start = shlex.split(value(service, "Service", "ExecStart"))
    # The same program checks the same file that is then run.
    assert shlex.split(check)[0] == start[0]
    assert shlex.split(check).count(INSTALLED_CONFIG) == start.count(INSTALLED_CONFIG) == 1


def test_reload_sends_sighup_to_the_main_process(service: Unit) -> None:
    argv = shlex.split(value(service, "Service", "ExecReload"))
    assert Path(argv[0]).name == "kill"
    assert argv[1:] in (["-HUP", "$MAINPID"], ["-s", "HUP", "$MAINPID"])


def test_stopping_waits_longer_than_the_graceful_shutdown_takes(service: Unit) -> None:
    defaults = ProxyConfig()
    graceful = defaults.grace_period + defaults.close_spread_time
    assert seconds(value(service, "Service", "TimeoutStopSec")) >= graceful + 10


def test_open_files_allow_two_per_connection_at_maxconn(service: Unit) -> None:
    assert int(value(service, "Service", "LimitNOFILE")) >= 4 * ProxyConfig().maxconn


SANDBOX = {
    "DynamicUser": "yes",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
}


@pytest.mark.parametrize(("key", "expected"), sorted(SANDBOX.items()))
def test_the_service_runs_sandboxed(service: Unit, key: str, expected: str) -> None:
    assert value(service, "Service", key) == expected


def test_only_the_capability_to_bind_low_ports_is_kept(service: Unit) -> None:
    assert value(service, "Service", "CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    assert value(service, "Service", "AmbientCapabilities") == "CAP_NET_BIND_SERVICE"


def test_the_address_families_include_the_notify_socket(service: Unit) -> None:
    families = set(value(service, "Service", "RestrictAddressFamilies").split())
    # AF_UNIX carries READY=1 and the rest to systemd.
    assert families == {"AF_INET", "AF_INET6", "AF_UNIX"}


# -- stickyproxy.socket --------------------------------------------------------------------


def test_the_socket_passes_one_listening_socket_to_the_service(socket_unit: Unit) -> None:
    assert len(values(socket_unit, "Socket", "ListenStream")) == 1
    assert value(socket_unit, "Socket", "Accept") == "no"
    # Without Service=, systemd starts the service of the same name.
    assert values(socket_unit, "Socket", "Service") == []
    assert SOCKET.stem == SERVICE.stem
    assert value(socket_unit, "Install", "WantedBy") == "sockets.target"


def documented_endpoint() -> str:
    """The ``listen = systemd:...`` line the socket unit tells readers to use."""
    found = re.findall(r"^#\s*listen = (systemd:\S+)$", SOCKET.read_text(), re.MULTILINE)
    assert len(found) == 1, found
    return str(found[0])


def test_the_documented_endpoint_adopts_the_family_systemd_opens(socket_unit: Unit) -> None:
    listen = value(socket_unit, "Socket", "ListenStream")
    domain = dict(arg.split("=", 1) for arg in documented_endpoint().split(":")[1:])["domain"]
    # A bare port would make the family depend on whether the host has IPv6.
    if listen.startswith("["):
        assert domain == "INET6"
    else:
        assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+:\d+", listen), listen
        assert domain == "INET"


def test_the_documented_endpoint_is_a_valid_listen_setting(tmp_path: Path) -> None:
    path = tmp_path / "activated.ini"
    path.write_text(
        f"[proxy]\nlisten = {documented_endpoint()}\n[server s1]\naddress = 127.0.0.1:8081\n"
    )
    assert load_config(str(path)).proxy.listen == (documented_endpoint(),)


# -- systemd-analyze verify ----------------------------------------------------------------

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def verify(directory: Path, *names: str) -> list[str]:
    """Run ``systemd-analyze verify`` on units in ``directory``; the lines about them."""
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(f"./{name}" for name in names)],
        cwd=directory,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    # Elsewhere in the output: complaints about the host (no systemd
    # running, other units), which say nothing about these files.
    stems = {Path(name).stem for name in names}
    lines = (result.stdout + result.stderr).splitlines()
    about = [line for line in lines if any(stem in line for stem in stems)]
    if result.returncode != 0:
        about.append(f"exit status {result.returncode}: {lines}")
    return about


def installable_copy(source: Path, directory: Path) -> Path:
    """Copy a unit, pointing it at the twistd of this test run (verify checks it exists)."""
    twistd = Path(sys.executable).with_name("twistd")
    if not twistd.exists():
        pytest.skip("no twistd next to the Python running the tests")
    target = directory / source.name
    target.write_text(source.read_text().replace(INSTALLED_TWISTD, str(twistd)))
    return target


@needs_systemd_analyze
def test_systemd_accepts_both_units(tmp_path: Path) -> None:
    installable_copy(SERVICE, tmp_path)
    installable_copy(SOCKET, tmp_path)
    assert verify(tmp_path, SERVICE.name, SOCKET.name) == []


@needs_systemd_analyze
def test_systemd_analyze_would_report_a_mistake(tmp_path: Path) -> None:
    # Guards the test above against a verifier that stays silent here.
    unit = installable_copy(SERVICE, tmp_path)
    unit.write_text(unit.read_text().replace("NotifyAccess=main", "NotifyAccess=mian"))
    assert verify(tmp_path, SERVICE.name) != []
