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
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, Self

from balancer.config.bounds import Bound, as_number, is_integer, show_value

if TYPE_CHECKING:
    from balancer.config.model import ServiceConfig


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


@dataclass(frozen=True)
class PolicyOption:
    """One number a policy reads from `ServiceConfig.policy_options`."""

    default: float
    bound: Bound
    integer: bool = False
    doc: str = ""


class Policy(ABC):
    """Chooses a target among the eligible ones."""

    name: ClassVar[str]
    options: ClassVar[Mapping[str, PolicyOption]] = {}
    """The options this policy reads from `ServiceConfig.policy_options`, with their bounds."""

    def __init__(self) -> None:
        self.targets: list[Target] = []

    @classmethod
    def from_service(cls, service: ServiceConfig) -> Self:
        """A policy configured from `service` (options already checked by `check_options`)."""
        return cls()

    @classmethod
    def option_error(cls, key: str, value: object) -> str | None:
        """What is wrong with `value` for option `key` ("expected ..., got ..."), or None."""
        spec = cls.options.get(key)
        if spec is None:
            known = ", ".join(sorted(cls.options)) or "none"
            return f"not used by {cls.name} (it takes: {known})"
        number = as_number(value)
        if number is not None and spec.bound.admits(number):
            if is_integer(value) or not spec.integer:
                return None
        return f"expected {spec.bound.expected(spec.integer)}, got {show_value(value)}"

    @classmethod
    def check_options(cls, options: Mapping[str, object]) -> None:
        """Raise ValueError naming the first unknown or out-of-range option."""
        for key, value in options.items():
            problem = cls.option_error(key, value)
            if problem is None:
                continue
            if key not in cls.options:
                raise ValueError(f"policy option {key!r} is {problem}")
            raise ValueError(f"policy option {key!r}: {problem}")

    @classmethod
    def option(cls, options: Mapping[str, float], key: str) -> float:
        """`options[key]`, or the option's default (options already checked)."""
        return float(options.get(key, cls.options[key].default))

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
