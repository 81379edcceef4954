"""The proxy's own error pages."""

from __future__ import annotations

import h11
import pytest

from stickyproxy.rewrite import error_response

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
