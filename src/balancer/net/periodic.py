"""A callback run periodically on the event loop, with one timer at a time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Periodic:
    """Runs `callback` every `period()` seconds (asked again before each run) until stopped.

    A callback that raises is logged by the loop and still runs again at the next period.
    """

    __slots__ = ("_callback", "_handle", "_loop", "_period")

    def __init__(self, period: Callable[[], float], callback: Callable[[], object]) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._period = period
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None

    @property
    def running(self) -> bool:
        return self._handle is not None

    def start(self) -> None:
        """Run from the running loop, the first time after one period."""
        if self._handle is None:
            self._loop = loop = asyncio.get_running_loop()
            self._handle = loop.call_later(self._period(), self._run)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _run(self) -> None:
        try:
            self._callback()
        finally:
            if self._handle is not None and self._loop is not None:  # not stopped meanwhile
                self._handle = self._loop.call_later(self._period(), self._run)
