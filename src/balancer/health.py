"""Active health checks.

How it works: every backend has a `HealthState` that counts consecutive
check results. A backend that is up goes down after `fall` consecutive
failures; one that is down comes back after `rise` consecutive successes
(HAProxy's rise/fall). The state machine is pure: `record(ok, is_up)` returns
"up", "down" or None (no change), and the `HealthChecker` (the asyncio part)
runs one probe loop per backend every `interval` seconds, randomly spread by
`jitter` so that checks of many backends do not fire together, and applies
the transitions to the pool. A backend the proxy marked down on its own
(a failed connection) is checked like any other and rejoins after `rise`
good checks. A backend that is down at start-up is checked forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass

from balancer.config import HealthConfig
from balancer.pool import DOWN, MAINT, UP, Backend, BackendPool

log = logging.getLogger("balancer")


class HealthState:
    """Consecutive-result counter deciding up/down transitions."""

    __slots__ = ("failures", "fall", "rise", "successes")

    def __init__(self, rise: int, fall: int) -> None:
        self.rise = rise
        self.fall = fall
        self.successes = 0
        self.failures = 0

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


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    reason: str


async def probe(host: str, port: int, health: HealthConfig, *, raw: bool = False) -> ProbeResult:
    """One check: connect, and when `health.send` is set, send it and compare the reply."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(health.timeout):
            reader, writer = await asyncio.open_connection(host, port)
            if health.send is None:
                return ProbeResult(True, "connect ok")
            payload = health.send.encode()
            writer.write(payload if raw else payload + b"\n")
            await writer.drain()
            if raw:
                data = await reader.read(65536)
            else:
                data = await reader.readline()
            if not data:
                return ProbeResult(False, "connection closed before a reply")
            reply = data.rstrip(b"\r\n").decode("utf-8", "replace")
            if health.expect is not None and reply != health.expect:
                return ProbeResult(False, f"unexpected reply {reply[:80]!r}")
            return ProbeResult(True, "reply ok")
    except TimeoutError:
        return ProbeResult(False, f"no answer within {health.timeout:g}s")
    except ConnectionRefusedError:
        return ProbeResult(False, "connection refused")
    except OSError as exc:
        return ProbeResult(False, exc.strerror or type(exc).__name__)
    except ValueError:  # StreamReader limit overrun
        return ProbeResult(False, "reply too long")
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()


class HealthChecker:
    """Runs the probe loops of one service's backends."""

    def __init__(self, pool: BackendPool) -> None:
        self.pool = pool
        self.config = pool.service.health
        self.raw = pool.service.backend_framing == "raw"
        self.states: dict[Backend, HealthState] = {}
        self._tasks: dict[Backend, asyncio.Task[None]] = {}
        pool.on_transition.append(self._on_transition)

    def _state(self, backend: Backend) -> HealthState:
        state = self.states.get(backend)
        if state is None:
            state = self.states[backend] = HealthState(self.config.rise, self.config.fall)
        return state

    def _on_transition(self, backend: Backend, new: str, reason: str) -> None:
        # A passive mark-down (or a manual change) restarts the count from there.
        self._state(backend).reset()
        if new == DOWN and not self.config.enabled and self.pool.ejection_left(backend) > 0:
            self._readmit_later(backend)

    async def check(self, backend: Backend) -> ProbeResult:
        result = await probe(backend.host, backend.port, self.config, raw=self.raw)
        backend.last_check = time.time()
        backend.last_check_ok = result.ok
        return result

    async def initial_round(self) -> None:
        """Check every backend once, concurrently; failing ones start down."""
        if not self.config.enabled:
            return
        backends = list(self.pool)
        results = await asyncio.gather(*(self.check(b) for b in backends))
        for backend, result in zip(backends, results, strict=True):
            if not result.ok:
                self.pool.mark_down(backend, f"initial check failed: {result.reason}")

    def start(self) -> None:
        if not self.config.enabled:
            return
        for backend in self.pool:
            self.watch(backend)

    def _readmit_later(self, backend: Backend) -> None:
        """Without active checks, an ejected backend comes back when its time is up."""
        delay = self.pool.ejection_left(backend)

        def readmit() -> None:
            if backend in self.pool.backends and backend.state == DOWN:
                backend.consecutive_failures = 0
                self.pool.mark_up(backend, "ejection time over (no active checks)")

        asyncio.get_running_loop().call_later(delay, readmit)

    def watch(self, backend: Backend) -> None:
        if self.config.enabled and backend not in self._tasks:
            self._tasks[backend] = asyncio.create_task(
                self._loop(backend), name=f"health {self.pool.service.name} {backend.address}"
            )

    def unwatch(self, backend: Backend) -> None:
        task = self._tasks.pop(backend, None)
        if task is not None:
            task.cancel()
        self.states.pop(backend, None)

    async def _loop(self, backend: Backend) -> None:
        cfg = self.config
        state = self._state(backend)
        while True:
            spread = cfg.interval * cfg.jitter
            await asyncio.sleep(max(0.0, cfg.interval + random.uniform(-spread, spread)))
            if backend.admin_state == MAINT:
                continue
            result = await self.check(backend)
            transition = state.record(result.ok, backend.is_up)
            if transition == UP and self.pool.ejection_left(backend) > 0:
                continue  # ejected by outlier detection: checks count, readmission waits
            if transition == UP:
                backend.consecutive_failures = 0
                self.pool.mark_up(backend, f"{state.successes} good check(s): {result.reason}")
            elif transition == DOWN:
                self.pool.mark_down(backend, f"{state.failures} failed check(s): {result.reason}")

    def reconfigure(self) -> None:
        """Pick up changed health settings: restart every probe loop with them."""
        self.config = self.pool.service.health
        self.raw = self.pool.service.backend_framing == "raw"
        for backend in list(self._tasks):
            self.unwatch(backend)
        for backend in self.pool:
            self._state(backend).rise = self.config.rise
            self._state(backend).fall = self.config.fall
        self.start()

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
