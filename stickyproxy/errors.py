"""Errors raised by the sans-IO core.

Each protocol error carries what the caller should do about it, as h11's
``error_status_hint`` does: the core decides *what* went wrong, the Twisted
shell decides how to put it on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass


class ProtocolError(Exception):
    """A peer broke the protocol.

    :param reason: a short, log-friendly description (never includes
        secrets or whole header values).
    :param status_hint: the HTTP status the proxy should answer with, or
        ``None`` when the right answer is to close without a response.
    """

    def __init__(self, reason: str, status_hint: int | None = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status_hint = status_hint


class RemoteProtocolError(ProtocolError):
    """The client or the backend sent bytes that are not valid HTTP/1.1."""


class ProxyHeaderError(ProtocolError):
    """A bad or missing PROXY protocol header.

    The PROXY protocol specification says such a connection must be aborted
    without a response, so the status hint is always ``None``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason, status_hint=None)


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with a configuration file."""

    section: str
    key: str | None
    message: str

    def __str__(self) -> str:
        where = f"[{self.section}]" if self.key is None else f"[{self.section}] {self.key}"
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """A configuration is invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: list[ConfigProblem], source: str = "<config>") -> None:
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s):\n{lines}")
