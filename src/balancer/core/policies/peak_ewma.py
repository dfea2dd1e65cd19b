"""Peak EWMA: latency-aware power of two choices (Finagle's and Linkerd's balancer).

How it works: each target has a response-time estimate, a moving average
that decays with time constant `decay` seconds (10 by default): a sample
that took `dt` seconds after the previous one weighs 1 - exp(-dt / decay).
A sample higher than the estimate replaces it outright (the "peak"), so a
target that turns slow is avoided at once, while faster samples only bring
the estimate down gradually. The first sample of a target replaces the
start value, `default_latency` (1 ms): small, so that new and recovered
targets are tried. A failed request counts as a sample of at least
`failure_penalty` seconds (0.5 by default).

The cost of a target is estimate x (in_flight + 1) / effective weight. Each
pick draws two distinct usable targets at random and keeps the cheaper one
(ties: higher weight, then the first drawn). Weights divide the cost, so at
low concurrency a heavier target wins more than its weight's share; under
load its in-flight count evens that out.

Not starving a slow target: on its own, two-choices never picks a target
that is costlier than every other, so a slow target would get no request and
no sample and could never show that it recovered (traefik#12306). So one pick
in every 1 / `probe` picks (probe = 0.02 by default, 0 turns it off) goes to
the usable target that has gone longest without a pick. A slow target thus
keeps a trickle of about `probe` of the traffic, its samples keep coming, and
once it is fast again those samples bring its estimate down (over about
`decay` seconds) and it wins its share back. With N targets, every usable one
is picked at least once in any N / probe consecutive picks.

Targets entering the eligible set (new, or back from down) start afresh.
The clock and random source can be given, to simulate time in tests.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Self

from balancer.config.policies import ALGORITHMS
from balancer.core.policies.base import Policy, Target, usable


class _Estimate:
    __slots__ = ("last_pick", "samples", "stamp", "value")

    def __init__(self, value: float, stamp: float) -> None:
        self.value = value
        self.stamp = stamp
        self.samples = 0
        self.last_pick = -1


class PeakEwma(Policy):
    name = "peak_ewma"

    def __init__(
        self,
        decay: float = 10.0,
        default_latency: float = 0.001,
        failure_penalty: float = 0.5,
        probe: float = 0.02,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        checked = {
            "decay": decay,
            "default_latency": default_latency,
            "failure_penalty": failure_penalty,
            "probe": probe,
        }
        ALGORITHMS[self.name].check_options(checked)
        self.decay = decay
        self.default_latency = default_latency
        self.failure_penalty = failure_penalty
        self.probe = probe
        self.probe_every = round(1 / probe) if probe > 0 else 0
        self._random = (rng or random.Random()).random
        self._clock = clock
        self._estimates: list[_Estimate] = []
        self._by_address: dict[str, _Estimate] = {}
        self._picks = 0

    @classmethod
    def from_options(cls, options: Mapping[str, float], balance_factor: float = 0.0) -> Self:
        algorithm = ALGORITHMS[cls.name]
        algorithm.check_options(options)
        return cls(
            decay=algorithm.value(options, "decay"),
            default_latency=algorithm.value(options, "default_latency"),
            failure_penalty=algorithm.value(options, "failure_penalty"),
            probe=algorithm.value(options, "probe"),
        )

    def update(self, targets: Sequence[Target]) -> None:
        super().update(targets)
        old = self._by_address
        now = self._clock()
        by_address: dict[str, _Estimate] = {}
        for t in self.targets:
            est = old.get(t.address)
            by_address[t.address] = est or _Estimate(self.default_latency, now)
        self._by_address = by_address
        self._estimates = [by_address[t.address] for t in self.targets]

    def estimate(self, target: Target) -> float | None:
        """The response-time estimate of `target`, in seconds (None if not in the set)."""
        est = self._by_address.get(target.address)
        return None if est is None else est.value

    def on_finish(self, target: Target, latency: float, ok: bool) -> None:
        est = self._by_address.get(target.address)
        if est is None:
            return  # left the eligible set while the request ran
        sample = latency if ok else max(latency, self.failure_penalty)
        if not sample >= 0:
            return
        now = self._clock()
        elapsed = now - est.stamp
        est.stamp = now
        if est.samples == 0 or sample >= est.value:
            est.value = sample
        elif elapsed > 0:
            w = math.exp(-elapsed / self.decay)
            est.value = est.value * w + sample * (1.0 - w)
        est.samples += 1

    def pick(self, key: bytes | None = None, exclude: Collection[Target] = ()) -> Target | None:
        targets = self.targets
        n = len(targets)
        self._picks += 1
        if self.probe_every and self._picks % self.probe_every == 0:
            return self._longest_waiting(exclude)
        if n >= 2:
            i, j = self._draw(n)
            a = targets[i]
            b = targets[j]
            if usable(a, exclude) and usable(b, exclude):
                return self._cheaper(i, j)
        candidates = [i for i, t in enumerate(targets) if usable(t, exclude)]
        if len(candidates) >= 2:
            i, j = self._draw(len(candidates))
            return self._cheaper(candidates[i], candidates[j])
        if candidates:
            self._estimates[candidates[0]].last_pick = self._picks
            return targets[candidates[0]]
        return None

    def _draw(self, n: int) -> tuple[int, int]:
        rnd = self._random
        i = min(int(rnd() * n), n - 1)
        j = min(int(rnd() * (n - 1)), n - 2)
        return i, (j + 1 if j >= i else j)

    def _cheaper(self, i: int, j: int) -> Target:
        a = self.targets[i]
        b = self.targets[j]
        ea = self._estimates[i]
        eb = self._estimates[j]
        wa = a.effective_weight
        wb = b.effective_weight
        ca = ea.value * (a.in_flight + 1) / wa
        cb = eb.value * (b.in_flight + 1) / wb
        if cb < ca or (cb == ca and wb > wa):
            eb.last_pick = self._picks
            return b
        ea.last_pick = self._picks
        return a

    def _longest_waiting(self, exclude: Collection[Target]) -> Target | None:
        best: int | None = None
        oldest = self._picks
        for i, t in enumerate(self.targets):
            last = self._estimates[i].last_pick
            if last < oldest and usable(t, exclude):
                best = i
                oldest = last
        if best is None:
            return None
        self._estimates[best].last_pick = self._picks
        return self.targets[best]

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{t.address} {est.value * 1000:.3g}ms x{t.in_flight + 1} "
            f"w={t.effective_weight:g} ({est.samples} samples)"
            for t, est in zip(self.targets, self._estimates, strict=True)
        )
        return f"<PeakEwma {len(self.targets)} targets, pick #{self._picks}: {parts}>"
