"""Balancing algorithms, picked per service by name.

The names and the options each takes are data in `balancer.config.policies`;
here are the implementations, each built from those options once checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from balancer.core.policies.base import Policy, Target
from balancer.core.policies.consistent_hash import ConsistentHash
from balancer.core.policies.least_connections import LeastConnections
from balancer.core.policies.peak_ewma import PeakEwma
from balancer.core.policies.power_of_two import PowerOfTwo
from balancer.core.policies.round_robin import RoundRobin
from balancer.core.policies.weighted_random import WeightedRandom
from balancer.core.policies.weighted_round_robin import WeightedRoundRobin

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        RoundRobin,
        WeightedRoundRobin,
        LeastConnections,
        WeightedRandom,
        PowerOfTwo,
        ConsistentHash,
        PeakEwma,
    )
}


class PolicySettings(Protocol):
    """What a policy is built from (a service's config has these)."""

    @property
    def algorithm(self) -> str: ...

    @property
    def policy_options(self) -> Mapping[str, float]: ...

    @property
    def hash_balance_factor(self) -> float: ...


def make_policy(settings: PolicySettings) -> Policy:
    """A new policy for `settings.algorithm` (the name is validated by the config loader).

    Raises ValueError, naming the option, when `settings.policy_options` does not suit it.
    """
    cls = POLICIES[settings.algorithm]
    return cls.from_options(settings.policy_options, settings.hash_balance_factor)


__all__ = [
    "POLICIES",
    "ConsistentHash",
    "LeastConnections",
    "PeakEwma",
    "Policy",
    "PolicySettings",
    "PowerOfTwo",
    "RoundRobin",
    "Target",
    "WeightedRandom",
    "WeightedRoundRobin",
    "make_policy",
]
