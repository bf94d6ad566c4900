"""How many base loads the mixed trace of `bench/placement.py` needs, by eviction rule, with
requests served in arrival order and each device holding one base's family at a time.

Offline: Belady's choice (evict the family asked for latest: `family_misses`, the bound the
benchmark prints). Online, from the past only: LRU (evict the family used least recently),
by decayed demand (evict the family with the least decayed request count, half-life
120 s as in `edgeserve.eviction.Demand`; the placement score's order when every family's
units cost the same to bring back); and two online rules told more than the past can
show (each family's share of the whole trace; that and the periodic model's schedule),
which bound what a better estimate of demand could gain. No server runs: it counts
decisions, in a second.

    .venv/bin/python bench/placement_bound.py [--seeds 0,1,2,3] [--requests 100]
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from collections.abc import Callable

from placement import family_misses, mixed_trace

Rule = Callable[[str, float, list[tuple[float, str]]], float]   # higher: keep


def misses(requests: list[tuple[float, str]], devices: int, keep: Rule) -> int:
    """Base loads when, on a miss with every device full, the family `keep` ranks lowest
    is evicted."""
    held: list[str] = []
    seen: list[tuple[float, str]] = []
    count = 0
    for at, model in requests:
        family = model.split("-ft")[0]
        if family not in held:
            count += 1
            if len(held) == devices:
                held.remove(min(held, key=lambda f: keep(f, at, seen)))
            held.append(family)
        seen.append((at, family))
    return count


def last_use(family: str, now: float, seen: list[tuple[float, str]]) -> float:
    return max((at for at, f in seen if f == family), default=-math.inf)


def decayed(half_life: float) -> Rule:
    decay = math.log(2) / half_life

    def score(family: str, now: float, seen: list[tuple[float, str]]) -> float:
        return sum(math.exp(-decay * (now - at)) for at, f in seen if f == family)
    return score


def known_popularity(trace: list[tuple[float, str]], period: float | None = None) -> Rule:
    """An online rule told what the past cannot show: every family's share of the whole
    trace (the best rule for independent requests keeps the most popular families), and,
    given `period`, when the periodic model's next burst comes (a family whose next request
    is surely sooner is kept first). Families rank by the expected wait to their next
    request."""
    # mixed_trace asks for its periodic model at every multiple of the period.
    periodic = next((m for t, m in trace if t > 0 and math.isclose(
        t / period, round(t / period), abs_tol=1e-9)), None) if period else None
    counts = Counter(model.split("-ft")[0] for _, model in trace if model != periodic)
    span = trace[-1][0]

    def score(family: str, now: float, seen: list[tuple[float, str]]) -> float:
        rate = counts[family] / span
        wait = 1 / rate if rate else math.inf
        if period and periodic is not None and periodic.split("-ft")[0] == family:
            wait = min(wait, (math.floor(now / period + 1e-9) + 1) * period - now)
        return -wait
    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--mean-gap", type=float, default=0.5)
    args = parser.parse_args()
    for seed in (int(s) for s in args.seeds.split(",")):
        trace = mixed_trace(args.requests, seed, args.mean_gap, period=3.0)
        print(json.dumps({"seed": seed, "requests": len(trace),
                          "belady": family_misses(trace, 2),
                          "lru": misses(trace, 2, last_use),
                          "decayed_demand": misses(trace, 2, decayed(120.0)),
                          "known_popularity": misses(trace, 2, known_popularity(trace)),
                          "known_popularity_and_period":
                              misses(trace, 2, known_popularity(trace, 3.0))}))


if __name__ == "__main__":
    main()
