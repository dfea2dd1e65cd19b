"""Nanoseconds per pick of every balancing policy, with 4 and 64 targets.

Each policy picks from targets with a fixed, uneven in-flight load (so the
load-aware ones have something to compare), keyed by 1,024 distinct client
addresses. The figure is the best of 5 timed runs of a bounded loop, and
includes the loop (about 12 ns a turn here) and the method call (an empty
Python function call costs about 75 ns).
Also timed: a Maglev table build, paid when the eligible set changes.

Usage: python bench/bench_policies.py [--quick]
Writes bench/results/policies.json and bench/results/policies.md.
"""

from __future__ import annotations

import argparse
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from balancer.core.policies import (
    ConsistentHash,
    LeastConnections,
    PeakEwma,
    Policy,
    PowerOfTwo,
    RoundRobin,
    WeightedRandom,
    WeightedRoundRobin,
)
from balancer.core.policies.consistent_hash import build_table
from harness import save_results

SIZES = (4, 64)
KEYS = [f"10.{i // 256}.{i % 256}.9:{30000 + i}".encode() for i in range(1024)]


@dataclass(eq=False)
class BenchTarget:
    address: str
    in_flight: int
    effective_weight: float
    weight: int


POLICIES: dict[str, Callable[[], Policy]] = {
    "round_robin": RoundRobin,
    "weighted_round_robin": WeightedRoundRobin,
    "least_connections": LeastConnections,
    "random": lambda: WeightedRandom(random.Random(1)),
    "power_of_two": lambda: PowerOfTwo(random.Random(1)),
    "consistent_hash": ConsistentHash,
    "consistent_hash (bounded 1.25)": lambda: ConsistentHash(balance_factor=1.25),
    "peak_ewma": lambda: PeakEwma(rng=random.Random(1)),
}


def make_targets(n: int) -> list[BenchTarget]:
    rng = random.Random(n)
    return [
        BenchTarget(f"10.0.{i // 256}.{i % 256}:8000", rng.randrange(8), w, int(w))
        for i, w in enumerate(rng.choice((1.0, 2.0, 3.0)) for _ in range(n))
    ]


def time_picks(policy: Policy, rounds: int) -> float:
    """Seconds per pick: the best of 5 runs of `rounds` passes over the keys."""
    pick = policy.pick
    keys = KEYS
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(rounds):
            for key in keys:
                pick(key)
        best = min(best, time.perf_counter() - start)
    return best / (rounds * len(keys))


def calibrate(policy: Policy, budget: float) -> int:
    """Passes over the keys that take about `budget` seconds (at least 1, at most 200)."""
    start = time.perf_counter()
    for key in KEYS:
        policy.pick(key)
    once = max(time.perf_counter() - start, 1e-6)
    return max(1, min(200, int(budget / once)))


def feed_latencies(policy: Policy, targets: list[BenchTarget]) -> None:
    rng = random.Random(2)
    for t in targets:
        policy.on_finish(t, rng.uniform(0.0005, 0.005), True)


def run(quick: bool) -> dict[str, object]:
    budget = 0.02 if quick else 0.1
    rows: dict[str, dict[str, float]] = {}
    for name, factory in POLICIES.items():
        row: dict[str, float] = {}
        for n in SIZES:
            targets = make_targets(n)
            policy = factory()
            policy.update(targets)
            feed_latencies(policy, targets)
            row[str(n)] = round(time_picks(policy, calibrate(policy, budget)) * 1e9, 1)
        rows[name] = row
    builds: dict[str, float] = {}
    for n in SIZES:
        targets = make_targets(n)
        best = float("inf")
        for _ in range(1 if quick else 3):
            start = time.perf_counter()
            build_table([t.address for t in targets], [t.weight for t in targets], 65537)
            best = min(best, time.perf_counter() - start)
        builds[str(n)] = round(best * 1e3, 1)
    return {
        "unit": "ns per pick",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "picks": rows,
        "maglev_build_ms": builds,
    }


def markdown(result: dict[str, object]) -> str:
    picks: dict[str, dict[str, float]] = result["picks"]  # type: ignore[assignment]
    builds: dict[str, float] = result["maglev_build_ms"]  # type: ignore[assignment]
    lines = [
        f"Policy pick cost (Python {result['python']}, {result['machine']})",
        "",
        "| policy | ns/pick, 4 targets | ns/pick, 64 targets |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {row['4']:.0f} | {row['64']:.0f} |" for name, row in picks.items()]
    lines += [
        "",
        "| Maglev table build (M = 65537) | 4 targets | 64 targets |",
        "|---|---:|---:|",
        f"| ms per build | {builds['4']:.1f} | {builds['64']:.1f} |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="shorter runs (a smoke test)")
    args = parser.parse_args(argv)
    result = run(args.quick)
    save_results("policies", result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
