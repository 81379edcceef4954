"""Tests for stickyproxy.cookies: byte-exact cookie handling (cases 27-35)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stickyproxy.config import CookieConfig
from stickyproxy.cookies import (
    cookie_names,
    extract,
    is_own_set_cookie,
    make_private,
    set_cookie_value,
    set_cookie_values,
)

NAME = "storify_editor_host"
TWIN = NAME + "_legacy"
BOTH = (NAME, TWIN)


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


class TestSecureAuto:
    """``secure = auto``: Secure follows the client connection's TLS."""

    def test_auto_adds_secure_over_tls(self) -> None:
        config = CookieConfig(secure="auto")
        assert set_cookie_value(config, "s1", tls=True) == (
            b"storify_editor_host=s1; path=/; Secure"
        )

    def test_auto_is_not_secure_over_plain_http(self) -> None:
        """``"auto"`` is a true value in Python; it must not mean always."""
        config = CookieConfig(secure="auto")
        assert set_cookie_value(config, "s1", tls=False) == b"storify_editor_host=s1; path=/"
        assert set_cookie_value(config, "s1") == b"storify_editor_host=s1; path=/"

    @pytest.mark.parametrize("tls", [False, True])
    def test_secure_true_and_false_ignore_the_connection(self, tls: bool) -> None:
        assert set_cookie_value(CookieConfig(secure=True), "s1", tls=tls).endswith(b"; Secure")
        assert b"Secure" not in set_cookie_value(CookieConfig(secure=False), "s1", tls=tls)

    def test_auto_over_tls_sends_samesite_none_after_secure(self) -> None:
        config = CookieConfig(secure="auto", samesite="None", httponly=True)
        assert set_cookie_value(config, "s1", tls=True) == (
            b"storify_editor_host=s1; path=/; HttpOnly; Secure; SameSite=None"
        )

    def test_auto_over_plain_http_leaves_samesite_none_out_entirely(self) -> None:
        """Browsers drop a SameSite=None cookie without Secure; without SameSite it stays."""
        config = CookieConfig(secure="auto", samesite="None", httponly=True)
        assert set_cookie_value(config, "s1", tls=False) == (
            b"storify_editor_host=s1; path=/; HttpOnly"
        )

    @pytest.mark.parametrize("samesite", ["Lax", "Strict"])
    def test_lax_and_strict_go_out_over_plain_http_too(self, samesite: str) -> None:
        config = CookieConfig(secure="auto", samesite=samesite)  # type: ignore[arg-type]
        assert set_cookie_value(config, "s1", tls=False) == (
            f"storify_editor_host=s1; path=/; SameSite={samesite}".encode()
        )
        assert set_cookie_value(config, "s1", tls=True) == (
            f"storify_editor_host=s1; path=/; Secure; SameSite={samesite}".encode()
        )

    def test_samesite_none_is_never_sent_without_secure(self) -> None:
        """Configuration validation refuses this; the core stays safe anyway."""
        config = CookieConfig(secure=False, samesite="None")
        assert set_cookie_value(config, "s1", tls=True) == b"storify_editor_host=s1; path=/"


LEGACY = CookieConfig(secure="auto", samesite="None", samesite_legacy=True)


class TestTwinCookie:
    """``samesite_legacy``: a twin without SameSite for clients that drop ``None``."""

    def test_names_are_the_main_one_then_the_twin(self) -> None:
        assert cookie_names(LEGACY) == BOTH
        assert cookie_names(CookieConfig(samesite_legacy=True, legacy_suffix="-old")) == (
            NAME,
            NAME + "-old",
        )

    def test_without_samesite_legacy_there_is_one_name(self) -> None:
        assert cookie_names(CookieConfig(secure=True, samesite="None")) == (NAME,)

    def test_over_tls_the_twin_follows_the_main_cookie(self) -> None:
        assert set_cookie_values(LEGACY, "s2", tls=True) == [
            b"storify_editor_host=s2; path=/; Secure; SameSite=None",
            b"storify_editor_host_legacy=s2; path=/; Secure",
        ]

    def test_the_twin_copies_every_attribute_but_samesite(self) -> None:
        config = CookieConfig(
            name="SRV",
            secure=True,
            samesite="None",
            samesite_legacy=True,
            legacy_suffix="_old",
            domain=".example.com",
            max_age=60.0,
            httponly=True,
        )
        assert set_cookie_values(config, "s1") == [
            b"SRV=s1; path=/; domain=.example.com; Max-Age=60; HttpOnly; Secure; SameSite=None",
            b"SRV_old=s1; path=/; domain=.example.com; Max-Age=60; HttpOnly; Secure",
        ]

    def test_over_plain_http_under_auto_one_cookie_without_samesite_is_enough(self) -> None:
        assert set_cookie_values(LEGACY, "s2", tls=False) == [b"storify_editor_host=s2; path=/"]

    def test_without_samesite_legacy_there_is_no_twin(self) -> None:
        config = CookieConfig(secure=True, samesite="None")
        assert set_cookie_values(config, "s2") == [
            b"storify_editor_host=s2; path=/; Secure; SameSite=None"
        ]

    @pytest.mark.parametrize("tls", [False, True])
    def test_set_cookie_value_is_the_main_cookie(self, tls: bool) -> None:
        assert (
            set_cookie_value(LEGACY, "s3", tls=tls) == set_cookie_values(LEGACY, "s3", tls=tls)[0]
        )

    def test_a_request_with_only_the_twin_yields_its_value(self) -> None:
        headers = [(b"Cookie", b"a=1; storify_editor_host_legacy=s2; b=2")]
        assert extract(headers, BOTH) == (["s2"], [(b"Cookie", b"a=1; b=2")])

    def test_main_values_come_first_whatever_the_order_in_the_header(self) -> None:
        headers = [
            (b"Cookie", b"storify_editor_host_legacy=s1; storify_editor_host=s2"),
            (b"Cookie", b"storify_editor_host=s3;storify_editor_host_legacy=s4"),
        ]
        assert extract(headers, BOTH) == (["s2", "s3", "s1", "s4"], [])

    def test_both_are_stripped_byte_exactly_and_others_kept(self) -> None:
        headers = [
            (b"Host", b"h"),
            (b"Cookie", b'a=1;storify_editor_host = s1 ;b="x y"\t;\tstorify_editor_host_legacy=s1'),
            (b"Accept", b"*/*"),
            (b"Cookie", b"io=abc;  c=3"),
        ]
        assert extract(headers, BOTH) == (
            ["s1", "s1"],
            [
                (b"Host", b"h"),
                (b"Cookie", b'a=1; b="x y"'),
                (b"Accept", b"*/*"),
                (b"Cookie", b"io=abc;  c=3"),
            ],
        )

    def test_rfc2109_attributes_go_with_the_twin(self) -> None:
        headers = [(b"Cookie", b'storify_editor_host_legacy=s1; $Path="/"; a=1')]
        assert extract(headers, BOTH) == (["s1"], [(b"Cookie", b"a=1")])

    @pytest.mark.parametrize(
        "other", [b"storify_editor_host_legacyx", b"storify_editor_host_legac", b"x_legacy"]
    )
    def test_names_that_resemble_the_twin_are_not_ours(self, other: bytes) -> None:
        headers = [(b"Cookie", other + b"=s1; storify_editor_host_legacy=s2")]
        assert extract(headers, BOTH) == (["s2"], [(b"Cookie", other + b"=s1")])

    def test_one_name_reads_no_twin(self) -> None:
        headers = [(b"Cookie", b"storify_editor_host_legacy=s2")]
        assert extract(headers, NAME) == ([], headers)

    @pytest.mark.parametrize(
        ("value", "ours"),
        [
            (b"storify_editor_host_legacy=fromapp; Path=/", True),
            (b"storify_editor_host=fromapp", True),
            (b"storify_editor_host_legacyx=1", False),
            (b"storify_editor_host_legacy", False),
        ],
    )
    def test_recognises_the_backends_set_cookie_for_either_name(
        self, value: bytes, ours: bool
    ) -> None:
        assert is_own_set_cookie(value, BOTH) is ours

    def test_one_name_does_not_claim_the_twins_set_cookie(self) -> None:
        assert not is_own_set_cookie(b"storify_editor_host_legacy=1", NAME)


twin_other_names = other_names.filter(lambda n: n != TWIN)
ours_names = st.sampled_from(BOTH)
header_names = st.sampled_from([b"Host", b"Accept", b"X-Cookie", b"Cookie2"])


@st.composite
def twin_requests(
    draw: st.DrawFn,
) -> tuple[list[tuple[bytes, bytes]], list[tuple[str, str]], list[list[tuple[str, str]]]]:
    """Request headers whose Cookie headers mix both our names with other cookies.

    :returns: the headers, every cookie pair in order of appearance, and
        each Cookie header's pairs (for the expected result).
    """
    pairs = draw(
        st.lists(
            st.one_of(st.tuples(twin_other_names, values), st.tuples(ours_names, values)),
            max_size=10,
        )
    )
    cuts = sorted(draw(st.lists(st.integers(0, len(pairs)), max_size=2)))
    groups = [pairs[a:b] for a, b in zip([0, *cuts], [*cuts, len(pairs)], strict=True)]
    headers: list[tuple[bytes, bytes]] = []
    for group in groups:
        if draw(st.booleans()):
            headers.append((draw(header_names), b"v"))
        text = ""
        for index, (name, value) in enumerate(group):
            if index:
                text += draw(separators)
            text += f"{name}={value}"
        headers.append((draw(st.sampled_from([b"Cookie", b"cookie"])), text.encode()))
    return headers, pairs, groups


class TestExtractTwinProperties:
    @given(twin_requests())
    def test_both_names_always_gone_every_other_pair_kept_in_order(
        self,
        case: tuple[list[tuple[bytes, bytes]], list[tuple[str, str]], list[list[tuple[str, str]]]],
    ) -> None:
        headers, pairs, groups = case
        found, result = extract(headers, BOTH)
        assert found == [v for n, v in pairs if n == NAME] + [v for n, v in pairs if n == TWIN]
        expected: list[tuple[bytes, bytes]] = []
        groups_left = iter(groups)
        for header_name, header_value in headers:
            if header_name.lower() != b"cookie":
                expected.append((header_name, header_value))
                continue
            group = next(groups_left)
            others = [(n, v) for n, v in group if n not in BOTH]
            if len(others) == len(group):
                expected.append((header_name, header_value))
            elif others:
                joined = "; ".join(f"{n}={v}" for n, v in others)
                expected.append((header_name, joined.encode()))
        assert result == expected
        assert extract(result, BOTH) == ([], result)


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
