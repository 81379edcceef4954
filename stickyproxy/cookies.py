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
"""

from __future__ import annotations

from stickyproxy.config import CookieConfig

__all__ = ["extract", "is_own_set_cookie", "make_private", "set_cookie_value"]

Headers = list[tuple[bytes, bytes]]

_OWS = b" \t"


def _split_pair(segment: bytes) -> tuple[bytes, bytes | None]:
    """Split one ``name=value`` cookie-pair into its trimmed name and value."""
    name, eq, value = segment.partition(b"=")
    return name.strip(_OWS), value.strip(_OWS) if eq else None


def extract(headers: Headers, name: str) -> tuple[list[str], Headers]:
    """Find and remove every occurrence of cookie ``name`` in ``Cookie`` headers.

    :param headers: the request's header lines as ``(name, value)`` bytes.
    :param name: our cookie's name (case-sensitive, as RFC 6265 §5.4 compares).
    :returns: the cookie's values in order of appearance, and the header list
        without it. A ``Cookie`` header that does not contain our cookie is
        kept unchanged; one that does is rebuilt from its other cookies,
        each kept byte for byte and joined with ``"; "``, or dropped if
        nothing is left. RFC 2109 attributes (``$Path``, ``$Domain``…)
        following our cookie belong to it and go with it.
    """
    ours = name.encode("utf-8")
    values: list[str] = []
    result: Headers = []
    for header_name, header_value in headers:
        if header_name.lower() != b"cookie" or ours not in header_value:
            result.append((header_name, header_value))
            continue
        kept: list[bytes] = []
        found = False
        dropping = False
        for segment in header_value.split(b";"):
            pair_name, pair_value = _split_pair(segment)
            if pair_name == ours and pair_value is not None:
                values.append(pair_value.decode("latin-1"))
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
    return values, result


def set_cookie_value(config: CookieConfig, value: str) -> bytes:
    """Return the ``Set-Cookie`` field value that pins a client to ``value``.

    Attributes come in HAProxy's order (path, domain, then flags) so that
    responses look the same as behind HAProxy; ``Max-Age`` (RFC 6265 §5.2.2)
    is only added when configured, otherwise the cookie lasts the browser
    session, as HAProxy's inserted cookies do.
    """
    parts = [f"{config.name}={value}", f"path={config.path}"]
    if config.domain:
        parts.append(f"domain={config.domain}")
    if config.max_age is not None:
        parts.append(f"Max-Age={int(config.max_age)}")
    if config.httponly:
        parts.append("HttpOnly")
    if config.secure:
        parts.append("Secure")
    if config.samesite:
        parts.append(f"SameSite={config.samesite}")
    return "; ".join(parts).encode("latin-1")


def is_own_set_cookie(value: bytes, name: str) -> bool:
    """Whether a backend's ``Set-Cookie`` field value sets our cookie ``name``.

    The cookie name is the text before the first ``=`` of the first
    ``;``-separated part, with whitespace trimmed (RFC 6265 §5.2 steps 1-4).
    Such a header is dropped: the proxy owns that cookie, as HAProxy's
    ``insert`` mode does without ``preserve``.
    """
    pair = value.split(b";", 1)[0]
    pair_name, pair_value = _split_pair(pair)
    return pair_value is not None and pair_name == name.encode("utf-8")


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
