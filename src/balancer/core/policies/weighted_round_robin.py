"""Smooth weighted round-robin, as NGINX does it.

How it works: every target carries a "current weight", 0 to begin with. On
each pick every usable target adds its effective weight to its current
weight; the target with the highest current weight wins (the first in config
order on a tie) and has the total of the added weights taken off its own.
Over any run of W picks (W the sum of the weights) each target is picked
exactly its weight's number of times, and the picks are spread out rather
than bunched: weights 5, 1, 1 give a a b a c a a. While the set and weights
hold, no target is picked more than ceil(k * w / W) times in the first k.

Effective weights are read at every pick, so slow start and runtime weight
changes apply at once. Targets that are excluded (a retry) or drained
(weight 0) sit the round out, like NGINX's "tried" peers. When the eligible
set changes, targets that stay keep their current weight, new ones start at
0, and the weights are re-centred on 0 so they stay bounded.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

from balancer.core.policies.base import Policy, Target


class SmoothWeights(Policy):
    """Current weights per target and the smooth weighted round-robin step over them."""

    def __init__(self) -> None:
        super().__init__()
        self._current: list[float] = []

    def update(self, targets: Sequence[Target]) -> None:
        kept = {t.address: cw for t, cw in zip(self.targets, self._current, strict=True)}
        super().update(targets)
        current = [kept.get(t.address, 0.0) for t in self.targets]
        if current:
            mean = sum(current) / len(current)
            current = [cw - mean for cw in current]
        self._current = current

    def _smooth_pick(self, indices: Iterable[int], exclude: Collection[Target]) -> Target | None:
        """One smooth weighted round-robin step among the targets at `indices`."""
        targets = self.targets
        current = self._current
        best = -1
        best_cw = 0.0
        total = 0.0
        for i in indices:
            target = targets[i]
            w = target.effective_weight
            if not w > 0 or (exclude and target in exclude):
                continue
            cw = current[i] + w
            current[i] = cw
            total += w
            if best < 0 or cw > best_cw:
                best = i
                best_cw = cw
        if best < 0:
            return None
        current[best] = best_cw - total
        return targets[best]


class WeightedRoundRobin(SmoothWeights):
    name = "weighted_round_robin"

    def pick(self, key: bytes | None = None, exclude: Collection[Target] = ()) -> Target | None:
        return self._smooth_pick(range(len(self.targets)), exclude)

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{t.address} w={t.effective_weight:g} cw={cw:g}"
            for t, cw in zip(self.targets, self._current, strict=True)
        )
        return f"<WeightedRoundRobin {len(self.targets)} targets: {parts}>"
