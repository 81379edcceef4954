"""Rewriting forwarded heads (the persistence cookie, its twin, the one-pass rewrites of
the usual heads) and the proxy's own error pages."""

from __future__ import annotations

import copy

import h11
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from stickyproxy.config import CookieConfig
from stickyproxy.httphead import HeadParser, RequestHead, ResponseHead
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


def _request(raw: bytes) -> RequestHead:
    head = HeadParser("request").feed(raw)
    assert head is not None
    return head


def _response(raw: bytes) -> ResponseHead:
    head = HeadParser("response").feed(raw)
    assert head is not None
    return head


LEGACY = CookieConfig(secure="auto", samesite="None", samesite_legacy=True)


class TestForwardOptions:
    def test_cookie_names_are_computed_once_from_the_cookie_config(self) -> None:
        assert ForwardOptions(LEGACY).cookie_names == (
            "storify_editor_host",
            "storify_editor_host_legacy",
        )
        assert ForwardOptions(CookieConfig()).cookie_names == ("storify_editor_host",)


class TestPrepareRequestTwin:
    def test_a_request_with_only_the_twin_routes_by_it(self) -> None:
        head = _request(
            b"GET / HTTP/1.1\r\nHost: h\r\nCookie: storify_editor_host_legacy=s2\r\n\r\n"
        )
        assert prepare_request(head, "10.0.0.1", ForwardOptions(LEGACY)) == ["s2"]

    def test_the_main_cookies_values_come_before_the_twins(self) -> None:
        head = _request(
            b"GET / HTTP/1.1\r\nHost: h\r\n"
            b"Cookie: storify_editor_host_legacy=s1; storify_editor_host=s2\r\n\r\n"
        )
        assert prepare_request(head, "10.0.0.1", ForwardOptions(LEGACY)) == ["s2", "s1"]

    def test_indirect_strips_both_and_keeps_every_other_byte(self) -> None:
        head = _request(
            b"GET /x HTTP/1.1\r\nHost: h\r\n"
            b"Cookie: a=1;storify_editor_host=s1 ; io=Zx-9\r\n"
            b"Accept: */*\r\n"
            b"Cookie: storify_editor_host_legacy=s1\r\n"
            b"Cookie: b=2;  c=3\r\n\r\n"
        )
        options = ForwardOptions(LEGACY, forwarded_for=False)
        assert prepare_request(head, "10.0.0.1", options) == ["s1", "s1"]
        assert head.serialize() == (
            b"GET /x HTTP/1.1\r\nHost: h\r\n"
            b"Cookie: a=1; io=Zx-9\r\n"
            b"Accept: */*\r\n"
            b"Cookie: b=2;  c=3\r\n\r\n"
        )

    def test_without_indirect_both_reach_the_server(self) -> None:
        raw = (
            b"GET / HTTP/1.1\r\nHost: h\r\n"
            b"Cookie: storify_editor_host=s1; storify_editor_host_legacy=s1\r\n\r\n"
        )
        head = _request(raw)
        config = CookieConfig(secure=True, samesite="None", samesite_legacy=True, indirect=False)
        options = ForwardOptions(config, forwarded_for=False)
        assert prepare_request(head, "10.0.0.1", options) == ["s1", "s1"]
        assert head.serialize() == raw

    def test_without_samesite_legacy_the_twin_is_just_another_cookie(self) -> None:
        head = _request(
            b"GET / HTTP/1.1\r\nHost: h\r\nCookie: storify_editor_host_legacy=s1\r\n\r\n"
        )
        options = ForwardOptions(CookieConfig(), forwarded_for=False)
        assert prepare_request(head, "10.0.0.1", options) == []
        assert head.get(b"cookie") == b"storify_editor_host_legacy=s1"


BACKEND_RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Set-Cookie: storify_editor_host=fromapp; Path=/\r\n"
    b"Set-Cookie: sid=1\r\n"
    b"Set-Cookie: storify_editor_host_legacy=fromapp\r\n"
    b"Content-Length: 0\r\n\r\n"
)


class TestPrepareResponseCookies:
    def test_over_tls_the_cookie_and_its_twin_are_set_and_the_backends_dropped(self) -> None:
        head = _response(BACKEND_RESPONSE)
        prepare_response(head, ForwardOptions(LEGACY), insert_value="s1", close=False, tls=True)
        assert head.serialize() == (
            b"HTTP/1.1 200 OK\r\n"
            b"Set-Cookie: sid=1\r\n"
            b"Content-Length: 0\r\n"
            b"Set-Cookie: storify_editor_host=s1; path=/; Secure; SameSite=None\r\n"
            b"Set-Cookie: storify_editor_host_legacy=s1; path=/; Secure\r\n"
            b"Cache-Control: private\r\n\r\n"
        )

    def test_over_plain_http_under_auto_one_cookie_without_samesite(self) -> None:
        head = _response(BACKEND_RESPONSE)
        prepare_response(head, ForwardOptions(LEGACY), insert_value="s1", close=False, tls=False)
        assert head.get_all(b"set-cookie") == [b"sid=1", b"storify_editor_host=s1; path=/"]

    def test_tls_defaults_to_false(self) -> None:
        head = _response(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        prepare_response(head, ForwardOptions(LEGACY), insert_value="s1", close=False)
        assert head.get_all(b"set-cookie") == [b"storify_editor_host=s1; path=/"]

    def test_the_twins_set_cookie_from_the_backend_is_dropped_without_an_insert(self) -> None:
        head = _response(BACKEND_RESPONSE)
        prepare_response(head, ForwardOptions(LEGACY), insert_value=None, close=False, tls=True)
        assert head.get_all(b"set-cookie") == [b"sid=1"]
        assert head.get(b"cache-control") is None

    def test_a_websocket_handshake_gets_both_cookies_and_no_cache_control(self) -> None:
        head = _response(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        )
        options = ForwardOptions(CookieConfig(secure=True, samesite="None", samesite_legacy=True))
        prepare_response(head, options, insert_value="s2", close=False, tls=False)
        assert head.get_all(b"set-cookie") == [
            b"storify_editor_host=s2; path=/; Secure; SameSite=None",
            b"storify_editor_host_legacy=s2; path=/; Secure",
        ]
        assert head.get(b"cache-control") is None


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
