"""The systemd service notification protocol, spoken without libsystemd.

A service of ``Type=notify`` tells its manager how it is doing by sending
datagrams to the ``AF_UNIX`` socket named in ``$NOTIFY_SOCKET``, each one a
newline-separated list of ``KEY=VALUE`` assignments (sd_notify(3)):

``READY=1``
    start-up is complete: the listeners accept connections. Units ordered
    after this one start only now, and ``systemctl start`` returns.
``RELOADING=1`` with ``MONOTONIC_USEC=...``
    a configuration reload has begun; ``READY=1`` ends it.
``STOPPING=1``
    shutdown has begun (connections are being drained).
``STATUS=...``
    one line of free text that ``systemctl status`` shows.
``WATCHDOG=1``
    the process is alive; required at least every ``WatchdogSec=``.

::

    systemd.ready("listening on 0.0.0.0:3030")   # after every listener is bound
    systemd.stopping()                           # first thing on SIGTERM

Outside systemd ``$NOTIFY_SOCKET`` is unset and every call is a no-op that
returns ``False``, so callers need no "are we under systemd?" test.

This module imports only the standard library and never blocks: it is called
from the reactor thread.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Mapping

__all__ = [
    "notify",
    "ready",
    "reloading",
    "status",
    "stopping",
    "watchdog",
    "watchdog_interval",
]


def notify(state: str, *, environ: Mapping[str, str] = os.environ) -> bool:
    """Send one notification datagram to the service manager.

    :param state: newline-separated ``KEY=VALUE`` assignments, such as
        ``"READY=1\\nSTATUS=serving"``; sent as UTF-8 (a lone surrogate,
        which UTF-8 cannot encode, becomes ``?``).
    :param environ: where to read ``NOTIFY_SOCKET`` (the process environment
        by default).
    :return: ``True`` once sent; ``False`` when ``NOTIFY_SOCKET`` is unset or
        empty (not running under a service manager that listens).
    :raises OSError: the datagram could not be sent (no such socket, nobody
        bound to it, its queue full, or an address family this module does
        not speak, such as ``vsock:``); sd_notify(3) reports the same errors
        as a negative errno.
    """
    address = _socket_address(environ.get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        # A full receive queue must not stall the event loop; the manager
        # drains its socket promptly, so EAGAIN here means it is wedged.
        sock.setblocking(False)
        sock.sendto(state.encode("utf-8", "replace"), address)
    return True


def ready(status: str | None = None, *, environ: Mapping[str, str] = os.environ) -> bool:
    """Report start-up (or a reload) complete, optionally with a status line.

    :param status: text for ``systemctl status``; see :func:`status`.
    """
    return notify(_with_status("READY=1", status), environ=environ)


def reloading(
    status: str | None = None,
    *,
    environ: Mapping[str, str] = os.environ,
    monotonic_usec: int | None = None,
) -> bool:
    """Report that a configuration reload has begun; :func:`ready` ends it.

    ``MONOTONIC_USEC`` goes with ``RELOADING=1``: systemd 253 and later
    (``Type=notify-reload``) use it to tell this reload from an earlier one
    and wait for it otherwise.

    :param monotonic_usec: ``CLOCK_MONOTONIC`` in microseconds, the clock
        systemd compares with; read now when not given.
    """
    if monotonic_usec is None:
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    state = f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec}"
    return notify(_with_status(state, status), environ=environ)


def stopping(status: str | None = None, *, environ: Mapping[str, str] = os.environ) -> bool:
    """Report that shutdown has begun, so systemd shows the unit as deactivating."""
    return notify(_with_status("STOPPING=1", status), environ=environ)


def status(text: str, *, environ: Mapping[str, str] = os.environ) -> bool:
    """Set the one-line status ``systemctl status`` shows.

    Line breaks in ``text`` become spaces: a newline would end the
    ``STATUS=`` assignment and let the rest be read as another one (a stray
    ``READY=1`` in a backend's name, say).
    """
    return notify(_status_line(text), environ=environ)


def watchdog(*, environ: Mapping[str, str] = os.environ) -> bool:
    """Tell the watchdog the process is alive (see :func:`watchdog_interval`)."""
    return notify("WATCHDOG=1", environ=environ)


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> float | None:
    """How often to call :func:`watchdog`, in seconds, if at all.

    systemd sets ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``) when the unit has
    ``WatchdogSec=``; the service is killed when no ``WATCHDOG=1`` arrives for
    that long. Pinging at half the timeout, as sd_watchdog_enabled(3)
    recommends, leaves room for one late timer.

    :return: half the timeout, or ``None`` when there is no watchdog for this
        process: ``WATCHDOG_USEC`` unset, not a positive integer, or
        ``WATCHDOG_PID`` naming another process (a parent that exec'd a
        helper, say).
    """
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000 / 2


def _socket_address(value: str) -> str | bytes | None:
    """The ``sendto`` address for ``$NOTIFY_SOCKET``, ``None`` when unset.

    A leading ``@`` names a socket in Linux's abstract namespace, whose
    address starts with a NUL byte instead (unix(7)).
    """
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode("utf-8")
    if value.startswith("/"):
        return value
    # systemd 253+ may also name an AF_VSOCK address ("vsock:CID:PORT") for
    # services in virtual machines; a proxy runs on the host, and a relative
    # path is not a valid NOTIFY_SOCKET at all.
    raise OSError(errno.EAFNOSUPPORT, f"unsupported NOTIFY_SOCKET address {value!r}")


def _status_line(text: str) -> str:
    # systemd also reads a NUL as the end of the datagram.
    return "STATUS=" + " ".join(text.replace("\0", " ").splitlines())


def _with_status(state: str, status: str | None) -> str:
    return state if status is None else f"{state}\n{_status_line(status)}"
