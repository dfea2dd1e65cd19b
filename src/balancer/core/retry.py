"""The retry budget: how many retries recent traffic allows.

Over a sliding window of RETRY_WINDOW seconds, retries may be at most a
percentage of the requests received, or a floor per second, whichever allows
more. A backend dying under load gets its requests retried in full; a full
outage cannot turn every request into several.
"""

from __future__ import annotations

RETRY_WINDOW = 10


class RetryBudget:
    """Requests and retries counted per second over the last RETRY_WINDOW seconds.

    The request path only bumps `received` (a plain counter); `advance` turns
    the counter's growth into the per-second buckets.
    """

    __slots__ = ("counted", "received", "requests", "retries", "second")

    def __init__(self, now: float) -> None:
        self.second = int(now)
        self.requests = [0] * RETRY_WINDOW
        self.retries = [0] * RETRY_WINDOW
        self.received = 0
        self.counted = 0

    def advance(self, now: float) -> None:
        self.requests[-1] += self.received - self.counted
        self.counted = self.received
        second = int(now)
        steps = min(second - self.second, RETRY_WINDOW)
        if steps > 0:
            self.requests = self.requests[steps:] + [0] * steps
            self.retries = self.retries[steps:] + [0] * steps
            self.second = second

    def requests_total(self) -> int:
        return sum(self.requests)

    def retries_total(self) -> int:
        return sum(self.retries)

    def allow(self, now: float, percent: float, per_second: float) -> bool:
        """Take one retry from the budget if it has room; False when it has none."""
        self.advance(now)
        allowed = max(per_second * RETRY_WINDOW, percent / 100.0 * self.requests_total())
        if self.retries_total() >= allowed:
            return False
        self.retries[-1] += 1
        return True
