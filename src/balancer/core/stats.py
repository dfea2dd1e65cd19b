"""Request-duration statistics the hot path keeps: plain counters, no metric library.

`LatencyHistogram.observe` bumps one bucket; the admin side reads the buckets when it is
asked (`/metrics` turns them into a Prometheus histogram, the per-second history into p99).
"""

from __future__ import annotations

from bisect import bisect_left

BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class LatencyHistogram:
    """Cumulative-at-scrape histogram of request durations in seconds."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            out.append((repr(bound), float(running)))
        running += self.counts[-1]
        out.append(("+Inf", float(running)))
        return out
