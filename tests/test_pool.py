"""Tests for stickyproxy.pool: server state, health hysteresis and routing."""

from __future__ import annotations

import random
from collections import Counter
from functools import cache
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stickyproxy.config import BalanceConfig, HealthConfig, ServerConfig
from stickyproxy.hashring import address_key
from stickyproxy.pool import Decision, Pool, Server, State, Transition


def servers(count: int = 3, **overrides: object) -> list[ServerConfig]:
    return [
        ServerConfig(name=f"s{i}", host="10.0.0.1", port=3000 + i, cookie=f"s{i}", **overrides)  # type: ignore[arg-type]
        for i in range(1, count + 1)
    ]


def make_pool(
    configs: list[ServerConfig] | None = None,
    *,
    rise: int = 1,
    fall: int = 3,
    **balance: object,
) -> Pool:
    return Pool(
        servers() if configs is None else configs,
        HealthConfig(rise=rise, fall=fall),
        BalanceConfig(**balance),  # type: ignore[arg-type]
    )


def keys(count: int, seed: int = 5) -> list[bytes]:
    rnd = random.Random(seed)
    return [rnd.getrandbits(32).to_bytes(4, "big") for _ in range(count)]


def key_hashing_to(pool: Pool, name: str) -> bytes:
    return next(k for k in keys(1000) if pool.choose([], k).server is pool.servers[name])


@cache
def _bounded_pool(factor: int, hash_function: str) -> Pool:
    configs = [
        ServerConfig(f"s{i}", "h", 1, f"s{i}", weight=w, maxconn=0)
        for i, w in enumerate([10, 10, 20, 5], 1)
    ]
    return make_pool(configs, hash_balance_factor=factor, hash_function=hash_function)


def bounded_pool(factor: int, hash_function: str) -> Pool:
    """A pool with bounded loads and no active connections (built once per setting)."""
    pool = _bounded_pool(factor, hash_function)
    for server in pool.servers.values():
        server.active = 0
    return pool


def take_down(pool: Pool, name: str) -> None:
    while pool.servers[name].state is not State.DOWN:
        pool.record_check(name, ok=False, now=0.0, detail="L7STS/503")


class TestPersistence:
    """HAProxy's persistence x server state table (cases 28-34, 42-44)."""

    def test_cookie_for_an_up_server_routes_there_without_a_new_cookie(self) -> None:
        pool = make_pool()
        assert pool.choose(["s2"], b"\x01\x02\x03\x04") == Decision(
            pool.servers["s2"], "cookie", set_cookie=False
        )

    def test_no_cookie_is_hashed_and_gets_a_cookie(self) -> None:
        decision = make_pool().choose([], b"\x01\x02\x03\x04")
        assert decision.reason == "hash"
        assert decision.set_cookie
        assert decision.server is not None

    def test_draining_server_keeps_its_pinned_clients(self) -> None:
        pool = make_pool()
        pool.set_admin("s2", "drain")
        assert pool.choose(["s2"], b"k").server is pool.servers["s2"]
        assert pool.choose(["s2"], b"k").set_cookie is False

    def test_draining_server_gets_no_new_clients(self) -> None:
        pool = make_pool()
        key = key_hashing_to(pool, "s2")
        pool.set_admin("s2", "drain")
        decision = pool.choose([], key)
        assert decision.server is not None
        assert decision.server.name != "s2"
        assert decision.set_cookie

    def test_weight_zero_is_draining(self) -> None:
        pool = make_pool([*servers(2), ServerConfig("s3", "h", 1, "s3", weight=0)])
        assert pool.servers["s3"].state is State.DRAIN
        assert pool.choose(["s3"], b"k").server is pool.servers["s3"]
        assert all(pool.choose([], k).server is not pool.servers["s3"] for k in keys(300))

    @pytest.mark.parametrize("make_unusable", ["maint", "down"])
    def test_cookie_for_a_maint_or_down_server_is_rehashed_with_a_new_cookie(
        self, make_unusable: str
    ) -> None:
        pool = make_pool()
        if make_unusable == "maint":
            pool.set_admin("s2", "maint")
        else:
            take_down(pool, "s2")
        decision = pool.choose(["s2"], b"\x01\x02\x03\x04")
        assert decision.reason == "cookie-unusable"
        assert decision.set_cookie
        assert decision.server is not None
        assert decision.server.name != "s2"

    @pytest.mark.parametrize("value", ['"s2"', "S2", "", "bogus"])
    def test_invalid_cookie_values_are_hashed_as_if_absent(self, value: str) -> None:
        decision = make_pool().choose([value], b"\x01\x02\x03\x04")
        assert decision.reason == "hash"
        assert decision.set_cookie

    def test_first_cookie_naming_a_known_server_wins(self) -> None:
        pool = make_pool()
        assert pool.choose(["bogus", "s1", "s3"], b"k").server is pool.servers["s1"]

    def test_excluded_pinned_server_is_rehashed(self) -> None:
        pool = make_pool()
        decision = pool.choose(["s2"], b"k", exclude={"s2"})
        assert decision.reason == "cookie-unusable"
        assert decision.server is not None
        assert decision.server.name != "s2"

    def test_no_usable_server_gives_none(self) -> None:
        pool = make_pool()
        for name in pool.servers:
            pool.set_admin(name, "maint")
        assert pool.choose(["s1"], b"k") == Decision(None, "none", set_cookie=False)

    def test_by_cookie_is_exact_and_never_matches_empty(self) -> None:
        pool = make_pool([*servers(2), ServerConfig("s3", "h", 1, "")])
        assert pool.by_cookie("s1") is pool.servers["s1"]
        assert pool.by_cookie("S1") is None
        assert pool.by_cookie("") is None

    def test_duplicate_server_names_are_refused(self) -> None:
        with pytest.raises(ValueError):
            make_pool([*servers(2), *servers(1)])


class TestRedispatchAndLimits:
    def test_redispatch_avoids_the_failed_server_and_sets_a_cookie(self) -> None:
        pool = make_pool()
        key = key_hashing_to(pool, "s1")
        decision = pool.redispatch(key, exclude={"s1"})
        assert decision.reason == "redispatch"
        assert decision.set_cookie
        assert decision.server is not None
        assert decision.server.name != "s1"

    def test_redispatch_with_everyone_excluded_gives_none(self) -> None:
        assert make_pool().redispatch(b"k", {"s1", "s2", "s3"}).server is None

    def test_a_full_server_gets_no_new_clients_but_keeps_pinned_ones(self) -> None:
        pool = make_pool(servers(3, maxconn=1))
        key = key_hashing_to(pool, "s1")
        pool.acquire(pool.servers["s1"])
        assert not pool.servers["s1"].accepts_new
        assert pool.choose([], key).server is not pool.servers["s1"]
        assert pool.choose(["s1"], key).server is pool.servers["s1"]
        pool.release(pool.servers["s1"])
        assert pool.choose([], key).server is pool.servers["s1"]

    def test_release_never_goes_below_zero(self) -> None:
        pool = make_pool()
        pool.release(pool.servers["s1"])
        assert pool.servers["s1"].active == 0

    def test_only_the_down_servers_clients_move(self) -> None:
        pool = make_pool(servers(5))
        sample = keys(3000)
        before = [pool.choose([], k).server for k in sample]
        take_down(pool, "s4")
        during = [pool.choose([], k).server for k in sample]
        assert all(b is d for b, d in zip(before, during, strict=True) if b.name != "s4")  # type: ignore[union-attr]
        assert all(d.name != "s4" for d in during)  # type: ignore[union-attr]
        pool.record_check("s4", ok=True, now=1.0, detail="L7OK/200")
        assert [pool.choose([], k).server for k in sample] == before

    @pytest.mark.parametrize("hash_function", ["default", "haproxy"])
    def test_routing_ignores_config_order_on_the_default_ring(self, hash_function: str) -> None:
        forward = make_pool(servers(4), hash_function=hash_function)
        backward = make_pool(servers(4)[::-1], hash_function=hash_function)
        same = [
            forward.choose([], k).server.name == backward.choose([], k).server.name  # type: ignore[union-attr]
            for k in keys(500)
        ]
        # The default ring is keyed by name; HAProxy's by position (ids).
        assert all(same) if hash_function == "default" else not all(same)

    def test_haproxy_ring_routes_like_haproxy(self) -> None:
        pool = make_pool(hash_function="haproxy")
        for ip, name in {"10.0.0.1": "s2", "127.0.0.1": "s3", "198.51.100.22": "s1"}.items():
            assert pool.choose([], address_key(ip)).server is pool.servers[name]

    @given(
        ops=st.lists(
            st.tuples(st.booleans(), st.binary(min_size=4, max_size=4)), min_size=1, max_size=150
        ),
        factor=st.sampled_from([101, 125, 150, 200]),
        hash_function=st.sampled_from(["default", "haproxy"]),
    )
    def test_bounded_load_never_exceeds_the_limit(
        self, ops: list[tuple[bool, bytes]], factor: int, hash_function: str
    ) -> None:
        pool = bounded_pool(factor, hash_function)
        total_weight = sum(s.weight for s in pool.servers.values())
        assigned: list[Server] = []
        for add, key in ops:
            if add or not assigned:
                total = sum(s.active for s in pool.servers.values())
                decision = pool.choose([], key)
                server = decision.server
                assert server is not None
                limit = max(1, -(-(total + 1) * factor * server.weight // (100 * total_weight)))
                assert server.active < limit
                pool.acquire(server)
                assigned.append(server)
            else:
                pool.release(assigned.pop(len(key) % len(assigned)))


class TestHealth:
    def test_fall_three_goes_down_one_check_at_a_time(self) -> None:
        """The ``show stat`` timeline of ``rise 1 fall 3`` (section 4, case 53)."""
        pool = make_pool(rise=1, fall=3)
        pool.record_check("s1", ok=True, now=0.0, detail="L7OK/200")
        statuses = [pool.servers["s1"].status]
        for t in (1.0, 2.0, 3.0):
            pool.record_check("s1", ok=False, now=t, detail="L7STS/503")
            statuses.append(pool.servers["s1"].status)
        pool.record_check("s1", ok=True, now=4.0, detail="L7OK/200")
        statuses.append(pool.servers["s1"].status)
        assert statuses == ["UP", "UP 2/3", "UP 1/3", "DOWN", "UP"]
        assert pool.servers["s1"].health == 3

    def test_rise_two_needs_two_passes_and_shows_progress(self) -> None:
        pool = make_pool(rise=2, fall=2)
        take_down(pool, "s1")
        pool.record_check("s1", ok=True, now=1.0, detail="ok")
        assert pool.servers["s1"].status == "DOWN 1/2"
        assert pool.servers["s1"].state is State.DOWN
        pool.record_check("s1", ok=True, now=2.0, detail="ok")
        assert pool.servers["s1"].status == "UP"

    def test_a_fresh_server_falls_at_the_first_failure(self) -> None:
        pool = make_pool(rise=1, fall=3)
        transition = pool.record_check("s1", ok=False, now=5.0, detail="L4CON")
        assert transition == Transition("s1", State.UP, State.DOWN, "health check failed: L4CON")

    def test_leaving_maintenance_restarts_health_at_rise(self) -> None:
        pool = make_pool(rise=2, fall=3)
        pool.set_admin("s1", "maint")
        assert pool.record_check("s1", ok=False, now=0.0, detail="ignored") is None
        assert pool.set_admin("s1", "ready") == Transition(
            "s1", State.MAINT, State.UP, "admin state set to ready"
        )
        assert pool.servers["s1"].health == 2
        pool.record_check("s1", ok=False, now=1.0, detail="L7STS/500")
        assert pool.servers["s1"].state is State.DOWN

    def test_failures_and_passes_stay_within_bounds(self) -> None:
        pool = make_pool(rise=2, fall=3)
        for _ in range(10):
            pool.record_check("s1", ok=False, now=0.0, detail="x")
        assert pool.servers["s1"].health == 0
        for _ in range(10):
            pool.record_check("s1", ok=True, now=0.0, detail="x")
        assert pool.servers["s1"].health == 4

    def test_unchecked_servers_are_always_up(self) -> None:
        pool = make_pool(servers(2, check=False))
        assert pool.record_check("s1", ok=False, now=1.0, detail="L4CON") is None
        assert pool.servers["s1"].state is State.UP
        assert pool.servers["s1"].status == "no check"
        assert pool.servers["s1"].last_check == "L4CON"

    def test_listeners_hear_every_state_change_and_only_those(self) -> None:
        pool = make_pool(rise=1, fall=2)
        heard: list[Transition] = []
        pool.add_listener(heard.append)
        pool.record_check("s1", ok=True, now=0.0, detail="ok")
        pool.record_check("s1", ok=False, now=1.0, detail="bad")
        pool.record_check("s1", ok=False, now=2.0, detail="bad")
        pool.set_admin("s2", "drain")
        pool.set_admin("s2", "drain")
        pool.set_admin("s2", "maint")
        assert [(t.server, t.old, t.new) for t in heard] == [
            ("s1", State.UP, State.DOWN),
            ("s2", State.UP, State.DRAIN),
            ("s2", State.DRAIN, State.MAINT),
        ]
        assert pool.servers["s1"].last_change == 2.0

    def test_unknown_admin_state_is_refused(self) -> None:
        with pytest.raises(ValueError):
            make_pool().set_admin("s1", "sleepy")  # type: ignore[arg-type]

    def test_snapshot_lists_servers_in_config_order_with_state(self) -> None:
        pool = make_pool()
        pool.set_admin("s3", "drain")
        pool.acquire(pool.servers["s1"])
        pool.record_check("s2", ok=False, now=7.0, detail="L7STS/503")
        snap = pool.snapshot()
        assert [s["name"] for s in snap] == ["s1", "s2", "s3"]
        assert [s["state"] for s in snap] == ["UP", "DOWN", "DRAIN"]
        assert snap[0]["active"] == 1
        assert snap[0]["requests"] == 1
        assert snap[1]["last_check"] == "L7STS/503"
        assert snap[1]["last_check_time"] == 7.0
        assert snap[0]["address"] == "10.0.0.1:3001"


class TestCheckInterval:
    """HAProxy's srv_getinter: which of interval/fastinter/downinter applies."""

    @staticmethod
    def pool(**health: object) -> Pool:
        config = HealthConfig(**{"rise": 2, "fall": 3, "interval": 10.0, **health})  # type: ignore[arg-type]
        return Pool(servers(), config, BalanceConfig())

    def test_fully_up_uses_interval_going_up_or_down_fastinter_fully_down_downinter(
        self,
    ) -> None:
        pool = self.pool(fastinter=2.0, downinter=30.0)
        server = pool.servers["s1"]
        seen = []
        for health in range(server.rise + server.fall):
            server.health = health
            seen.append((server.status, pool.check_interval("s1")))
        assert seen == [
            ("DOWN", 30.0),
            ("DOWN 1/2", 2.0),
            ("UP 1/3", 2.0),
            ("UP 2/3", 2.0),
            ("UP", 10.0),
        ]

    def test_a_fresh_server_is_checked_at_fastinter(self) -> None:
        assert self.pool(fastinter=2.0).check_interval("s1") == 2.0

    def test_fastinter_and_downinter_default_to_interval(self) -> None:
        pool = self.pool()
        for health in (0, 2, 4):
            pool.servers["s1"].health = health
            assert pool.check_interval("s1") == 10.0

    def test_with_fall_one_there_is_no_way_down_only_up_or_down(self) -> None:
        pool = self.pool(rise=1, fall=1, fastinter=2.0, downinter=30.0)
        assert pool.check_interval("s1") == 10.0
        take_down(pool, "s1")
        assert pool.check_interval("s1") == 30.0


@cache
def _pool_pair(rise: int, fall: int) -> tuple[Pool, Pool]:
    """Two one-server pools (building a ring costs more than the test itself)."""
    observed = make_pool(servers(1), rise=rise, fall=fall, hash_function="haproxy")
    checked = make_pool(servers(1), rise=rise, fall=fall, hash_function="haproxy")
    return observed, checked


class TestObserveLayer4:
    """Connection failures seen in traffic count as failed checks (``observe layer4``)."""

    def test_fall_refused_connections_take_a_server_down_with_the_reason(self) -> None:
        pool = make_pool(rise=1, fall=3)
        pool.record_check("s1", ok=True, now=0.0, detail="L7OK/200")
        heard: list[Transition] = []
        pool.add_listener(heard.append)
        statuses = []
        for t in (1.0, 2.0, 3.0):
            pool.observe_connect_failure("s1", t, "connection refused")
            statuses.append(pool.servers["s1"].status)
        assert statuses == ["UP 2/3", "UP 1/3", "DOWN"]
        assert heard == [
            Transition("s1", State.UP, State.DOWN, "connection refused during traffic (3/3)")
        ]
        assert pool.servers["s1"].last_change == 3.0

    def test_the_transition_is_returned_once(self) -> None:
        pool = make_pool(rise=1, fall=2)
        pool.record_check("s1", ok=True, now=0.0, detail="ok")
        assert pool.observe_connect_failure("s1", 1.0, "timeout") is None
        transition = pool.observe_connect_failure("s1", 2.0, "timeout")
        assert transition == Transition("s1", State.UP, State.DOWN, "timeout during traffic (2/2)")
        assert pool.observe_connect_failure("s1", 3.0, "timeout") is None

    def test_a_fresh_server_falls_at_the_first_failure(self) -> None:
        pool = make_pool(rise=1, fall=3)
        assert pool.observe_connect_failure("s1", 1.0, "connection refused") is not None
        assert pool.servers["s1"].state is State.DOWN

    def test_failures_are_counted_apart_from_failed_checks(self) -> None:
        pool = make_pool()
        pool.observe_connect_failure("s1", 1.0, "connection refused")
        snap = pool.snapshot()[0]
        assert (snap["observed_failures"], snap["check_failures"]) == (1, 0)
        # Only checks set what operators see as the last check.
        assert snap["last_check"] is None

    def test_only_a_passed_check_brings_the_server_back(self) -> None:
        pool = make_pool(rise=1, fall=3)
        pool.observe_connect_failure("s1", 1.0, "connection refused")
        assert pool.servers["s1"].state is State.DOWN
        pool.record_check("s1", ok=True, now=2.0, detail="L7OK/200")
        assert pool.servers["s1"].status == "UP"

    def test_unchecked_servers_are_not_affected(self) -> None:
        pool = make_pool(servers(2, check=False))
        for _ in range(5):
            assert pool.observe_connect_failure("s1", 1.0, "connection refused") is None
        assert pool.servers["s1"].status == "no check"
        assert pool.servers["s1"].observed_failures == 0

    def test_servers_in_maintenance_are_not_affected(self) -> None:
        pool = make_pool()
        pool.set_admin("s1", "maint")
        assert pool.observe_connect_failure("s1", 1.0, "connection refused") is None
        pool.set_admin("s1", "ready")
        assert pool.servers["s1"].health == 1

    def test_observe_none_turns_it_off(self) -> None:
        pool = Pool(servers(), HealthConfig(observe="none"), BalanceConfig())
        for _ in range(5):
            assert pool.observe_connect_failure("s1", 1.0, "connection refused") is None
        assert pool.servers["s1"].state is State.UP

    def test_unknown_servers_are_refused(self) -> None:
        with pytest.raises(KeyError):
            make_pool().observe_connect_failure("nope", 1.0, "connection refused")

    @given(
        rise=st.integers(1, 4),
        fall=st.integers(1, 4),
        events=st.lists(st.sampled_from(["pass", "fail", "traffic"]), max_size=40),
    )
    def test_a_traffic_failure_moves_health_exactly_as_a_failed_check(
        self, rise: int, fall: int, events: list[str]
    ) -> None:
        observed, checked = _pool_pair(rise, fall)
        for pool in (observed, checked):
            pool.servers["s1"].health = rise  # as at start-up
        for event in events:
            if event == "pass":
                observed.record_check("s1", ok=True, now=0.0, detail="ok")
                checked.record_check("s1", ok=True, now=0.0, detail="ok")
            else:
                checked.record_check("s1", ok=False, now=0.0, detail="bad")
                if event == "fail":
                    observed.record_check("s1", ok=False, now=0.0, detail="bad")
                else:
                    observed.observe_connect_failure("s1", 0.0, "connection refused")
            server = observed.servers["s1"]
            assert server.health == checked.servers["s1"].health
            assert 0 <= server.health <= rise + fall - 1
            assert server.operational is (server.health >= rise)


def test_removed_listeners_hear_nothing_more() -> None:
    pool = make_pool()
    heard: list[Transition] = []
    pool.add_listener(heard.append)
    pool.remove_listener(heard.append)
    pool.remove_listener(heard.append)  # a second time is harmless
    pool.set_admin("s1", "maint")
    assert heard == []


def test_hashed_clients_spread_by_weight() -> None:
    configs = [ServerConfig(f"s{i}", "h", 1, f"s{i}", weight=w) for i, w in enumerate([1, 2, 4], 1)]
    pool = make_pool(configs)
    counts = Counter(pool.choose([], k).server.name for k in keys(14_000))  # type: ignore[union-attr]
    for name, weight in (("s1", 1), ("s2", 2), ("s3", 4)):
        assert counts[name] == pytest.approx(2_000 * weight, rel=0.06)


def test_set_weight_moves_clients_like_a_configuration_change() -> None:
    from stickyproxy.config import parse_config
    from stickyproxy.hashring import address_key

    text = "".join(f"[server s{i}]\naddress = 10.0.0.{i}:80\n" for i in range(1, 5))
    pool = Pool(*_parts(parse_config(text)))
    keys = [address_key(f"198.51.{i // 250}.{i % 250}") for i in range(2000)]
    before = {k: pool.choose([], k).server.name for k in keys}  # type: ignore[union-attr]
    pool.set_weight("s2", 30)
    after = {k: pool.choose([], k).server.name for k in keys}  # type: ignore[union-attr]
    gained = sum(1 for k in keys if after[k] == "s2") - sum(1 for k in keys if before[k] == "s2")
    assert gained > 300
    assert all(after[k] == "s2" for k in keys if before[k] == "s2")
    expected = Pool(
        *_parts(parse_config(text.replace("10.0.0.2:80\n", "10.0.0.2:80\nweight = 30\n")))
    )
    assert after == {k: expected.choose([], k).server.name for k in keys}  # type: ignore[union-attr]


def _parts(config: Any) -> tuple[Any, Any, Any]:
    return config.servers, config.health, config.balance


@given(
    hash_function=st.sampled_from(["default", "haproxy"]),
    states=st.lists(
        st.tuples(
            st.sampled_from(["ready", "drain", "maint"]),
            st.booleans(),  # health check failing
            st.integers(0, 3),  # active requests (maxconn is 2)
            st.sampled_from([None, 0, 5]),  # weight override
        ),
        min_size=3,
        max_size=3,
    ),
    key=st.binary(min_size=4, max_size=4),
)
def test_a_hashed_request_lands_where_the_ring_lookup_says_whatever_the_states(
    hash_function: str, states: list[tuple[str, bool, int, int | None]], key: bytes
) -> None:
    pool = make_pool(
        [ServerConfig(f"s{i}", "h", 1, f"s{i}", maxconn=2, check=True) for i in (1, 2, 3)],
        rise=1,
        hash_function=hash_function,
    )
    # Route once with everyone up, so that the key's first choice is known
    # before the states change under it.
    pool.choose([], key)
    for server, (admin, failing, active, weight) in zip(pool.servers.values(), states, strict=True):
        server.admin = admin  # type: ignore[assignment]
        server.health = 0 if failing else server.rise
        server.active = active
        if weight is not None:
            pool.set_weight(server.name, weight)
    expected = pool.ring.lookup(
        key,
        lambda name: pool.servers[name].state is State.UP,
        skip=lambda name: not pool.servers[name].accepts_new,
    )
    decision = pool.choose([], key)
    assert (decision.server.name if decision.server else None) == expected
    assert pool.choose([], key) == decision
