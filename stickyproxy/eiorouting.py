# -*- test-case-name: tests.test_eiorouting -*-
"""Routing engine.io sessions by their ``sid``, without I/O.

:mod:`stickyproxy.engineio` knows the protocol; this module applies it to the
proxy's traffic, one request and one response at a time:

* :meth:`EngineRouter.inspect` looks at a request head: is it on the
  engine.io path, which session does it belong to, and which server holds
  that session, as told by a server tag in the sid (and then strips the tag
  from the target before the request is forwarded) or by the local
  :class:`~stickyproxy.sidtable.SidTable`;
* :class:`HandshakeCapture` holds the body of a handshake response (a
  hundred-odd bytes) until it is complete, so that the session is learned,
  and stored in a shared table when there is one, *before* the client can
  send its first poll; and so that the body can be tagged and reframed;
* :class:`EngineRouter.learn` remembers the new session.

Sessions go first, ahead of the persistence cookie and the hash: a client
that keeps no cookies, or whose cookie is stale, still reaches the process
that holds its session (engine.io answers any other with "Session ID
unknown").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from stickyproxy.eiopayload import (
    HANDSHAKE_LIMIT,
    BodyPrefix,
    Handshake,
    HandshakeError,
    parse_handshake,
)
from stickyproxy.engineio import (
    EngineRequest,
    classify,
    set_content_length,
    sid_from_set_cookie,
    tag_handshake_body,
    untag_target,
)
from stickyproxy.sidtable import SidTable

if TYPE_CHECKING:
    from stickyproxy.config import EngineIOConfig, ServerConfig
    from stickyproxy.httphead import RequestHead, ResponseHead

__all__ = ["EngineRouter", "HandshakeCapture", "SessionRoute"]

#: engine.io's default heartbeat (``pingInterval`` 25 s + ``pingTimeout``
#: 20 s), for sessions learned without their handshake (from the shared store).
DEFAULT_PING_MS: Final = (25_000, 20_000)


@dataclass(slots=True)
class SessionRoute:
    """What the proxy knows about one engine.io request.

    :param request: the request's engine.io facts.
    :param sid: the session id as the backend knows it (tag removed).
    :param server: the server holding the session, when known locally.
    :param reason: how that server was found.
    """

    request: EngineRequest
    sid: str | None
    server: str | None = None
    reason: Literal["sid-tag", "sid-table", "sid-store"] | None = None


class EngineRouter:
    """The engine.io routing state of one proxy: settings, tags and sessions.

    :param config: the ``[engineio]`` section.
    :param servers: the configured servers (their tags).
    """

    __slots__ = ("_by_tag", "_tags", "config", "learned", "prefix", "table", "tagged")

    def __init__(self, config: EngineIOConfig, servers: Sequence[ServerConfig]) -> None:
        self.table = SidTable(config.max_sessions)
        #: Sessions learned from handshakes, and handshakes tagged.
        self.learned = 0
        self.tagged = 0
        self.config = config
        self.prefix = b""
        self._by_tag: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self.reconfigure(config, servers)

    def reconfigure(self, config: EngineIOConfig, servers: Sequence[ServerConfig]) -> None:
        """Use new settings; known sessions stay (a reload keeps them alive)."""
        self.config = config
        self.prefix = config.path.encode("ascii")
        self.table.max_entries = config.max_sessions
        self._tags = {server.name: server.engine_tag for server in servers}
        self._by_tag = {tag: name for name, tag in self._tags.items()}
        names = set(self._tags)
        for name in self.table.servers() - names:
            self.table.forget_server(name)

    @property
    def enabled(self) -> bool:
        return bool(self.prefix)

    def inspect(self, head: RequestHead, now: float) -> SessionRoute | None:
        """Classify a request; for a session, find its server and untag its target.

        Tags are stripped whatever ``sid_tag`` says now, so that sessions
        tagged before a reload that turned tagging off keep working.

        :returns: None for a request off the engine.io path.
        :raises stickyproxy.engineio.SidError: (400) a repeated, oversized
            or malformed ``sid``.
        """
        if not self.prefix:
            return None
        request = classify(head, self.prefix)
        if request is None:
            return None
        sid = request.sid
        if sid is None:
            return SessionRoute(request, None)
        tag, target = untag_target(head.target, self._by_tag)
        if tag is not None:
            head.target = target
            sid = sid[: -len(tag) - 1]
            return SessionRoute(request, sid, self._by_tag[tag], "sid-tag")
        server = self.table.lookup(sid, now)
        if server is not None:
            return SessionRoute(request, sid, server, "sid-table")
        return SessionRoute(request, sid)

    def capture_for(self, route: SessionRoute | None, head: ResponseHead) -> bool:
        """Whether the response to this request is a handshake to hold and learn."""
        return (
            route is not None
            and route.request.learnable
            and head.status == 200
            and head.get(b"content-encoding") in (None, b"identity")
        )

    def tag_of(self, server: str) -> str | None:
        """The tag to add to the sids of ``server``'s new sessions, or None."""
        if self.config.sid_tag != "eio4":
            return None
        return self._tags.get(server)

    def learn(self, handshake: Handshake, server: str, now: float) -> float:
        """Remember a new session; return its idle lifetime in seconds."""
        table = self.table
        table.learn(handshake.sid, server, handshake.ping_interval, handshake.ping_timeout, now)
        self.learned += 1
        return table.ttl_for(handshake.ping_interval, handshake.ping_timeout)

    def learn_stored(self, sid: str, server: str, now: float) -> None:
        """Remember a session found in the shared store."""
        self.table.learn(sid, server, *DEFAULT_PING_MS, now)


class HandshakeCapture:
    """Holds a handshake response until its body is complete.

    Relaying waits for the whole body (it is small, and a polling handshake
    is answered at once), so that the session is known before the client
    can use it, and so that a tagged body can be reframed. A body larger
    than ``limit`` is no handshake worth holding: :meth:`feed` says so and
    the caller relays what it has.

    :param head: the response head, already prepared for the client.
    :param chunked: the body uses the chunked transfer coding.
    """

    __slots__ = ("_body", "head", "limit", "raw")

    def __init__(self, head: ResponseHead, *, chunked: bool, limit: int = HANDSHAKE_LIMIT) -> None:
        self.head = head
        self.limit = limit
        self.raw = bytearray()
        self._body = BodyPrefix(chunked=chunked, limit=limit)

    def feed(self, data: bytes) -> bool:
        """Hold body bytes as they came; False when the body is too big to hold."""
        self.raw += data
        self._body.feed(data)
        return len(self.raw) <= 2 * self.limit and not self._body.overflow

    def handshake(self, cookie_name: str) -> Handshake | None:
        """The session the complete body opens, or None when it is no handshake.

        A sid in engine.io's own cookie counts too when the body has none
        that can be read (a JSONP or binary body, say), with the default
        heartbeat.
        """
        body = self._body
        if not body.broken:
            try:
                return parse_handshake(body.data)
            except HandshakeError:
                pass
        sid = sid_from_set_cookie(self.head.headers, cookie_name)
        if sid is None:
            return None
        return Handshake(sid, *DEFAULT_PING_MS, (), None, "eio4")

    def output(self, tag: str | None, eio: int) -> tuple[bytes, bool]:
        """The bytes to send the client: head and body, tagged when possible.

        :returns: the bytes, and whether the body was tagged.
        """
        if tag is not None and not self._body.broken:
            try:
                body = tag_handshake_body(self._body.data, tag, eio=eio)
            except HandshakeError:
                pass
            else:
                set_content_length(self.head, len(body))
                return self.head.serialize() + body, True
        return self.head.serialize() + bytes(self.raw), False
