"""Demo backends: small HTTP + WebSocket servers that say who they are.

Each backend answers every request with an ``X-Backend: NAME`` header, so a
browser (through ``conf/demo.ini``) or an integration test can see which server
the proxy chose. The resources cover what a sticky proxy has to get right:

==========================  ====================================================
``GET /``                   an HTML page naming the backend, showing the
                            persistence cookie and a live WebSocket panel
``/ws``                     WebSocket echo; greets with ``hello from NAME``;
                            the text ``subscribe`` starts a tick every 2 s
``GET /status``             ``200 OK NAME``, or ``503`` once health is off
``POST /_health?ok=0|1``    turns the health answer off or on
``GET /whoami``             ``NAME`` as text/plain
``GET /headers``            the request head exactly as received, as JSON
``GET /setcookie``          two ``Set-Cookie`` lines, one of them the proxy's
``POST /upload``            streams the body into SHA-256 and answers its size
                            and digest
``GET /big?size=N``         N pattern bytes (byte ``i`` is ``i % 256``) with
                            ``Content-Length``, written by a producer
``GET /chunked?n=K``        a chunked response of K chunks
``GET /slow?delay=S``       answers after S seconds
``GET /close``              closes the connection without a response
                            (``?abort=1`` resets it instead)
``GET /cache?lm=1&cc=V``    optional ``Last-Modified`` and ``Cache-Control: V``
==========================  ====================================================

Run one on its own with ``python -m stickyproxy.demo --name s1``.
"""

# twisted.web and autobahn's protocol classes are mostly unannotated; calling
# into them from this typed module is expected.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import argparse
import hashlib
import html
import io
import json
import os
import sys
from collections.abc import Callable
from typing import IO, Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocol,
    IPullProducer,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.task import LoopingCall
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource
from zope.interface import implementer

#: Seconds between the ticks pushed to a subscribed WebSocket.
TICK_INTERVAL = 2.0

#: How much of ``/big`` one producer turn writes: a multiple of 256, so every
#: full block of the pattern is the same bytes.
_BLOCK = bytes(range(256)) * 256


class _DigestSink(io.RawIOBase):
    """A write-only request body "file" that hashes and counts, and keeps nothing.

    :class:`twisted.web.server.Request` asks its site for a content file and
    writes each decoded body chunk into it; hashing as the chunks arrive keeps
    a 50 MB upload at constant memory instead of spooling it to disk.
    """

    def __init__(self) -> None:
        super().__init__()
        self.size = 0
        self._sha256 = hashlib.sha256()

    def hexdigest(self) -> str:
        """:return: the SHA-256 of everything written so far, in hex."""
        return self._sha256.hexdigest()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._sha256.update(chunk)
        self.size += len(chunk)
        return len(chunk)

    def readinto(self, buffer: Any) -> int:
        # The body is not kept: reading it back yields end-of-file at once.
        return 0

    def tell(self) -> int:
        return self.size

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        # Twisted rewinds the content file before dispatching; nothing to rewind.
        return self.size


class DemoRequest(server.Request):
    """A request that also records its header lines byte for byte.

    Twisted canonicalises header names and groups values by name; ``/headers``
    needs the original names, case and order to show what the proxy really
    forwarded (a stripped cookie, a lowercased name, an added
    ``X-Forwarded-For``).
    """

    def __init__(self, channel: http.HTTPChannel, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        self.raw_header_lines: list[bytes] = []


class _DemoChannel(http.HTTPChannel):
    """An HTTP/1.1 channel that records raw header lines and survives upgrades.

    ``upgraded_to`` is set once a WebSocket has taken over the connection.
    """

    upgraded_to: IProtocol | None = None

    def headerReceived(self, line: bytes) -> bool:
        request = self.requests[-1]
        if isinstance(request, DemoRequest):
            request.raw_header_lines.append(line)
        return bool(super().headerReceived(line))

    def rawDataReceived(self, data: bytes) -> None:
        # A client may send its first frames in the same segment as the
        # upgrade request (RFC 6455 section 4.1 lets it send as soon as it has
        # the 101). The channel would buffer those bytes as the start of a
        # pipelined request and drop them once the WebSocket owns the socket.
        if self.upgraded_to is not None:
            self.upgraded_to.dataReceived(data)
        else:
            super().rawDataReceived(data)


class _WebSocketUpgrade(WebSocketResource):
    """Autobahn's resource, telling the channel which protocol took over."""

    def render(self, request: server.Request) -> int:
        channel = request.channel
        transport = channel.transport
        result: int = super().render(request)
        # On success, WebSocketResource detaches the channel from the transport
        # and makes the WebSocket protocol the transport's protocol.
        upgraded = transport is not None and channel.transport is None
        if upgraded and isinstance(channel, _DemoChannel):
            channel.upgraded_to = transport.protocol  # type: ignore[union-attr]
        return result


class DemoSite(server.Site):
    """The site of one demo backend: raw header recording and hashed bodies."""

    protocol = _DemoChannel  # type: ignore[assignment]
    requestFactory = DemoRequest

    def getContentFile(self, length: int | None) -> IO[bytes]:
        """Called by :class:`twisted.web.server.Request` for each request body."""
        sink: IO[bytes] = _DigestSink()  # type: ignore[assignment]
        return sink


class _DemoState:
    """What the resources of one backend share: its name, clock and health."""

    def __init__(self, name: str, reactor: IReactorTime) -> None:
        self.name = name
        self.reactor = reactor
        self.healthy = True


def _query(request: server.Request, key: str, default: str = "") -> str:
    values = request.args.get(key.encode()) if request.args else None
    return values[0].decode("utf-8", "replace") if values else default


def _int_query(request: server.Request, key: str, default: int) -> int:
    try:
        return int(_query(request, key, str(default)))
    except ValueError:
        return default


def _text(request: server.Request, body: str, content_type: bytes = b"text/plain") -> bytes:
    request.setHeader(b"Content-Type", content_type + b"; charset=utf-8")
    return body.encode("utf-8")


def _json(request: server.Request, value: object) -> bytes:
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(value).encode("utf-8")


class _Page(Resource):
    """A leaf resource whose handlers are plain functions of the request."""

    isLeaf = True

    def __init__(
        self,
        get: Callable[[server.Request], bytes | int] | None = None,
        post: Callable[[server.Request], bytes | int] | None = None,
    ) -> None:
        super().__init__()
        self._get = get
        self._post = post

    def render_GET(self, request: server.Request) -> bytes | int:
        if self._get is None:
            return self.render_method_not_allowed(request)
        return self._get(request)

    def render_POST(self, request: server.Request) -> bytes | int:
        if self._post is None:
            return self.render_method_not_allowed(request)
        return self._post(request)

    def render_method_not_allowed(self, request: server.Request) -> bytes:
        request.setResponseCode(http.NOT_ALLOWED)
        return _text(request, "method not allowed\n")


class _Root(Resource):
    """Tags every answer with ``X-Backend`` and serves the HTML page at ``/``."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name.encode("utf-8")
        page = _html_page(name)
        self._index = _Page(get=lambda r: _text(r, page, b"text/html"))

    def getChildWithDefault(self, path: bytes, request: server.Request) -> Resource:
        request.setHeader(b"X-Backend", self._name)
        if path == b"" and not request.postpath:
            return self._index
        return super().getChildWithDefault(path, request)  # type: ignore[no-any-return]


@implementer(IPullProducer)
class _PatternProducer:
    """Writes ``size`` bytes of the ``i % 256`` pattern, one block per turn.

    A pull producer: the request's transport asks for more only when its write
    buffer has drained, so a slow reader never makes the backend buffer the
    whole body.
    """

    def __init__(self, request: server.Request, size: int) -> None:
        self._request = request
        self._left = size
        self._stopped = False

    def resumeProducing(self) -> None:
        if self._stopped:
            return
        if self._left > 0:
            block = _BLOCK[: min(self._left, len(_BLOCK))]
            self._left -= len(block)
            self._request.write(block)
        if self._left == 0:
            self._stopped = True
            self._request.unregisterProducer()
            self._request.finish()

    def stopProducing(self) -> None:
        self._stopped = True


class _EchoProtocol(WebSocketServerProtocol):
    """Echoes every message; greets on open; ticks once asked to ``subscribe``."""

    factory: _EchoFactory
    _ticks = 0
    _ticker: LoopingCall | None = None

    def onOpen(self) -> None:
        self.sendMessage(f"hello from {self.factory.backend_name}".encode())

    def onMessage(self, payload: bytes, is_binary: bool) -> None:
        self.sendMessage(payload, is_binary)
        if not is_binary and payload == b"subscribe" and self._ticker is None:
            self._ticker = LoopingCall(self._tick)
            self._ticker.clock = self.factory.reactor
            self._ticker.start(TICK_INTERVAL, now=False)

    def _tick(self) -> None:
        self._ticks += 1
        self.sendMessage(f"{self.factory.backend_name}: tick {self._ticks}".encode())

    def onClose(self, was_clean: bool, code: int | None, reason: str | None) -> None:
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()


class _EchoFactory(WebSocketServerFactory):
    protocol = _EchoProtocol  # type: ignore[assignment]

    def __init__(self, backend_name: str, reactor: IReactorTime) -> None:
        # The handshake response is written by autobahn, not twisted.web, so the
        # X-Backend header has to be given to the factory as well.
        super().__init__(reactor=reactor, headers={"X-Backend": backend_name})
        self.backend_name = backend_name


def demo_site(name: str, reactor: IReactorTime) -> server.Site:
    """Build the HTTP and WebSocket application of one demo backend.

    :param name: the backend's name, reported in every answer.
    :param reactor: the clock used for ``/slow``, WebSocket ticks and the
        HTTP channel's idle timeout.
    """
    state = _DemoState(name, reactor)
    root = _Root(name)
    children: dict[bytes, Resource] = {
        b"status": _Page(get=lambda r: _status(state, r)),
        b"_health": _Page(post=lambda r: _set_health(state, r)),
        b"whoami": _Page(get=lambda r: _text(r, name)),
        b"headers": _Page(get=_headers),
        b"setcookie": _Page(get=_set_cookie),
        b"upload": _Page(post=_upload),
        b"big": _Page(get=_big),
        b"chunked": _Page(get=_chunked),
        b"slow": _Page(get=lambda r: _slow(state, r)),
        b"close": _Page(get=_close),
        b"cache": _Page(get=_cache),
    }
    for path, child in children.items():
        root.putChild(path, child)
    root.putChild(b"ws", _WebSocketUpgrade(_EchoFactory(name, reactor)))
    return DemoSite(root, reactor=reactor, parsePOSTFormSubmission=False)


def _status(state: _DemoState, request: server.Request) -> bytes:
    if state.healthy:
        return _text(request, f"OK {state.name}\n")
    request.setResponseCode(http.SERVICE_UNAVAILABLE)
    return _text(request, f"DOWN {state.name}\n")


def _set_health(state: _DemoState, request: server.Request) -> bytes:
    state.healthy = _query(request, "ok", "1") != "0"
    return _text(request, f"healthy={int(state.healthy)}\n")


def _headers(request: server.Request) -> bytes:
    lines = request.raw_header_lines if isinstance(request, DemoRequest) else []
    pairs = []
    for line in lines:
        name, _, value = line.partition(b":")
        # RFC 9112 section 5: optional whitespace around the value is not part of it.
        pairs.append([name.decode("latin-1"), value.strip(b" \t").decode("latin-1")])
    peer = request.getClientAddress()
    client = [getattr(peer, "host", None), getattr(peer, "port", None)]
    return _json(request, {"headers": pairs, "client": client})


def _set_cookie(request: server.Request) -> bytes:
    # The first line uses the proxy's own cookie name: an "insert" proxy must
    # drop it and keep the other one.
    request.responseHeaders.addRawHeader(b"Set-Cookie", b"storify_editor_host=fromapp")
    request.responseHeaders.addRawHeader(b"Set-Cookie", b"other=1")
    return _text(request, "cookies set\n")


def _upload(request: server.Request) -> bytes:
    body = request.content
    if isinstance(body, _DigestSink):
        return _json(request, {"bytes": body.size, "sha256": body.hexdigest()})
    request.setResponseCode(http.INTERNAL_SERVER_ERROR)
    return _text(request, "body was not hashed\n")


def _big(request: server.Request) -> int:
    size = max(0, _int_query(request, "size", 0))
    request.setHeader(b"Content-Type", b"application/octet-stream")
    # An explicit Content-Length stops twisted.web from choosing chunked coding.
    request.setHeader(b"Content-Length", str(size).encode())
    producer = _PatternProducer(request, size)
    request.registerProducer(producer, False)
    return server.NOT_DONE_YET


def _chunked(request: server.Request) -> int:
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    # Without Content-Length, twisted.web frames each write() as one chunk
    # (RFC 9112 section 7.1) for an HTTP/1.1 client.
    for index in range(max(0, _int_query(request, "n", 3))):
        request.write(f"chunk {index}\n".encode())
    request.finish()
    return server.NOT_DONE_YET


def _slow(state: _DemoState, request: server.Request) -> int:
    try:
        delay = max(0.0, float(_query(request, "delay", "1")))
    except ValueError:
        delay = 1.0

    def answer() -> None:
        request.write(_text(request, f"slow {state.name}\n"))
        request.finish()

    call = state.reactor.callLater(delay, answer)

    def client_gone(reason: Failure) -> None:
        if call.active():
            call.cancel()

    request.notifyFinish().addErrback(client_gone)
    return server.NOT_DONE_YET


def _close(request: server.Request) -> int:
    transport = request.channel.transport
    if transport is None:
        return server.NOT_DONE_YET
    if _query(request, "abort") == "1" and ITCPTransport.providedBy(transport):
        transport.abortConnection()
    else:
        transport.loseConnection()
    return server.NOT_DONE_YET


def _cache(request: server.Request) -> bytes:
    if _query(request, "lm") == "1":
        request.setHeader(b"Last-Modified", b"Mon, 02 Jan 2006 15:04:05 GMT")
    cache_control = _query(request, "cc")
    if cache_control:
        request.setHeader(b"Cache-Control", cache_control.encode("latin-1", "replace"))
    return _text(request, "cacheable\n")


def _html_page(name: str) -> str:
    return _PAGE.replace("{title}", html.escape(f"Served by {name}"))


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
  body { font: 16px/1.5 system-ui, sans-serif; max-width: 42rem; margin: 2rem auto;
         padding: 0 1rem; color: #222; background: #fafafa; }
  h1 { font-size: 1.8rem; margin-bottom: 0.5rem; }
  code, #log { font-family: ui-monospace, monospace; }
  .box { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 0.8rem 1rem;
         margin: 1rem 0; }
  #log { height: 12rem; overflow-y: auto; white-space: pre-wrap; font-size: 0.9rem; }
  #state { font-weight: bold; }
</style>
</head>
<body>
<h1>{title}</h1>
<div class="box">
  Persistence cookie as this page sees it (<code>document.cookie</code>):
  <code id="cookie"></code>
</div>
<div class="box">
  WebSocket to <code id="url"></code>: <span id="state">connecting</span>
  <div id="log"></div>
</div>
<p>Reloading keeps you on the same backend: the proxy set a cookie naming it. Clear this
site's cookies and reload, and you may land on another backend, chosen by a hash of your
address.</p>
<script>
  const cookie = document.cookie.split("; ").find((c) => c.startsWith("storify_editor_host="));
  document.getElementById("cookie").textContent =
    cookie || "(none visible: no cookie yet, or an HttpOnly one that scripts cannot read)";
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const url = scheme + location.host + "/ws";
  document.getElementById("url").textContent = url;
  const state = document.getElementById("state");
  const log = document.getElementById("log");
  const ws = new WebSocket(url);
  ws.onopen = () => { state.textContent = "open"; ws.send("subscribe"); };
  ws.onclose = () => { state.textContent = "closed"; };
  ws.onerror = () => { state.textContent = "error"; };
  ws.onmessage = (event) => {
    if (event.data === "subscribe") { return; }
    log.textContent += event.data + "\\n";
    log.scrollTop = log.scrollHeight;
  };
</script>
</body>
</html>
"""


def listen_demo_backend(
    name: str, endpoint_description: str, reactor: Any
) -> Deferred[IListeningPort]:
    """Start a demo backend on a Twisted server endpoint.

    :param name: the backend's name.
    :param endpoint_description: a server endpoint string, such as
        ``tcp:0:interface=127.0.0.1``.
    :param reactor: the reactor to listen on (it is also the backend's clock).
    :return: a Deferred firing with the listening port.
    """
    endpoint = serverFromString(reactor, endpoint_description)
    listening: Deferred[IListeningPort] = endpoint.listen(demo_site(name, reactor))
    return listening


def _write_ready_file(path: str, port: object) -> None:
    # Write then rename: rename is atomic on POSIX, so a reader polling for the
    # file sees either nothing or the whole port number.
    partial = path + ".tmp"
    with open(partial, "w", encoding="ascii") as handle:
        handle.write(f"{port}\n")
    os.replace(partial, path)


def main(argv: list[str] | None = None) -> int:
    """Run one demo backend on the global reactor until it is stopped.

    :param argv: command-line arguments (default: ``sys.argv[1:]``).
    :return: the process exit status.
    """
    parser = argparse.ArgumentParser(prog="python -m stickyproxy.demo", description=__doc__)
    parser.add_argument("--name", required=True, help="the name this backend reports")
    parser.add_argument(
        "--listen",
        default="tcp:0:interface=127.0.0.1",
        help="Twisted server endpoint string (default: an OS-chosen port on 127.0.0.1)",
    )
    parser.add_argument("--ready-file", help="once listening, write the bound port here")
    options = parser.parse_args(argv)

    # Imported here, not at module level: importing stickyproxy.demo must not
    # install a reactor (conf/demo.ini runs these backends inside the proxy).
    from twisted.internet import reactor

    # Logs go to stderr; stdout stays free for the "listening" line.
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    status: list[int] = [0]

    def listening(port: IListeningPort) -> None:
        address = port.getHost()
        # TCP is the common case; other endpoints (unix:) report their address.
        bound = address.port if isinstance(address, IPv4Address | IPv6Address) else address
        if options.ready_file:
            _write_ready_file(options.ready_file, bound)
        print(f"listening {options.name} {bound}", flush=True)

    def failed(reason: Failure) -> None:
        print(f"cannot listen on {options.listen}: {reason.getErrorMessage()}", file=sys.stderr)
        status[0] = 1
        reactor.stop()

    def start() -> None:
        listen_demo_backend(options.name, options.listen, reactor).addCallbacks(listening, failed)

    # Listen from inside the running reactor, so a failure can always stop it.
    reactor.callWhenRunning(start)
    reactor.run()
    return status[0]


if __name__ == "__main__":
    sys.exit(main())
