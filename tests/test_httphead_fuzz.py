"""Property tests for stickyproxy.httphead, with h11 as a differential oracle.

Generated requests (methods, targets, header sets with Content-Length and
Transfer-Encoding combinations, chunked bodies with extensions and trailers,
then a pipelined next request) are fed to the head parser and body reader,
whole and at random splits, both as generated and after random byte
mutations. The invariants:

* only :class:`~stickyproxy.errors.RemoteProtocolError` is ever raised, and
  the outcome does not depend on how the bytes were split;
* when h11 and this parser both accept a request, they agree on the method,
  the target, the header fields, the body bytes and where the next message
  starts;
* when this parser accepts a request that h11 refuses, the request belongs to
  one of the deliberate classes in :func:`deliberate_acceptance`; anything
  else fails the test.

Requests this parser refuses and h11 accepts are expected (it is stricter on
purpose: bare LF, control characters, "#" in targets, Host syntax and
duplicate Host lines, the request-target form for the method, HTTP/1.0
with Transfer-Encoding or with a GET body, a missing Host in HTTP/1.2 (handled
as HTTP/1.1), whitespace after a chunk size) and are not
checked further.

The default hypothesis profile is small and deterministic;
``HYPOTHESIS_PROFILE=deep`` runs many more examples.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from dataclasses import dataclass

import h11
from hypothesis import event, example, given
from hypothesis import strategies as st

from stickyproxy.errors import RemoteProtocolError
from stickyproxy.httphead import CHUNKED, BodyReader, HeadParser, RequestHead

NEXT = b"GET /next HTTP/1.1\r\nHost: next.example\r\n\r\n"

TCHARS = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


# --------------------------------------------------------------------------
# Outcomes


@dataclass(frozen=True)
class Accepted:
    method: bytes
    target: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    chunked: bool
    body: bytes  # decoded (de-chunked) body
    rest: bytes  # bytes after the message


@dataclass(frozen=True)
class Rejected:
    status: int | None


@dataclass(frozen=True)
class Incomplete:
    pass


Outcome = Accepted | Rejected | Incomplete


def dechunk(raw: bytes) -> bytes:
    """Decode a chunked body already validated by BodyReader (reference decoder)."""
    out: list[bytes] = []
    pos = 0
    while True:
        eol = raw.index(b"\r\n", pos)
        size = int(raw[pos:eol].split(b";")[0].strip(), 16)
        pos = eol + 2
        if size == 0:
            return b"".join(out)
        out.append(raw[pos : pos + size])
        pos += size + 2


def ours(chunks: list[bytes]) -> Outcome:
    """Run the head parser and the body reader the way the relay does."""
    parser = HeadParser("request")
    head: RequestHead | None = None
    reader: BodyReader | None = None
    body: list[bytes] = []
    rest: list[bytes] = []
    try:
        for chunk in chunks:
            if reader is not None and reader.done:
                rest.append(chunk)
                continue
            data = chunk
            if head is None:
                head = parser.feed(data)
                if head is None:
                    continue
                reader = BodyReader(head.framing)
                data = parser.take_rest()
            assert reader is not None
            this, after = reader.feed(data)
            body.append(this)
            rest.append(after)
    except RemoteProtocolError as exc:
        return Rejected(exc.status_hint)
    if head is None or reader is None or not reader.done:
        return Incomplete()
    raw = b"".join(body)
    chunked = head.framing.kind == "chunked"
    return Accepted(
        head.method,
        head.target,
        tuple(head.headers),
        chunked,
        dechunk(raw) if chunked else raw,
        b"".join(rest),
    )


def theirs(data: bytes) -> Outcome:
    """What h11, as a server, makes of the same bytes."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    request = None
    body = []
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return Incomplete()
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
    except h11.RemoteProtocolError as exc:
        return Rejected(exc.error_status_hint)
    assert request is not None
    return Accepted(
        bytes(request.method),
        bytes(request.target),
        tuple((bytes(n), bytes(v)) for n, v in request.headers.raw_items()),
        any(n.lower() == b"transfer-encoding" for n, _ in request.headers.raw_items()),
        b"".join(body),
        conn.trailing_data[0],
    )


#: Fields each side normalizes on purpose: h11 and this parser both collapse
#: Content-Length lists; this parser also drops Content-Length next to
#: Transfer-Encoding (RFC 9112 §6.3 step 3) and rewrites Transfer-Encoding to
#: exactly "chunked". Their effect is compared through the body instead.
NORMALIZED = frozenset((b"content-length", b"transfer-encoding"))


def comparable(outcome: Accepted) -> Accepted:
    headers = tuple((n, v) for n, v in outcome.headers if n.lower() not in NORMALIZED)
    return Accepted(
        outcome.method, outcome.target, headers, outcome.chunked, outcome.body, outcome.rest
    )


def deliberate_acceptance(data: bytes) -> str | None:
    """Name the documented reason this parser accepts what h11 refuses.

    Each class is a decision recorded in stickyproxy.httphead:

    * leading empty lines before the request line are skipped
      (RFC 9112 §2.2: a server SHOULD ignore at least one);
    * a Transfer-Encoding whose codings reduce to a single "chunked"
      (empty list elements per RFC 9110 §5.6.1, or several fields) is
      accepted and forwarded as exactly "chunked";
    * whitespace between a chunk size and its extension is accepted: it is
      BWS in RFC 9112 §7.1.1, which RFC 9110 §5.6.3 says a recipient MUST
      parse (h11 refuses it). It cannot change the chunk size.
    """
    if data.startswith(b"\r\n"):
        return "leading empty line"
    head, _, body = data.partition(b"\r\n\r\n")
    fields = [line.split(b":", 1) for line in head.split(b"\r\n")[1:]]
    te_values = [f[1].strip(b" \t").lower() for f in fields if f[0].lower() == b"transfer-encoding"]
    if te_values and te_values != [b"chunked"]:
        return "Transfer-Encoding reduced to chunked"
    if te_values and re.search(rb"(?:^|\r\n)[0-9A-Fa-f]+[ \t]+;", body):
        return "BWS before a chunk extension"
    return None


def check(data: bytes, chunks: list[bytes]) -> None:
    """All the invariants for one input."""
    whole = ours([data])
    assert ours(chunks) == whole, "the outcome depends on how the bytes were split"
    assert ours([data[i : i + 1] for i in range(len(data))]) == whole
    reference = theirs(data)
    event(f"ours: {type(whole).__name__}, h11: {type(reference).__name__}")
    if isinstance(whole, Rejected):
        assert whole.status in (400, 413, 414, 431, 501, 505)
        return
    if isinstance(whole, Accepted):
        if isinstance(reference, Accepted):
            assert comparable(whole) == comparable(reference)
        else:
            event(f"deliberate: {deliberate_acceptance(data)}")
            assert deliberate_acceptance(data) is not None, (
                f"accepted a request h11 refuses: {reference}"
            )
    elif isinstance(reference, Accepted):
        # Incomplete here means this parser expects more body than h11 did.
        assert deliberate_acceptance(data) is None
        raise AssertionError("h11 finished a request this parser still waits on")


# --------------------------------------------------------------------------
# Strategies

token = st.text(TCHARS, min_size=1, max_size=10).map(str.encode)
field_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=20,
).map(lambda s: s.encode("latin-1"))
methods = st.one_of(
    st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"get"]),
    token,
)
path_chars = st.text("abcxyzABC0123456789-._~!$&'()*+,;=:@/?%", min_size=0, max_size=15).map(
    str.encode
)
targets = st.one_of(
    path_chars.map(lambda p: b"/" + p),
    st.sampled_from([b"*", b"http://h.example/x", b"https://H.EXAMPLE", b"h.example:443"]),
)
versions = st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2"])
other_fields = st.lists(
    st.tuples(
        st.one_of(
            st.sampled_from([b"Accept", b"Cookie", b"User-Agent", b"Connection", b"Expect"]),
            token,
        ).filter(lambda n: n.lower() not in (b"host", b"content-length", b"transfer-encoding")),
        field_text,
    ),
    max_size=5,
)


@st.composite
def chunked_body(draw: st.DrawFn) -> bytes:
    parts = []
    for data in draw(st.lists(st.binary(min_size=1, max_size=20), max_size=4)):
        size = b"%x" % len(data)
        size = draw(st.sampled_from([size, size.upper(), b"0" + size]))
        ext = draw(st.sampled_from([b"", b";a", b";a=b", b' ;a="q \\" x"', b";a=b;c"]))
        parts.append(size + ext + b"\r\n" + data + b"\r\n")
    trailers = draw(st.lists(st.tuples(token, field_text), max_size=2))
    last = draw(st.sampled_from([b"0", b"000"])) + b"\r\n"
    parts.append(last + b"".join(n + b": " + v + b"\r\n" for n, v in trailers) + b"\r\n")
    return b"".join(parts)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """A request, mostly valid, with a body framed every which way."""
    method = draw(methods)
    target = draw(targets)
    version = draw(versions)
    lines = [method + b" " + target + b" " + version]
    fields = draw(other_fields)
    host = draw(st.sampled_from([[b"h.example"], [b"h.example"], [], [b"h.example", b"H.example"]]))
    fields += [(b"Host", h) for h in host]
    framing = draw(st.sampled_from(["none", "length", "chunked", "both"]))
    body = b""
    if framing in ("length", "both"):
        content = draw(st.binary(max_size=30))
        n = b"%d" % len(content)
        values = draw(
            st.sampled_from([[n], [n], [n + b", " + n], [n, n], [b" " + n + b" "], [b"0" + n]])
        )
        fields += [(b"Content-Length", v) for v in values]
        body = content
    if framing in ("chunked", "both"):
        te = draw(
            st.sampled_from(
                [[b"chunked"], [b"chunked"], [b"Chunked"], [b"chunked,"], [b"", b"chunked"]]
            )
        )
        fields += [(b"Transfer-Encoding", v) for v in te]
        body = draw(chunked_body())
    order = draw(st.permutations(range(len(fields))))
    lines += [fields[i][0] + b": " + fields[i][1] for i in order]
    prefix = draw(st.sampled_from([b"", b"", b"", b"\r\n"]))
    return prefix + b"\r\n".join(lines) + b"\r\n\r\n" + body + NEXT


@st.composite
def cut(draw: st.DrawFn, data: bytes) -> list[bytes]:
    offsets = sorted(draw(st.sets(st.integers(1, max(1, len(data) - 1)), max_size=6)))
    bounds = [0, *(o for o in offsets if o < len(data)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


INTERESTING = b" \t\r\n\x00:;,=-0189aAfFzZ\x7f\x80\xff"


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A generated request with a few bytes replaced, inserted or deleted."""
    data = bytearray(draw(requests()))
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(data) - 1))
        byte = draw(st.one_of(st.sampled_from(INTERESTING), st.integers(0, 255)))
        action = draw(st.sampled_from(["replace", "insert", "delete"]))
        if action == "replace":
            data[pos] = byte
        elif action == "insert":
            data.insert(pos, byte)
        else:
            del data[pos]
    return bytes(data)


# --------------------------------------------------------------------------


@given(st.data())
def test_generated_requests_satisfy_the_invariants(data: st.DataObject) -> None:
    message = data.draw(requests())
    check(message, data.draw(cut(message)))


@given(st.data())
def test_mutated_requests_satisfy_the_invariants(data: st.DataObject) -> None:
    message = data.draw(mutated())
    check(message, data.draw(cut(message)))


@given(st.binary(max_size=200))
@example(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
@example(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
def test_arbitrary_bytes_only_ever_raise_remote_protocol_errors(data: bytes) -> None:
    outcome = ours([data])
    assert ours([data[i : i + 1] for i in range(len(data))]) == outcome
    with contextlib.suppress(RemoteProtocolError):
        HeadParser("response").feed(data)


@given(st.binary(max_size=120))
def test_arbitrary_chunked_bodies_only_ever_raise_remote_protocol_errors(data: bytes) -> None:
    results: list[object] = []
    for chunks in ([data], [data[i : i + 1] for i in range(len(data))]):
        reader = BodyReader(CHUNKED)
        try:
            forwarded, after = b"", b""
            for chunk in chunks:
                this, rest = reader.feed(chunk)
                forwarded += this
                after += rest
            results.append((forwarded, after, reader.done))
        except RemoteProtocolError as exc:
            results.append(("error", exc.status_hint))
    assert results[0] == results[1]


def test_deliberate_acceptances_are_refused_by_h11() -> None:
    """Each documented class really is one where h11 and this parser differ."""
    samples = [
        b"\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked,\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1 ;a\r\nx\r\n0\r\n\r\n",
    ]
    for sample in samples:
        assert isinstance(ours([sample]), Accepted), sample
        assert isinstance(theirs(sample), Rejected), sample
        assert deliberate_acceptance(sample) is not None
