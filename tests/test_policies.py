"""Balancing policies, without sockets: exact sequences, shares and rules under any churn."""

from __future__ import annotations

import heapq
import inspect
import itertools
import math
import random
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.config.model import BackendConfig, ServiceConfig
from balancer.config.policies import ALGORITHMS, check_policy_options, is_prime
from balancer.core.policies import (
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
    make_policy,
)
from balancer.core.policies.consistent_hash import build_table
from balancer.core.pool import BackendPool


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


def test_the_catalogue_and_the_implementations_name_the_same_algorithms_and_options() -> None:
    """`config.policies.ALGORITHMS` (what the loader accepts) matches what core implements.

    Each option is a keyword of the implementation's constructor, with the catalogue's default.
    """
    assert list(ALGORITHMS) == list(POLICIES)
    not_options = {"self", "rng", "clock", "balance_factor"}
    for name, cls in POLICIES.items():
        parameters = inspect.signature(cls.__init__).parameters
        defaults = {p: v.default for p, v in parameters.items() if p not in not_options}
        options = ALGORITHMS[name].options
        assert defaults == {key: spec.default for key, spec in options.items()}, name
        built = make_policy(service(name))
        for key, spec in options.items():
            assert getattr(built, key) == spec.default, (name, key)


def test_only_the_weight_aware_algorithms_take_slow_start() -> None:
    """`weighted` in the catalogue: the algorithms whose picks follow the effective weight."""
    weighted = {name for name, algorithm in ALGORITHMS.items() if algorithm.weighted}
    assert weighted == set(POLICIES) - {"round_robin", "consistent_hash"}


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


# -- details a user or an operator sees ----------------------------------------------------
#
# Found by mutation testing (scripts/mutation): each test below pins a behaviour that the
# tests above let change unnoticed.


class ScriptedRandom(random.Random):
    """A random source that returns the given numbers, in turn."""

    def __init__(self, *values: float) -> None:
        super().__init__(0)
        self.values = list(values)
        self.at = 0

    def random(self) -> float:
        value = self.values[self.at % len(self.values)]
        self.at += 1
        return value


@dataclass(eq=False)
class ConfiguredTarget(FakeTarget):
    """A target with a configured weight apart from its effective (ramped) one."""

    weight: int = 1


def test_every_policy_explains_its_state_in_its_repr() -> None:
    ts = targets(3, [1, 2, 1])
    ts[0].in_flight = 4
    addresses = "10.0.0.1:7000, 10.0.0.2:7000, 10.0.0.3:7000"
    rr = RoundRobin()
    rr.update(ts)
    rr.pick()
    assert repr(rr) == f"<RoundRobin 3 targets, next #1: {addresses}>"
    wrr = WeightedRoundRobin()
    wrr.update(ts)
    wrr.pick()
    assert repr(wrr) == (
        "<WeightedRoundRobin 3 targets: 10.0.0.1:7000 w=1 cw=1, 10.0.0.2:7000 w=2 cw=-2, "
        "10.0.0.3:7000 w=1 cw=1>"
    )
    loads = "10.0.0.1:7000 4/1, 10.0.0.2:7000 0/2, 10.0.0.3:7000 0/1"
    lc = LeastConnections()
    lc.update(ts)
    assert repr(lc) == f"<LeastConnections 3 targets (in flight/weight): {loads}>"
    p2 = PowerOfTwo(ScriptedRandom(0.0, 0.5))
    p2.update(ts)
    assert repr(p2) == f"<PowerOfTwo 3 targets (in flight/weight): {loads}>"
    p2.pick()
    assert repr(p2) == (
        f"<PowerOfTwo 3 targets (in flight/weight): {loads}"
        " | last pair 10.0.0.1:7000 vs 10.0.0.3:7000>"
    )
    wr = WeightedRandom()
    wr.update(ts)
    assert repr(wr) == (
        "<WeightedRandom 3 targets: 10.0.0.1:7000 w=1, 10.0.0.2:7000 w=2, 10.0.0.3:7000 w=1>"
    )
    ch = ConsistentHash(table_size=7, balance_factor=1.5)
    ch.update(ts)
    assert repr(ch) == (
        "<ConsistentHash maglev M=7, balance factor 1.5, 3 targets: "
        "10.0.0.1:7000 2 slots 4 in flight, 10.0.0.2:7000 3 slots 0 in flight, "
        "10.0.0.3:7000 2 slots 0 in flight>"
    )
    ch = ConsistentHash(table_size=7)
    ch.update(ts[1:])
    assert repr(ch).startswith("<ConsistentHash maglev M=7, 2 targets: ")
    ewma = PeakEwma(clock=lambda: 0.0, probe=0)
    ewma.update(ts)
    ewma.on_finish(ts[0], 0.002, True)
    ewma.on_finish(ts[0], 0.003, True)
    ewma.pick()
    assert repr(ewma) == (
        "<PeakEwma 3 targets, pick #1: 10.0.0.1:7000 3ms x5 w=1 (2 samples), "
        "10.0.0.2:7000 1ms x1 w=2 (0 samples), 10.0.0.3:7000 1ms x1 w=1 (0 samples)>"
    )
    base = Policy.__repr__(rr)
    assert base == f"<RoundRobin 3 targets: {addresses}>"


def test_option_bounds_are_inclusive_at_both_ends() -> None:
    check_policy_options("peak_ewma", {"failure_penalty": 0.0, "probe": 0.0})  # 0 = off
    check_policy_options("peak_ewma", {"default_latency": 1e-6, "decay": 0.01, "probe": 0.5})
    check_policy_options("peak_ewma", {"failure_penalty": 3600.0, "decay": 3600.0})
    check_policy_options("consistent_hash", {"table_size": 2})  # the smallest prime
    with pytest.raises(ValueError, match=r"'table_size': expected a prime number .*got 2.0"):
        check_policy_options("consistent_hash", {"table_size": 2.0})  # an integer, not a float
    with pytest.raises(ValueError, match=r"'failure_penalty': expected a number from 0 to 3600"):
        check_policy_options("peak_ewma", {"failure_penalty": -1.0})
    with pytest.raises(ValueError, match=r"'default_latency': expected a number from 1e-06 to 60"):
        check_policy_options("peak_ewma", {"default_latency": 0.0})
    with pytest.raises(ValueError, match=r"'decay': expected a number from 0.01 to 3600 .*inf"):
        check_policy_options("peak_ewma", {"decay": math.inf})
    with pytest.raises(ValueError, match=r"'probe': expected 0 \(off\) or a number .*nan"):
        check_policy_options("peak_ewma", {"probe": math.nan})
    with pytest.raises(ValueError, match=r"'probe': expected 0 \(off\) or a number .*0.0005"):
        check_policy_options("peak_ewma", {"probe": 0.0005})
    with pytest.raises(ValueError, match=r"'table_size': expected a prime number from 2 to"):
        check_policy_options("consistent_hash", {"table_size": 1})
    with pytest.raises(
        ValueError, match=r"it takes: decay, default_latency, failure_penalty, probe"
    ):
        check_policy_options("peak_ewma", {"table_size": 101.0})


def test_peak_ewma_defaults_are_the_documented_ones_and_every_option_is_passed() -> None:
    ewma = PeakEwma()
    assert (ewma.decay, ewma.default_latency, ewma.failure_penalty, ewma.probe) == (
        10.0,
        0.001,
        0.5,
        0.02,
    )
    assert ewma.probe_every == 50  # docs/behaviour.md: one pick in 50
    configured = make_policy(service("peak_ewma"))
    assert isinstance(configured, PeakEwma)
    assert (configured.decay, configured.default_latency, configured.failure_penalty) == (
        10.0,
        0.001,
        0.5,
    )
    options = {"decay": 2.0, "default_latency": 0.004, "failure_penalty": 1.5, "probe": 0.25}
    configured = make_policy(service("peak_ewma", policy_options=options))
    assert isinstance(configured, PeakEwma)
    assert (configured.default_latency, configured.failure_penalty, configured.probe) == (
        0.004,
        1.5,
        0.25,
    )
    assert configured.probe_every == 4


def test_peak_ewma_without_probes_never_sends_to_a_target_that_is_always_costlier() -> None:
    ts = targets(3)
    policy = PeakEwma(probe=0.0, rng=random.Random(9), clock=SimClock())
    policy.update(ts)
    assert policy.probe_every == 0
    policy.on_finish(ts[1], 0.5, True)
    chosen = Counter(names(picks(policy, 300), ts))
    assert "b" not in chosen
    assert chosen["a"] > 100
    assert chosen["c"] > 100


def test_peak_ewma_probes_the_target_that_waited_longest_on_schedule() -> None:
    ts = targets(3)
    policy = PeakEwma(probe=0.5, rng=ScriptedRandom(0.0, 0.0), clock=SimClock())
    policy.update(ts)
    policy.on_finish(ts[1], 0.5, True)
    policy.on_finish(ts[2], 0.5, True)
    # pick 1 compares a and b: a is cheaper; pick 2 is a probe: the first never picked (b)
    assert names(picks(policy, 2), ts) == "ab"
    # pick 3 is a and b again; pick 4 probes the longest waiting, c (never picked)
    assert names(picks(policy, 2), ts) == "ac"


def test_peak_ewma_keeps_estimates_while_the_set_is_stable_and_takes_a_zero_sample() -> None:
    ts = targets(2)
    clock = SimClock()
    policy = PeakEwma(clock=clock)
    policy.update(ts)
    policy.on_finish(ts[0], 0.0, True)
    assert policy.estimate(ts[0]) == 0.0  # a reply faster than the clock's resolution
    policy.on_finish(ts[1], 0.2, True)
    policy.update(list(ts))
    assert policy.estimate(ts[1]) == 0.2
    policy.on_finish(ts[1], -1.0, True)  # a clock step backwards is not a sample
    assert policy.estimate(ts[1]) == 0.2


def test_peak_ewma_cost_is_latency_times_load_over_weight() -> None:
    ts = targets(2, [1, 4])
    policy = PeakEwma(probe=0.0, rng=random.Random(4), clock=SimClock())
    policy.update(ts)
    # equal latency, nothing in flight: the heavier target is cheaper (1 ms / 4 < 1 ms / 1)
    assert set(names(picks(policy, 40), ts)) == {"b"}
    ts = targets(2)
    policy = PeakEwma(probe=0.0, rng=random.Random(4), clock=SimClock())
    policy.update(ts)
    policy.on_finish(ts[0], 0.0016, True)
    policy.on_finish(ts[1], 0.0010, True)
    ts[1].in_flight = 1
    # a: 1.6 ms x (0 + 1) = 1.6; b: 1.0 ms x (1 + 1) = 2.0: a wins, whichever is drawn first
    assert set(names(picks(policy, 40), ts)) == {"a"}
    ts[0].in_flight = 1
    # a: 1.6 x 2 = 3.2; b: 2.0
    assert set(names(picks(policy, 40), ts)) == {"b"}


def test_peak_ewma_ties_go_to_the_heavier_target_then_to_the_first_drawn() -> None:
    ts = targets(2, [1, 1])
    first_then_second = ScriptedRandom(0.0, 0.0)  # draws a, then b
    policy = PeakEwma(probe=0.0, rng=first_then_second, clock=SimClock())
    policy.update(ts)
    assert names(picks(policy, 3), ts) == "aaa"
    ts = targets(2, [1, 2])
    policy = PeakEwma(probe=0.0, rng=ScriptedRandom(0.0, 0.0), clock=SimClock())
    policy.update(ts)
    policy.on_finish(ts[0], 0.001, True)
    policy.on_finish(ts[1], 0.002, True)  # cost 2 ms / 2 == 1 ms / 1: a tie, b is heavier
    assert names(picks(policy, 3), ts) == "bbb"
    ts = targets(2, [1, 2])
    policy = PeakEwma(probe=0.0, rng=ScriptedRandom(0.0, 0.0), clock=SimClock())
    policy.update(ts)
    policy.on_finish(ts[0], 0.001, True)
    policy.on_finish(ts[1], 0.004, True)  # b heavier but costlier: a
    assert names(picks(policy, 3), ts) == "aaa"


def test_peak_ewma_with_one_target_excluded_still_compares_the_other_two() -> None:
    ts = targets(3)
    policy = PeakEwma(probe=0.0, rng=random.Random(12), clock=SimClock())
    policy.update(ts)
    policy.on_finish(ts[1], 0.5, True)  # b is costly, c is cheap
    chosen = {policy.pick(None, exclude=[ts[0]]) for _ in range(60)}
    assert chosen == {ts[2]}


@pytest.mark.parametrize("kind", ["power_of_two", "peak_ewma"])
def test_two_choices_draw_every_pair_of_distinct_targets_equally(kind: str) -> None:
    n = 5
    pairs: Counter[tuple[int, int]] = Counter()
    for i in range(n):
        for k in range(n - 1):
            rng = ScriptedRandom((i + 0.5) / n, (k + 0.5) / (n - 1))
            policy: PowerOfTwo | PeakEwma
            if kind == "power_of_two":
                policy = PowerOfTwo(rng)
                ts = targets(n)
                policy.update(ts)
                a, b = policy._draw(list(ts))
                pairs[(ts.index(a), ts.index(b))] += 1  # type: ignore[arg-type]
            else:
                policy = PeakEwma(probe=0.0, rng=rng, clock=SimClock())
                policy.update(targets(n))
                pairs[policy._draw(n)] += 1
    assert pairs == Counter({(i, j): 1 for i in range(n) for j in range(n) if i != j})


def test_power_of_two_ties_go_to_either_in_proportion_to_the_weights() -> None:
    ts = targets(2, [1, 2])
    policy = PowerOfTwo(random.Random(21))
    policy.update(ts)
    counts = Counter(names(picks(policy, 4000), ts))
    assert abs(counts["b"] / 4000 - 2 / 3) < 0.03, counts


def test_weighted_random_draw_rounded_up_to_the_total_takes_the_last_usable_target() -> None:
    ts = targets(4, [1, 2, 0, 0])
    policy = WeightedRandom(ScriptedRandom(1.0))
    policy.update(ts)
    assert policy.pick() is ts[1]
    ts = targets(4, [1, 0, 2, 0])
    policy = WeightedRandom(ScriptedRandom(1.0))
    policy.update(ts)
    assert policy.pick() is ts[2]
    assert policy.pick(exclude=[ts[2]]) is ts[0]


def test_weighted_round_robin_keeps_its_place_in_the_cycle_across_set_changes() -> None:
    ts = targets(4, [5, 1, 1, 2])
    policy = WeightedRoundRobin()
    policy.update(ts[:3])
    assert names(picks(policy, 3), ts) == "aab"
    policy.update(ts[:3])  # the same set: the cycle goes on where it was
    assert names(picks(policy, 4), ts) == "acaa"
    policy.update(ts[:3])
    assert names(picks(policy, 3), ts) == "aab"
    policy.update(ts)  # d joins at a current weight of 0; the others keep theirs
    assert "cw=1, 10.0.0.2:7000 w=1 cw=-4, 10.0.0.3:7000 w=1 cw=3, 10.0.0.4:7000 w=2 cw=0>" in (
        repr(policy)
    )
    assert names(picks(policy, 9), ts) == "acadaadab"
    again = WeightedRoundRobin()
    again.update(ts[:3])
    picks(again, 3)
    again.update(ts[:2])  # c leaves with a current weight of 3: the rest are re-centred on 0
    assert repr(again).endswith("10.0.0.1:7000 w=5 cw=2.5, 10.0.0.2:7000 w=1 cw=-2.5>")
    assert names(picks(again, 6), ts) == "aaaaab"


def test_round_robin_keeps_its_turn_when_the_set_shrinks_and_restarts_when_it_empties() -> None:
    ts = targets(4)
    policy = RoundRobin()
    policy.update(ts)
    assert names(picks(policy, 3), ts) == "abc"
    policy.update(ts[:2])  # the next turn (#3, d) wraps into the smaller set: #1, b
    assert names(picks(policy, 3), ts) == "bab"
    policy.update([])
    policy.update(ts)
    assert names(picks(policy, 2), ts) == "ab"


def test_consistent_hash_tables_are_the_same_in_every_process_and_release() -> None:
    """The table is a pure function of the addresses and weights: a restart, a second balancer
    in front of the same backends, or an upgrade maps every key as before. Changing the hash
    or the fill order breaks that for every client at once, so it is pinned."""
    addresses = ["10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000"]
    table = build_table(addresses, [1.0, 2.0, 1.0], 101)
    assert table[:24] == [1, 1, 1, 2, 0, 0, 0, 1, 1, 1, 1, 0, 2, 2, 2, 2, 0, 2, 2, 0, 1, 1, 1, 0]
    assert zlib.crc32(bytes(table)) == 835767781


def test_consistent_hash_tables_follow_the_configured_weight_not_the_ramp() -> None:
    ts = [ConfiguredTarget(f"10.0.0.{i}:7000", 0, 1.0, weight=w) for i, w in enumerate((1, 3))]
    policy = ConsistentHash(table_size=1009)
    policy.update(ts)
    share = Counter(policy.pick(k) for k in key_set(4000))
    assert abs(share[ts[1]] / 4000 - 0.75) < 0.04, share
    rebuilds = policy.rebuilds
    ts[1].effective_weight = 0.3  # ramping up after a recovery: the table stays
    policy.update(ts)
    assert policy.rebuilds == rebuilds


def test_consistent_hash_rebuilds_when_a_configured_weight_changes() -> None:
    ts = [ConfiguredTarget(f"10.0.0.{i}:7000", 0, 1.0, weight=1) for i in range(2)]
    policy = ConsistentHash(table_size=1009)
    policy.update(ts)
    ts[1].weight = 3
    policy.update(ts)
    assert policy.rebuilds == 2
    share = Counter(policy.pick(k) for k in key_set(4000))
    assert abs(share[ts[1]] / 4000 - 0.75) < 0.04, share


def test_consistent_hash_rebuilds_when_a_target_is_replaced_by_one_of_the_same_weight() -> None:
    ts = targets(3)
    policy = ConsistentHash(table_size=101)
    assert policy.rebuilds == 0
    policy.update(ts[:2])
    assert policy.rebuilds == 1
    policy.update([ts[0], ts[2]])
    assert policy.rebuilds == 2
    assert ts[2] in {policy.pick(k) for k in key_set(200)}


def test_consistent_hash_refuses_a_bad_table_size_or_balance_factor() -> None:
    with pytest.raises(ValueError, match=r"'table_size': expected a prime number .*got 100"):
        ConsistentHash(table_size=100)
    with pytest.raises(ValueError, match=r"expected 0 \(off\) or a number > 1, got 1"):
        ConsistentHash(balance_factor=1.0)
    with pytest.raises(ValueError, match=r"'table_size': expected a prime number .*got 101.5"):
        ConsistentHash.from_options({"table_size": 101.5})
    with pytest.raises(ValueError, match=r"'table_size': expected a prime number from 2 .*got 1"):
        ConsistentHash.from_options({"table_size": 1})
    assert ConsistentHash.from_options({"table_size": 2}).table_size == 2


def test_consistent_hash_bounded_load_cap_counts_the_new_request() -> None:
    ts = targets(4)
    policy = ConsistentHash(table_size=1009, balance_factor=1.25)
    policy.update(ts)
    key = b"10.9.9.9:4444"
    home = policy.pick(key)
    assert isinstance(home, FakeTarget)
    other = next(t for t in ts if t is not home)
    home.in_flight = 1
    other.in_flight = 1
    # cap = ceil(1.25 * (2 + 1) / 4) = 1: home (1 in flight) is full
    assert policy.pick(key) is not home
    other.in_flight = 0
    # cap = ceil(1.25 * (1 + 1) / 4) = 1 still; with the new request not counted it would be 0
    assert policy.pick(key) is not home


def test_consistent_hash_bounded_load_scales_the_cap_by_weight() -> None:
    ts = targets(2, [3, 1])
    policy = ConsistentHash(table_size=101, balance_factor=1.25)
    policy.update(ts)
    key = next(k for k in key_set(100) if policy.pick(k) is ts[0])
    ts[0].in_flight = 2
    # scale = 1.25 * 3 / 4; heavy cap = ceil(0.9375 * 3) = 3 > 2: stays home
    assert policy.pick(key) is ts[0]


def test_consistent_hash_bounded_load_walk_scales_each_cap_by_its_weight() -> None:
    ts = targets(3, [3, 1, 1])
    heavy, light = ts[0], ts[1]
    policy = ConsistentHash(table_size=101, balance_factor=1.25)
    policy.update(ts)
    key = b"192.168.0.1:40001"  # home: light; next in its walk: heavy
    assert policy.pick(key) is light
    assert policy.pick(key, exclude=[light]) is heavy
    heavy.in_flight = 2
    # scale = 1.25 * (2 + 1) / 5 = 0.75: heavy's cap ceil(0.75 * 3) = 3 > 2, it still fits
    # (the third target, with nothing in flight, would be next)
    assert policy.pick(key, exclude=[light]) is heavy


def test_consistent_hash_without_a_bound_ignores_load_when_walking_past_an_excluded_home() -> None:
    ts = targets(4)
    policy = ConsistentHash(table_size=101)
    policy.update(ts)
    key = b"10.1.2.3:5555"
    home = policy.pick(key)
    assert home is not None
    second = policy.pick(key, exclude=[home])
    assert isinstance(second, FakeTarget)
    second.in_flight = 50
    assert policy.pick(key, exclude=[home]) is second


def test_consistent_hash_over_its_bound_everywhere_still_answers() -> None:
    ts = targets(2)
    policy = ConsistentHash(table_size=101, balance_factor=1.25)
    policy.update(ts)
    key = b"k"
    home = policy.pick(key)
    assert home is not None
    other = next(t for t in ts if t is not home)
    other.in_flight = 40  # cap = ceil(1.25 * 41 / 2) = 26: other is over it
    assert policy.pick(key, exclude=[home]) is other  # over the bound beats no answer


def test_consistent_hash_reaches_a_target_whose_weight_rose_after_the_table_was_built() -> None:
    """Found by the churn property: a target without a configured weight whose effective
    weight was 0 when the table was built had no slot, and was never picked, even alone."""
    alone = FakeTarget("10.1.0.2:80", 0, 0.0)
    policy = ConsistentHash(table_size=101)
    policy.update([alone])
    assert policy.pick(None) is None
    alone.effective_weight = 0.01
    assert policy.pick(None) is alone
    assert policy.pick(b"key") is alone
    assert policy.pick(b"key", exclude=[alone]) is None
    other = FakeTarget("10.1.0.3:80", 0, 1.0)
    policy.update([alone, other])
    alone.effective_weight = 0.0
    assert policy.pick(b"key", exclude=[other]) is None
