"""Least connections, weight-aware.

How it works: each pick scores every usable target by in_flight / effective
weight and keeps the lowest score. When several targets share it (at low
load: all of them, with 0 in flight) the tie is broken by smooth weighted
round-robin among the tied targets, as NGINX's least_conn does, so the tie
rotates through them in proportion to their weights and none is starved.
Excluded and drained (weight 0) targets are never scored.
"""

from __future__ import annotations

from collections.abc import Collection

from balancer.core.policies.base import Target
from balancer.core.policies.weighted_round_robin import SmoothWeights


class LeastConnections(SmoothWeights):
    name = "least_connections"

    def pick(self, key: bytes | None = None, exclude: Collection[Target] = ()) -> Target | None:
        targets = self.targets
        best_score = float("inf")
        tied: list[int] = []
        i = -1
        for target in targets:
            i += 1
            w = target.effective_weight
            if not w > 0 or (exclude and target in exclude):
                continue
            score = target.in_flight / w
            if score < best_score:
                best_score = score
                tied = [i]
            elif score == best_score:
                tied.append(i)
        if len(tied) < 2:
            return targets[tied[0]] if tied else None
        return self._smooth_pick(tied, ())

    def __repr__(self) -> str:
        parts = ", ".join(f"{t.address} {t.in_flight}/{t.effective_weight:g}" for t in self.targets)
        return f"<LeastConnections {len(self.targets)} targets (in flight/weight): {parts}>"
