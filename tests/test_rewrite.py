"""The proxy's own error pages, and the one-pass rewrites of the usual heads."""

from __future__ import annotations

import copy

import h11
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from stickyproxy.config import CookieConfig
from stickyproxy.httphead import RequestHead, ResponseHead
from stickyproxy.rewrite import (
    ForwardOptions,
    error_response,
    prepare_request,
    prepare_request_bytes,
    prepare_response,
    prepare_response_bytes,
)

STATUSES = [400, 403, 408, 413, 414, 421, 431, 501, 502, 503, 504, 505]


@pytest.mark.parametrize("status", STATUSES)
def test_each_error_page_is_a_short_valid_http_response(status: int) -> None:
    raw = error_response(status, close=True)
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(raw)
    response = client.next_event()
    assert isinstance(response, h11.Response) and response.status_code == status
    headers = dict(response.headers)
    assert headers[b"connection"] == b"close"
    assert headers[b"cache-control"] == b"no-cache"
    body = client.next_event()
    assert isinstance(body, h11.Data) and str(status).encode() in body.data
    assert len(body.data) < 300
    assert isinstance(client.next_event(), h11.EndOfMessage)


def test_a_page_for_a_kept_connection_has_no_connection_close() -> None:
    assert b"Connection:" not in error_response(503, close=False)


# Names the rewrites treat specially, in several cases, among ordinary ones.
_NAMES = [
    b"Host",
    b"Accept",
    b"Content-Length",
    b"Cookie",
    b"cookie",
    b"Connection",
    b"Keep-Alive",
    b"TE",
    b"Upgrade",
    b"Proxy-Connection",
    b"X-Forwarded-For",
    b"X-Unique-ID",
    b"Set-Cookie",
    b"Cache-Control",
    b"Accept-Encoding",
]
_VALUES = [
    b"x",
    b"close",
    b"keep-alive, Accept",
    b"storify_editor_host=s1",
    b"a=1; storify_editor_host=s2; b=2",
    b"storify_editor_host=s9; path=/",
    b"public, max-age=60",
    b"no-store",
    b"6.6.6.6",
]
headers_strategy = st.lists(
    st.tuples(st.sampled_from(_NAMES), st.sampled_from(_VALUES)), max_size=6
)
options_strategy = st.builds(
    ForwardOptions,
    cookie=st.builds(CookieConfig, indirect=st.booleans(), nocache=st.booleans()),
    forwarded_for=st.booleans(),
    proxy_tlv_headers=st.booleans(),
)


_DEFAULT = ForwardOptions(cookie=CookieConfig())


@given(headers=headers_strategy, options=options_strategy)
@example(headers=[(b"Host", b"x")], options=_DEFAULT)
@example(headers=[(b"Host", b"x"), (b"Cookie", b"a=1; storify_editor_host=s2")], options=_DEFAULT)
def test_a_request_is_rewritten_and_serialized_as_prepare_request_does(
    headers: list[tuple[bytes, bytes]], options: ForwardOptions
) -> None:
    head = RequestHead(b"GET", b"/", b"HTTP/1.1", headers)
    reference = copy.deepcopy(head)
    values = prepare_request(reference, "192.0.2.1", options)
    assert prepare_request_bytes(head, "192.0.2.1", options) == (values, reference.serialize())
    assert head.headers == reference.headers


@given(
    headers=headers_strategy,
    options=options_strategy,
    status=st.sampled_from([101, 200, 304, 503]),
    insert=st.sampled_from([None, "s1"]),
    close=st.booleans(),
)
@example(
    headers=[(b"Content-Length", b"2")], options=_DEFAULT, status=200, insert="s1", close=False
)
@example(headers=[], options=_DEFAULT, status=304, insert="s1", close=True)
def test_a_response_is_rewritten_and_serialized_as_prepare_response_does(
    headers: list[tuple[bytes, bytes]],
    options: ForwardOptions,
    status: int,
    insert: str | None,
    close: bool,
) -> None:
    head = ResponseHead(b"HTTP/1.1", status, b"OK", headers)
    reference = copy.deepcopy(head)
    prepare_response(reference, options, insert_value=insert, close=close)
    data = prepare_response_bytes(head, options, insert_value=insert, close=close)
    assert data == reference.serialize()
    assert head.headers == reference.headers
