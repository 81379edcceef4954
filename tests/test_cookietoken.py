"""Tests for stickyproxy.cookietoken: signed, opaque, dated cookie values."""

from __future__ import annotations

import base64
import hashlib
import hmac
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stickyproxy.cookietoken import (
    DEFAULT_CLOCK_SKEW,
    MIN_KEY_BYTES,
    TOKEN_LENGTH,
    CookieSigner,
    Rejection,
    Verified,
    parse_keys,
)

KEY = b"k" * 16 + b"0123456789abcdef"
OLD_KEY = b"o" * 16 + b"fedcba9876543210"
OTHER_KEY = b"x" * 16 + b"ABCDEFGHIJKLMNOP"
SERVERS = ["s1", "s2", "s3"]
T0 = 1_700_000_000.0
URLSAFE = frozenset(string.ascii_letters + string.digits + "-_")
# RFC 6265 §4.1.1: %x21 / %x23-2B / %x2D-3A / %x3C-5B / %x5D-7E.
COOKIE_OCTETS = frozenset(chr(c) for c in range(0x21, 0x7F)) - set('",;\\')


def signer(
    keys: list[bytes] | None = None,
    *,
    servers: list[str] = SERVERS,
    maxidle: float | None = None,
    maxlife: float | None = None,
    clock_skew: float = DEFAULT_CLOCK_SKEW,
) -> CookieSigner:
    return CookieSigner(
        [KEY] if keys is None else keys,
        servers=servers,
        maxidle=maxidle,
        maxlife=maxlife,
        clock_skew=clock_skew,
    )


def raw(token: str) -> bytes:
    return base64.urlsafe_b64decode(token)


def encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii")


class TestRoundTrip:
    def test_a_token_names_its_server_and_dates(self) -> None:
        s = signer()
        token = s.issue("s2", T0)
        assert s.verify(token, T0 + 5) == Verified("s2", T0, T0, refresh=False, key_index=0)

    def test_dates_are_whole_seconds(self) -> None:
        s = signer()
        verified = s.verify(s.issue("s1", T0 + 0.999), T0 + 1)
        assert verified is not None
        assert verified.last_seen == T0

    def test_a_refresh_keeps_the_first_seen_date(self) -> None:
        s = signer()
        token = s.issue("s1", T0 + 100, first_seen=T0)
        assert s.verify(token, T0 + 100) == Verified("s1", T0, T0 + 100, False, 0)

    def test_a_first_seen_date_ahead_of_now_is_brought_back(self) -> None:
        s = signer()
        verified = s.verify(s.issue("s1", T0, first_seen=T0 + 60), T0)
        assert verified is not None
        assert verified.first_seen == verified.last_seen == T0

    def test_every_token_has_the_documented_length(self) -> None:
        assert len(signer().issue("a-much-longer-server-cookie-value" * 4, T0)) == TOKEN_LENGTH

    def test_a_token_starts_with_the_version_byte(self) -> None:
        assert raw(signer().issue("s1", T0))[0] == 1

    def test_the_same_inputs_give_the_same_token(self) -> None:
        assert signer().issue("s1", T0) == signer().issue("s1", T0)

    def test_another_time_gives_another_token(self) -> None:
        assert signer().issue("s1", T0) != signer().issue("s1", T0 + 1)

    def test_a_server_unknown_to_the_signer_can_be_issued_but_never_verifies(self) -> None:
        """A response from a server just removed by a reload still gets a token."""
        s = signer()
        assert s.inspect(s.issue("gone", T0), T0) is Rejection.SERVER

    def test_a_server_removed_from_the_configuration_no_longer_verifies(self) -> None:
        token = signer().issue("s3", T0)
        assert signer(servers=["s1", "s2"]).inspect(token, T0) is Rejection.SERVER

    def test_a_server_added_later_verifies_tokens_of_the_others_unchanged(self) -> None:
        token = signer().issue("s3", T0)
        verified = signer(servers=[*SERVERS, "s4"]).verify(token, T0)
        assert verified is not None
        assert verified.server_cookie == "s3"

    def test_the_time_is_a_unix_time_in_range(self) -> None:
        s = signer()
        for bad in (-1.0, 2.0**32, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="Unix time"):
                s.issue("s1", bad)
        with pytest.raises(ValueError, match="Unix time"):
            s.issue("s1", T0, first_seen=-5.0)

    def test_a_server_without_a_cookie_value_cannot_be_pinned(self) -> None:
        with pytest.raises(ValueError, match="cookie value"):
            signer().issue("", T0)


class TestOpacity:
    def test_the_server_cookie_is_not_readable_in_the_token(self) -> None:
        token = signer(servers=["storifyeditor1.prod"]).issue("storifyeditor1.prod", T0)
        assert b"storifyeditor1" not in raw(token)
        assert "storifyeditor1" not in token

    def test_the_server_id_depends_on_the_key(self) -> None:
        """Without the key, the id cannot be computed from a guessed server name."""
        first = raw(signer([KEY]).issue("s1", T0))[1:9]
        second = raw(signer([OTHER_KEY]).issue("s1", T0))[1:9]
        assert first != second
        assert first != hashlib.sha256(b"s1").digest()[:8]

    @given(
        st.lists(
            st.text(alphabet=string.ascii_letters + string.digits + "-_.", min_size=1),
            min_size=2,
            max_size=5,
            unique=True,
        ),
        st.integers(0, 2**32 - 1),
    )
    def test_two_servers_never_share_a_token(self, cookies: list[str], now: int) -> None:
        s = signer(servers=cookies)
        tokens = {s.issue(cookie, now) for cookie in cookies}
        assert len(tokens) == len(cookies)
        for cookie in cookies:
            verified = s.verify(s.issue(cookie, now), now)
            assert verified is not None
            assert verified.server_cookie == cookie

    @given(st.text(min_size=1, max_size=200), st.integers(0, 2**32 - 1))
    def test_tokens_are_cookie_octets_of_base64url(self, cookie: str, now: int) -> None:
        token = signer(servers=[cookie]).issue(cookie, now)
        assert len(token) == TOKEN_LENGTH
        assert set(token) <= URLSAFE <= COOKIE_OCTETS
        assert "=" not in token


class TestTampering:
    def test_changing_any_character_to_any_other_is_refused(self) -> None:
        s = signer()
        token = s.issue("s1", T0)
        for position, original in enumerate(token):
            for replacement in sorted(URLSAFE - {original}):
                forged = token[:position] + replacement + token[position + 1 :]
                assert s.verify(forged, T0) is None, (position, replacement)

    def test_flipping_any_bit_of_the_decoded_token_is_refused(self) -> None:
        s = signer()
        data = raw(s.issue("s1", T0))
        for bit in range(len(data) * 8):
            forged = bytearray(data)
            forged[bit // 8] ^= 1 << (bit % 8)
            assert s.verify(encode(bytes(forged)), T0) is None, bit

    def test_every_truncation_is_refused(self) -> None:
        s = signer()
        token = s.issue("s1", T0)
        for length in range(len(token)):
            assert s.inspect(token[:length], T0) is Rejection.MALFORMED

    def test_every_one_character_extension_is_refused(self) -> None:
        s = signer()
        token = s.issue("s1", T0)
        for extra in sorted(COOKIE_OCTETS):
            assert s.verify(token + extra, T0) is None
            assert s.verify(extra + token, T0) is None

    def test_surrounding_whitespace_and_quotes_are_refused(self) -> None:
        s = signer()
        token = s.issue("s1", T0)
        for variant in (f" {token}", f"{token}\n", f'"{token}"', token[:-1] + "="):
            assert s.verify(variant, T0) is None

    def test_standard_base64_spelling_is_not_a_second_spelling(self) -> None:
        """b64decode would read "+" and "/" as "-" and "_"; the token has one spelling."""
        s = signer()
        token = next(
            t for t in (s.issue("s1", T0 + i) for i in range(1000)) if "-" in t or "_" in t
        )
        other = token.replace("-", "+").replace("_", "/")
        assert s.inspect(other, T0) is Rejection.MALFORMED

    def test_a_plain_server_cookie_is_not_a_token(self) -> None:
        assert signer().inspect("s1", T0) is Rejection.MALFORMED

    def test_another_key_is_refused(self) -> None:
        token = signer([OTHER_KEY]).issue("s1", T0)
        assert signer([KEY]).inspect(token, T0) is Rejection.SIGNATURE

    def test_an_unknown_version_is_refused_even_when_correctly_signed(self) -> None:
        data = bytearray(raw(signer().issue("s1", T0)))
        data[0] = 2
        tag_key = hmac.new(KEY, b"stickyproxy cookie tag v1", hashlib.sha256).digest()
        body = bytes(data[:17])
        tag = hmac.new(tag_key, body, hashlib.sha256).digest()[:16]
        assert signer().inspect(encode(body + tag), T0) is Rejection.VERSION

    def test_a_correctly_signed_token_with_the_dates_swapped_is_refused(self) -> None:
        """issue() never writes first_seen after last_seen; such a token is not ours."""
        data = raw(signer().issue("s1", T0 + 10, first_seen=T0))
        body = data[:9] + data[13:17] + data[9:13]
        tag_key = hmac.new(KEY, b"stickyproxy cookie tag v1", hashlib.sha256).digest()
        tag = hmac.new(tag_key, body, hashlib.sha256).digest()[:16]
        assert signer().inspect(encode(body + tag), T0 + 10) is Rejection.MALFORMED

    @given(st.text(max_size=300))
    def test_arbitrary_text_never_raises_and_never_verifies(self, value: str) -> None:
        s = signer(maxidle=60, maxlife=3600)
        assert isinstance(s.inspect(value, T0), Rejection)
        assert s.verify(value, T0) is None

    @given(st.text(alphabet=sorted(URLSAFE), min_size=TOKEN_LENGTH, max_size=TOKEN_LENGTH))
    def test_random_token_shaped_values_never_verify(self, value: str) -> None:
        assert signer().inspect(value, T0) in (Rejection.SIGNATURE, Rejection.VERSION)

    @given(st.binary(min_size=33, max_size=33))
    def test_random_bytes_never_verify(self, data: bytes) -> None:
        assert signer().verify(encode(data), T0) is None

    def test_a_huge_value_is_refused_by_its_length(self) -> None:
        s = signer()
        assert s.inspect("A" * 10_000_000, T0) is Rejection.MALFORMED
        assert s.inspect(s.issue("s1", T0) * 1000, T0) is Rejection.MALFORMED


class TestRotation:
    def test_the_first_key_signs(self) -> None:
        rotated = signer([KEY, OLD_KEY])
        token = rotated.issue("s1", T0)
        assert signer([KEY]).verify(token, T0) is not None
        assert signer([OLD_KEY]).verify(token, T0) is None

    def test_a_token_of_an_older_key_still_verifies_and_asks_for_a_refresh(self) -> None:
        token = signer([OLD_KEY]).issue("s2", T0)
        verified = signer([KEY, OLD_KEY]).verify(token, T0)
        assert verified == Verified("s2", T0, T0, refresh=True, key_index=1)

    def test_the_refreshed_token_verifies_with_the_new_key_alone(self) -> None:
        rotated = signer([KEY, OLD_KEY])
        old = rotated.verify(signer([OLD_KEY]).issue("s2", T0), T0 + 10)
        assert old is not None
        fresh = rotated.issue(old.server_cookie, T0 + 10, first_seen=old.first_seen)
        assert signer([KEY]).verify(fresh, T0 + 10) == Verified("s2", T0, T0 + 10, False, 0)

    def test_a_dropped_key_no_longer_verifies(self) -> None:
        token = signer([OLD_KEY]).issue("s1", T0)
        assert signer([KEY]).inspect(token, T0) is Rejection.SIGNATURE


class TestExpiry:
    def test_maxidle_is_inclusive_to_the_second(self) -> None:
        s = signer(maxidle=60)
        token = s.issue("s1", T0)
        assert s.verify(token, T0 + 60) is not None
        assert s.inspect(token, T0 + 60.001) is Rejection.IDLE
        assert s.inspect(token, T0 + 61) is Rejection.IDLE

    def test_maxlife_counts_from_the_first_pin_across_refreshes(self) -> None:
        s = signer(maxidle=60, maxlife=100)
        token = s.issue("s1", T0 + 90, first_seen=T0)
        assert s.verify(token, T0 + 100) is not None
        assert s.inspect(token, T0 + 100.5) is Rejection.LIFE

    def test_maxlife_alone_ignores_idleness(self) -> None:
        s = signer(maxlife=3600)
        token = s.issue("s1", T0)
        verified = s.verify(token, T0 + 3600)
        assert verified is not None
        assert not verified.refresh
        assert s.inspect(token, T0 + 3601) is Rejection.LIFE

    def test_without_limits_a_token_never_expires(self) -> None:
        s = signer()
        assert s.verify(s.issue("s1", 0), 2**32 - 1) is not None

    def test_a_date_within_the_clock_skew_is_accepted(self) -> None:
        s = signer(maxidle=60, maxlife=600)
        token = s.issue("s1", T0 + 300)
        verified = s.verify(token, T0)
        assert verified is not None
        assert not verified.refresh

    def test_a_date_beyond_the_clock_skew_is_refused(self) -> None:
        s = signer()
        token = s.issue("s1", T0 + 300)
        assert s.inspect(token, T0 - 0.5) is Rejection.FUTURE
        assert s.inspect(token, T0 - 86400) is Rejection.FUTURE

    def test_the_clock_skew_is_configurable(self) -> None:
        token = signer().issue("s1", T0 + 10)
        assert signer(clock_skew=10).verify(token, T0) is not None
        assert signer(clock_skew=0).inspect(token, T0 + 9) is Rejection.FUTURE
        assert signer(clock_skew=0).verify(token, T0 + 10) is not None

    def test_the_default_clock_skew_is_five_minutes(self) -> None:
        assert DEFAULT_CLOCK_SKEW == 300


class TestRefresh:
    def test_a_token_idle_for_half_of_maxidle_is_not_refreshed(self) -> None:
        s = signer(maxidle=60)
        verified = s.verify(s.issue("s1", T0), T0 + 30)
        assert verified is not None
        assert not verified.refresh

    def test_a_token_idle_for_more_than_half_of_maxidle_is_refreshed(self) -> None:
        s = signer(maxidle=60)
        verified = s.verify(s.issue("s1", T0), T0 + 30.5)
        assert verified is not None
        assert verified.refresh

    def test_without_maxidle_only_a_key_change_refreshes(self) -> None:
        s = signer(maxlife=10_000)
        verified = s.verify(s.issue("s1", T0), T0 + 9000)
        assert verified is not None
        assert not verified.refresh

    def test_a_client_that_comes_back_within_half_of_maxidle_stays_pinned_forever(self) -> None:
        s = signer(maxidle=60)
        token = s.issue("s1", T0)
        first_seen = T0
        for step in range(1, 200):
            now = T0 + step * 29
            verified = s.verify(token, now)
            assert verified is not None
            assert verified.first_seen == first_seen
            if verified.refresh:
                token = s.issue(verified.server_cookie, now, first_seen=verified.first_seen)


class TestVerifyAll:
    def test_valid_tokens_are_kept_in_order(self) -> None:
        s = signer()
        values = ["s1", s.issue("s3", T0), "garbage", s.issue("s1", T0)]
        assert [v.server_cookie for v in s.verify_all(values, T0)] == ["s3", "s1"]

    def test_only_the_first_values_are_looked_at(self) -> None:
        s = signer()
        values = ["bogus"] * 8 + [s.issue("s1", T0)]
        assert s.verify_all(values, T0) == []
        assert len(s.verify_all(values, T0, limit=9)) == 1


class TestConstruction:
    def test_at_least_one_key_is_needed(self) -> None:
        with pytest.raises(ValueError, match="at least one key"):
            signer([])

    def test_a_short_key_is_refused(self) -> None:
        with pytest.raises(ValueError, match=r"key 2 has 31 bytes"):
            signer([KEY, b"k" * (MIN_KEY_BYTES - 1)])

    @pytest.mark.parametrize("name", ["maxidle", "maxlife"])
    @pytest.mark.parametrize("value", [0.0, 0.5, -1.0, float("nan"), float("inf")])
    def test_limits_are_at_least_one_second(self, name: str, value: float) -> None:
        with pytest.raises(ValueError, match=name):
            signer(**{name: value})  # type: ignore[arg-type]

    def test_a_negative_clock_skew_is_refused(self) -> None:
        with pytest.raises(ValueError, match="clock_skew"):
            signer(clock_skew=-1)


GOOD = "Zq3xv0WJ6n8Hk1mR2bT9cY4dE7fL5gPs"  # 32 characters, many distinct


class TestParseKeys:
    def test_empty_text_means_no_signing(self) -> None:
        assert parse_keys("") == []
        assert parse_keys("  \n ") == []

    def test_one_key_is_used_as_its_bytes(self) -> None:
        assert parse_keys(GOOD) == [GOOD.encode("ascii")]

    def test_keys_are_separated_by_commas_or_lines_and_keep_their_order(self) -> None:
        second = GOOD[::-1]
        third = GOOD[1:] + GOOD[0]
        assert parse_keys(f" {GOOD} ,{second}\n  {third}") == [
            k.encode("ascii") for k in (GOOD, second, third)
        ]

    def test_generated_keys_are_accepted(self) -> None:
        import secrets

        for _ in range(50):
            urlsafe, hexkey = secrets.token_urlsafe(32), secrets.token_hex(32)
            assert parse_keys(f"{urlsafe}, {hexkey}") == [urlsafe.encode(), hexkey.encode()]

    def test_base64_with_padding_is_accepted(self) -> None:
        key = base64.b64encode(bytes(range(200, 232))).decode("ascii")
        assert "=" in key
        assert "+" in key or "/" in key
        assert parse_keys(key) == [key.encode("ascii")]

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            (GOOD[:31], "key 1 of 1 has 31 characters; at least 32 are needed"),
            (f"{GOOD},", "key 2 of 2 is empty"),
            (f"{GOOD},,{GOOD[::-1]}", "key 2 of 3 is empty"),
            (f"{GOOD}, {GOOD}", "key 2 of 2 is the same as key 1"),
            (GOOD[:20] + " " + GOOD[20:], "key 1 of 1 may only use"),
            (GOOD + "é", "key 1 of 1 may only use"),
            ("ab" * 20, "key 1 of 1 uses only 2 different characters"),
            ("changeme" * 5, "uses only 7 different characters"),
        ],
    )
    def test_bad_keys_are_reported_by_position(self, text: str, message: str) -> None:
        with pytest.raises(ValueError, match="python -c") as info:
            parse_keys(text)
        assert message in str(info.value)

    def test_every_problem_is_reported_at_once(self) -> None:
        with pytest.raises(ValueError) as info:
            parse_keys(f"short, {GOOD}, ,{GOOD}")
        text = str(info.value)
        assert "key 1 of 4 has 5 characters" in text
        assert "key 3 of 4 is empty" in text
        assert "key 4 of 4 is the same as key 2" in text

    def test_a_message_never_shows_the_key(self) -> None:
        for text in (GOOD[:31], f"{GOOD}, {GOOD}", GOOD + "!", "ab" * 20):
            with pytest.raises(ValueError) as info:
                parse_keys(text)
            assert text.split(",")[0].strip()[:8] not in str(info.value)

    @given(st.text(max_size=200))
    def test_any_text_gives_keys_or_a_value_error(self, text: str) -> None:
        try:
            keys = parse_keys(text)
        except ValueError:
            return
        assert all(len(k) >= MIN_KEY_BYTES for k in keys)

    def test_parsed_keys_make_a_signer(self) -> None:
        s = CookieSigner(parse_keys(GOOD), servers=SERVERS, maxidle=None, maxlife=None)
        assert s.verify(s.issue("s1", T0), T0) is not None


# The sans-IO boundary of this module is checked in tests/test_core_imports.py.
