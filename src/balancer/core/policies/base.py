"""The policy interface every balancing algorithm implements.

A policy is pure, synchronous bookkeeping: it is told which targets are
eligible (`update`), asked to choose one (`pick`), and told how a request
went (`on_start` / `on_finish`). It never does I/O; the proxy code does what
the policy decides. Targets are the pool's backend objects, seen through the
small `Target` protocol.

Rules every policy keeps, whatever happened to the eligible set between two
picks: `pick` returns a target of the current set, never one in `exclude`
(a retry must go to a different backend) and never one whose effective
weight is zero or less (drained); it returns None exactly when no target is
left after those rules.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from typing import ClassVar, Protocol, Self

from balancer.config.policies import ALGORITHMS


class Target(Protocol):
    """What a policy may read of a backend."""

    @property
    def address(self) -> str:
        """Stable identity, "host:port"."""
        ...

    @property
    def in_flight(self) -> int:
        """Requests (message mode) or connections (tcp mode) currently held."""
        ...

    @property
    def effective_weight(self) -> float:
        """Configured weight after slow start; 0 means drain (no new work)."""
        ...


def usable(target: Target, exclude: Collection[Target]) -> bool:
    """May `target` take new work: positive effective weight and not excluded."""
    return target.effective_weight > 0 and not (exclude and target in exclude)


class Policy(ABC):
    """Chooses a target among the eligible ones."""

    name: ClassVar[str]
    """The name `algorithm` takes (its options are in `balancer.config.policies.ALGORITHMS`)."""

    def __init__(self) -> None:
        self.targets: list[Target] = []

    @classmethod
    def from_options(cls, options: Mapping[str, float], balance_factor: float = 0.0) -> Self:
        """A policy built from a service's `policy_options` and `hash_balance_factor`.

        Raises ValueError, naming the option, when `options` do not suit it.
        """
        ALGORITHMS[cls.name].check_options(options)
        return cls()

    def update(self, targets: Sequence[Target]) -> None:
        """Replace the eligible set (healthy, weight > 0), in config order."""
        self.targets = list(targets)

    @abstractmethod
    def pick(self, key: bytes | None = None, exclude: Collection[Target] = ()) -> Target | None:
        """Choose a target, never one in `exclude`; None when none is eligible."""

    def on_start(self, target: Target) -> None:  # noqa: B027 - optional hook
        """A request (or connection) was handed to `target`."""

    def on_finish(self, target: Target, latency: float, ok: bool) -> None:  # noqa: B027
        """A request on `target` finished after `latency` seconds."""

    def __repr__(self) -> str:
        names = ", ".join(t.address for t in self.targets)
        return f"<{type(self).__name__} {len(self.targets)} targets: {names}>"
