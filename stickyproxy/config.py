"""Configuration: INI text in, frozen dataclasses out.

Section and key names follow the configuration contract documented in the
README. Parsing validates the whole file and reports every problem at once
(:class:`stickyproxy.errors.ConfigError`), each with its section and key.

The file is read with :mod:`configparser`: keys are case-sensitive, there is no
``%`` interpolation, and ``;`` or ``#`` start a comment at the beginning of a
line or after whitespace. Durations need a unit (``500ms``, ``10s``, ``5m``,
``1h``); sizes are bytes, or take ``k``/``m``/``g`` (powers of 1024).

Keys
====

===============================  =================  ==========================================
key                              default            meaning
===============================  =================  ==========================================
``[proxy] listen``               ``tcp:3030``       Twisted server endpoint strings,
                                                    comma-separated
``[proxy] proxy_protocol``       ``required``       ``required`` | ``optional`` | ``off``
``[proxy] trusted_proxies``      (anyone)           CIDRs or addresses allowed to send a PROXY
                                                    header, comma- or space-separated
``[proxy] maxconn``              ``1000``           client connections accepted at once (>= 1)
``[proxy] timeout_connect``      ``5s``             connecting to a server
``[proxy] grace_period``         ``10s``            *added*: on stop, how long requests in flight
                                                    may take to finish
``[proxy] close_spread_time``    ``10s``            *added*: on stop, open WebSockets are closed
                                                    (Close 1001) spread over this window
``[proxy] timeout_queue``        (connect)          *added*: how long a request may wait for a
                                                    server at its ``maxconn``; then 503.
                                                    Defaults to ``timeout_connect``
``[proxy] timeout_http_request`` ``10s``            the PROXY header and the whole request head
``[proxy] timeout_http_keep_alive``  (request)      *added*: idle time between two requests on
                                                    one client connection; defaults to
                                                    ``timeout_http_request``
``[proxy] timeout_client``       ``60s``            client inactivity while a request is served
``[proxy] timeout_server``       ``60s``            server inactivity while a request is served
``[proxy] timeout_tunnel``       ``1h``             inactivity of an upgraded (WebSocket)
                                                    connection
``[proxy] retries``              ``3``              connection attempts after the first (>= 0)
``[proxy] redispatch``           ``true``           the last retry may go to another server
``[proxy] forwarded_for``        ``true``           add ``X-Forwarded-For``
``[proxy] access_log``           ``off``            *added*: one line per request and per finished
                                                    tunnel: ``httplog`` (HAProxy-style text),
                                                    ``json`` or ``off``
``[proxy] proxy_tlv_headers``    ``false``          *added*: pass the PROXY v2 AUTHORITY and
                                                    UNIQUE_ID to backends as
                                                    ``X-Proxy-Authority``/``X-Unique-ID``
``[proxy] decision_header``      (off)              *added*: response header naming the routing
                                                    decision and server, e.g.
                                                    ``X-Stickyproxy-Route``
``[proxy] trust_forwarded_proto``  ``false``        *added*: a trusted peer's
                                                    ``X-Forwarded-Proto: https`` means TLS
                                                    (for ``[cookie] secure = auto``)
``[proxy] max_head_size``        ``15360``          *added*: largest request head (size)
``[proxy] max_headers``          ``100``            *added*: most header lines in a request head
``[proxy] workers``              ``1``              *added*: processes sharing the listeners,
                                                    1 to 64 (see stickyproxy.workers)
``[cookie] name``                ``storify_...``    persistence cookie name (an RFC 6265 token);
                                                    default ``storify_editor_host``
``[cookie] mode``                ``insert``         only ``insert`` for now
``[cookie] indirect``            ``true``           strip the cookie before forwarding; no
                                                    ``Set-Cookie`` when it is already right
``[cookie] nocache``             ``true``           keep shared caches from storing responses
                                                    that set the cookie
``[cookie] httponly``            ``false``          add the ``HttpOnly`` attribute
``[cookie] secure``              ``false``          add the ``Secure`` attribute; *added*:
                                                    ``auto`` adds it when the client's
                                                    connection is TLS
``[cookie] samesite``            (none)             empty | ``Lax`` | ``Strict`` | ``None``
                                                    (``None`` needs ``secure`` true or auto)
``[cookie] samesite_legacy``     ``false``          *added*: with ``samesite = None``, also set
                                                    a twin cookie without SameSite for old
                                                    clients
``[cookie] legacy_suffix``       ``_legacy``        *added*: the twin cookie's name is
                                                    ``name`` + this
``[cookie] max_age``             (session)          duration, whole seconds; empty = session
``[cookie] domain``              (none)             *added*: ``Domain`` attribute
``[cookie] path``                ``/``              *added*: ``Path`` attribute
``[balance] hash_key``           ``source``         ``source`` | ``header:NAME`` |
                                                    ``query:NAME``
``[balance] hash_balance_factor``  ``0``            0 = off, else > 100 (bounded loads, %)
``[balance] hash_function``      ``default``        ``default`` | ``haproxy``
``[health] path``                ``/status?all=1``  request target of the check
``[health] interval``            ``10s``            time between checks of a server fully UP (> 0)
``[health] fastinter``           (interval)         *added*: time between checks of a server going
                                                    up or down (``UP 2/3``, ``DOWN 1/2``), and
                                                    after start-up or maintenance; empty =
                                                    ``interval``
``[health] downinter``           (interval)         *added*: time between checks of a server fully
                                                    DOWN; empty = ``interval``
``[health] timeout``             ``5s``             time allowed for one check (> 0)
``[health] rise``                ``1``              passes that bring a server UP (>= 1)
``[health] fall``                ``3``              failures that take a server DOWN (>= 1)
``[health] expect_status``       ``200-399``        *added*: status codes that pass, as codes and
                                                    ranges: ``200,204,300-399``
``[health] host``                (server)           *added*: ``Host`` header of the check; empty
                                                    means the server's ``host:port`` (HTTP/1.1)
                                                    or no ``Host`` at all (HTTP/1.0)
``[health] http_version``        ``1.1``            *added*: ``1.1`` | ``1.0`` (HAProxy's default,
                                                    which sends no ``Host`` unless ``host`` is
                                                    set)
``[health] observe``             ``layer4``         *added*: ``layer4`` | ``none``; with
                                                    ``layer4`` a failed connection during traffic
                                                    counts as a failed check
``[server NAME] address``        (required)         ``host:port`` or ``[ipv6]:port``
``[server NAME] cookie``         NAME               cookie value naming this server (unique)
``[server NAME] weight``         ``10``             0 (drained) to 256
``[server NAME] maxconn``        ``1000``           concurrent requests, 0 = unlimited
``[server NAME] check``          ``true``           *added*: health-check this server
``[server NAME] tag``            (from NAME)        *added*: opaque tag in tagged engine.io sids
                                                    (unique; base64url, 1 to 32 characters)
``[engineio] path``              ``/socket.io/``    *added*: path prefix of engine.io requests,
                                                    routed by their ``sid``; empty = off
``[engineio] sid_tag``           ``off``            *added*: ``off`` | ``eio4``: tag EIO4 sids
                                                    with the server's tag (stateless fleets)
``[engineio] sid_store``         (none)             *added*: shared sid table for fleets,
                                                    ``redis://host:port/db``
``[engineio] sid_store_timeout`` ``250ms``          *added*: longest wait for the store
``[engineio] max_sessions``      ``100000``         *added*: sessions the local table keeps
``[engineio] sid_cookie``        ``io``             *added*: engine.io's own cookie name
``[admin] listen``               (off)              endpoint string of the status page
``[admin] token``                (none)             *added*: bearer token for runtime control
                                                    (16 or more of ``A-Za-z0-9-._~+/``, then
                                                    optional ``=``); without one, control is
                                                    allowed from loopback only
``[demo] backends``              ``false``          *added*: run built-in demo backends in the
                                                    proxy process on every server address
                                                    (loopback addresses only)
===============================  =================  ==========================================

Booleans are ``true``/``false``, ``yes``/``no``, ``on``/``off`` or ``1``/``0``.
Server names use letters, digits, ``-``, ``_`` and ``.``.
"""

from __future__ import annotations

import base64
import configparser
import difflib
import hashlib
import ipaddress
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from stickyproxy.cookietoken import parse_keys
from stickyproxy.errors import ConfigError, ConfigProblem
from stickyproxy.storeaddress import parse_store_url

__all__ = [
    "AdminConfig",
    "BalanceConfig",
    "Config",
    "CookieConfig",
    "DemoConfig",
    "EngineIOConfig",
    "HealthConfig",
    "IPNetwork",
    "ProxyConfig",
    "ServerConfig",
    "format_duration",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
    "read_config",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """``[proxy]``: the listening side."""

    listen: tuple[str, ...] = ("tcp:3030",)
    proxy_protocol: Literal["required", "optional", "off"] = "required"
    trusted_proxies: tuple[IPNetwork, ...] = ()
    maxconn: int = 1000
    timeout_connect: float = 5.0
    timeout_queue: float = 5.0
    grace_period: float = 10.0
    close_spread_time: float = 10.0
    timeout_http_request: float = 10.0
    timeout_http_keep_alive: float = 10.0
    timeout_client: float = 60.0
    timeout_server: float = 60.0
    timeout_tunnel: float = 3600.0
    retries: int = 3
    redispatch: bool = True
    forwarded_for: bool = True
    proxy_tlv_headers: bool = False
    #: A response header naming the routing decision and the server (for
    #: example ``X-Stickyproxy-Route: sid-table; server=s1``); empty: off.
    decision_header: str = ""
    #: Trust ``X-Forwarded-Proto: https`` from trusted proxies as a sign of TLS.
    trust_forwarded_proto: bool = False
    access_log: Literal["httplog", "json", "off"] = "off"
    max_head_size: int = 15360
    max_headers: int = 100
    workers: int = 1


@dataclass(frozen=True, slots=True)
class CookieConfig:
    """``[cookie]``: the persistence cookie."""

    name: str = "storify_editor_host"
    mode: Literal["insert"] = "insert"
    indirect: bool = True
    nocache: bool = True
    httponly: bool = False
    #: ``"auto"``: Secure when the client's connection is TLS (a TLS
    #: listener, a trusted ``X-Forwarded-Proto: https``, or the PROXY v2 SSL
    #: TLV).
    secure: bool | Literal["auto"] = False
    samesite: Literal["", "Lax", "Strict", "None"] = ""
    #: With ``samesite = None``: also set a twin cookie without SameSite,
    #: named ``name + legacy_suffix``, for old clients that reject
    #: ``SameSite=None`` (the approach of AWS ALB's AWSALB/AWSALBCORS pair).
    samesite_legacy: bool = False
    legacy_suffix: str = "_legacy"
    max_age: float | None = None
    domain: str | None = None
    path: str = "/"
    #: Signing keys, first signs, all verify (``[cookie] secret``); empty:
    #: the cookie carries the server's cookie value in clear. Kept out of
    #: ``repr`` so that a logged configuration never shows a secret.
    secret: tuple[bytes, ...] = field(default=(), repr=False)
    #: Seconds a signed cookie stays valid after its last refresh, or no limit.
    maxidle: float | None = None
    #: Seconds a signed cookie stays valid after the first pin, or no limit.
    maxlife: float | None = None


@dataclass(frozen=True, slots=True)
class BalanceConfig:
    """``[balance]``: how clients without a valid cookie are placed."""

    hash_key: Literal["source", "header", "query"] = "source"
    hash_key_name: str | None = None
    hash_balance_factor: int = 0
    hash_function: Literal["default", "haproxy"] = "default"


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """``[health]``: active HTTP checks."""

    path: str = "/status?all=1"
    interval: float = 10.0
    #: ``None``: the same as ``interval``.
    fastinter: float | None = None
    #: ``None``: the same as ``interval``.
    downinter: float | None = None
    timeout: float = 5.0
    rise: int = 1
    fall: int = 3
    #: Inclusive ``(low, high)`` ranges of status codes that pass.
    expect_status: tuple[tuple[int, int], ...] = ((200, 399),)
    #: ``None``: HTTP/1.1 names the server (``host:port``), HTTP/1.0 sends no Host.
    host: str | None = None
    http_version: Literal["1.0", "1.1"] = "1.1"
    observe: Literal["layer4", "none"] = "layer4"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """``[server NAME]``: one backend."""

    name: str
    host: str
    port: int
    cookie: str
    weight: int = 10
    maxconn: int = 1000
    check: bool = True
    #: The opaque tag that names this server in tagged engine.io sids
    #: (``[engineio] sid_tag``); empty: derived from the name.
    tag: str = ""

    @property
    def engine_tag(self) -> str:
        """The tag this server's sids carry: ``tag``, or one derived from the name."""
        return self.tag or default_tag(self.name)


@dataclass(frozen=True, slots=True)
class EngineIOConfig:
    """``[engineio]``: routing engine.io (socket.io) sessions by their ``sid``."""

    #: The path prefix of engine.io requests; empty turns sid routing off.
    path: str = "/socket.io/"
    #: ``eio4``: append the server's tag to the sid of EIO4 polling handshakes,
    #: so that any proxy of a fleet routes the session without shared state.
    sid_tag: Literal["off", "eio4"] = "off"
    #: A shared table for fleets, ``redis://host:port/db``; ``None``: none.
    sid_store: str | None = None
    #: How long a request or a handshake waits for the store at most.
    sid_store_timeout: float = 0.25
    #: The most sessions the local table remembers (oldest idle go first).
    max_sessions: int = 100_000
    #: engine.io's own cookie, also read to learn a handshake's sid.
    sid_cookie: str = "io"

    @property
    def enabled(self) -> bool:
        return bool(self.path)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """``[admin]``: the status endpoint (empty ``listen`` disables it)."""

    listen: str | None = None
    #: ``None``: runtime control only from loopback. Kept out of ``repr`` so
    #: that a logged configuration does not leak it.
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class DemoConfig:
    """``[demo]``: built-in demo backends for trying the proxy on one machine."""

    backends: bool = False


@dataclass(frozen=True, slots=True)
class Config:
    """A whole, validated configuration."""

    servers: tuple[ServerConfig, ...]
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    cookie: CookieConfig = field(default_factory=CookieConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    engineio: EngineIOConfig = field(default_factory=EngineIOConfig)


# ---------------------------------------------------------------------------
# Scalar values: each parser takes the stripped text of one value and either
# returns the parsed value or raises ValueError with a message that says what
# was expected. The message becomes ConfigProblem.message.
# ---------------------------------------------------------------------------

_DURATION_RE = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?P<unit>ms|s|m|h)")
_BARE_NUMBER_RE = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_SIZE_RE = re.compile(r"(?P<number>[0-9]+)(?P<unit>[kKmMgG]?)")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_WHOLE_RE = re.compile(r"[0-9]+")


def parse_duration(text: str) -> float:
    """Parse a duration with a unit into seconds.

    ``"500ms"`` is 0.5, ``"10s"`` 10, ``"1.5s"`` 1.5, ``"5m"`` 300 and ``"1h"``
    3600. A bare number is refused on purpose: HAProxy reads ``5000`` as
    milliseconds, so a value copied from an HAProxy configuration would
    otherwise silently mean something a thousand times longer.

    :param text: the value as written.
    :raises ValueError: with a message saying what was expected.
    """
    text = text.strip()
    match = _DURATION_RE.fullmatch(text)
    if match is None:
        if _BARE_NUMBER_RE.fullmatch(text):
            raise ValueError(
                f"{text!r} has no unit: write {text}ms or {text}s "
                f"(HAProxy reads a bare {text} as milliseconds, so {text}ms is what an "
                f"HAProxy configuration meant)"
            )
        raise ValueError(f"expected a duration such as 500ms, 10s, 5m or 1h, got {text!r}")
    number = float(match["number"])
    unit = match["unit"]
    # Milliseconds divide rather than multiply by 0.001 (which is not exact
    # in binary), so "500ms" is exactly 0.5 and format_duration round-trips.
    if unit == "ms":
        seconds = number / 1000
    elif unit == "s":
        seconds = number
    elif unit == "m":
        seconds = number * 60
    else:
        seconds = number * 3600
    if not math.isfinite(seconds):
        raise ValueError(f"duration {text!r} is too large")
    return seconds


def format_duration(seconds: float) -> str:
    """Write ``seconds`` the way a person would in the configuration.

    The largest unit that represents the value exactly wins (``"1h"``,
    ``"5m"``, ``"10s"``, ``"500ms"``); anything else is written in seconds
    with every significant digit. ``parse_duration(format_duration(x)) == x``
    for every finite ``x >= 0``.

    :raises ValueError: for a negative or non-finite value.
    """
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"cannot write {seconds!r} as a duration")
    seconds = float(seconds)
    if seconds == 0:
        return "0s"
    for unit, scaled in (
        ("h", seconds / 3600),
        ("m", seconds / 60),
        ("s", seconds),
        ("ms", seconds * 1000),
    ):
        if scaled.is_integer() and scaled < 1e15:
            candidate = f"{int(scaled)}{unit}"
            if parse_duration(candidate) == seconds:
                return candidate
    # repr() is the shortest text that reads back as the same float; the
    # grammar has no exponent, so expand "1e-05" into "0.00001".
    digits = repr(float(seconds))
    if "e" in digits:
        digits = format(Decimal(digits), "f")
    return f"{digits}s"


def parse_size(text: str) -> int:
    """Parse a size in bytes: ``"16384"``, ``"16k"``, ``"1m"`` (powers of 1024).

    :param text: the value as written.
    :raises ValueError: with a message saying what was expected.
    """
    text = text.strip()
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise ValueError(
            f"expected a size in bytes, optionally with k, m or g (16k = 16384 bytes), got {text!r}"
        )
    return int(match["number"]) * _SIZE_UNITS[match["unit"].lower()]


def _whole(text: str, minimum: int, maximum: int | None = None, what: str = "") -> int:
    """A decimal whole number within bounds (no sign, no ``_``, unlike int())."""
    if maximum is None:
        expected = f"a whole number >= {minimum}{what}"
    else:
        expected = f"a whole number from {minimum} to {maximum}{what}"
    if not _WHOLE_RE.fullmatch(text):
        raise ValueError(f"expected {expected}, got {text!r}")
    number = int(text)
    if number < minimum or (maximum is not None and number > maximum):
        raise ValueError(f"expected {expected}, got {text}")
    return number


def _integer(minimum: int, maximum: int | None = None, what: str = "") -> Callable[[str], int]:
    def parse(text: str) -> int:
        return _whole(text, minimum, maximum, what)

    return parse


_BOOLEANS = {
    "true": True,
    "yes": True,
    "on": True,
    "1": True,
    "false": False,
    "no": False,
    "off": False,
    "0": False,
}


def _boolean(text: str) -> bool:
    try:
        return _BOOLEANS[text.lower()]
    except KeyError:
        raise ValueError(f"expected true or false (or yes/no, on/off, 1/0), got {text!r}") from None


def _positive_size(text: str) -> int:
    size = parse_size(text)
    if size < 1:
        raise ValueError(f"expected a size above zero, got {text!r}")
    return size


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"expected {' or '.join(choices)}, got {text!r}")
        return text

    return parse


def _positive_duration(text: str) -> float:
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError(f"expected a duration above zero, got {text!r}")
    return seconds


# RFC 9110 §5.6.2: token = 1*tchar. A cookie name is a token (RFC 6265
# §4.1.1), and so is a header field name (RFC 9110 §5.1).
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# RFC 6265 §4.1.1 cookie-octet: visible ASCII except DQUOTE, comma,
# semicolon and backslash.
_COOKIE_VALUE_RE = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]+")
_SERVER_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_HOST_LABEL_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _cookie_name(text: str) -> str:
    if not _TOKEN_RE.fullmatch(text):
        raise ValueError(
            f"expected a cookie name made of letters, digits and !#$%&'*+.^_`|~- "
            f"(an RFC 6265 token), got {text!r}"
        )
    return text


def _cookie_value(text: str) -> str:
    # An empty value would make the bare "name=" cookie valid, and HAProxy
    # treats that as invalid precisely so no client sticks to nothing.
    if not _COOKIE_VALUE_RE.fullmatch(text):
        raise ValueError(
            "expected a non-empty cookie value of visible ASCII characters without "
            f"spaces, '\"', ',', ';' or '\\' (RFC 6265 section 4.1.1), got {text!r}"
        )
    return text


def _cookie_mode(text: str) -> str:
    if text == "insert":
        return text
    if text in ("rewrite", "prefix"):
        raise ValueError(f"mode {text!r} is not supported yet: only insert is")
    raise ValueError(f"expected insert, got {text!r}")


def _samesite(text: str) -> str:
    # RFC 6265bis: the SameSite attribute value is matched case-insensitively;
    # keep the canonical spelling for the Set-Cookie line.
    for canonical in ("", "Lax", "Strict", "None"):
        if text.lower() == canonical.lower():
            return canonical
    raise ValueError(f"expected Lax, Strict, None or nothing, got {text!r}")


def _header_name(text: str) -> str:
    # RFC 9110 §5.1: a field name is a token.
    if text and not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", text):
        raise ValueError(f"expected an HTTP header name such as X-Stickyproxy-Route, got {text!r}")
    return text


def _secure(text: str) -> bool | str:
    if text.lower() == "auto":
        return "auto"
    try:
        return _boolean(text)
    except ValueError:
        raise ValueError(f"expected true, false or auto, got {text!r}") from None


def _legacy_suffix(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", text):
        raise ValueError(f"expected 1 to 32 letters, digits, '_' or '-', got {text!r}")
    return text


def _engineio_path(text: str) -> str:
    if not text:
        return ""
    if not text.startswith("/") or not re.fullmatch(r"/[!$&'()*+,;=:@A-Za-z0-9._~/%-]*", text):
        raise ValueError(f"expected a path starting with '/', such as /socket.io/, got {text!r}")
    return text


def _store_url(text: str) -> str | None:
    if not text:
        return None
    parse_store_url(text)
    return text


def _server_tag(text: str) -> str:
    if not text:
        return ""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", text):
        raise ValueError(f"expected 1 to 32 letters, digits, '_' or '-', got {text!r}")
    return text


def default_tag(name: str) -> str:
    """The engine.io sid tag of a server without ``tag``: opaque, from its name.

    Every proxy of a fleet with the same configuration derives the same tag,
    and the tag reveals neither the name nor the address of the server.
    """
    digest = hashlib.sha256(b"stickyproxy-sid-tag:" + name.encode("utf-8")).digest()
    return base64.urlsafe_b64encode(digest[:6]).decode("ascii")


def _max_age(text: str) -> float | None:
    if not text:
        return None
    seconds = parse_duration(text)
    # RFC 6265 §4.1.1: Max-Age is a whole, non-zero number of seconds.
    if seconds < 1 or not seconds.is_integer():
        raise ValueError(
            f"expected a whole number of seconds, at least 1s (RFC 6265 Max-Age), "
            f"or nothing for a session cookie, got {text!r}"
        )
    return seconds


def _cookie_secret(text: str) -> tuple[bytes, ...]:
    return tuple(parse_keys(text))


def _cookie_date_limit(text: str) -> float | None:
    if not text:
        return None
    seconds = parse_duration(text)
    # The signed dates have one-second resolution.
    if seconds < 1:
        raise ValueError(f"expected at least 1s, or nothing for no limit, got {text!r}")
    return seconds


def _cookie_domain(text: str) -> str | None:
    if not text:
        return None
    labels = text.removeprefix(".").split(".")
    if not all(_HOST_LABEL_RE.fullmatch(label) for label in labels):
        raise ValueError(f"expected a domain such as example.com, got {text!r}")
    return text


def _cookie_path(text: str) -> str:
    # RFC 6265 §4.1.1 path-value: any CHAR except CTLs or ";"; it must be an
    # absolute path to ever match (§5.1.4).
    if not text.startswith("/") or any(c == ";" or not " " <= c <= "~" for c in text):
        raise ValueError(f"expected a path starting with / and without ';', got {text!r}")
    return text


def _request_path(text: str) -> str:
    # RFC 9112 §3.2.1 origin-form: absolute-path [ "?" query ]; no whitespace,
    # and no fragment, which never goes on the wire (RFC 9110 §4.2.5).
    if not text.startswith("/") or any(c == "#" or not "!" <= c <= "~" for c in text):
        raise ValueError(
            f"expected a request path such as /status?all=1 (starting with /, "
            f"no spaces), got {text!r}"
        )
    return text


_STATUS_RANGE_RE = re.compile(r"(?P<low>[1-5][0-9][0-9])(?:-(?P<high>[1-5][0-9][0-9]))?")
# RFC 9110 §7.2: Host = uri-host [ ":" port ], where uri-host is a reg-name,
# an IPv4 address or a bracketed IP-literal (RFC 3986 §3.2.2).
_HOST_NAME = r"[A-Za-z0-9._~!$&'()*+,;=%-]+"
_HOST_HEADER_RE = re.compile(rf"(?:{_HOST_NAME}|\[[0-9A-Fa-f:.]+\])(?::[0-9]{{1,5}})?")


def _optional_interval(text: str) -> float | None:
    # Empty: the same as [health] interval, as HAProxy's fastinter/downinter
    # default to inter.
    return None if not text else _positive_duration(text)


def _status_ranges(text: str) -> tuple[tuple[int, int], ...]:
    # RFC 9110 §15: a status code is three digits, 100 to 599.
    expected = "status codes and ranges from 100 to 599 such as 200,204,300-399"
    ranges = []
    for item in text.split(","):
        match = _STATUS_RANGE_RE.fullmatch(item.strip())
        if match is None:
            raise ValueError(f"expected {expected}, got {text!r}")
        low = int(match["low"])
        high = int(match["high"] or low)
        if high < low:
            raise ValueError(f"the range {item.strip()!r} ends before it starts")
        ranges.append((low, high))
    return tuple(ranges)


def _host_header(text: str) -> str | None:
    if not text:
        return None
    if not _HOST_HEADER_RE.fullmatch(text):
        raise ValueError(
            f"expected a Host header value such as editor.example.com or "
            f"editor.example.com:3030, got {text!r}"
        )
    return text


def _hash_key(text: str) -> tuple[str, str | None]:
    if text == "source":
        return ("source", None)
    kind, sep, name = text.partition(":")
    if sep and kind == "header" and _TOKEN_RE.fullmatch(name):
        # RFC 9110 §5.1: field names are case-insensitive; store them lowered.
        return ("header", name.lower())
    if sep and kind == "query" and name and not any(c in "&=#" or c.isspace() for c in name):
        return ("query", name)
    raise ValueError(f"expected source, header:NAME or query:NAME, got {text!r}")


def _balance_factor(text: str) -> int:
    value = _whole(text, 0)
    if 0 < value <= 100:
        raise ValueError(f"expected 0 (off) or a percentage above 100 such as 125, got {text}")
    return value


def _networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    bad = []
    for item in re.split(r"[\s,]+", text):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=True))
        except ValueError:
            try:
                loose = ipaddress.ip_network(item, strict=False)
            except ValueError:
                bad.append(f"{item!r} is not an address or CIDR")
            else:
                bad.append(f"{item!r} has host bits set (did you mean {loose}?)")
    if bad:
        raise ValueError("; ".join(bad))
    return tuple(networks)


def split_endpoint(text: str, *, keep_escapes: bool = False) -> list[str]:
    """Split on ':' not escaped by a backslash, as Twisted's strports does.

    :param keep_escapes: keep the backslashes, so the pieces join back into
        the same description.
    """
    parts = [""]
    escaped = False
    for char in text:
        if escaped:
            parts[-1] += char
            escaped = False
        elif char == "\\":
            if keep_escapes:
                parts[-1] += char
            escaped = True
        elif char == ":":
            parts.append("")
        else:
            parts[-1] += char
    return parts


def _endpoint(text: str) -> str:
    """A light syntactic check of one Twisted server endpoint string.

    This module cannot import Twisted; the shell builds the endpoint and
    reports anything this check lets through.
    """
    kind, sep, rest = text.partition(":")
    if not sep or kind not in ("tcp", "tcp6", "ssl", "unix", "systemd"):
        if _WHOLE_RE.fullmatch(text):
            raise ValueError(f"{text!r} has no endpoint type: write tcp:{text}")
        raise ValueError(
            f"expected an endpoint such as tcp:3030, tcp6:3030, ssl:443:privateKey=FILE, "
            f"unix:PATH or systemd:domain=INET:index=0, got {text!r}"
        )
    positional: list[str] = []
    keywords: dict[str, str] = {}
    for arg in split_endpoint(rest):
        name, equals, value = arg.partition("=")
        if equals:
            keywords[name] = value
        else:
            positional.append(arg)
    if kind in ("tcp", "tcp6", "ssl"):
        port = positional[0] if positional else keywords.get("port")
        if port is None or not _WHOLE_RE.fullmatch(port) or int(port) > 65535:
            raise ValueError(f"{text!r} needs a port from 0 to 65535, as in {kind}:3030")
        if kind == "ssl" and "privateKey" not in keywords:
            raise ValueError(f"{text!r} needs privateKey=FILE (and certKey=FILE)")
    elif kind == "unix":
        if not (positional and positional[0]) and not keywords.get("address"):
            raise ValueError(f"{text!r} needs a socket path, as in unix:/run/stickyproxy.sock")
    elif not rest:
        raise ValueError(f"{text!r} needs arguments, as in systemd:domain=INET:index=0")
    return text


def _listen(text: str) -> tuple[str, ...]:
    items = [item.strip() for item in text.split(",")]
    if items == [""]:
        raise ValueError("expected at least one endpoint, such as tcp:3030")
    if "" in items:
        raise ValueError(f"empty endpoint in {text!r}: remove the extra comma")
    return tuple(_endpoint(item) for item in items)


# RFC 6750 §2.1: the b64token of an "Authorization: Bearer" header.
_BEARER_TOKEN_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_MIN_TOKEN_LENGTH = 16


def _admin_token(text: str) -> str | None:
    if not text:
        return None
    if not _BEARER_TOKEN_RE.fullmatch(text):
        raise ValueError(
            "a token may only use letters, digits and -._~+/ (then optional '='), "
            "as an HTTP bearer token"
        )
    if len(text) < _MIN_TOKEN_LENGTH:
        raise ValueError(
            f"a token needs at least {_MIN_TOKEN_LENGTH} characters; make one with: "
            "python -c 'import secrets; print(secrets.token_urlsafe(24))'"
        )
    return text


def _admin_listen(text: str) -> str | None:
    if not text:
        return None
    if "," in text:
        raise ValueError(f"expected one endpoint, got {text!r}")
    return _endpoint(text)


def _host(text: str) -> str:
    if re.fullmatch(r"[0-9.]+", text):
        ipaddress.IPv4Address(text)  # raises ValueError for "300.1.1.1"
        return text
    labels = text.removesuffix(".").split(".")
    if len(text) > 253 or not all(_HOST_LABEL_RE.fullmatch(label) for label in labels):
        raise ValueError(f"{text!r} is not a host name or IPv4 address")
    return text


def _address(text: str) -> tuple[str, int]:
    expected = "host:port or [ipv6]:port, such as editor1.example.com:3030"
    if text.startswith("["):
        match = re.fullmatch(r"\[(?P<host>[^\]]+)\]:(?P<port>[^:]*)", text)
        if match is None:
            raise ValueError(f"expected {expected}, got {text!r}")
        host, port = match["host"], match["port"]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in {text!r} is not an IPv6 address") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r} has no port: expected {expected}")
        if ":" in host:
            raise ValueError(f"write an IPv6 address in brackets, as in [::1]:3030, got {text!r}")
        try:
            _host(host)
        except ValueError:
            raise ValueError(f"{host!r} is not a host name or IPv4 address in {text!r}") from None
    if not _WHOLE_RE.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise ValueError(f"the port in {text!r} must be from 1 to 65535")
    return host, int(port)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------
# Sections: which keys each accepts, and how each value is parsed.
# ---------------------------------------------------------------------------

_Parsers = Mapping[str, Callable[[str], Any]]

_SECTIONS: dict[str, _Parsers] = {
    "proxy": {
        "listen": _listen,
        "proxy_protocol": _choice("required", "optional", "off"),
        "trusted_proxies": _networks,
        "maxconn": _integer(1),
        "timeout_connect": _positive_duration,
        "timeout_queue": _positive_duration,
        "grace_period": parse_duration,
        "close_spread_time": parse_duration,
        "timeout_http_request": _positive_duration,
        "timeout_http_keep_alive": _positive_duration,
        "timeout_client": _positive_duration,
        "timeout_server": _positive_duration,
        "timeout_tunnel": _positive_duration,
        "retries": _integer(0),
        "redispatch": _boolean,
        "forwarded_for": _boolean,
        "proxy_tlv_headers": _boolean,
        "decision_header": _header_name,
        "trust_forwarded_proto": _boolean,
        "access_log": _choice("httplog", "json", "off"),
        "max_head_size": _positive_size,
        "max_headers": _integer(1),
        "workers": _integer(1, 64),
    },
    "cookie": {
        "name": _cookie_name,
        "mode": _cookie_mode,
        "indirect": _boolean,
        "nocache": _boolean,
        "httponly": _boolean,
        "secure": _secure,
        "samesite": _samesite,
        "samesite_legacy": _boolean,
        "legacy_suffix": _legacy_suffix,
        "max_age": _max_age,
        "domain": _cookie_domain,
        "path": _cookie_path,
        "secret": _cookie_secret,
        "maxidle": _cookie_date_limit,
        "maxlife": _cookie_date_limit,
    },
    "balance": {
        "hash_key": _hash_key,
        "hash_balance_factor": _balance_factor,
        "hash_function": _choice("default", "haproxy"),
    },
    "health": {
        "path": _request_path,
        "interval": _positive_duration,
        "fastinter": _optional_interval,
        "downinter": _optional_interval,
        "timeout": _positive_duration,
        "rise": _integer(1),
        "fall": _integer(1),
        "expect_status": _status_ranges,
        "host": _host_header,
        "http_version": _choice("1.1", "1.0"),
        "observe": _choice("layer4", "none"),
    },
    "engineio": {
        "path": _engineio_path,
        "sid_tag": _choice("off", "eio4"),
        "sid_store": _store_url,
        "sid_store_timeout": _positive_duration,
        "max_sessions": _integer(1),
        "sid_cookie": _cookie_name,
    },
    "admin": {"listen": _admin_listen, "token": _admin_token},
    "demo": {"backends": _boolean},
    "server": {
        "address": _address,
        "cookie": _cookie_value,
        "weight": _integer(0, 256, " (0 drains the server)"),
        "maxconn": _integer(0, what=" (0 = unlimited)"),
        "check": _boolean,
        "tag": _server_tag,
    },
}

# Where people coming from HAProxy look first.
_HAPROXY_SECTIONS = {
    "global": "[proxy]",
    "defaults": "[proxy]",
    "frontend": "[proxy]",
    "backend": "[balance], [health] and one [server NAME] per server",
    "listen": "[proxy], [balance] and [server NAME]",
}

# Section names that cannot appear in a file: configparser's DEFAULT section
# would otherwise leak its keys into every section, and the preamble catches
# keys written before the first header.
_DEFAULT_SECTION = "\x00default"
_PREAMBLE = "\x00preamble"
_DUPLICATE = "\x00duplicate"


def _new_parser() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(
        interpolation=None,
        inline_comment_prefixes=(";", "#"),
        comment_prefixes=(";", "#"),
        strict=True,
        default_section=_DEFAULT_SECTION,
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    return parser


def _section_of_line(lines: list[str], index: int) -> str:
    for line in reversed(lines[: index + 1]):
        match = configparser.ConfigParser.SECTCRE.match(line.strip())
        if match:
            return match["header"]
    return _PREAMBLE


def _label(section: str) -> str:
    return "(top of file)" if section == _PREAMBLE else section


def _read_ini(text: str, problems: list[ConfigProblem]) -> configparser.ConfigParser:
    """Read INI text, reporting every duplicate and unparsable line.

    configparser's strict mode raises on the first duplicate section or key
    and stops reading. To report them all, each duplicate is reported, taken
    out of the text, and the text read again; a file has finitely many lines,
    so this ends.
    """
    # Line 1 is the preamble header: file line N is lines[N].
    lines = [f"[{_PREAMBLE}]", *text.split("\n")]
    for _ in range(len(lines) + 1):
        parser = _new_parser()
        try:
            parser.read_string("\n".join(lines))
        except configparser.DuplicateSectionError as exc:
            index = (exc.lineno or 1) - 1
            problems.append(
                ConfigProblem(
                    exc.section,
                    None,
                    f"section appears more than once (again on line {index})",
                )
            )
            lines[index] = f"[{_DUPLICATE} {index}]"
            continue
        except configparser.DuplicateOptionError as exc:
            index = (exc.lineno or 1) - 1
            problems.append(
                ConfigProblem(
                    _label(exc.section),
                    exc.option,
                    f"key appears more than once in this section (again on line {index})",
                )
            )
            # Drop the line and any continuation lines indented below it.
            indent = len(lines[index]) - len(lines[index].lstrip())
            lines[index] = ";"
            following = index + 1
            while following < len(lines) and lines[following].strip():
                line = lines[following]
                if len(line) - len(line.lstrip()) <= indent:
                    break
                lines[following] = ";"
                following += 1
            continue
        except configparser.ParsingError as exc:
            # Not fatal: configparser has read every other line.
            for lineno, _ in exc.errors:
                index = lineno - 1
                problems.append(
                    ConfigProblem(
                        _label(_section_of_line(lines, index)),
                        None,
                        f"line {index}: {lines[index].strip()!r} is not a 'key = value' line",
                    )
                )
        return parser
    raise AssertionError("unreachable: every retry removes a line")  # pragma: no cover


def _suggest(word: str, candidates: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return close[0] if close else None


def _unknown_key(section_kind: str, key: str) -> str:
    close = _suggest(key, _SECTIONS[section_kind])
    if close:
        return f"unknown key (did you mean {close!r}?)"
    # A key from another section, or close to one (HAProxy's "inter" is a
    # [health] key here, not a per-server one).
    for kind, keys in _SECTIONS.items():
        close = _suggest(key, keys)
        if kind != section_kind and close:
            where = "[server NAME]" if kind == "server" else f"[{kind}]"
            return f"unknown key here (did you mean {close!r} in {where}?)"
    return "unknown key"


def _unknown_section(name: str) -> str:
    first, _, rest = name.partition(" ")
    if first.lower() in _HAPROXY_SECTIONS:
        return (
            f"unknown section: stickyproxy does not read HAProxy's [{first}]; "
            f"use {_HAPROXY_SECTIONS[first.lower()]}"
        )
    candidates = [kind for kind in _SECTIONS if kind != "server"]
    if rest:
        candidates.append(f"server {rest.strip()}")
    close = _suggest(name, candidates)
    return f"unknown section (did you mean [{close}]?)" if close else "unknown section"


def _read_values(
    label: str, kind: str, items: Mapping[str, str], problems: list[ConfigProblem]
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    parsers = _SECTIONS[kind]
    for key, text in items.items():
        parse = parsers.get(key)
        if parse is None:
            problems.append(ConfigProblem(label, key, _unknown_key(kind, key)))
            continue
        try:
            values[key] = parse(text)
        except ValueError as exc:
            problems.append(ConfigProblem(label, key, str(exc)))
    return values


def _server(
    label: str, name: str, values: dict[str, Any], problems: list[ConfigProblem]
) -> ServerConfig | None:
    if "address" not in values:
        if not any(p.section == label and p.key == "address" for p in problems):
            problems.append(
                ConfigProblem(label, "address", "missing: every server needs address = host:port")
            )
        return None
    host, port = values.pop("address")
    values.setdefault("cookie", name)
    return ServerConfig(name=name, host=host, port=port, **values)


def _check_servers(
    servers: list[tuple[str, ServerConfig]],
    demo: DemoConfig,
    problems: list[ConfigProblem],
) -> None:
    cookie_owner: dict[str, str] = {}
    tag_owner: dict[str, str] = {}
    address_owner: dict[tuple[str, int], str] = {}
    for label, server in servers:
        owner = cookie_owner.setdefault(server.cookie, label)
        if owner != label:
            # Two servers with one cookie value would make the cookie name
            # whichever server happens to win a tie: the seed's websrv1 bug.
            problems.append(
                ConfigProblem(
                    label, "cookie", f"value {server.cookie!r} is already used by [{owner}]"
                )
            )
        tagged = tag_owner.setdefault(server.engine_tag, label)
        if tagged != label:
            problems.append(
                ConfigProblem(
                    label, "tag", f"tag {server.engine_tag!r} is already used by [{tagged}]"
                )
            )
        if demo.backends:
            where = f"{server.host}:{server.port}"
            if not _is_loopback(server.host):
                problems.append(
                    ConfigProblem(
                        label,
                        "address",
                        f"{where} is not a loopback address, but [demo] backends = true "
                        f"starts this server inside the proxy: use 127.0.0.1, ::1 or localhost",
                    )
                )
            first = address_owner.setdefault((server.host, server.port), label)
            if first != label:
                problems.append(
                    ConfigProblem(
                        label,
                        "address",
                        f"{where} is also the address of [{first}]; [demo] backends = true "
                        f"needs one port per server",
                    )
                )


def parse_config(text: str, source: str = "<string>") -> Config:
    """Parse and validate a whole configuration.

    :param text: the INI text.
    :param source: where the text came from, for error messages.
    :raises ConfigError: listing every problem found, not just the first.
    """
    problems: list[ConfigProblem] = []
    parser = _read_ini(text, problems)

    sections: dict[str, dict[str, Any]] = {}
    server_values: list[tuple[str, str, dict[str, Any]]] = []
    server_labels: dict[str, str] = {}
    for section in parser.sections():
        items = dict(parser.items(section, raw=True))
        if section.startswith(_DUPLICATE):
            continue  # already reported
        if section == _PREAMBLE:
            problems.extend(
                ConfigProblem(_label(section), key, "keys must come after a [section] header")
                for key in items
            )
            continue
        kind, _, name = section.partition(" ")
        name = name.strip()
        if kind == "server":
            if not name:
                problems.append(
                    ConfigProblem(section, None, "a server section needs a name: [server s1]")
                )
            elif not _SERVER_NAME_RE.fullmatch(name):
                problems.append(
                    ConfigProblem(
                        section,
                        None,
                        f"server name {name!r} may only use letters, digits, '-', '_' and '.'",
                    )
                )
            elif name in server_labels:
                problems.append(
                    ConfigProblem(
                        section,
                        None,
                        f"server {name!r} is already defined by [{server_labels[name]}]",
                    )
                )
            else:
                server_labels[name] = section
                server_values.append(
                    (section, name, _read_values(section, "server", items, problems))
                )
                continue
            _read_values(section, "server", items, problems)
        elif section in _SECTIONS and section != "server":
            sections[section] = _read_values(section, section, items, problems)
        else:
            problems.append(ConfigProblem(section, None, _unknown_section(section)))

    proxy = sections.get("proxy", {})
    if "timeout_http_request" in proxy:
        proxy.setdefault("timeout_http_keep_alive", proxy["timeout_http_request"])
    if "timeout_connect" in proxy:
        # HAProxy: "timeout queue" defaults to "timeout connect".
        proxy.setdefault("timeout_queue", proxy["timeout_connect"])
    cookie = sections.get("cookie", {})
    if cookie.get("samesite") == "None" and not cookie.get("secure", CookieConfig().secure):
        # "auto" passes: a cookie set over plain HTTP then goes out without
        # SameSite=None at all (see cookies.set_cookie_value).
        problems.append(
            ConfigProblem(
                "cookie",
                "samesite",
                "SameSite=None requires secure = true or auto: browsers reject a "
                "SameSite=None cookie without the Secure attribute",
            )
        )
    if cookie.get("samesite_legacy") and cookie.get("samesite") != "None":
        problems.append(
            ConfigProblem(
                "cookie",
                "samesite_legacy",
                "the twin cookie without SameSite is only useful with samesite = None",
            )
        )
    for key in ("maxidle", "maxlife"):
        if (
            cookie.get(key) is not None
            and not cookie.get("secret")
            # A secret given but invalid is already reported.
            and not any(p.section == "cookie" and p.key == "secret" for p in problems)
        ):
            problems.append(
                ConfigProblem(
                    "cookie",
                    key,
                    "needs [cookie] secret: the dates are only trustworthy in a signed value",
                )
            )
    balance = sections.get("balance", {})
    if "hash_key" in balance:
        balance["hash_key"], balance["hash_key_name"] = balance["hash_key"]
    demo = DemoConfig(**sections.get("demo", {}))

    servers: list[tuple[str, ServerConfig]] = []
    for label, name, values in server_values:
        server = _server(label, name, values, problems)
        if server is not None:
            servers.append((label, server))
    if not server_labels:
        problems.append(
            ConfigProblem(
                "server", None, "no [server NAME] section: at least one backend is required"
            )
        )
    _check_servers(servers, demo, problems)

    if problems:
        raise ConfigError(problems, source)
    return Config(
        servers=tuple(server for _, server in servers),
        proxy=ProxyConfig(**proxy),
        cookie=CookieConfig(**cookie),
        balance=BalanceConfig(**balance),
        health=HealthConfig(**sections.get("health", {})),
        admin=AdminConfig(**sections.get("admin", {})),
        demo=demo,
        engineio=EngineIOConfig(**sections.get("engineio", {})),
    )


def load_config(path: str) -> Config:
    """Read and parse the configuration file at ``path``.

    :raises ConfigError: when the file cannot be read or decoded, or is invalid.
    """
    return read_config(path)[1]


def read_config(path: str) -> tuple[str, Config]:
    """Read and parse the file at ``path``: its text and what it means.

    :raises ConfigError: when the file cannot be read or decoded, or is invalid.
    """
    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(
            [ConfigProblem("file", None, f"cannot read {path}: {reason}")], path
        ) from exc
    return text, parse_config(text, source=path)
