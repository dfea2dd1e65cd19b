"""Weighted random: each pick draws a target with probability weight / total.

How it works: the effective weights of the usable targets (not excluded, not
drained) are read at every pick, summed cumulatively, and a uniform draw in
[0, total) is located by bisection. The sums are kept while the weights stay
the same; the weights are read at every pick, so a changed eligible set or
weight applies at once. The random source can be
given (a seeded `random.Random`) to make runs reproducible.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Collection
from itertools import accumulate

from balancer.core.policies.base import Policy, Target


class WeightedRandom(Policy):
    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__()
        self._random = (rng or random.Random()).random
        self._weights: list[float] = []
        self._cumulative: list[float] = []

    def pick(self, key: bytes | None = None, exclude: Collection[Target] = ()) -> Target | None:
        targets = self.targets
        if exclude:
            targets = [t for t in targets if t not in exclude]
        weights = [t.effective_weight for t in targets]
        if weights == self._weights and not exclude:
            cumulative = self._cumulative
        else:
            cumulative = list(accumulate(w if w > 0 else 0.0 for w in weights))
            if not exclude:
                self._weights = weights
                self._cumulative = cumulative
        if not cumulative or not cumulative[-1] > 0:
            return None
        i = bisect_right(cumulative, self._random() * cumulative[-1])
        # A draw rounded up to the total would land past the end: take the last usable one.
        while i >= len(targets) or not weights[i] > 0:
            i -= 1
        return targets[i]

    def __repr__(self) -> str:
        parts = ", ".join(f"{t.address} w={t.effective_weight:g}" for t in self.targets)
        return f"<WeightedRandom {len(self.targets)} targets: {parts}>"
