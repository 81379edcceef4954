"""Access log lines: one per request, one per finished tunnel.

The text form follows HAProxy's ``option httplog`` so existing log tooling
and habits carry over::

    203.0.113.7:40000 [27/Nov/2026:06:40:12.345] stickyproxy s2 0/0/1/2/3 200 119 hash
    +cookie "GET / HTTP/1.1"

(one line; wrapped here).

The timers are HAProxy's TR/Tw/Tc/Tr/Ta in milliseconds: receiving the
request head, waiting in a queue, connecting to the server (0 on a reused
connection), waiting for the response head (-1 when none came), and the whole
exchange. After the byte count comes the routing
decision (``cookie``, ``cookie-unusable``: the cookie named a server that
could not take it and the client was re-pinned, ``hash``, ``redispatch``,
``none``). The JSON form carries the same fields by name, one object per line.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass


@dataclass(slots=True)
class RequestRecord:
    """What is logged about one request."""

    client: str
    time: float  # when the request head began (UNIX time)
    server: str  # "-" when none was chosen
    decision: str
    status: int
    bytes_out: int
    t_request: float  # TR: receiving the head, seconds
    t_queue: float  # Tw
    t_connect: float  # Tc; 0 for a reused connection
    t_response: float  # Tr: waiting for the response head; -1 if none came
    t_total: float  # Ta
    request_line: str
    cookie_set: bool
    error: str = ""  # the proxy's reason, for its own error answers


@dataclass(slots=True)
class TunnelRecord:
    """What is logged about one finished tunnel (WebSocket)."""

    client: str
    time: float  # when the tunnel opened
    server: str
    duration: float
    bytes_from_client: int
    bytes_to_client: int
    closed_by: str  # "client", "server" or "proxy"


def _stamp(when: float) -> str:
    # HAProxy's date format, with milliseconds, in UTC.
    seconds = int(when)
    text = time.strftime("%d/%b/%Y:%H:%M:%S", time.gmtime(seconds))
    return f"{text}.{int((when - seconds) * 1000):03d}"


def _ms(seconds: float) -> int:
    return -1 if seconds < 0 else int(seconds * 1000)


def request_line(record: RequestRecord, frontend: str = "stickyproxy") -> str:
    """The httplog-style text line of ``record``."""
    timers = "/".join(
        str(_ms(t))
        for t in (
            record.t_request,
            record.t_queue,
            record.t_connect,
            record.t_response,
            record.t_total,
        )
    )
    cookie = " +cookie" if record.cookie_set else ""
    error = f" ({record.error})" if record.error else ""
    return (
        f"{record.client} [{_stamp(record.time)}] {frontend} {record.server} {timers} "
        f"{record.status} {record.bytes_out} {record.decision}{cookie} "
        f"{json.dumps(record.request_line)}{error}"
    )


def tunnel_line(record: TunnelRecord, frontend: str = "stickyproxy") -> str:
    """The text line of a finished tunnel."""
    return (
        f"{record.client} [{_stamp(record.time)}] {frontend} {record.server} tunnel "
        f"{_ms(record.duration)}ms in={record.bytes_from_client} "
        f"out={record.bytes_to_client} closed-by={record.closed_by}"
    )


def as_json(record: RequestRecord | TunnelRecord, frontend: str = "stickyproxy") -> str:
    """``record`` as one JSON object (``type`` is ``request`` or ``tunnel``)."""
    fields = asdict(record)
    fields["type"] = "request" if isinstance(record, RequestRecord) else "tunnel"
    fields["frontend"] = frontend
    return json.dumps(fields, separators=(",", ":"))
