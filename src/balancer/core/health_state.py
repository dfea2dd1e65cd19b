"""The decisions of health checking, without I/O.

- `HealthState` counts consecutive check results of one backend. A backend
  that is up goes down after `fall` consecutive failures; one that is down
  comes back after `rise` consecutive successes (HAProxy's rise/fall).
  `record(ok, is_up)` returns "up", "down" or None (no change).
- `CheckSchedule` is a heap of due times: the one place that knows when each
  backend is checked next. `next_wait` spreads each wait by +-`jitter` of the
  interval, and the first periodic checks are spread over a whole interval,
  so the checks of many backends never fire together.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Hashable
from typing import Generic, TypeVar

from balancer.core.states import DOWN, UP


class HealthState:
    """Consecutive-result counter deciding up/down transitions."""

    __slots__ = ("failing", "failures", "fall", "framing", "rise", "successes")

    def __init__(self, rise: int, fall: int) -> None:
        self.rise = rise
        self.fall = fall
        self.successes = 0
        self.failures = 0
        self.failing: str | None = None
        """The failure reason logged last for this backend (None: nothing logged)."""
        self.framing = ""
        """The framing last logged as detected."""

    def record(self, ok: bool, is_up: bool) -> str | None:
        """Count one check result; return the transition it causes, if any."""
        if ok:
            self.successes += 1
            self.failures = 0
            if not is_up and self.successes >= self.rise:
                return UP
        else:
            self.failures += 1
            self.successes = 0
            if is_up and self.failures >= self.fall:
                return DOWN
        return None

    def reset(self) -> None:
        self.successes = 0
        self.failures = 0

    def __repr__(self) -> str:
        return (
            f"<HealthState rise={self.rise} fall={self.fall} "
            f"successes={self.successes} failures={self.failures}>"
        )


# -- when: the schedule ---------------------------------------------------------------


def next_wait(interval: float, jitter: float, rng: random.Random) -> float:
    """Seconds until a backend's next check: `interval`, spread by ±`jitter` of it."""
    spread = interval * jitter
    return max(0.0, interval + rng.uniform(-spread, spread))


def first_wait(interval: float, rng: random.Random) -> float:
    """Seconds until a backend's first periodic check: anywhere in one interval."""
    return rng.uniform(0.0, interval)


K = TypeVar("K", bound=Hashable)


class CheckSchedule(Generic[K]):
    """Due times of keys (backends): a heap, earliest first; a key is in it at most once.

    `add` of a key already in it moves it; `discard` forgets it. Both leave the
    old heap entry behind, skipped when it comes up (and swept when they pile up).
    """

    __slots__ = ("_heap", "_seq", "_token")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, K]] = []
        self._token: dict[K, int] = {}
        self._seq = itertools.count()

    def add(self, key: K, due: float) -> None:
        token = next(self._seq)
        self._token[key] = token
        heapq.heappush(self._heap, (due, token, key))
        if len(self._heap) > 2 * len(self._token) + 64:
            self._sweep()

    def discard(self, key: K) -> None:
        self._token.pop(key, None)

    def clear(self) -> None:
        self._heap.clear()
        self._token.clear()

    def __contains__(self, key: object) -> bool:
        return key in self._token

    def __len__(self) -> int:
        return len(self._token)

    def _top(self) -> tuple[float, int, K] | None:
        heap = self._heap
        token = self._token
        while heap:
            entry = heap[0]
            if token.get(entry[2]) == entry[1]:
                return entry
            heapq.heappop(heap)
        return None

    def next_due(self) -> float | None:
        """The earliest due time, or None when the schedule is empty."""
        top = self._top()
        return None if top is None else top[0]

    def pop_due(self, now: float) -> K | None:
        """The key due earliest if it is due at `now` (removed from the schedule), else None."""
        top = self._top()
        if top is None or top[0] > now:
            return None
        heapq.heappop(self._heap)
        del self._token[top[2]]
        return top[2]

    def _sweep(self) -> None:
        token = self._token
        self._heap = [e for e in self._heap if token.get(e[2]) == e[1]]
        heapq.heapify(self._heap)

    def __repr__(self) -> str:
        due = self.next_due()
        return f"<CheckSchedule {len(self)} keys, next due {due}>"
