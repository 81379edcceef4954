"""Tests for stickyproxy.cookies: byte-exact cookie handling (cases 27-35)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stickyproxy.config import CookieConfig
from stickyproxy.cookies import extract, is_own_set_cookie, make_private, set_cookie_value

NAME = "storify_editor_host"


class TestExtract:
    def test_no_cookie_header_leaves_the_request_alone(self) -> None:
        """Case 27."""
        headers = [(b"Host", b"editor"), (b"Accept", b"*/*")]
        assert extract(headers, NAME) == ([], headers)

    def test_our_cookie_between_others_is_cut_out(self) -> None:
        """Case 28."""
        headers = [(b"Host", b"x"), (b"Cookie", b"a=1; storify_editor_host=s2; b=2")]
        assert extract(headers, NAME) == (["s2"], [(b"Host", b"x"), (b"Cookie", b"a=1; b=2")])

    def test_a_header_with_only_our_cookie_disappears(self) -> None:
        """Case 29."""
        headers = [(b"Host", b"x"), (b"cookie", b"storify_editor_host=s2"), (b"Accept", b"*/*")]
        assert extract(headers, NAME) == (["s2"], [(b"Host", b"x"), (b"Accept", b"*/*")])

    def test_our_cookie_in_a_second_cookie_header(self) -> None:
        """Case 30."""
        headers = [(b"Cookie", b"a=1;b=2"), (b"Cookie", b"storify_editor_host=s3")]
        assert extract(headers, NAME) == (["s3"], [(b"Cookie", b"a=1;b=2")])

    def test_spaces_around_equals_and_semicolons_are_tolerated(self) -> None:
        """Case 31."""
        headers = [(b"Cookie", b"storify_editor_host = s2 ; z=9")]
        assert extract(headers, NAME) == (["s2"], [(b"Cookie", b"z=9")])

    @pytest.mark.parametrize("value", [b'"s2"', b"S1", b"", b"bogus"])
    def test_odd_values_are_returned_as_is_and_still_stripped(self, value: bytes) -> None:
        """Case 32: the pool decides they name nothing; the cookie goes anyway."""
        headers = [(b"Cookie", b"keep=me; storify_editor_host=" + value + b"; also=1")]
        assert extract(headers, NAME) == (
            [value.decode()],
            [(b"Cookie", b"keep=me; also=1")],
        )

    def test_another_case_of_the_name_is_not_ours(self) -> None:
        """Case 33."""
        headers = [(b"Cookie", b"STORIFY_EDITOR_HOST=s1; storify_editor_hostx=s2")]
        assert extract(headers, NAME) == ([], headers)

    def test_every_occurrence_is_returned_in_order_and_stripped(self) -> None:
        """Case 34."""
        headers = [(b"Cookie", b"storify_editor_host=bogus; storify_editor_host=s1")]
        assert extract(headers, NAME) == (["bogus", "s1"], [])

    def test_rfc2109_attributes_go_with_our_cookie(self) -> None:
        headers = [
            (
                b"Cookie",
                b'$Version="1"; storify_editor_host=s1; $Path="/"; $Domain=x; a=1; $Path=/a',
            )
        ]
        assert extract(headers, NAME) == (["s1"], [(b"Cookie", b'$Version="1"; a=1; $Path=/a')])

    def test_a_name_without_equals_is_not_our_cookie(self) -> None:
        headers = [(b"Cookie", b"storify_editor_host; a=1")]
        assert extract(headers, NAME) == ([], headers)

    def test_other_headers_keep_their_position(self) -> None:
        headers = [
            (b"A", b"1"),
            (b"Cookie", b"storify_editor_host=s1"),
            (b"B", b"2"),
            (b"Cookie", b"x=y; storify_editor_host=s2"),
            (b"C", b"3"),
        ]
        assert extract(headers, NAME) == (
            ["s1", "s2"],
            [(b"A", b"1"), (b"B", b"2"), (b"Cookie", b"x=y"), (b"C", b"3")],
        )


# Cookie names and values that are never ours, per RFC 6265 §4.1.1 (token,
# cookie-octet), including names that merely contain or prefix ours.
other_names = st.one_of(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC_-0123456789", min_size=1, max_size=12),
    st.sampled_from([NAME.upper(), NAME + "x", "x" + NAME, NAME[:-1]]),
).filter(lambda n: n != NAME and not n.startswith("$"))
values = st.text(
    alphabet="".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in ' ",;\\'), max_size=12
)
separators = st.sampled_from(["; ", ";", " ; ", ";  ", "\t;\t"])


@st.composite
def cookie_headers(draw: st.DrawFn) -> tuple[list[tuple[str, str]], list[str], str]:
    """A Cookie header value mixing other cookies with ours at random places."""
    others = draw(st.lists(st.tuples(other_names, values), max_size=6))
    ours = draw(st.lists(values, max_size=3))
    items: list[tuple[str, str]] = list(others)
    for value in ours:
        items.insert(draw(st.integers(0, len(items))), (NAME, value))
    ours = [value for name, value in items if name == NAME]
    text = ""
    for index, (name, value) in enumerate(items):
        if index:
            text += draw(separators)
        text += f"{name}={value}"
    return others, ours, text


class TestExtractProperties:
    @given(cookie_headers())
    def test_ours_always_gone_others_preserved_exactly(
        self, case: tuple[list[tuple[str, str]], list[str], str]
    ) -> None:
        others, ours, text = case
        headers = [(b"Host", b"h"), (b"Cookie", text.encode())]
        found, result = extract(headers, NAME)
        assert found == ours
        assert result[0] == (b"Host", b"h")
        if not ours:
            assert result == headers
        elif not others:
            assert result == [(b"Host", b"h")]
        else:
            assert result[1:] == [(b"Cookie", "; ".join(f"{n}={v}" for n, v in others).encode())]

    @given(cookie_headers())
    def test_extracting_twice_finds_nothing_more(
        self, case: tuple[list[tuple[str, str]], list[str], str]
    ) -> None:
        _, result = extract([(b"Cookie", case[2].encode())], NAME)
        assert extract(result, NAME) == ([], result)


class TestSetCookie:
    def test_default_is_the_haproxy_insert_line(self) -> None:
        """Case 27: ``storify_editor_host=<srv>; path=/``."""
        assert set_cookie_value(CookieConfig(), "s2") == b"storify_editor_host=s2; path=/"

    def test_attributes_come_in_haproxy_order(self) -> None:
        config = CookieConfig(
            name="SRV",
            domain=".example.com",
            max_age=3600.0,
            httponly=True,
            secure=True,
            samesite="Lax",
        )
        assert set_cookie_value(config, "s1") == (
            b"SRV=s1; path=/; domain=.example.com; Max-Age=3600; HttpOnly; Secure; SameSite=Lax"
        )

    @pytest.mark.parametrize(
        ("value", "ours"),
        [
            (b"storify_editor_host=fromapp", True),
            (b"storify_editor_host = fromapp; Path=/", True),
            (b"storify_editor_host=", True),
            (b"other=1; storify_editor_host=x", False),
            (b"STORIFY_EDITOR_HOST=x", False),
            (b"storify_editor_host", False),
        ],
    )
    def test_recognises_the_backends_own_set_cookie(self, value: bytes, ours: bool) -> None:
        """Case 35."""
        assert is_own_set_cookie(value, NAME) is ours


class TestMakePrivate:
    def test_adds_private_when_there_is_no_cache_control(self) -> None:
        headers = [(b"Content-Type", b"text/html")]
        assert make_private(headers) == [*headers, (b"Cache-Control", b"private")]

    @pytest.mark.parametrize("value", [b"private", b"no-store", b"No-Store, max-age=60"])
    def test_leaves_private_or_no_store_responses_alone(self, value: bytes) -> None:
        headers = [(b"Cache-Control", value), (b"X", b"y")]
        assert make_private(headers) == headers

    def test_replaces_public_and_keeps_other_directives(self) -> None:
        headers = [(b"cache-control", b"public, max-age=60"), (b"X", b"y")]
        assert make_private(headers) == [(b"cache-control", b"max-age=60, private"), (b"X", b"y")]

    def test_adds_private_to_an_existing_header_byte_exactly(self) -> None:
        headers = [(b"Cache-Control", b"max-age=0,must-revalidate")]
        assert make_private(headers) == [(b"Cache-Control", b"max-age=0,must-revalidate, private")]

    def test_no_cache_alone_still_gets_private(self) -> None:
        """``no-cache`` allows storing; only ``private`` keeps shared caches out."""
        assert make_private([(b"Cache-Control", b"no-cache")]) == [
            (b"Cache-Control", b"no-cache, private")
        ]

    def test_public_only_header_becomes_private(self) -> None:
        assert make_private([(b"Cache-Control", b"public")]) == [(b"Cache-Control", b"private")]

    def test_public_in_a_second_header_is_removed_too(self) -> None:
        headers = [(b"Cache-Control", b"max-age=5"), (b"Cache-Control", b"public")]
        assert make_private(headers) == [(b"Cache-Control", b"max-age=5, private")]

    def test_qualified_private_is_not_enough(self) -> None:
        headers = [(b"Cache-Control", b'private="Set-Cookie, X", max-age=5')]
        assert make_private(headers) == [
            (b"Cache-Control", b'private="Set-Cookie, X", max-age=5, private')
        ]

    def test_commas_inside_quoted_strings_do_not_split_directives(self) -> None:
        headers = [(b"Cache-Control", b'no-cache="a, public", public')]
        assert make_private(headers) == [(b"Cache-Control", b'no-cache="a, public", private')]
