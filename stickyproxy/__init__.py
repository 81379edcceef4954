"""stickyproxy: a sticky HTTP/WebSocket reverse proxy built on Twisted.

Importing this package has no side effects: it installs no reactor, opens no
socket and starts no timer. The names below are loaded on first use, so the
protocol core (``stickyproxy.httphead``, ``stickyproxy.proxyproto``, …) can be
imported without Twisted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "StickyProxy", "__version__", "load_config", "parse_config"]

if TYPE_CHECKING:
    from stickyproxy.config import Config, load_config, parse_config
    from stickyproxy.errors import ConfigError
    from stickyproxy.service import StickyProxy

_LAZY = {
    "Config": "stickyproxy.config",
    "load_config": "stickyproxy.config",
    "parse_config": "stickyproxy.config",
    "ConfigError": "stickyproxy.errors",
    "StickyProxy": "stickyproxy.service",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'stickyproxy' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
