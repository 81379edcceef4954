"""Measure the default hash ring: spread, weight accuracy, movement, speed.

Run from the repository root::

    PYTHONPATH=. python bench/hashring_bench.py [--clients 1000000]

Prints one table per measurement. Client addresses are random IPv4 addresses
from a fixed seed, so runs are comparable; times are the best of a few runs.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from collections.abc import Callable
from functools import partial

from stickyproxy.hashring import SLOTS, HAProxyRing, HashRing

Eligible = Callable[[str], bool]


def everyone(name: str) -> bool:
    return True


def clients(count: int, seed: int = 2024) -> list[bytes]:
    rnd = random.Random(seed)
    return [rnd.getrandbits(32).to_bytes(4, "big") for _ in range(count)]


def best_of(runs: int, action: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - start)
    return best


def equal(count: int) -> dict[str, int]:
    return {f"srv{i:03d}": 10 for i in range(count)}


def spread(keys: list[bytes]) -> None:
    print("\n== spread: busiest and idlest server / mean, equal weights ==")
    print(f"{'servers':>8} {'max/mean':>9} {'min/mean':>9} {'target':>7}")
    for count, target in ((10, 1.015), (50, 1.03), (200, 1.06)):
        ring = HashRing(equal(count))
        counts = Counter(ring.lookup(k, everyone) for k in keys)
        mean = len(keys) / count
        high, low = max(counts.values()) / mean, min(counts.values()) / mean
        print(f"{count:>8} {high:>9.4f} {low:>9.4f} {target:>7}")
    # One sample of clients decides the table above; the busiest server of
    # other samples shows how much of that figure is the clients' own noise.
    size = len(keys)
    samples = [Counter(map(HashRing.slot, clients(size, seed=s))) for s in range(1, 6)]
    print(f"{'servers':>8}  max/mean for 5 other samples of as many clients (best .. worst)")
    for count in (10, 50, 200):
        owners = HashRing(equal(count)).owners()
        highs = []
        for sample in samples:
            load: Counter[str] = Counter()
            for slot, n in sample.items():
                load[owners[slot]] += n
            highs.append(max(load.values()) / (size / count))
        print(f"{count:>8} {min(highs):>9.4f} .. {max(highs):.4f}")
    ha = HAProxyRing([(f"srv{i:03d}", i + 1, 10) for i in range(10)])
    counts = Counter(ha.lookup(k, everyone) for k in keys[:200_000])
    mean = 200_000 / 10
    print(f"{'(haproxy ring, 10 servers: max/mean':>8} {max(counts.values()) / mean:.4f})")


def weights(keys: list[bytes]) -> None:
    print("\n== weight accuracy: 60 servers, weights 1-4 mixed ==")
    config = {f"srv{i:03d}": 1 + i % 4 for i in range(60)}
    ring = HashRing(config)
    counts = Counter(ring.lookup(k, everyone) for k in keys)
    total = sum(config.values())
    errors = [counts[n] / (len(keys) * w / total) - 1 for n, w in config.items()]
    print(f"worst share error {max(map(abs, errors)) * 100:.2f} % (target 5 %)")


def movement(keys: list[bytes]) -> None:
    print("\n== movement when the configuration changes (1.0 = ideal 1/N share; target 1.3) ==")
    print(f"{'servers':>8} {'remove':>8} {'add':>8}   (slots; clients in brackets)")
    # Every client: with fewer, the noise of which clients sit on the moved
    # slots (about 1/sqrt(clients moved)) is a good part of the margin.
    sample = keys
    for count in (10, 50, 200):
        config = equal(count)
        base = HashRing(config)
        removed = dict(config)
        del removed["srv003"]
        added = {**config, "srvnew": 10}
        results = []
        for other, ideal in ((HashRing(removed), 1 / count), (HashRing(added), 1 / (count + 1))):
            slots = sum(a != b for a, b in zip(base.owners(), other.owners(), strict=True))
            moved = sum(base.lookup(k, everyone) != other.lookup(k, everyone) for k in sample)
            results.append(f"{slots / SLOTS / ideal:>5.3f} [{moved / len(sample) / ideal:.3f}]")
        print(f"{count:>8} {results[0]:>16} {results[1]:>16}")
    # One removed and one added server are one draw each; the worst of a few
    # more shows how far that draw is from the bound.
    full = equal(200)
    before = HashRing(full).owners()
    worst = []
    for variants in (
        [{n: w for n, w in full.items() if n != gone} for gone in ("srv017", "srv101", "srv150")],
        [{**full, new: 10} for new in ("zeta", "node-7", "srv200")],
    ):
        ratios = []
        for variant in variants:
            after = HashRing(variant).owners()
            share = SLOTS / max(len(full), len(variant))
            ratios.append(sum(a != b for a, b in zip(before, after, strict=True)) / share)
        worst.append(max(ratios))
    print(
        f"{'200':>8} {worst[0]:>5.3f}{'':>11} {worst[1]:>5.3f}   (worst of 3 other servers, slots)"
    )


def failover(keys: list[bytes]) -> None:
    print("\n== a server goes down (50 servers) ==")
    ring = HashRing(equal(50))
    sample = keys[:200_000]
    before = [ring.lookup(k, everyone) for k in sample]
    during = [ring.lookup(k, lambda n: n != "srv007") for k in sample]
    wrong = sum(b not in (d, "srv007") for b, d in zip(before, during, strict=True))
    moved = Counter(d for b, d in zip(before, during, strict=True) if b != d)
    mean = sum(moved.values()) / 49
    back = [ring.lookup(k, everyone) for k in sample] == before
    print(f"clients of other servers moved: {wrong}; displaced clients max/mean over the")
    print(f"other 49: {max(moved.values()) / mean:.3f}; all back when it returns: {back}")


def _lookups(ring: HashRing | HAProxyRing, keys: list[bytes], eligible: Eligible) -> None:
    for k in keys:
        ring.lookup(k, eligible)


def speed() -> None:
    print("\n== speed (targets: rebuild < 100 ms at 200 servers, lookup < 2000 ns) ==")
    keys = clients(20_000, seed=9)
    header = ("servers", "rebuild ms", "lookup ns", "owner down ns", "haproxy ns")
    print(f"{header[0]:>8} {header[1]:>11} {header[2]:>10} {header[3]:>14} {header[4]:>11}")
    for count in (10, 50, 200):
        config = equal(count)
        rebuild = best_of(3, partial(HashRing, config)) * 1000
        ring = HashRing(config)
        common = best_of(5, partial(_lookups, ring, keys, everyone)) / len(keys) * 1e9
        owned = [k for k in keys if ring.lookup(k, everyone) == "srv001"]

        def not_down(name: str) -> bool:
            return name != "srv001"

        _lookups(ring, owned, not_down)  # warm the per-slot fallback cache
        fallback = best_of(5, partial(_lookups, ring, owned, not_down))
        fallback_ns = fallback / max(1, len(owned)) * 1e9
        ha = HAProxyRing([(f"srv{i:03d}", i + 1, 10) for i in range(count)])
        ha_ns = best_of(3, partial(_lookups, ha, keys, everyone)) / len(keys) * 1e9
        print(f"{count:>8} {rebuild:>11.1f} {common:>10.0f} {fallback_ns:>14.0f} {ha_ns:>11.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--clients", type=int, default=1_000_000)
    args = parser.parse_args()
    keys = clients(args.clients)
    spread(keys)
    weights(keys)
    movement(keys)
    failover(keys)
    speed()


if __name__ == "__main__":
    main()
