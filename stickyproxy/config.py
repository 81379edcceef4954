"""Configuration: INI text in, frozen dataclasses out.

Section and key names follow the configuration contract documented in the
README. Parsing validates the whole file and reports every problem at once
(:class:`stickyproxy.errors.ConfigError`), each with its section and key.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """``[proxy]``: the listening side."""

    listen: tuple[str, ...] = ("tcp:3030",)
    proxy_protocol: Literal["required", "optional", "off"] = "required"
    trusted_proxies: tuple[IPNetwork, ...] = ()
    maxconn: int = 1000
    timeout_connect: float = 5.0
    timeout_http_request: float = 10.0
    timeout_http_keep_alive: float = 10.0
    timeout_client: float = 60.0
    timeout_server: float = 60.0
    timeout_tunnel: float = 3600.0
    retries: int = 3
    redispatch: bool = True
    forwarded_for: bool = True
    max_head_size: int = 15360
    max_headers: int = 100


@dataclass(frozen=True, slots=True)
class CookieConfig:
    """``[cookie]``: the persistence cookie."""

    name: str = "storify_editor_host"
    mode: Literal["insert"] = "insert"
    indirect: bool = True
    nocache: bool = True
    httponly: bool = False
    secure: bool = False
    samesite: Literal["", "Lax", "Strict", "None"] = ""
    max_age: float | None = None
    domain: str | None = None
    path: str = "/"


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
    timeout: float = 5.0
    rise: int = 1
    fall: int = 3


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


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """``[admin]``: the status endpoint (empty ``listen`` disables it)."""

    listen: str | None = None


@dataclass(frozen=True, slots=True)
class Config:
    """A whole, validated configuration."""

    servers: tuple[ServerConfig, ...]
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    cookie: CookieConfig = field(default_factory=CookieConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
