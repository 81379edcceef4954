"""Tests for stickyproxy.hashring: keys, the default slot ring, the HAProxy ring."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import subprocess
import sys
from collections import Counter
from functools import cache
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stickyproxy import hashring
from stickyproxy.hashring import (
    SLOTS,
    HAProxyRing,
    HashRing,
    address_key,
    full_hash,
    text_key,
)

ROOT = Path(__file__).resolve().parent.parent


def everyone(name: str) -> bool:
    return True


@cache
def ring(*servers: tuple[str, int]) -> HashRing:
    """Build (once) a default ring over ``(name, weight)`` pairs, in the given order."""
    return HashRing(dict(servers))


def equal(count: int, weight: int = 10) -> tuple[tuple[str, int], ...]:
    return tuple((f"srv{i}", weight) for i in range(count))


def ipv4_keys(count: int, seed: int = 1) -> list[bytes]:
    rnd = random.Random(seed)
    return [rnd.getrandbits(32).to_bytes(4, "big") for _ in range(count)]


class TestAddressKey:
    def test_ipv4_is_the_packed_address(self) -> None:
        assert address_key("203.0.113.7") == bytes([203, 0, 113, 7])

    def test_ipv6_is_the_packed_address(self) -> None:
        assert address_key("2001:db8::1") == bytes.fromhex("20010db8" + "0" * 23 + "1")

    def test_ipv4_mapped_ipv6_is_the_same_client_as_ipv4(self) -> None:
        assert address_key("::ffff:203.0.113.7") == address_key("203.0.113.7")

    def test_brackets_and_zone_are_ignored(self) -> None:
        assert address_key("[fe80::1%eth0]") == address_key("fe80::1")

    def test_rejects_non_addresses(self) -> None:
        with pytest.raises(ValueError):
            address_key("example.com")

    @given(st.text())
    def test_text_keys_never_have_an_address_length(self, value: str) -> None:
        key = text_key(value)
        assert len(key) > 16
        assert key != text_key(value + "x")


class TestHashRingTable:
    def test_slot_counts_follow_weight_within_the_band(self) -> None:
        servers = (("a", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 1), ("f", 4))
        counts = Counter(ring(*servers).owners())
        total = sum(w for _, w in servers)
        for name, weight in servers:
            share = SLOTS * weight / total
            assert share * 0.96 - 1 <= counts[name] <= share * 1.01 + 1

    @pytest.mark.parametrize("count", [10, 50])
    def test_no_server_holds_more_than_one_percent_above_its_share(self, count: int) -> None:
        counts = Counter(ring(*equal(count)).owners())
        assert max(counts.values()) <= SLOTS / count * 1.01 + 1
        assert min(counts.values()) >= SLOTS / count * 0.96 - 1

    def test_at_200_servers_no_server_holds_more_than_two_percent_above_its_share(self) -> None:
        counts = Counter(ring(*equal(200)).owners())
        assert len(counts) == 200
        assert max(counts.values()) <= SLOTS / 200 * 1.02 + 1
        assert min(counts.values()) >= SLOTS / 200 * 0.96 - 1

    @pytest.mark.parametrize("gone", ["srv3", "srv150"])
    def test_removing_one_of_200_servers_moves_at_most_1_3_times_its_slots(self, gone: str) -> None:
        before = ring(*equal(200)).owners()
        after = ring(*(server for server in equal(200) if server[0] != gone)).owners()
        own = before.count(gone)
        moved = sum(a != b for a, b in zip(before, after, strict=True))
        assert own <= moved <= 1.3 * own

    @pytest.mark.parametrize("new", ["new", "extra-1"])
    def test_adding_a_server_to_200_moves_at_most_1_3_times_its_slots(self, new: str) -> None:
        before = ring(*equal(200)).owners()
        after = ring(*equal(200), (new, 10)).owners()
        share = after.count(new)
        moved = sum(a != b for a, b in zip(before, after, strict=True))
        assert SLOTS / 201 * 0.96 - 1 <= share <= SLOTS / 201 * 1.02 + 1
        assert share <= moved <= 1.3 * share

    def test_a_changed_server_count_moves_clients_like_slots(self) -> None:
        # Keys map to slots uniformly, so client movement follows slot movement.
        before = ring(*equal(200))
        after = ring(*equal(200), ("new", 10))
        keys = ipv4_keys(20_000, seed=7)
        moved = sum(before.lookup(k, everyone) != after.lookup(k, everyone) for k in keys)
        slots = sum(a != b for a, b in zip(before.owners(), after.owners(), strict=True))
        assert abs(moved / len(keys) - slots / SLOTS) < 0.005

    @pytest.mark.parametrize("chain", [hashring._HEIR_CHAIN, hashring._TAKER_CHAIN])
    def test_slot_chains_visit_every_slot_before_repeating(self, chain: tuple[int, int]) -> None:
        # An undrawn slot's walk to a drawn one, and a given slot's walk to a
        # taker, must be able to reach every slot.
        visited = set(itertools.islice(hashring._walk(0, chain), SLOTS))
        assert len(visited) == SLOTS

    def test_table_ignores_the_order_servers_are_listed_in(self) -> None:
        servers = equal(12)
        shuffled = list(servers)
        random.Random(3).shuffle(shuffled)
        assert ring(*servers).owners() == ring(*shuffled).owners()

    @pytest.mark.parametrize(("count", "bound"), [(10, 1.05), (50, 1.2)])
    def test_removing_a_server_moves_little_more_than_its_own_slots(
        self, count: int, bound: float
    ) -> None:
        before = ring(*equal(count)).owners()
        after = ring(*equal(count)[:3], *equal(count)[4:]).owners()
        moved = sum(a != b for a, b in zip(before, after, strict=True))
        assert "srv3" not in after
        assert moved <= bound * SLOTS / count

    @pytest.mark.parametrize(("count", "bound"), [(10, 1.05), (50, 1.2)])
    def test_adding_a_server_moves_little_more_than_its_share(
        self, count: int, bound: float
    ) -> None:
        before = ring(*equal(count)).owners()
        after = ring(*equal(count), ("new", 10)).owners()
        moved = sum(a != b for a, b in zip(before, after, strict=True))
        assert after.count("new") >= SLOTS / (count + 1) * 0.96
        assert moved <= bound * SLOTS / (count + 1)

    def test_removing_a_server_hands_its_slots_to_all_the_others(self) -> None:
        before = ring(*equal(10)).owners()
        after = ring(*equal(10)[:3], *equal(10)[4:]).owners()
        heirs = Counter(b for a, b in zip(before, after, strict=True) if a == "srv3")
        assert set(heirs) == {f"srv{i}" for i in range(10)} - {"srv3"}

    def test_every_slot_has_a_configured_owner(self) -> None:
        servers = (("a", 1), ("b", 256), ("c", 7))
        owners = ring(*servers).owners()
        assert len(owners) == SLOTS
        assert set(owners) == {"a", "b", "c"}

    def test_table_is_the_same_in_every_process(self) -> None:
        # Python's str hash is randomised per process; the table must not
        # depend on it (nor on anything else but names and weights).
        script = (
            "import hashlib; from stickyproxy.hashring import HashRing; "
            "r = HashRing({'a': 3, 'b': 1, 'c': 2, 'd': 5}); "
            "print(hashlib.sha256('\\n'.join(r.owners()).encode()).hexdigest())"
        )
        here = ring(("a", 3), ("b", 1), ("c", 2), ("d", 5)).owners()
        expected = hashlib.sha256("\n".join(here).encode()).hexdigest()
        for seed in ("0", "1", "12345"):
            env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
            out = subprocess.run(
                [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
            )
            assert out.stdout.strip() == expected

    def test_clients_spread_evenly(self) -> None:
        r = ring(*equal(10))
        counts = Counter(r.lookup(k, everyone) for k in ipv4_keys(50_000))
        assert max(counts.values()) <= 1.05 * 5_000
        assert min(counts.values()) >= 0.95 * 5_000


class TestHashRingLookup:
    def test_the_same_key_always_gets_the_same_server(self) -> None:
        r = ring(*equal(5))
        key = address_key("198.51.100.22")
        assert len({r.lookup(key, everyone) for _ in range(10)}) == 1

    def test_a_down_server_moves_exactly_its_own_clients_and_they_come_back(self) -> None:
        r = ring(*equal(10))
        keys = ipv4_keys(60_000)
        before = [r.lookup(k, everyone) for k in keys]
        during = [r.lookup(k, lambda n: n != "srv4") for k in keys]
        after = [r.lookup(k, everyone) for k in keys]
        assert after == before
        moved = [d for b, d in zip(before, during, strict=True) if b != d]
        assert moved and all(b == "srv4" for b, d in zip(before, during, strict=True) if b != d)
        # The displaced clients spread evenly, client by client, over the nine others.
        spread = Counter(moved)
        assert set(spread) == {f"srv{i}" for i in range(10)} - {"srv4"}
        assert max(spread.values()) <= 1.15 * len(moved) / 9
        assert min(spread.values()) >= 0.85 * len(moved) / 9

    def test_displaced_clients_follow_weight(self) -> None:
        r = ring(("a", 1), ("b", 1), ("heavy", 4), ("gone", 2))
        moved = Counter(
            r.lookup(k, lambda n: n != "gone")
            for k in ipv4_keys(30_000)
            if r.lookup(k, everyone) == "gone"
        )
        assert moved["heavy"] > 2.5 * moved["a"]
        assert moved["heavy"] > 2.5 * moved["b"]

    def test_clients_of_a_slot_go_different_ways_when_its_owner_is_down(self) -> None:
        r = ring(*equal(10))
        slot_keys: dict[int, list[bytes]] = {}
        for key in ipv4_keys(200_000):
            slot_keys.setdefault(HashRing.slot(key), []).append(key)
        keys = max(slot_keys.values(), key=len)
        owner = r.lookup(keys[0], everyone)
        during = {r.lookup(k, lambda n: n != owner) for k in keys}
        assert owner not in during
        assert len(during) > 1

    def test_two_servers_down_move_only_their_clients(self) -> None:
        r = ring(*equal(10))
        down = {"srv2", "srv7"}
        for key in ipv4_keys(5_000, seed=4):
            before = r.lookup(key, everyone)
            during = r.lookup(key, lambda n: n not in down)
            assert during not in down
            assert during == before or before in down

    def test_ipv4_mapped_ipv6_clients_get_the_same_server_as_ipv4(self) -> None:
        r = ring(*equal(10))
        for ip in ("203.0.113.7", "10.0.0.1", "198.51.100.22"):
            mapped = address_key(f"::ffff:{ip}")
            assert r.lookup(mapped, everyone) == r.lookup(address_key(ip), everyone)
            assert list(r.sequence(mapped)) == list(r.sequence(address_key(ip)))

    def test_a_single_server_takes_every_client_until_it_is_down(self) -> None:
        r = ring(("only", 3))
        assert {r.lookup(k, everyone) for k in ipv4_keys(100)} == {"only"}
        assert r.lookup(b"\x01\x02\x03\x04", lambda n: False) is None
        assert list(r.sequence(b"\x01\x02\x03\x04")) == ["only"]

    def test_skip_passes_over_a_server_like_ineligibility(self) -> None:
        r = ring(*equal(5))
        for key in ipv4_keys(200):
            assert r.lookup(key, everyone, skip=lambda n: n == "srv2") == r.lookup(
                key, lambda n: n != "srv2"
            )

    def test_nothing_eligible_gives_none(self) -> None:
        assert ring(*equal(3)).lookup(b"\x01\x02\x03\x04", lambda n: False) is None

    def test_an_empty_ring_gives_none(self) -> None:
        assert HashRing({}).lookup(b"key", everyone) is None
        assert list(HashRing({}).sequence(b"key")) == []

    def test_weight_zero_servers_are_never_chosen_and_come_last(self) -> None:
        r = ring(("a", 10), ("b", 10), ("idle", 0))
        assert "idle" not in {r.lookup(k, everyone) for k in ipv4_keys(2_000)}
        assert list(r.sequence(b"\x01\x02\x03\x04"))[-1] == "idle"

    def test_negative_weights_are_refused(self) -> None:
        with pytest.raises(ValueError):
            HashRing({"a": -1})

    @given(
        key=st.binary(min_size=1, max_size=20),
        down=st.sets(st.sampled_from([f"srv{i}" for i in range(12)])),
    )
    def test_lookup_is_the_first_eligible_server_of_the_sequence(
        self, key: bytes, down: set[str]
    ) -> None:
        r = ring(*equal(12))
        order = list(r.sequence(key))
        assert sorted(order) == sorted(name for name, _ in equal(12))
        expected = next((n for n in order if n not in down), None)
        assert r.lookup(key, lambda n: n not in down) == expected
        assert order[0] == r.lookup(key, everyone)


# Routing observed on a real HAProxy 2.6.12 with ``balance source`` and
# ``hash-type consistent``: servers s1, s2, s3 with ids 1, 2, 3.
GOLDEN_EQUAL = {
    "83.77.202.24": "s2", "19.48.187.29": "s3", "130.109.19.44": "s2",
    "112.214.35.123": "s3", "24.217.30.63": "s1", "58.31.203.25": "s1",
    "57.23.68.148": "s3", "108.73.60.157": "s3", "144.92.52.96": "s1",
    "96.49.32.30": "s1", "179.124.41.153": "s2", "135.253.175.229": "s3",
    "127.0.0.1": "s3", "10.0.0.1": "s2", "203.0.113.7": "s2", "198.51.100.22": "s1",
    "2001:db8::1": "s1", "fe80::1234": "s1", "::1": "s1",
}  # fmt: skip
# Weights 1, 3, 2.
GOLDEN_WEIGHTED = {
    "83.77.202.24": "s3", "24.217.30.63": "s2", "57.23.68.148": "s1",
    "108.73.60.157": "s3", "144.92.52.96": "s1", "96.49.32.30": "s2",
    "135.253.175.229": "s1", "74.37.60.214": "s3", "127.0.0.1": "s2",
    "2001:db8::1": "s1", "2001:db8::2": "s3", "fe80::1234": "s1", "::1": "s3",
}  # fmt: skip
# Weights 10, with s2 disabled (in maintenance).
GOLDEN_S2_DOWN = {
    "83.77.202.24": "s3", "130.109.19.44": "s3", "179.124.41.153": "s3",
    "10.0.0.1": "s3", "203.0.113.7": "s1", "24.217.30.63": "s1",
    "19.48.187.29": "s3", "2001:db8::2": "s1",
}  # fmt: skip


class TestHAProxyRing:
    def test_full_hash_is_jenkins_then_the_multiplier(self) -> None:
        a = 0x7F000001
        a = ((a + 0x7ED55D16) + (a << 12)) & 0xFFFFFFFF
        a = ((a ^ 0xC761C23C) ^ (a >> 19)) & 0xFFFFFFFF
        a = ((a + 0x165667B1) + (a << 5)) & 0xFFFFFFFF
        a = ((a + 0xD3A2646C) ^ (a << 9)) & 0xFFFFFFFF
        a = ((a + 0xFD7046C5) + (a << 3)) & 0xFFFFFFFF
        a = ((a ^ 0xB55A4F09) ^ (a >> 16)) & 0xFFFFFFFF
        assert full_hash(0x7F000001) == (a * 3221225473) & 0xFFFFFFFF

    @pytest.mark.parametrize(
        ("weights", "eligible", "golden"),
        [
            ((10, 10, 10), everyone, GOLDEN_EQUAL),
            ((1, 3, 2), everyone, GOLDEN_WEIGHTED),
            ((10, 10, 10), lambda n: n != "s2", GOLDEN_S2_DOWN),
        ],
        ids=["equal", "weighted", "s2-down"],
    )
    def test_matches_haproxy_2_6(
        self, weights: tuple[int, int, int], eligible: object, golden: dict[str, str]
    ) -> None:
        r = HAProxyRing([("s1", 1, weights[0]), ("s2", 2, weights[1]), ("s3", 3, weights[2])])
        got = {ip: r.lookup(address_key(ip), eligible) for ip in golden}  # type: ignore[arg-type]
        assert got == golden

    def test_ipv4_mapped_clients_hash_like_ipv4(self) -> None:
        r = HAProxyRing([("s1", 1, 10), ("s2", 2, 10), ("s3", 3, 10)])
        assert r.lookup(address_key("::ffff:203.0.113.7"), everyone) == "s2"

    def test_ids_not_list_order_place_the_points(self) -> None:
        a = HAProxyRing([("s1", 1, 10), ("s2", 2, 10), ("s3", 3, 10)])
        b = HAProxyRing([("s3", 3, 10), ("s1", 1, 10), ("s2", 2, 10)])
        for ip in GOLDEN_EQUAL:
            assert a.lookup(address_key(ip), everyone) == b.lookup(address_key(ip), everyone)

    def test_skip_walks_clockwise_to_the_next_server(self) -> None:
        r = HAProxyRing([("s1", 1, 10), ("s2", 2, 10), ("s3", 3, 10)])
        for ip, expected in GOLDEN_EQUAL.items():
            key = address_key(ip)
            order = list(r.sequence(key))
            assert order[0] == expected
            assert r.lookup(key, everyone, skip={expected}.__contains__) == order[1]

    def test_nothing_eligible_or_everything_skipped_gives_none(self) -> None:
        r = HAProxyRing([("s1", 1, 10), ("s2", 2, 10)])
        key = address_key("10.0.0.1")
        assert r.lookup(key, lambda n: False) is None
        assert r.lookup(key, everyone, skip=everyone) is None
        assert HAProxyRing([]).lookup(key, everyone) is None

    def test_sequence_names_every_server_once_including_weight_zero(self) -> None:
        r = HAProxyRing([("s1", 1, 10), ("s2", 2, 0), ("s3", 3, 5)])
        assert sorted(r.sequence(address_key("10.0.0.1"))) == ["s1", "s2", "s3"]

    def test_weights_outside_haproxy_range_are_refused(self) -> None:
        with pytest.raises(ValueError):
            HAProxyRing([("s1", 1, 257)])
