"""Balancing algorithms, picked per service by name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from balancer.core.policies.base import Policy, Target
from balancer.core.policies.consistent_hash import ConsistentHash
from balancer.core.policies.least_connections import LeastConnections
from balancer.core.policies.peak_ewma import PeakEwma
from balancer.core.policies.power_of_two import PowerOfTwo
from balancer.core.policies.round_robin import RoundRobin
from balancer.core.policies.weighted_random import WeightedRandom
from balancer.core.policies.weighted_round_robin import WeightedRoundRobin

if TYPE_CHECKING:
    from balancer.config.model import ServiceConfig

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


def check_policy_options(algorithm: str, options: Mapping[str, float]) -> None:
    """Raise ValueError if `options` has a key `algorithm` does not take, or a bad value."""
    POLICIES[algorithm].check_options(options)


def make_policy(service: ServiceConfig) -> Policy:
    """A new policy for `service.algorithm` (the name is validated by the config loader).

    Raises ValueError, naming the option, when `service.policy_options` does not suit it.
    """
    cls = POLICIES[service.algorithm]
    cls.check_options(service.policy_options)
    return cls.from_service(service)


__all__ = [
    "POLICIES",
    "ConsistentHash",
    "LeastConnections",
    "PeakEwma",
    "Policy",
    "PowerOfTwo",
    "RoundRobin",
    "Target",
    "WeightedRandom",
    "WeightedRoundRobin",
    "check_policy_options",
    "make_policy",
]
