"""Per-second history of every service's traffic: what the dashboard's charts and table read.

How it works: `TrafficHistory.sample` runs once a second, reads the plain counters
(per-backend requests and failures, the service's "not available" count, the latency
histogram's buckets), and stores the difference from the previous sample as rates; p99
comes from the bucket deltas of that second, interpolated linearly inside the bucket.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from balancer.core.pool import Backend
from balancer.core.stats import LatencyHistogram

if TYPE_CHECKING:
    from balancer.runtime.server import Server

HISTORY_SECONDS = 300


def quantile_of_counts(bounds: tuple[float, ...], counts: list[int], q: float) -> float:
    """Quantile `q` of bucket counts (bucket i holds values up to bounds[i]); 0 when empty.

    Linear inside the bucket; the overflow bucket answers its lower bound.
    """
    total = sum(counts)
    if total <= 0:
        return 0.0
    rank = q * total
    running = 0
    for i, n in enumerate(counts):
        if n <= 0:
            continue
        if running + n >= rank:
            if i >= len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i > 0 else 0.0
            fraction = (rank - running) / n
            return lower + (bounds[i] - lower) * fraction
        running += n
    return bounds[-1]


@dataclass
class _Snapshot:
    at: float
    requests: dict[str, int]
    failures: dict[str, int]
    not_available: int
    buckets: list[int]


@dataclass
class TrafficHistory:
    """One-second samples of every service's traffic, the last `seconds` of them.

    The ring keeps each service's totals (what the charts draw); the rates of each
    backend are kept for the latest second only (what the table shows), so memory and
    `/api/history` stay the same size however many backends a service has.
    """

    seconds: int = HISTORY_SECONDS
    samples: deque[dict[str, Any]] = field(default_factory=deque)
    backends: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    """service -> backend address -> its rates over the latest second."""
    _last: dict[str, _Snapshot] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.samples = deque(maxlen=self.seconds)

    @staticmethod
    def _snapshot(
        at: float, backends: list[Backend], not_available: int, histogram: LatencyHistogram
    ) -> _Snapshot:
        return _Snapshot(
            at,
            {b.address: b.requests for b in backends},
            {b.address: b.failures for b in backends},
            not_available,
            list(histogram.counts),
        )

    def sample(self, server: Server, now: float, now_wall: float) -> dict[str, Any] | None:
        """Take a sample at monotonic time `now`; the first call only sets the baseline."""
        services: dict[str, Any] = {}
        for name, runtime in server.services.items():
            backends = list(runtime.pool)
            snap = self._snapshot(now, backends, runtime.proxy.not_available, runtime.histogram)
            prev = self._last.get(name)
            self._last[name] = snap
            if prev is None or now <= prev.at:
                continue
            dt = now - prev.at
            per_backend: dict[str, Any] = {}
            served = failed = 0
            for addr, n in snap.requests.items():
                done = max(n - prev.requests.get(addr, n), 0)
                bad = max(snap.failures[addr] - prev.failures.get(addr, snap.failures[addr]), 0)
                served += done
                failed += bad
                per_backend[addr] = {
                    "rps": round(done / dt, 2),
                    "error_rate": round(bad / (done + bad), 4) if done + bad else 0.0,
                }
            unavailable = max(snap.not_available - prev.not_available, 0)
            failed += unavailable
            delta = [a - b for a, b in zip(snap.buckets, prev.buckets, strict=True)]
            p99 = quantile_of_counts(runtime.histogram.bounds, delta, 0.99)
            services[name] = {
                "requests": served,
                "errors": failed,
                "rps": round(served / dt, 2),
                "error_rate": round(failed / (served + failed), 4) if served + failed else 0.0,
                "p99_ms": round(p99 * 1000.0, 3),
            }
            self.backends[name] = per_backend
        for gone in set(self._last) - set(server.services):
            del self._last[gone]
            self.backends.pop(gone, None)
        if not services:
            return None
        entry = {"t": round(now_wall, 3), "services": services}
        self.samples.append(entry)
        return entry

    @property
    def latest(self) -> dict[str, Any] | None:
        return self.samples[-1] if self.samples else None

    def document(self, since: float | None = None) -> dict[str, Any]:
        samples = [s for s in self.samples if since is None or s["t"] > since]
        return {"interval_s": 1.0, "capacity": self.seconds, "samples": samples}
