"""The persistence cookie: find it, strip it, set it, keep it out of caches.

Requests carry ``Cookie: a=1; NAME=s2; b=2`` (RFC 6265 §4.2, §5.4). The proxy
reads every value of its cookie ``NAME`` to route the request and, in
``indirect`` mode, removes the cookie before the request reaches the server,
leaving every other cookie byte for byte as the client sent it. Responses get
``Set-Cookie: NAME=s2; path=/`` (§4.1) when the client needs a new value, and
then must not be stored by a shared cache.

Parsing is deliberately as tolerant as HAProxy's: spaces and tabs around
``=`` and ``;`` are ignored, while names and values are compared exactly
(case-sensitive; a quoted value keeps its quotes and so names no server).

With ``samesite_legacy`` the cookie has a twin, ``NAME`` + ``legacy_suffix``,
set alongside it without ``SameSite`` for clients that drop a
``SameSite=None`` cookie; requests may carry either or both, and both count.
"""

from __future__ import annotations

from functools import lru_cache

from stickyproxy.config import CookieConfig

__all__ = [
    "cookie_names",
    "extract",
    "is_own_set_cookie",
    "make_private",
    "set_cookie_value",
    "set_cookie_values",
]

Headers = list[tuple[bytes, bytes]]

_OWS = b" \t"


def _split_pair(segment: bytes) -> tuple[bytes, bytes | None]:
    """Split one ``name=value`` cookie-pair into its trimmed name and value."""
    name, eq, value = segment.partition(b"=")
    return name.strip(_OWS), value.strip(_OWS) if eq else None


def cookie_names(config: CookieConfig) -> tuple[str, ...]:
    """The names under which a request may carry the persistence cookie.

    The main name first, then the twin's when ``samesite_legacy`` is on. The
    twin is read even when a response would not set it (plain HTTP under
    ``secure = auto``): a client that got it over TLS still routes by it.
    """
    if config.samesite_legacy:
        return (config.name, config.name + config.legacy_suffix)
    return (config.name,)


@lru_cache(maxsize=32)
def _encoded(names: str | tuple[str, ...]) -> tuple[bytes, ...]:
    """``names`` as the bytes compared on the wire, computed once per name set.

    Called on every request with the same few arguments (one per
    configuration): a ``str`` or a tuple is its own cache key, so a hit
    allocates nothing.
    """
    if isinstance(names, str):
        return (names.encode("utf-8"),)
    return tuple(name.encode("utf-8") for name in names)


def extract(headers: Headers, names: str | tuple[str, ...]) -> tuple[list[str], Headers]:
    """Find and remove every occurrence of our cookie in ``Cookie`` headers.

    :param headers: the request's header lines as ``(name, value)`` bytes.
    :param names: our cookie's name, or its names in order of precedence
        (the main cookie, then its twin: :func:`cookie_names`); compared
        case-sensitively, as RFC 6265 §5.4 does.
    :returns: the cookie's values, and the header list without it. The
        values of the first name come first, in order of appearance, then
        those of the next name, and so on: a client holding both the main
        cookie and its twin is routed by the main one. A ``Cookie`` header
        that contains none of the names is kept unchanged; one that does is
        rebuilt from its other cookies, each kept byte for byte and joined
        with ``"; "``, or dropped if nothing is left. RFC 2109 attributes
        (``$Path``, ``$Domain``…) following one of our cookies belong to it
        and go with it.
    """
    wanted = _encoded(names)
    main = wanted[0]
    others = wanted[1:]
    values: list[str] = []
    # Values of the other names with their rank, only allocated when seen.
    later: list[tuple[int, str]] | None = None
    result: Headers = []
    for header_name, header_value in headers:
        # Substring tests first: most Cookie headers hold none of our names.
        if header_name.lower() != b"cookie" or (
            main not in header_value
            and not (others and any(name in header_value for name in others))
        ):
            result.append((header_name, header_value))
            continue
        kept: list[bytes] = []
        found = False
        dropping = False
        for segment in header_value.split(b";"):
            pair_name, pair_value = _split_pair(segment)
            if pair_value is not None and pair_name in wanted:
                if pair_name == main:
                    values.append(pair_value.decode("latin-1"))
                else:
                    if later is None:
                        later = []
                    later.append((wanted.index(pair_name), pair_value.decode("latin-1")))
                found = dropping = True
            elif dropping and pair_name.startswith(b"$"):
                continue
            else:
                dropping = False
                trimmed = segment.strip(_OWS)
                if trimmed:
                    kept.append(trimmed)
        if not found:
            result.append((header_name, header_value))
        elif kept:
            result.append((header_name, b"; ".join(kept)))
    if later is not None:
        # sorted() is stable: each name's values keep their order.
        values.extend(value for _, value in sorted(later, key=lambda item: item[0]))
    return values, result


def _attributes(config: CookieConfig, tls: bool) -> tuple[list[str], bool]:
    """The attributes shared by the cookie and its twin, and whether ``SameSite=None`` goes out.

    ``SameSite`` itself is not in the list: only the main cookie carries it.
    """
    parts = [f"path={config.path}"]
    if config.domain:
        parts.append(f"domain={config.domain}")
    if config.max_age is not None:
        parts.append(f"Max-Age={int(config.max_age)}")
    if config.httponly:
        parts.append("HttpOnly")
    # ``secure`` is ``True``, ``False`` or ``"auto"``: a plain truth test
    # would make "auto" mean always.
    secure = config.secure is True or (config.secure == "auto" and tls)
    if secure:
        parts.append("Secure")
    # Browsers ignore a ``SameSite=None`` cookie that lacks ``Secure``
    # (RFC 6265bis: §5.6.7 defines the attribute, and its storage model drops
    # such a cookie entirely; Chrome enforces this since version 80). Under
    # ``secure = auto`` a cookie set over plain HTTP would so be lost, and
    # the client re-pinned on every request. Without ``SameSite`` it is
    # kept under the browser's default policy, the most a cookie set over
    # plain HTTP can get.
    return parts, secure and config.samesite == "None"


def set_cookie_value(config: CookieConfig, value: str, *, tls: bool = False) -> bytes:
    """Return the ``Set-Cookie`` field value that pins a client to ``value``.

    Attributes come in HAProxy's order (path, domain, then flags) so that
    responses look the same as behind HAProxy; ``Max-Age`` (RFC 6265 §5.2.2)
    is only added when configured, otherwise the cookie lasts the browser
    session, as HAProxy's inserted cookies do.

    :param tls: the client's connection is TLS; with ``secure = auto`` this
        decides ``Secure``. ``SameSite=None`` is only ever sent together with
        ``Secure``: without it the attribute is left out.
    """
    return set_cookie_values(config, value, tls=tls)[0]


def set_cookie_values(config: CookieConfig, value: str, *, tls: bool = False) -> list[bytes]:
    """Return every ``Set-Cookie`` field value that pins a client to ``value``.

    One value, :func:`set_cookie_value`, unless the main cookie goes out
    with ``SameSite=None`` and ``samesite_legacy`` is on: then a twin named
    ``name + legacy_suffix`` follows with the same value and attributes
    but no ``SameSite``. Some clients (iOS 12 Safari, Chrome 51-66) reject a
    ``SameSite=None`` cookie or read it as ``Strict``; they keep the twin
    and route by it, while current browsers send the main cookie cross-site.
    When ``SameSite`` is left out anyway (plain HTTP under ``secure =
    auto``), the one cookie already suits every client.
    """
    parts, samesite_none = _attributes(config, tls)
    attributes = "; ".join(parts)
    if not samesite_none:
        if config.samesite and config.samesite != "None":
            attributes += f"; SameSite={config.samesite}"
        return [f"{config.name}={value}; {attributes}".encode("latin-1")]
    main = f"{config.name}={value}; {attributes}; SameSite=None".encode("latin-1")
    if not config.samesite_legacy:
        return [main]
    twin = f"{config.name}{config.legacy_suffix}={value}; {attributes}".encode("latin-1")
    return [main, twin]


def is_own_set_cookie(value: bytes, names: str | tuple[str, ...]) -> bool:
    """Whether a backend's ``Set-Cookie`` field value sets our cookie.

    :param names: our cookie's name, or its names (:func:`cookie_names`).

    The cookie name is the text before the first ``=`` of the first
    ``;``-separated part, with whitespace trimmed (RFC 6265 §5.2 steps 1-4).
    Such a header is dropped: the proxy owns that cookie and its twin, as
    HAProxy's ``insert`` mode does without ``preserve``.
    """
    pair = value.split(b";", 1)[0]
    pair_name, pair_value = _split_pair(pair)
    return pair_value is not None and pair_name in _encoded(names)


def _split_directives(value: bytes) -> list[bytes]:
    """Split a Cache-Control value on commas outside quoted strings (RFC 9110 §5.6.1, §5.6.4)."""
    parts: list[bytes] = []
    start = 0
    quoted = False
    escaped = False
    for index, byte in enumerate(value):
        if escaped:
            escaped = False
        elif quoted and byte == 0x5C:  # backslash: quoted-pair
            escaped = True
        elif byte == 0x22:  # double quote
            quoted = not quoted
        elif byte == 0x2C and not quoted:  # comma
            parts.append(value[start:index])
            start = index + 1
    parts.append(value[start:])
    return [p.strip(_OWS) for p in parts if p.strip(_OWS)]


def _directive_name(directive: bytes) -> bytes:
    return directive.partition(b"=")[0].strip(_OWS).lower()


def make_private(headers: Headers) -> Headers:
    """Make sure no shared cache stores a response that carries our ``Set-Cookie``.

    A shared cache that stored it would hand one client's server assignment
    to everyone (RFC 9111 §5.2.2.7; RFC 6265 §4.1.1 warns likewise). HAProxy's
    ``nocache`` only adds ``Cache-Control: private`` to responses that look
    cacheable by its heuristics, which skips most dynamic responses; here
    every such response is covered:

    * an unqualified ``private`` or a ``no-store`` already present: unchanged;
    * otherwise, if there is a ``Cache-Control`` header: ``public`` is removed
      (it would contradict ``private``) and ``private`` is added to the first
      ``Cache-Control`` header, keeping every other directive (``max-age``
      still lets the client's own cache reuse the response);
    * otherwise ``Cache-Control: private`` is appended.
    """
    directives = [
        d
        for header_name, value in headers
        if header_name.lower() == b"cache-control"
        for d in _split_directives(value)
    ]
    for d in directives:
        name = _directive_name(d)
        if name == b"no-store" or (name == b"private" and b"=" not in d):
            return list(headers)
    result: Headers = []
    added = False
    for header_name, value in headers:
        if header_name.lower() != b"cache-control":
            result.append((header_name, value))
            continue
        own = _split_directives(value)
        kept = [d for d in own if _directive_name(d) != b"public"]
        # Headers without ``public`` keep their exact bytes.
        new_value = b", ".join(kept) if len(kept) < len(own) else value
        if not added:
            new_value = new_value + b", private" if new_value.strip(_OWS) else b"private"
            added = True
        if new_value.strip(_OWS):
            result.append((header_name, new_value))
    if not added:
        result.append((b"Cache-Control", b"private"))
    return result
