"""Wall-clock time as every log line writes it: UTC, ISO 8601, milliseconds, `Z`."""

from __future__ import annotations

import time


def utc_second(second: int) -> str:
    """`2026-12-02T07:30:15` for a whole second of the epoch (callers cache it per second)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def utc_timestamp(seconds: float) -> str:
    """`2026-12-02T07:30:15.042Z`."""
    whole = int(seconds)
    return f"{utc_second(whole)}.{int((seconds - whole) * 1000):03d}Z"
