# -*- test-case-name: tests.test_sidstore -*-
"""Where the shared engine.io session table lives: ``redis://`` and ``unix://`` URLs.

Parsed without I/O, so that the configuration can check ``[engineio]
sid_store`` with everything else; :mod:`stickyproxy.sidstore` connects.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Final, Literal
from urllib.parse import parse_qsl, quote, unquote, urlsplit

__all__ = ["DEFAULT_PORT", "StoreAddress", "parse_store_url"]

#: Redis's registered port, used when a ``redis://`` URL names none.
DEFAULT_PORT: Final = 6379

#: The highest database number accepted; Redis itself has 16 by default.
_MAX_DB: Final = 2**31 - 1


@dataclass(frozen=True)
class StoreAddress:
    """Where the store lives: a TCP ``host:port`` or a Unix socket ``path``.

    :ivar kind: ``"tcp"`` or ``"unix"``.
    :ivar host: the host name or IP address (TCP only).
    :ivar port: the port (TCP only).
    :ivar path: the socket's absolute path (Unix only).
    :ivar db: the Redis database number, selected on every connection.
    """

    kind: Literal["tcp", "unix"]
    host: str | None = None
    port: int | None = None
    path: str | None = None
    db: int = 0

    @property
    def ip(self) -> IPv4Address | IPv6Address | None:
        """The host as an IP address, or None for a host name (or a Unix socket)."""
        return _ip_or_none(self.host) if self.host else None

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix://{quote(self.path or '')}?db={self.db}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"redis://{host}:{self.port}/{self.db}"


def parse_store_url(text: str) -> StoreAddress:
    """Read ``redis://host[:port][/db]`` or ``unix:///path[?db=N]``.

    The port defaults to 6379 and the database to 0; an IPv6 address is
    written in brackets, as in any URL (RFC 3986 section 3.2.2).
    Credentials and TLS (``rediss://``) are not supported.

    :raises ValueError: with a message naming what is wrong.
    """
    text = text.strip()
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {text!r} ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "unix"):
        hint = " (TLS is not supported)" if scheme == "rediss" else ""
        raise ValueError(
            f"{text!r}: the scheme must be redis:// or unix://, not {scheme or 'missing'!r}{hint}"
        )
    if parts.fragment:
        raise ValueError(f"{text!r}: a fragment (#...) means nothing here")
    if scheme == "unix":
        return _parse_unix(text, parts.netloc, parts.path, parts.query)
    return _parse_tcp(text, parts.netloc, parts.path, parts.query)


def _parse_tcp(text: str, netloc: str, path: str, query: str) -> StoreAddress:
    if "@" in netloc:
        raise ValueError(f"{text!r}: credentials in the URL are not supported")
    if query:
        raise ValueError(f"{text!r}: redis:// takes no query; put the database in the path")
    if netloc.startswith("["):
        # An IPv6 literal: "[addr]" or "[addr]:port".
        end = netloc.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: unclosed '[' in the address")
        host, rest = netloc[1:end], netloc[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r}: unexpected {rest!r} after the address")
        port_text = rest[1:] if rest else None
        if not isinstance(_ip_or_none(host), IPv6Address):
            raise ValueError(f"{text!r}: {host!r} in brackets is not an IPv6 address")
    else:
        host, colon, port_text_ = netloc.partition(":")
        port_text = port_text_ if colon else None
    if not host:
        raise ValueError(f"{text!r}: the host is missing")
    port = DEFAULT_PORT if port_text is None else _port(text, port_text)
    db_text = path[1:] if path.startswith("/") else path
    db = 0 if not db_text else _db(text, db_text)
    return StoreAddress("tcp", host=host, port=port, db=db)


def _parse_unix(text: str, netloc: str, path: str, query: str) -> StoreAddress:
    if netloc:
        raise ValueError(
            f"{text!r}: a unix:// URL names no host; write the path after three slashes, "
            "as in unix:///run/redis.sock"
        )
    socket_path = unquote(path)
    if not socket_path.startswith("/") or socket_path == "/":
        raise ValueError(f"{text!r}: the socket path is missing or not absolute")
    db = 0
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ValueError(f"{text!r}: malformed query {query!r}") from None
    for name, value in pairs:
        if name != "db":
            raise ValueError(f"{text!r}: unknown parameter {name!r}; only db is accepted")
        db = _db(text, value)
    if len(pairs) > 1:
        raise ValueError(f"{text!r}: db is given more than once")
    return StoreAddress("unix", path=socket_path, db=db)


def _port(text: str, port_text: str) -> int:
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"{text!r}: the port must be a number, not {port_text!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is out of range 1-65535")
    return port


def _db(text: str, db_text: str) -> int:
    if not db_text.isascii() or not db_text.isdigit():
        raise ValueError(f"{text!r}: the database must be a number, not {db_text!r}")
    db = int(db_text)
    if db > _MAX_DB:
        raise ValueError(f"{text!r}: database {db} is out of range")
    return db


def _ip_or_none(host: str) -> IPv4Address | IPv6Address | None:
    try:
        return ip_address(host)
    except ValueError:
        return None
