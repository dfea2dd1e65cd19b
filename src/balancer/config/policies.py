"""The balancing algorithms a service can name, and the options each takes, as data.

The loader checks `algorithm` and `policy_options` against `ALGORITHMS`; the
implementations in `balancer.core.policies` are built from options already
checked here (a test keeps the two naming the same algorithms and options).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from balancer.config.bounds import Bound, as_number, fmt_number, is_integer, show_value

DEFAULT_TABLE_SIZE = 65537
MAX_TABLE_SIZE = 524287
"""The largest Maglev table (a prime, 2**19 - 1): about 100 slots for each of 5,000 backends."""


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


@dataclass(frozen=True)
class PolicyOption:
    """One number an algorithm reads from `policy_options`."""

    default: float
    bound: Bound
    integer: bool = False
    prime: bool = False
    """Only primes within the bound (implies `integer`)."""
    doc: str = ""


@dataclass(frozen=True)
class Algorithm:
    """An algorithm a service can name, with what it takes."""

    name: str
    weighted: bool
    """Picks follow each backend's effective weight (so slow start ramps it up)."""
    options: Mapping[str, PolicyOption] = field(default_factory=dict)
    doc: str = ""

    def option_error(self, key: str, value: object) -> str | None:
        """What is wrong with `value` for option `key` ("expected ..., got ..."), or None."""
        spec = self.options.get(key)
        if spec is None:
            known = ", ".join(sorted(self.options)) or "none"
            return f"not used by {self.name} (it takes: {known})"
        number = as_number(value)
        if spec.prime:
            if number is not None and spec.bound.admits(number) and is_integer(value):
                if is_prime(value):
                    return None
            return (
                f"expected a prime number from {fmt_number(spec.bound.low)} to "
                f"{fmt_number(spec.bound.high)}, got {show_value(value)}"
            )
        if number is not None and spec.bound.admits(number):
            if is_integer(value) or not spec.integer:
                return None
        return f"expected {spec.bound.expected(spec.integer)}, got {show_value(value)}"

    def check_options(self, options: Mapping[str, object]) -> None:
        """Raise ValueError naming the first unknown or out-of-range option."""
        for key, value in options.items():
            problem = self.option_error(key, value)
            if problem is None:
                continue
            if key not in self.options:
                raise ValueError(f"policy option {key!r} is {problem}")
            raise ValueError(f"policy option {key!r}: {problem}")

    def value(self, options: Mapping[str, float], key: str) -> float:
        """`options[key]`, or the option's default (options already checked)."""
        return float(options.get(key, self.options[key].default))


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm(
            "round_robin", weighted=False, doc="the next healthy backend in turn (the tutorial's)"
        ),
        Algorithm(
            "weighted_round_robin",
            weighted=True,
            doc="smooth weighted round-robin as NGINX does it: weights 5,1,1 give a,a,b,a,c,a,a",
        ),
        Algorithm(
            "least_connections",
            weighted=True,
            doc="fewest in-flight requests (connections in tcp mode) per unit of weight",
        ),
        Algorithm("random", weighted=True, doc="weighted random"),
        Algorithm(
            "power_of_two",
            weighted=True,
            doc="two random backends, the less loaded wins (Envoy's least-request)",
        ),
        Algorithm(
            "consistent_hash",
            weighted=False,
            options={
                "table_size": PolicyOption(
                    DEFAULT_TABLE_SIZE,
                    Bound(2, MAX_TABLE_SIZE, unit="slots"),
                    integer=True,
                    prime=True,
                    doc="Maglev lookup table size, a prime",
                )
            },
            doc="Maglev lookup table over `hash_key`; the configured weights, not a ramp",
        ),
        Algorithm(
            "peak_ewma",
            weighted=True,
            options={
                "decay": PolicyOption(
                    10.0,
                    Bound(0.01, 3600, unit="seconds"),
                    doc="time constant of the moving average",
                ),
                "default_latency": PolicyOption(
                    0.001,
                    Bound(1e-6, 60, unit="seconds"),
                    doc="estimate of a target with no sample yet",
                ),
                "failure_penalty": PolicyOption(
                    0.5,
                    Bound(0, 3600, unit="seconds"),
                    doc="least sample a failed request counts as",
                ),
                "probe": PolicyOption(
                    0.02,
                    Bound(0.001, 0.5, off=True),
                    doc="share of picks given to the longest waiting",
                ),
            },
            doc="latency-aware: peak-EWMA of response time x (in-flight + 1), by power of two",
        ),
    )
}
"""Every algorithm, by the name `algorithm` takes, in the order the docs list them."""


def check_policy_options(algorithm: str, options: Mapping[str, object]) -> None:
    """Raise ValueError if `options` has a key `algorithm` does not take, or a bad value."""
    ALGORITHMS[algorithm].check_options(options)


def weighted_names() -> str:
    """The weight-aware algorithms, as a message lists them ("a, b or c")."""
    names = [a.name for a in ALGORITHMS.values() if a.weighted]
    return f"{', '.join(names[:-1])} or {names[-1]}"
