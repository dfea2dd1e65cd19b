"""Round-robin: each pick takes the next eligible target in turn.

How it works: a cursor walks the eligible list. When the list changes the
cursor is kept modulo the new length, so no index is ever out of range.
Excluded targets (a retry must go elsewhere) and drained ones (effective
weight 0) are stepped over, at most one full turn. Weights are otherwise
ignored; `weighted_round_robin` honours them.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from balancer.core.policies.base import Policy, Target


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self) -> None:
        super().__init__()
        self._cursor = 0

    def update(self, targets: Sequence[Target]) -> None:
        super().update(targets)
        n = len(self.targets)
        self._cursor = self._cursor % n if n else 0

    def pick(self, key: bytes | None = None, exclude: Collection[Target] = ()) -> Target | None:
        targets = self.targets
        n = len(targets)
        for _ in range(n):
            target = targets[self._cursor]
            self._cursor += 1
            if self._cursor >= n:
                self._cursor = 0
            if target.effective_weight > 0 and not (exclude and target in exclude):
                return target
        return None

    def __repr__(self) -> str:
        names = ", ".join(t.address for t in self.targets)
        return f"<RoundRobin {len(self.targets)} targets, next #{self._cursor}: {names}>"
