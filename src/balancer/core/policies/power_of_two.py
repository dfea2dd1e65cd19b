"""Power of two choices: the less loaded of two random targets (Envoy's least-request).

How it works: each pick draws two distinct usable targets uniformly at random
and keeps the one with the lower in_flight / effective weight. A tie (at low
load: 0 and 0) goes to either with odds in proportion to their weights, so
that the weights hold even when nothing is in flight. Compared with a
full least-connections scan it costs two looks instead of N and it does not
make every balancer instance herd onto the same idle target. With one usable
target that target is returned. The pair last compared is kept in
`last_pair` (shown by `repr`) to explain a decision.
"""

from __future__ import annotations

import random
from collections.abc import Collection

from balancer.core.policies.base import Policy, Target, usable


class PowerOfTwo(Policy):
    name = "power_of_two"

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__()
        self._random = (rng or random.Random()).random
        self.last_pair: tuple[Target, Target] | None = None

    def pick(self, key: bytes | None = None, exclude: Collection[Target] = ()) -> Target | None:
        targets = self.targets
        n = len(targets)
        if n >= 2:
            a, b = self._draw(targets)
            wa = a.effective_weight
            wb = b.effective_weight
            if wa > 0 and wb > 0 and not (exclude and (a in exclude or b in exclude)):
                return self._better(a, wa, b, wb)
        # Some drawn target may not be used: draw again among those that may.
        candidates = [t for t in targets if usable(t, exclude)]
        if len(candidates) >= 2:
            a, b = self._draw(candidates)
            return self._better(a, a.effective_weight, b, b.effective_weight)
        if candidates:
            self.last_pair = (candidates[0], candidates[0])
            return candidates[0]
        return None

    def _draw(self, targets: list[Target]) -> tuple[Target, Target]:
        n = len(targets)
        rnd = self._random
        i = min(int(rnd() * n), n - 1)
        j = min(int(rnd() * (n - 1)), n - 2)
        if j >= i:
            j += 1
        return targets[i], targets[j]

    def _better(self, a: Target, wa: float, b: Target, wb: float) -> Target:
        self.last_pair = (a, b)
        sa = a.in_flight / wa
        sb = b.in_flight / wb
        if sb < sa:
            return b
        if sb == sa and wb != wa and self._random() * (wa + wb) < wb:
            return b
        return a

    def __repr__(self) -> str:
        parts = ", ".join(f"{t.address} {t.in_flight}/{t.effective_weight:g}" for t in self.targets)
        last = ""
        if self.last_pair is not None:
            last = f" | last pair {self.last_pair[0].address} vs {self.last_pair[1].address}"
        return f"<PowerOfTwo {len(self.targets)} targets (in flight/weight): {parts}{last}>"
