"""A throwaway ``redis-server`` on loopback, for the integration suite and benchmarks.

The server keeps nothing on disk (no RDB snapshot, no append-only file), so a
restart on the same address starts empty, as after a crash of a cache. It
listens on a Unix socket in a private directory (no port to race for) or on a
TCP port the OS picked. It is stopped, paused and killed by PID.

Commands are sent in RESP2 (the Redis serialization protocol, version 2) on a
new connection each, so a test can ask Redis what the proxies wrote without
sharing a connection with them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.helpers import resp

from .harness import READY_TIMEOUT, Proc, ProcessNotReadyError, spawn

#: The ``redis-server`` executable, or None where it is not installed (often in
#: /usr/sbin or /usr/bin, off a restricted PATH).
REDIS = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin:/usr/bin")


class RedisServer:
    """A ``redis-server`` without persistence, restartable on the same address.

    :param workdir: the server's directory, and that of its Unix socket; keep
        its path short, as a socket's path is limited to about 100 bytes.
    :param tcp: listen on a loopback TCP port the OS picked instead of the
        Unix socket. The port is picked once, so a restart keeps it.
    """

    def __init__(self, workdir: Path, *, tcp: bool = False) -> None:
        self.workdir = workdir
        self.port: int | None = None
        if tcp:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                self.port = probe.getsockname()[1]
        self.socket_path = str(workdir / "redis.sock")
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        """The store URL of this server, naming no database (the default, 0)."""
        if self.port is not None:
            return f"redis://127.0.0.1:{self.port}"
        return f"unix://{self.socket_path}"

    def database_url(self, db: int) -> str:
        """The store URL of database ``db`` of this server."""
        if self.port is not None:
            return f"{self.url}/{db}"
        return f"{self.url}?db={db}"

    def start(self) -> None:
        """Start the server and wait until it answers ``PING``."""
        if REDIS is None:
            raise FileNotFoundError("redis-server is not installed")
        argv = [REDIS, "--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        if self.port is not None:
            argv += ["--port", str(self.port), "--bind", "127.0.0.1"]
        else:
            argv += ["--port", "0", "--unixsocket", self.socket_path, "--unixsocketperm", "700"]
        self.proc = spawn("redis", argv, self.workdir)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                if self.command("PING") == "PONG":
                    return
            except OSError:
                pass
            if not self.proc.running() or time.monotonic() > deadline:
                self.proc.stop()
                raise ProcessNotReadyError(f"waiting for PONG: {self.proc.describe()}")
            time.sleep(0.02)

    def _connect(self) -> socket.socket:
        if self.port is not None:
            return socket.create_connection(("127.0.0.1", self.port), timeout=5)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(5)
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        return sock

    def command(self, *args: str) -> str | int | None:
        """Send one command on a new connection (database 0).

        :return: the simple string, integer or bulk string reply; None for the
            null bulk string (a missing key).
        :raises OSError: the server is unreachable, or replied with an error or
            a kind of reply not decoded here (an array).
        """
        with self._connect() as sock, sock.makefile("rb") as reply:
            sock.sendall(resp(*args))
            line = reply.readline().rstrip(b"\r\n").decode()
            kind, rest = line[:1], line[1:]
            if kind == ":":
                return int(rest)
            if kind == "$":
                size = int(rest)
                # The payload is followed by its own CRLF.
                return None if size < 0 else reply.read(size + 2)[:-2].decode()
            if kind == "+":
                return rest
            raise OSError(f"unexpected reply {line!r} to {args[0]}")

    def integer(self, *args: str) -> int:
        """Send a command whose reply is an integer (``TTL``, ``EXISTS``...)."""
        value = self.command(*args)
        assert isinstance(value, int), (args, value)
        return value

    def keys(self) -> int:
        """How many keys database 0 holds."""
        return self.integer("DBSIZE")

    def signal(self, signum: int) -> None:
        """Send ``signum`` by PID (``SIGSTOP`` pauses the server, ``SIGCONT`` resumes it)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signum)

    def kill(self) -> None:
        """SIGKILL by PID: no goodbye to the clients, as in a crash."""
        assert self.proc is not None
        self.signal(signal.SIGKILL)
        self.proc.popen.wait(READY_TIMEOUT)

    def stop(self) -> None:
        """Stop the server if it runs; safe to call more than once."""
        if self.proc is not None:
            if self.proc.running():
                # A paused process would hold SIGTERM until resumed, and be
                # killed only after the whole grace period.
                self.signal(signal.SIGCONT)
            self.proc.stop()


@contextmanager
def private_directory(prefix: str) -> Iterator[Path]:
    """A new directory with a short path, removed afterwards.

    A Unix socket's path is limited to about 100 bytes, which a pytest
    ``tmp_path`` named after a long test can exceed.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def running_redis(*, tcp: bool = False) -> Iterator[RedisServer]:
    """A started :class:`RedisServer` in a private directory, for a ``with`` block.

    :param tcp: listen on a loopback TCP port instead of a Unix socket.
    """
    with private_directory("redis-") as workdir:
        server = RedisServer(workdir, tcp=tcp)
        server.start()
        try:
            yield server
        finally:
            server.stop()
