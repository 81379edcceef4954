"""Child processes for the benchmark: start, watch, measure and stop them by PID.

Every listening socket is bound here, on 127.0.0.1 with an OS-chosen port, and
handed to the child by file descriptor (HAProxy's ``bind fd@N``, the relay's and
the echo server's ``--fd``). The port is therefore known before the child runs
and nothing races for it. stickyproxy binds its own port (``tcp:0``) and
reports it through its ``--ready-file``.

CPU time and resident memory are read from ``/proc/PID/stat`` and
``/proc/PID/status`` (see proc(5)), so the figures are the proxy process's own,
whatever else the machine is doing.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

#: Clock ticks per second, the unit of utime and stime in /proc/PID/stat.
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

#: Accept queue of the listening sockets made here; the WebSocket tests open
#: connections in bursts of a few hundred.
LISTEN_BACKLOG = 1024


class ChildError(Exception):
    """A child process exited early or never became ready."""


def raise_nofile_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit.

    Children inherit resource limits, so every process started afterwards
    (proxies, backends) may hold as many sockets as this one.

    :return: the new soft limit.
    """
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def listening_socket() -> socket.socket:
    """A TCP socket listening on 127.0.0.1, on a port the OS chose.

    The socket is inheritable so that it can be passed to a child with
    ``pass_fds``.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(LISTEN_BACKLOG)
    sock.set_inheritable(True)
    return sock


def port_of(sock: socket.socket) -> int:
    """The port a socket from :func:`listening_socket` is bound to."""
    port: int = sock.getsockname()[1]
    return port


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far (proc(5) fields 14, 15)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is parenthesised and may contain spaces, so
    # split after its closing parenthesis; utime is then the 12th field.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (``VmRSS`` in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ChildError(f"no VmRSS for pid {pid}")


class Child:
    """One process started for the benchmark, stopped by its PID.

    The child runs in its own session so that a Ctrl-C in the terminal reaches
    only the benchmark, which then stops its children in order.

    :param name: a short label for messages.
    :param argv: the command line.
    :param log_dir: the child's stdout and stderr go to ``log_dir/name.log``.
    :param pass_fds: listening sockets handed to the child.
    :param env: extra environment variables.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        *,
        pass_fds: Sequence[int] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=tuple(pass_fds),
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def check_alive(self) -> None:
        """Raise :class:`ChildError` with the end of its log if the child exited."""
        code = self.process.poll()
        if code is not None:
            raise ChildError(f"{self.name} exited with status {code}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the child wrote."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready_file(self, path: Path, timeout: float) -> list[tuple[str, int]]:
        """Wait for the child to write ``{"listen": [[host, port], ...]}`` to *path*.

        :return: the listening addresses.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if path.exists():
                listen = json.loads(path.read_text())["listen"]
                return [(str(host), int(port)) for host, port in listen]
            time.sleep(0.05)
        raise ChildError(f"{self.name} wrote no ready file in {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after *grace* seconds; always reaps the child."""
        if self.process.poll() is not None:
            return
        os.kill(self.pid, signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait()


class Children:
    """The set of children started so far; :meth:`stop_all` stops each by PID."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._running: list[Child] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        pass_fds: Sequence[int] = (),
        env: dict[str, str] | None = None,
    ) -> Child:
        child = Child(name, argv, self.log_dir, pass_fds=pass_fds, env=env)
        self._running.append(child)
        return child

    def stop(self, child: Child) -> None:
        child.stop()
        self._running.remove(child)

    def stop_all(self) -> None:
        """Stop every child still running, most recent first."""
        while self._running:
            self._running.pop().stop()
