"""stickyproxy: a sticky HTTP/WebSocket reverse proxy built on Twisted.

Importing this package has no side effects: it installs no reactor, opens no
socket and starts no timer.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
