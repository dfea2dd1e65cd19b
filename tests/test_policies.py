"""Balancing policies, without sockets: exact sequences, shares and rules under any churn."""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.config import BackendConfig, ServiceConfig
from balancer.policies import (
    POLICIES,
    ConsistentHash,
    LeastConnections,
    PeakEwma,
    Policy,
    PowerOfTwo,
    RoundRobin,
    Target,
    WeightedRandom,
    WeightedRoundRobin,
    check_policy_options,
    make_policy,
)
from balancer.policies.consistent_hash import build_table, is_prime
from balancer.pool import BackendPool


@dataclass(eq=False)
class FakeTarget:
    address: str
    in_flight: int = 0
    effective_weight: float = 1.0


def targets(n: int, weights: Iterable[float] | None = None) -> list[FakeTarget]:
    ws = list(weights) if weights is not None else [1.0] * n
    return [FakeTarget(f"10.0.0.{i + 1}:7000", 0, w) for i, w in enumerate(ws)]


def picks(policy: Policy, count: int, key: bytes | None = None) -> list[Target]:
    chosen = []
    for _ in range(count):
        target = policy.pick(key)
        assert target is not None, policy
        chosen.append(target)
    return chosen


def names(chosen: Iterable[Target], ts: list[FakeTarget]) -> str:
    letters = {t.address: "abcdefghijklmnopqrstuvwxyz"[i] for i, t in enumerate(ts)}
    return "".join(letters[t.address] for t in chosen)


def service(
    algorithm: str,
    hash_balance_factor: float = 0.0,
    policy_options: dict[str, float] | None = None,
) -> ServiceConfig:
    backends = (BackendConfig("127.0.0.1", 7001), BackendConfig("127.0.0.1", 7002, 3))
    return ServiceConfig(
        "svc",
        "127.0.0.1",
        0,
        backends,
        algorithm=algorithm,
        hash_balance_factor=hash_balance_factor,
        policy_options=policy_options or {},
    )


# -- registry and construction ------------------------------------------------------


def test_registry_names_every_algorithm_by_its_config_name() -> None:
    assert set(POLICIES) == {
        "round_robin",
        "weighted_round_robin",
        "least_connections",
        "random",
        "power_of_two",
        "consistent_hash",
        "peak_ewma",
    }
    for name, cls in POLICIES.items():
        assert cls.name == name


@pytest.mark.parametrize("algorithm", sorted(POLICIES))
def test_make_policy_builds_a_working_policy_over_a_pool(algorithm: str) -> None:
    pool = BackendPool(service(algorithm))
    assert type(pool.policy) is POLICIES[algorithm]
    chosen = {t.address for t in picks(pool.policy, 200, b"127.0.0.1:5555")}
    if algorithm == "consistent_hash":
        assert len(chosen) == 1
    else:
        assert chosen == {"127.0.0.1:7001", "127.0.0.1:7002"}
    first = pool.backends[0]
    pool.mark_down(first, "test")
    assert {pool.pick(b"k") for _ in range(50)} == {pool.backends[1]}
    assert pool.pick(b"k", exclude=[pool.backends[1]]) is None
    assert pool.backends[1].address in repr(pool.policy)
    assert pool.backends[0].address not in repr(pool.policy)


def test_make_policy_passes_the_service_options() -> None:
    policy = make_policy(
        service("consistent_hash", hash_balance_factor=1.5, policy_options={"table_size": 101})
    )
    assert isinstance(policy, ConsistentHash)
    assert policy.table_size == 101
    assert policy.balance_factor == 1.5
    ewma = make_policy(service("peak_ewma", policy_options={"decay": 2.0, "probe": 0.1}))
    assert isinstance(ewma, PeakEwma)
    assert (ewma.decay, ewma.probe_every) == (2.0, 10)


@pytest.mark.parametrize(
    ("algorithm", "options", "message"),
    [
        ("consistent_hash", {"table_size": 100.0}, "prime"),
        ("consistent_hash", {"table_size": 101.5}, "prime"),
        ("consistent_hash", {"decay": 1.0}, "'decay' is not used by consistent_hash"),
        ("round_robin", {"table_size": 101.0}, "it takes: none"),
        ("peak_ewma", {"decay": 0.0}, "'decay': expected a number from 0.01 to 3600 seconds"),
        ("peak_ewma", {"probe": 1.0}, r"'probe': expected 0 \(off\) or a number from 0.001 to 0.5"),
        # bounds that keep a policy from exhausting memory or doing nothing useful
        ("consistent_hash", {"table_size": 1_000_000_007}, "prime number from 2 to 524287"),
        ("consistent_hash", {"table_size": 524_309}, "prime number from 2 to 524287"),
        ("consistent_hash", {"table_size": 1009.0}, "prime number from 2 to 524287"),
        ("consistent_hash", {"table_size": 10**400}, "got an integer of 401 digits"),
        ("peak_ewma", {"probe": 1e-300}, "'probe': expected 0 \\(off\\) or a number"),
        ("peak_ewma", {"decay": 1e300}, "'decay': expected a number from 0.01 to 3600 seconds"),
        ("peak_ewma", {"default_latency": 0.0}, "'default_latency': expected a number from 1e-06"),
        ("peak_ewma", {"default_latency": 1e9}, "'default_latency': expected a number from 1e-06"),
        ("peak_ewma", {"failure_penalty": -1.0}, "'failure_penalty': expected a number from 0"),
        ("peak_ewma", {"failure_penalty": float("nan")}, "'failure_penalty': expected a number"),
        ("peak_ewma", {"decay": True}, "'decay': expected a number from 0.01 to 3600 seconds"),
    ],
)
def test_bad_policy_options_are_refused_with_the_option_named(
    algorithm: str, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        check_policy_options(algorithm, options)
    with pytest.raises(ValueError, match=message):
        make_policy(service(algorithm, policy_options=options))


# -- weighted round-robin --------------------------------------------------------------


def test_wrr_gives_the_nginx_sequence_for_5_1_1() -> None:
    ts = targets(3, [5, 1, 1])
    policy = WeightedRoundRobin()
    policy.update(ts)
    assert names(picks(policy, 14), ts) == "aabacaa" * 2


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=7))
def test_wrr_is_exact_over_a_cycle_and_smooth_in_every_prefix(weights: list[int]) -> None:
    ts = targets(len(weights), weights)
    policy = WeightedRoundRobin()
    policy.update(ts)
    total = sum(weights)
    counts = Counter[str]()
    for k in range(1, 2 * total + 1):
        target = policy.pick()
        assert target is not None
        counts[target.address] += 1
        for t, w in zip(ts, weights, strict=True):
            # Never ahead of its share by a whole pick: count <= ceil(k * w / W).
            assert counts[t.address] * total <= k * w + total - 1, (k, policy)
        if k % total == 0:
            assert [counts[t.address] for t in ts] == [w * k // total for w in weights]


def test_wrr_reads_effective_weight_at_every_pick() -> None:
    ts = targets(2)
    policy = WeightedRoundRobin()
    policy.update(ts)
    ts[1].effective_weight = 0.0  # drained (or not yet ramped up)
    assert set(names(picks(policy, 10), ts)) == {"a"}
    ts[1].effective_weight = 3.0
    after = Counter(names(picks(policy, 40), ts))
    assert 28 <= after["b"] <= 32


# -- least connections -----------------------------------------------------------------

loads = st.lists(
    st.tuples(st.integers(0, 6), st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0])),
    min_size=1,
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(loads, st.data())
def test_least_connections_never_picks_a_busier_target(
    load: list[tuple[int, float]], data: st.DataObject
) -> None:
    ts = [FakeTarget(f"h:{i}", f, w) for i, (f, w) in enumerate(load)]
    policy = LeastConnections()
    policy.update(ts)
    for _ in range(5):
        exclude = data.draw(st.sets(st.sampled_from(ts)))
        usable = [t for t in ts if t.effective_weight > 0 and t not in exclude]
        target = policy.pick(None, exclude)
        if not usable:
            assert target is None
            continue
        assert isinstance(target, FakeTarget)
        assert target in usable
        best = min(t.in_flight / t.effective_weight for t in usable)
        assert target.in_flight / target.effective_weight == best, policy
        target.in_flight += 1


def test_least_connections_rotates_ties() -> None:
    ts = targets(4)
    for t in ts:
        t.in_flight = 2
    policy = LeastConnections()
    policy.update(ts)
    assert sorted(names(picks(policy, 8), ts)) == sorted("abcdabcd")
    assert len(set(names(picks(policy, 4), ts))) == 4


def test_least_connections_breaks_ties_by_weight_and_follows_load() -> None:
    ts = targets(2, [2, 1])
    policy = LeastConnections()
    policy.update(ts)
    assert Counter(names(picks(policy, 30), ts)) == {"a": 20, "b": 10}
    ts[0].in_flight = 5  # 5/2 > 0/1
    assert set(names(picks(policy, 5), ts)) == {"b"}


# -- random and power of two -------------------------------------------------------------


def test_weighted_random_follows_the_weights() -> None:
    ts = targets(3, [1, 2, 5])
    policy = WeightedRandom(random.Random(3))
    policy.update(ts)
    counts = Counter(names(picks(policy, 16000), ts))
    for letter, share in zip("abc", (1 / 8, 2 / 8, 5 / 8), strict=True):
        assert abs(counts[letter] / 16000 - share) < 0.02, counts


@settings(max_examples=100, deadline=None)
@given(loads, st.integers(0, 2**32))
def test_power_of_two_never_picks_the_busier_of_its_pair(
    load: list[tuple[int, float]], seed: int
) -> None:
    ts = [FakeTarget(f"h:{i}", f, w) for i, (f, w) in enumerate(load)]
    policy = PowerOfTwo(random.Random(seed))
    policy.update(ts)
    for _ in range(20):
        target = policy.pick()
        usable = [t for t in ts if t.effective_weight > 0]
        if not usable:
            assert target is None
            continue
        assert target is not None
        assert policy.last_pair is not None
        a, b = policy.last_pair
        assert target in (a, b)
        assert a in usable
        assert b in usable
        assert (a is b) == (len(usable) == 1)
        other = b if target is a else a
        assert target.in_flight / target.effective_weight <= (
            other.in_flight / other.effective_weight
        ), policy


def test_power_of_two_gives_every_target_picks_and_spares_the_busiest() -> None:
    ts = targets(5)
    policy = PowerOfTwo(random.Random(11))
    policy.update(ts)
    counts = Counter(names(picks(policy, 1000), ts))
    assert set(counts) == set("abcde")
    assert min(counts.values()) > 100
    ts[2].in_flight = 4
    assert "c" not in names(picks(policy, 500), ts)


# -- consistent hash (Maglev) ------------------------------------------------------------


def key_set(count: int) -> list[bytes]:
    return [f"192.168.{i // 250}.{i % 250}:{40000 + i}".encode() for i in range(count)]


def test_is_prime() -> None:
    assert [n for n in range(30) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]
    assert is_prime(65537)
    assert not is_prime(65535)


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_maglev_gives_every_target_its_share_of_the_table(n: int) -> None:
    table = build_table([t.address for t in targets(n)], [1.0] * n, 65537)
    counts = Counter(table)
    assert len(counts) == n
    for count in counts.values():
        assert abs(count / 65537 - 1 / n) < 0.01


def test_weighted_maglev_shares_follow_the_weights() -> None:
    weights = [5.0, 1.0, 1.0, 3.0]
    table = build_table([t.address for t in targets(4)], weights, 65537)
    counts = Counter(table)
    for i, w in enumerate(weights):
        assert abs(counts[i] / 65537 - w / 10) < 0.01


@pytest.mark.parametrize("n", [4, 8])
def test_maglev_removing_one_target_moves_only_about_its_keys(n: int) -> None:
    ts = targets(n)
    policy = ConsistentHash()
    policy.update(ts)
    keys = key_set(20000)
    before = [policy.pick(k) for k in keys]
    gone = ts[n // 2]
    policy.update([t for t in ts if t is not gone])
    after = [policy.pick(k) for k in keys]
    moved = sum(1 for a, b in zip(before, after, strict=True) if a is not b)
    moved_elsewhere = sum(
        1 for a, b in zip(before, after, strict=True) if a is not b and a is not gone
    )
    assert gone not in after
    assert moved / len(keys) <= 1 / n + 0.01
    assert moved_elsewhere / len(keys) <= 0.01
    rebuilds = policy.rebuilds
    policy.update(ts)
    assert [policy.pick(k) for k in keys] == before
    assert policy.rebuilds == rebuilds + 1


def test_maglev_keeps_keys_and_table_while_the_set_is_stable() -> None:
    ts = targets(5)
    policy = ConsistentHash(table_size=1009)
    policy.update(ts)
    first = {k: policy.pick(k) for k in key_set(300)}
    assert len(set(first.values())) == 5
    rebuilds = policy.rebuilds
    policy.update(list(reversed(ts)))  # same set, other order
    for t in ts:
        t.in_flight = 3
    assert {k: policy.pick(k) for k in key_set(300)} == first
    assert policy.rebuilds == rebuilds


def test_maglev_retry_goes_to_another_target_deterministically() -> None:
    ts = targets(4)
    policy = ConsistentHash(table_size=1009)
    policy.update(ts)
    key = b"10.1.2.3:5555"
    home = policy.pick(key)
    assert home is not None
    second = policy.pick(key, exclude=[home])
    assert second is not None
    assert second is not home
    assert policy.pick(key, exclude=[home]) is second
    assert policy.pick(key, exclude=ts) is None


def test_maglev_bounded_load_skips_an_overloaded_target() -> None:
    ts = targets(4)
    policy = ConsistentHash(table_size=1009, balance_factor=1.25)
    policy.update(ts)
    key = b"10.9.9.9:4444"
    home = policy.pick(key)
    assert isinstance(home, FakeTarget)
    assert policy.pick(key) is home
    home.in_flight = 10
    # cap = ceil(1.25 * (10 + 1) / 4) = 4: home is over it.
    spill = policy.pick(key)
    assert spill is not None
    assert spill is not home
    assert policy.pick(key) is spill
    for t in ts:
        t.in_flight = 3  # cap = ceil(1.25 * 13 / 4) = 5: home fits again
    assert policy.pick(key) is home


def test_maglev_bounded_load_spreads_one_hot_key() -> None:
    ts = targets(4)
    policy = ConsistentHash(table_size=1009, balance_factor=1.25)
    policy.update(ts)
    for _ in range(200):
        target = policy.pick(b"hot")
        assert target is not None
        assert isinstance(target, FakeTarget)
        target.in_flight += 1
    assert max(t.in_flight for t in ts) <= math.ceil(1.25 * 200 / 4)


# -- peak EWMA -------------------------------------------------------------------------


class SimClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Simulation:
    """Requests arriving every `interval` seconds; each holds its target for its latency."""

    policy: PeakEwma
    clock: SimClock
    latency: dict[str, float]
    interval: float = 0.00025
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    def __post_init__(self) -> None:
        self.pending: list[tuple[float, int, FakeTarget, float]] = []
        self.seq = itertools.count()

    def run(self, count: int) -> Counter[str]:
        counts = Counter[str]()
        for _ in range(count):
            self.clock.now += self.interval
            while self.pending and self.pending[0][0] <= self.clock.now:
                _, _, done, took = heapq.heappop(self.pending)
                done.in_flight -= 1
                self.policy.on_finish(done, took, True)
            target = self.policy.pick()
            assert isinstance(target, FakeTarget)
            target.in_flight += 1
            counts[target.address] += 1
            took = self.latency[target.address] * self.rng.uniform(0.8, 1.2)
            heapq.heappush(self.pending, (self.clock.now + took, next(self.seq), target, took))
        return counts


def test_peak_ewma_avoids_a_slow_target_without_starving_it_and_lets_it_recover() -> None:
    ts = targets(4)
    clock = SimClock()
    policy = PeakEwma(decay=1.0, rng=random.Random(5), clock=clock)
    policy.update(ts)
    slow = ts[0].address
    sim = Simulation(policy, clock, {t.address: 0.001 for t in ts} | {slow: 0.020})
    counts = sim.run(10000)
    assert 0.01 <= counts[slow] / 10000 <= 0.05, (counts, policy)
    for t in ts[1:]:
        assert counts[t.address] > 3000
    sim.latency[slow] = 0.001  # recovered
    sim.run(20000)
    counts = sim.run(5000)
    assert counts[slow] / 5000 >= 0.18, (counts, policy)


def test_peak_ewma_samples_jump_up_and_decay_down() -> None:
    clock = SimClock()
    policy = PeakEwma(decay=10.0, default_latency=0.001, failure_penalty=0.5, clock=clock)
    (t,) = targets(1)
    policy.update([t])
    assert policy.estimate(t) == 0.001
    policy.on_finish(t, 0.0002, True)
    assert policy.estimate(t) == 0.0002  # the first sample replaces the default
    clock.now = 1.0
    policy.on_finish(t, 0.05, True)
    assert policy.estimate(t) == 0.05  # peak
    clock.now = 11.0
    policy.on_finish(t, 0.01, True)
    assert policy.estimate(t) == pytest.approx(0.01 + 0.04 * math.exp(-1))
    clock.now = 12.0
    policy.on_finish(t, 0.001, False)
    assert policy.estimate(t) == 0.5  # a failure counts as the penalty latency


def test_peak_ewma_restarts_a_target_that_comes_back() -> None:
    ts = targets(2)
    policy = PeakEwma(clock=SimClock())
    policy.update(ts)
    policy.on_finish(ts[0], 0.3, True)
    policy.update(ts[1:])
    policy.on_finish(ts[0], 0.9, True)  # a late reply from the departed target is ignored
    assert policy.estimate(ts[0]) is None
    policy.update(ts)
    assert policy.estimate(ts[0]) == policy.default_latency


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(0.0001, 5.0), min_size=2, max_size=6),
    st.lists(st.integers(0, 5), min_size=6, max_size=6),
    st.integers(0, 2**32),
)
def test_peak_ewma_picks_every_target_within_n_over_probe_picks(
    latencies: list[float], in_flight: list[int], seed: int
) -> None:
    ts = targets(len(latencies))
    clock = SimClock()
    policy = PeakEwma(probe=0.05, rng=random.Random(seed), clock=clock)
    policy.update(ts)
    for t, latency, busy in zip(ts, latencies, in_flight, strict=False):
        policy.on_finish(t, latency, True)
        t.in_flight = busy
    window = len(ts) * policy.probe_every
    chosen = picks(policy, 3 * window)
    for start in range(0, 2 * window, 7):
        assert {t.address for t in chosen[start : start + window]} == {t.address for t in ts}


# -- every policy, under any churn -----------------------------------------------------

FACTORIES: dict[str, Callable[[], Policy]] = {
    "round_robin": RoundRobin,
    "weighted_round_robin": WeightedRoundRobin,
    "least_connections": LeastConnections,
    "random": lambda: WeightedRandom(random.Random(1)),
    "power_of_two": lambda: PowerOfTwo(random.Random(2)),
    "consistent_hash": lambda: ConsistentHash(table_size=101),
    "consistent_hash_bounded": lambda: ConsistentHash(table_size=101, balance_factor=1.25),
    "peak_ewma": lambda: PeakEwma(probe=0.1, rng=random.Random(3), clock=SimClock()),
}

UNIVERSE = 7


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_a_drained_or_excluded_target_is_never_picked(kind: str) -> None:
    ts = targets(3)
    policy = FACTORIES[kind]()
    policy.update(ts)
    keys = [None, *key_set(40)]
    for key in keys[:5]:
        policy.pick(key)
    ts[1].effective_weight = 0.0
    chosen = {policy.pick(key) for key in keys for _ in range(3)}
    assert ts[1] not in chosen
    assert {policy.pick(key, exclude=[ts[0]]) for key in keys} == {ts[2]}
    assert policy.pick(b"k", exclude=[ts[0], ts[2]]) is None
    policy.update([])
    assert policy.pick(b"k") is None


operation = st.one_of(
    st.tuples(st.just("update"), st.lists(st.integers(0, UNIVERSE - 1), unique=True)),
    st.tuples(
        st.just("pick"),
        st.one_of(st.none(), st.binary(max_size=8)),
        st.sets(st.integers(0, UNIVERSE - 1)),
    ),
    st.tuples(
        st.just("load"),
        st.integers(0, UNIVERSE - 1),
        st.integers(0, 9),
        st.sampled_from([0.0, 0.01, 0.5, 1.0, 4.0]),
    ),
    st.tuples(
        st.just("finish"),
        st.integers(0, UNIVERSE - 1),
        st.floats(0.0, 2.0),
        st.booleans(),
    ),
)


@pytest.mark.parametrize("kind", sorted(FACTORIES))
@settings(max_examples=150, deadline=None)
@given(ops=st.lists(operation, max_size=60))
def test_every_policy_obeys_the_rules_under_churn(kind: str, ops: list[tuple[object, ...]]) -> None:
    universe = [FakeTarget(f"10.1.0.{i}:80", 0, 1.0) for i in range(UNIVERSE)]
    policy = FACTORIES[kind]()
    current: list[FakeTarget] = []
    for op in ops:
        match op:
            case ("update", list(indices)):
                current = [universe[i] for i in indices]
                policy.update(current)
            case ("pick", bytes() | None as key, set(excluded)):
                exclude = [universe[i] for i in excluded]
                target = policy.pick(key, exclude)
                allowed = [t for t in current if t.effective_weight > 0 and t not in exclude]
                if allowed:
                    assert target is not None, policy
                    assert any(target is t for t in allowed), (target, policy)
                    policy.on_start(target)
                else:
                    assert target is None, policy
            case ("load", int(i), int(busy), float(weight)):
                universe[i].in_flight = busy
                universe[i].effective_weight = weight
            case ("finish", int(i), float(latency), bool(ok)):
                policy.on_finish(universe[i], latency, ok)
    text = repr(policy)
    for t in current:
        assert t.address in text
