"""Active health checks.

How it works: `HealthState` and `CheckSchedule` (`balancer.core.health_state`)
decide, without I/O, what check results mean and when each backend is
checked next.

- `HealthChecker` (the asyncio part) runs one scheduler task per service. It
  starts the checks that are due, at most `concurrency` at once, and hands each
  result to `apply`, plain bookkeeping that decides what the result means and
  tells the pool. A check's timeout starts when its probe starts, not when it
  was due; a reply the event loop had not got to by then still counts, and a
  timeout noticed late (the loop was busy) is checked again: being late
  ourselves never fails a backend. At most `STARTS_PER_TURN` probes start in
  one turn of the loop, so traffic goes on in between. Transitions are handed
  to the pool with `defer=True`, so many of them cost one refresh of the policy.

What a result means (`apply`):
- a probe that failed for want of our own resources (`resources.is_local_shortage`:
  out of file descriptors, memory, local ports) is no check at all: nothing
  changes, `resources.ALARM` counts it, the next interval tries again;
- a backend that is this balancer itself (`Backend.looped`) is not checked any
  more, and `BackendPool.mark_up` refuses it anyway;
- a backend in maintenance is not checked; back to `up`, its checks resume;
- a backend ejected by outlier detection is not readmitted before its ejection
  time is over, however many checks pass;
- a backend that stays down says why: its `last_reason` is the reason of its
  last failed check, and the log has one line per change of reason;
- an http check's 404 with `disable_on_404` (`ProbeResult.drain`) drains an up
  backend, and counts as a good check; the next passing check gives it back
  (`runtime.drains`). A down backend answering 404 has failed its check.

The first round (`initial_round`, before the service listens) checks every
backend once with the same bound on concurrency; those that fail start down.
Its transitions are handed to the pool in one refresh, and beyond the first
`INITIAL_LOG_LINES` failures the log sums the rest up by reason.

Framing (`backend_framing = "auto"`, see `balancer.runtime.probe`): while a
backend's framing is not known ("", also after it went down), the probe
detects it, and the first good check stores it in `Backend.framing` and logs
it. Each probe's connection is known to `loopguard` while it is open, with
`(pool, backend)` as its owner (`pool.LoopOwner`), so that a listener of this
process accepting it knows it is talking to itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable

from balancer.core.health_state import CheckSchedule, HealthState, first_wait, next_wait
from balancer.core.pool import Backend, BackendPool, LoopOwner, detects_framing
from balancer.core.states import DOWN, MAINT, UP
from balancer.net import resources
from balancer.proxy.tls import probe_tls
from balancer.runtime.drains import CheckDrains
from balancer.runtime.probe import LINE, RAW, ProbeResult, probe

log = logging.getLogger("balancer")

MAX_CONCURRENCY = 512
"""Probes in flight at once per service, at most (fewer when file descriptors are scarce)."""
STARTS_PER_TURN = 64
"""Probes started in one turn of the event loop at most (traffic goes on in between)."""
INITIAL_LOG_LINES = 100
"""Backends whose failed first check is logged one by one; the rest are summed up."""


def check_concurrency() -> int:
    """Probes in flight at once per service: MAX_CONCURRENCY, or less if descriptors are few."""
    fds = resources.FDS
    if fds is None:
        return MAX_CONCURRENCY
    return max(4, min(MAX_CONCURRENCY, fds.reserve // 2))


# -- the checker -------------------------------------------------------------------------


class _FirstRound:
    """The log of a first round: the first failures one by one, then a sum by reason."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.failures = 0
        self.unlogged: dict[str, int] = {}

    def count(self, reason: str) -> bool:
        """Count a failure; True when it is one too many to log by itself."""
        self.failures += 1
        if self.failures <= INITIAL_LOG_LINES:
            return False
        self.unlogged[reason] = self.unlogged.get(reason, 0) + 1
        return True

    def log(self) -> None:
        if not self.unlogged:
            return
        total = sum(self.unlogged.values())
        by_reason = ", ".join(
            f"{reason}: {n:,}" for reason, n in sorted(self.unlogged.items(), key=lambda kv: -kv[1])
        )
        log.warning(
            "service %s: %s more backend(s) DOWN after their first check (%s); "
            "/status has each one's reason",
            self.service,
            f"{total:,}",
            by_reason,
        )


ProbeFunc = Callable[[Backend, str], Awaitable[ProbeResult]]
"""Checks one backend with the given framing ("" to detect it)."""


def call_soon(callback: Callable[[], None]) -> None:
    """`callback` at the end of this turn of the running loop; at once outside a loop."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        callback()
        return
    loop.call_soon(callback)


class HealthChecker:
    """Checks one service's backends on schedule and tells the pool what the results mean."""

    def __init__(
        self,
        pool: BackendPool,
        *,
        probe: ProbeFunc | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.pool = pool
        pool.defer = call_soon  # the transitions of one loop turn make one refresh
        self.config = pool.service.health
        self.states: dict[Backend, HealthState] = {}
        self.schedule: CheckSchedule[Backend] = CheckSchedule()
        self.concurrency = check_concurrency()
        self._probe = probe if probe is not None else self._probe_backend
        self._rng = rng if rng is not None else random.Random()
        self._watched: set[Backend] = set()
        self._probing: dict[Backend, asyncio.Task[None]] = {}
        self._round: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self.drains = CheckDrains(pool)
        pool.on_transition.append(self._on_transition)

    def __repr__(self) -> str:
        return (
            f"<HealthChecker {self.pool.service.name}: {len(self._watched)} watched, "
            f"{len(self._probing)} probing (at most {self.concurrency}), "
            f"next due {self.schedule.next_due()}>"
        )

    def _state(self, backend: Backend) -> HealthState:
        state = self.states.get(backend)
        if state is None:
            state = self.states[backend] = HealthState(self.config.rise, self.config.fall)
        return state

    def _on_transition(self, backend: Backend, new: str, reason: str) -> None:
        # A passive mark-down (or a manual change) restarts the count from there.
        state = self._state(backend)
        state.reset()
        state.failing = None
        if new == DOWN and not self.config.enabled and self.pool.ejection_left(backend) > 0:
            self._readmit_later(backend)

    async def _probe_backend(self, backend: Backend, framing: str) -> ProbeResult:
        owner: LoopOwner = (self.pool, backend)
        tls = probe_tls(self.pool.service, backend.host)
        return await probe(
            backend.host, backend.port, self.config, framing=framing, owner=owner, tls=tls
        )

    def _framing_to_probe(self, backend: Backend) -> str:
        if detects_framing(self.pool.service):
            return backend.framing
        return RAW if self.pool.service.backend_framing == RAW else LINE

    # -- what a result means ------------------------------------------------------
    def apply(self, backend: Backend, result: ProbeResult) -> None:
        """Count one check result of `backend` and tell the pool what it changes."""
        if result.shortage is not None:
            resources.ALARM.note(result.shortage, f"checking backend {backend.address}")
            return
        if backend.looped:
            return
        backend.last_check = time.time()
        backend.last_check_ok = result.ok
        state = self._state(backend)
        if result.drain and backend.is_up:
            self.drains.drain(backend, result.reason)
            result = ProbeResult(True, result.reason)
        elif result.ok:
            self.drains.restore(backend, result.reason)
        if result.ok and result.framing:
            self._learn_framing(backend, state, result.framing)
        transition = state.record(result.ok, backend.is_up)
        name = self.pool.service.name
        if result.ok:
            state.failing = None
            if transition == UP:
                left = self.pool.ejection_left(backend)
                if left > 0:
                    # ejected by outlier detection: checks count, readmission waits
                    backend.last_reason = f"checks pass; ejected for {left:.1f}s more"
                    return
                backend.consecutive_failures = 0
                self.pool.mark_up(
                    backend, f"{state.successes} good check(s): {result.reason}", defer=True
                )
            elif not backend.is_up:
                backend.last_reason = (
                    f"{state.successes} of {state.rise} good checks: {result.reason}"
                )
            return
        if transition == DOWN:
            self.pool.mark_down(
                backend, f"{state.failures} failed check(s): {result.reason}", defer=True
            )
            state.failing = result.reason
        elif not backend.is_up:
            backend.last_reason = f"check failed: {result.reason}"
            if result.reason != state.failing:
                state.failing = result.reason
                log.warning(
                    "backend %s of service %s is down: check failed: %s",
                    backend.address,
                    name,
                    result.reason,
                )

    def _learn_framing(self, backend: Backend, state: HealthState, framing: str) -> None:
        backend.framing = framing
        if state.framing != framing:
            state.framing = framing
            what = "unterminated replies" if framing == RAW else "newline-terminated replies"
            log.info(
                "backend %s of service %s speaks %s framing (%s)",
                backend.address,
                self.pool.service.name,
                framing,
                what,
            )

    # -- the first round, before the service listens --------------------------------
    async def initial_round(self) -> None:
        """Check every backend once, at most `concurrency` at a time; failing ones start down."""
        if not self.config.enabled:
            return
        backends = [b for b in self.pool if not b.looped and b.admin_state != MAINT]
        todo = iter(backends)
        summary = _FirstRound(self.pool.service.name)

        async def worker() -> None:
            for backend in todo:
                result = await self._probe(backend, self._framing_to_probe(backend))
                self._first_result(backend, result, summary)

        workers = [
            asyncio.ensure_future(worker()) for _ in range(min(self.concurrency, len(backends)))
        ]
        self._round.update(workers)
        try:
            with self.pool.batch():
                await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
            self._round.difference_update(workers)
        summary.log()

    def _first_result(self, backend: Backend, result: ProbeResult, summary: _FirstRound) -> None:
        if result.shortage is not None or result.ok or (result.drain and backend.is_up):
            self.apply(backend, result)  # an alarm, the framing learnt, or a drain
            return
        backend.last_check = time.time()
        backend.last_check_ok = False
        quiet = summary.count(result.reason)
        self.pool.mark_down(
            backend, f"initial check failed: {result.reason}", defer=True, quiet=quiet
        )
        self._state(backend).failing = result.reason

    # -- the periodic checks ------------------------------------------------------------
    def start(self) -> None:
        """Watch every backend, first checks spread over one interval; start the scheduler."""
        if not self.config.enabled:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for backend in self.pool:
            if backend not in self._watched:
                self._watched.add(backend)
                self.schedule.add(backend, now + first_wait(self.config.interval, self._rng))
        if self._runner is None or self._runner.done():
            self._wake = asyncio.Event()
            self._runner = loop.create_task(
                self._run(), name=f"health checks of service {self.pool.service.name}"
            )
        else:
            self._poke()

    def watch(self, backend: Backend) -> None:
        """Check `backend` (new, or down and waiting) now, and on schedule from then on."""
        if not self.config.enabled or backend in self._watched:
            return
        self._watched.add(backend)
        self.schedule.add(backend, asyncio.get_running_loop().time())
        self._poke()

    def unwatch(self, backend: Backend) -> None:
        self._watched.discard(backend)
        self.schedule.discard(backend)
        task = self._probing.pop(backend, None)
        if task is not None:
            task.cancel()
        self.states.pop(backend, None)
        self.drains.release(backend)

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _run(self) -> None:
        assert self._wake is not None
        wake = self._wake
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            started = 0
            while len(self._probing) < self.concurrency and started < STARTS_PER_TURN:
                backend = self.schedule.pop_due(now)
                if backend is None:
                    break
                self._begin(backend, now)
                started += 1
            if started == STARTS_PER_TURN:
                await asyncio.sleep(0)  # let the rest of the loop's work in between
                continue
            due = self.schedule.next_due()
            wake.clear()
            if due is None or len(self._probing) >= self.concurrency:
                await wake.wait()
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(due):
                    await wake.wait()

    def _begin(self, backend: Backend, now: float) -> None:
        if backend.looped or backend.admin_state == MAINT:
            self._reschedule(backend, now)
            return
        task = asyncio.get_running_loop().create_task(self._check(backend))
        self._probing[backend] = task

    async def _check(self, backend: Backend) -> None:
        try:
            result = await self._probe(backend, self._framing_to_probe(backend))
            if self._probing.get(backend) is asyncio.current_task():
                self.apply(backend, result)
        finally:
            if self._probing.get(backend) is asyncio.current_task():
                del self._probing[backend]
                self._reschedule(backend, asyncio.get_running_loop().time())
                self._poke()

    def _reschedule(self, backend: Backend, now: float) -> None:
        if backend in self._watched:
            cfg = self.config
            self.schedule.add(backend, now + next_wait(cfg.interval, cfg.jitter, self._rng))

    def _readmit_later(self, backend: Backend) -> None:
        """Without active checks, an ejected backend comes back when its time is up."""
        delay = self.pool.ejection_left(backend)

        def readmit() -> None:
            if backend in self.pool.backends and backend.state == DOWN:
                backend.consecutive_failures = 0
                self.pool.mark_up(backend, "ejection time over (no active checks)")

        asyncio.get_running_loop().call_later(delay, readmit)

    def reconfigure(self) -> None:
        """Pick up changed health settings (and framing): reschedule every backend with them."""
        self.config = self.pool.service.health
        self.concurrency = check_concurrency()
        service = self.pool.service
        for backend in self.pool:
            state = self._state(backend)
            state.rise = self.config.rise
            state.fall = self.config.fall
            if service.backend_framing != "auto":
                backend.framing = service.backend_framing
            elif not detects_framing(service):
                backend.framing = backend.framing or LINE
        if not (self.config.type == "http" and self.config.disable_on_404):
            self.drains.restore_all("disable_on_404 is off")
        for task in self._probing.values():
            task.cancel()
        self._probing.clear()
        self.schedule.clear()
        self._watched.clear()
        if self.config.enabled:
            self.start()
        elif self._runner is not None:
            self._runner.cancel()
            self._runner = None

    async def stop(self) -> None:
        """Cancel the scheduler and every probe in flight, and wait until they are gone."""
        tasks: list[asyncio.Task[object]] = [*self._probing.values(), *self._round]
        if self._runner is not None:
            tasks.append(self._runner)
        self._runner = None
        self._probing.clear()
        self._round.clear()
        self.schedule.clear()
        self._watched.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
