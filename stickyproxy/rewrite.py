"""What the proxy changes in the messages it forwards, and its own answers.

Pure functions over parsed heads (:mod:`stickyproxy.httphead`): the Twisted
shell calls them once per request and once per response and forwards every
other byte as it came.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stickyproxy import cookies
from stickyproxy.config import CookieConfig
from stickyproxy.httphead import HOP_BY_HOP, RequestHead, ResponseHead, strip_hop_by_hop
from stickyproxy.proxyproto import ProxyInfo

_X_FORWARDED_FOR = b"x-forwarded-for"
_X_PROXY_AUTHORITY = b"x-proxy-authority"
_X_UNIQUE_ID = b"x-unique-id"
_SET_COOKIE = b"set-cookie"
_COOKIE = b"cookie"
_CACHE_CONTROL = b"cache-control"

# Fields that make prepare_request or prepare_response do more than append:
# a message with none of them (names compared by length first, so most lines
# cost no lower-casing) is rewritten by appending the proxy's own fields.
_REQUEST_EDITED = HOP_BY_HOP | {_X_FORWARDED_FOR, _X_PROXY_AUTHORITY, _X_UNIQUE_ID}
_REQUEST_EDITED_LENGTHS = frozenset(len(name) for name in _REQUEST_EDITED | {_COOKIE})
_RESPONSE_EDITED = HOP_BY_HOP | {_SET_COOKIE, _CACHE_CONTROL}
_RESPONSE_EDITED_LENGTHS = frozenset(len(name) for name in _RESPONSE_EDITED)

#: How many ``Set-Cookie`` values :class:`ForwardOptions` remembers. Unsigned
#: values are the servers' cookies, a handful; signed ones are all different.
_SET_COOKIE_VALUES_MAX = 256


@dataclass(frozen=True, slots=True)
class ForwardOptions:
    """The settings that shape a forwarded request or response."""

    cookie: CookieConfig
    forwarded_for: bool = True
    proxy_tlv_headers: bool = False
    #: The persistence cookie's names (:func:`stickyproxy.cookies.cookie_names`),
    #: computed once here rather than on every request.
    cookie_names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    #: What :func:`stickyproxy.cookies.extract` is given: one name as a plain
    #: string (its single-cookie scan, the common case), else the tuple.
    extract_names: str | tuple[str, ...] = field(init=False, repr=False, compare=False)
    #: ``Set-Cookie`` field values already built, by cookie value and TLS.
    set_cookie_cache: dict[tuple[str, bool], tuple[bytes, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        # A frozen dataclass sets derived fields through object.__setattr__.
        names = cookies.cookie_names(self.cookie)
        object.__setattr__(self, "cookie_names", names)
        object.__setattr__(self, "extract_names", names[0] if len(names) == 1 else names)

    def set_cookies(self, value: str, tls: bool = False) -> tuple[bytes, ...]:
        """The ``Set-Cookie`` field values that pin a client to ``value``."""
        key = (value, tls)
        found = self.set_cookie_cache.get(key)
        if found is None:
            found = tuple(cookies.set_cookie_values(self.cookie, value, tls=tls))
            if len(self.set_cookie_cache) < _SET_COOKIE_VALUES_MAX:
                self.set_cookie_cache[key] = found
        return found


def prepare_request(
    head: RequestHead,
    client_ip: str,
    options: ForwardOptions,
    proxy_info: ProxyInfo | None = None,
) -> list[str]:
    """Rewrite a request head in place for the backend.

    Returns the values of the persistence cookie the client presented, in
    order, for the caller to route on: those of the main cookie, then those
    of its twin (``samesite_legacy``), which counts the same.

    - With ``indirect``, the persistence cookie and its twin are removed from
      ``Cookie`` byte-exactly and the other cookies are kept (HAProxy
      ``insert indirect``); a ``Cookie`` header left empty disappears.
    - Hop-by-hop headers are removed (RFC 9110 §7.6.1), except the pair a
      WebSocket upgrade needs (RFC 6455 §4.1).
    - ``X-Forwarded-For`` is replaced by the client address the connection
      (or its PROXY header) vouches for: a value the client sent itself is
      not evidence of anything, so it is never passed on.
    - With ``proxy_tlv_headers``, the PROXY v2 AUTHORITY (the TLS server name
      the client asked for) and UNIQUE_ID TLVs become ``X-Proxy-Authority`` and
      ``X-Unique-ID``; headers of those names from the client are dropped.
    """
    values, stripped = cookies.extract(head.headers, options.extract_names)
    if options.cookie.indirect:
        head.headers = stripped
    strip_hop_by_hop(head, keep_upgrade=head.is_websocket_upgrade)
    if options.forwarded_for:
        head.remove(_X_FORWARDED_FOR)
        head.add(b"X-Forwarded-For", client_ip.encode("ascii"))
    if options.proxy_tlv_headers:
        head.remove(_X_PROXY_AUTHORITY)
        head.remove(_X_UNIQUE_ID)
        if proxy_info is not None and proxy_info.authority:
            head.add(b"X-Proxy-Authority", _header_safe(proxy_info.authority.encode("utf-8")))
        if proxy_info is not None and proxy_info.unique_id:
            head.add(b"X-Unique-ID", _header_safe(proxy_info.unique_id))
    return values


def prepare_request_bytes(
    head: RequestHead,
    client_ip: str,
    options: ForwardOptions,
    proxy_info: ProxyInfo | None = None,
) -> tuple[list[str], bytes]:
    """:func:`prepare_request`, and the rewritten head serialized.

    The usual request, with no hop-by-hop field nor any field the proxy
    replaces, is rewritten in one pass over its fields; the result is the
    same as :func:`prepare_request`'s.

    :returns: the values of the persistence cookie, and the head's bytes.
    """
    cookie = False
    for name, _ in head.headers:
        if len(name) in _REQUEST_EDITED_LENGTHS:
            lower = name.lower()
            if lower in _REQUEST_EDITED:
                break
            if lower == _COOKIE:
                cookie = True
    else:
        if not options.proxy_tlv_headers:
            values: list[str] = []
            if cookie:
                values, stripped = cookies.extract(head.headers, options.extract_names)
                if options.cookie.indirect:
                    head.headers = stripped
            if options.forwarded_for:
                head.headers.append((b"X-Forwarded-For", client_ip.encode("ascii")))
            return values, head.serialize()
    values = prepare_request(head, client_ip, options, proxy_info)
    return values, head.serialize()


def _header_safe(value: bytes) -> bytes:
    """``value`` if it is visible ASCII (RFC 9110 §5.5 field-vchar), else hex."""
    if value and all(0x21 <= b <= 0x7E for b in value):
        return value
    return value.hex().encode("ascii")


def prepare_response(
    head: ResponseHead,
    options: ForwardOptions,
    *,
    insert_value: str | None,
    close: bool,
    tls: bool = False,
) -> None:
    """Rewrite a response head in place for the client.

    :param insert_value: the cookie value to set (the client had no valid
        cookie for the server that answered), or ``None``.
    :param close: the proxy closes the client connection after this response.
    :param tls: the client's connection is TLS (a TLS listener, the PROXY v2
        SSL TLV, or a trusted ``X-Forwarded-Proto: https``); with
        ``secure = auto`` it decides ``Secure``, and with it ``SameSite=None``
        and the twin cookie (:func:`stickyproxy.cookies.set_cookie_values`).

    A backend's own ``Set-Cookie`` for the persistence cookie or its twin is
    dropped, as HAProxy's ``insert`` mode does without ``preserve``: the
    proxy alone decides where a client is pinned. Every status gets the
    cookie, 101 and 4xx included, so stickiness is set up during a WebSocket
    handshake.

    ``nocache``: a response that carries the inserted cookie is marked
    ``private`` (RFC 9111 §5.2.2.7) whatever its cacheability, so a shared
    cache can never hand one client's pin to another. HAProxy only does this
    for responses it judges cacheable, which skips the typical dynamic page.
    """
    names = options.cookie_names
    if head.get(_SET_COOKIE) is not None:
        head.headers = [
            (n, v)
            for n, v in head.headers
            if n.lower() != _SET_COOKIE or not cookies.is_own_set_cookie(v, names)
        ]
    strip_hop_by_hop(head, keep_upgrade=head.status == 101)
    if insert_value is not None:
        for value in options.set_cookies(insert_value, tls):
            head.add(b"Set-Cookie", value)
        if options.cookie.nocache and head.status >= 200:
            head.headers = cookies.make_private(head.headers)
    if close:
        head.add(b"Connection", b"close")


def prepare_response_bytes(
    head: ResponseHead,
    options: ForwardOptions,
    *,
    insert_value: str | None,
    close: bool,
    tls: bool = False,
) -> bytes:
    """:func:`prepare_response`, and the rewritten head serialized.

    The usual response, with no hop-by-hop field, ``Set-Cookie`` or
    ``Cache-Control``, is rewritten by appending fields only; the result is
    the same as :func:`prepare_response`'s.
    """
    headers = head.headers
    for name, _ in headers:
        if len(name) in _RESPONSE_EDITED_LENGTHS and name.lower() in _RESPONSE_EDITED:
            prepare_response(head, options, insert_value=insert_value, close=close, tls=tls)
            return head.serialize()
    if insert_value is not None:
        for value in options.set_cookies(insert_value, tls):
            headers.append((b"Set-Cookie", value))
        if options.cookie.nocache and head.status >= 200:
            # What make_private does to a response without Cache-Control.
            headers.append((b"Cache-Control", b"private"))
    if close:
        headers.append((b"Connection", b"close"))
    return head.serialize()


_REASONS = {
    400: (b"Bad Request", "Your browser sent an invalid request."),
    403: (b"Forbidden", "Request forbidden."),
    408: (b"Request Timeout", "Your browser didn't send a complete request in time."),
    413: (b"Payload Too Large", "The request body is not allowed here."),
    414: (b"URI Too Long", "The request target is too long."),
    421: (b"Misdirected Request", "This request was sent to the wrong server."),
    431: (b"Request Header Fields Too Large", "The request headers are too large."),
    501: (b"Not Implemented", "The request uses a feature this proxy does not support."),
    502: (b"Bad Gateway", "The server returned an invalid or incomplete response."),
    503: (b"Service Unavailable", "No server is available to handle this request."),
    504: (b"Gateway Timeout", "The server didn't respond in time."),
    505: (b"HTTP Version Not Supported", "This proxy speaks HTTP/1.0 and HTTP/1.1 only."),
}


def error_response(status: int, *, close: bool) -> bytes:
    """The proxy's own answer: a short HTML page, never cached.

    ``Connection: close`` is sent whenever the proxy closes the connection
    afterwards, so the client knows not to reuse it (RFC 9112 §9.6).
    """
    reason, text = _REASONS.get(status, (b"Error", "The request could not be handled."))
    body = (f"<html><body><h1>{status} {reason.decode()}</h1>\n{text}\n</body></html>\n").encode()
    lines = [
        b"HTTP/1.1 %d %s" % (status, reason),
        b"Content-Type: text/html",
        b"Content-Length: %d" % len(body),
        b"Cache-Control: no-cache",
    ]
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
