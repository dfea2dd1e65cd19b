"""Start-up, listeners, signals, reloads and shutdown of a balancer process.

How it works:
- Start-up and reload go through the same two steps. Prepare: build each service that
  needs a new listener (pool, proxy, health checker) and bind its listener inside a
  `ListenerBatch` (bound, accepting nothing yet); refuse a backend that is one of this
  process's own listeners; run the new services' first health checks. Commit: retire
  the services the file dropped or moved, change the others in place, swap the new
  ones in and start accepting. Only prepare can fail, and a failure there closes what
  it bound: a rejected reload changes nothing, and says why (`balancer.errors`:
  InvalidInput for a bad file, Conflict for a listen address in use or a stop under way).
- Reloads are serialized (SIGHUP and `POST /api/reload` take one lock); the state after
  any sequence of reloads is the last file's (`balancer.core.lifecycle`).
- Signals: the SIGINT, SIGTERM and SIGHUP handlers are installed before anything slow,
  and start-up runs as a task raced against the stop request, so a stop during a long
  start cancels it and the process exits cleanly. The first SIGINT or SIGTERM drains:
  no new connections or requests, what is in flight is answered within
  `drain_timeout`, what is left then is cut by the proxies (in message mode each
  unanswered request gets an error line) and logged as cut by the stop, not as a
  backend failure. A second signal cuts at once (`balancer.runtime.stop`). A stop takes at most
  `drain_timeout` and a grace of about a second for what is closed after the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Mapping

from balancer.core.lifecycle import DrainCut
from balancer.net import resources
from balancer.runtime.reloading import ServerReloads
from balancer.runtime.services import (
    Address,
    ServiceRuntime,
)
from balancer.runtime.stop import STOP_GRACE, drain_all, log_cut

log = logging.getLogger("balancer")

SUMMARY_BACKENDS = 100
"""A service with more backends is summed up in one line at the stop."""


class Server(ServerReloads):
    """Runs every service of a `Config` in one event loop, plus the admin endpoint."""

    # -- stop ---------------------------------------------------------------------------
    def request_stop(self, sig: int | None = None) -> None:
        """A stop signal: the first drains, a second one cuts what is left at once."""
        what = signal.Signals(sig).name if sig is not None else "stop"
        if not self._stop.is_set():
            log.info(
                "%s: stopping; draining for at most %gs (a second signal stops at once)",
                what,
                self.config.drain_timeout,
            )
            self._stop.set()
        elif not self._hurry.is_set():
            log.warning("%s again: stopping now, cutting what is left", what)
            self._hurry.set()

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    async def shutdown(self) -> None:
        """Drain every service within drain_timeout (a second signal: at once), then close.

        Everything after the drain (cut connections closing, health checks, the admin
        endpoint) shares one grace of STOP_GRACE seconds: a stop ends by then.
        """
        self.stopping = True
        loop = asyncio.get_running_loop()
        if self._preparing is not None:
            self._preparing.cancel()
        timeout = self.config.drain_timeout
        end = loop.time() + timeout + STOP_GRACE
        runtimes = list(self.services.values())
        for runtime in runtimes:
            runtime.proxy.stop_accepting()
            for removal in list(runtime.removals.values()):
                if removal.task is not None:
                    removal.task.cancel()
        drains: dict[asyncio.Task[DrainCut | None], ServiceRuntime] = {
            loop.create_task(r.proxy.drain(timeout), name=f"drain {r.config.name}"): r
            for r in runtimes
        }
        cuts = await drain_all(drains, self.draining, self._hurry, timeout, end)
        for runtime, (why, cut) in cuts.items():
            log_cut(f"stop: service {runtime.config.name}", why, cut, "stop")
        await self._close_rest(runtimes, end)
        self.log_summary()

    async def _close_rest(self, runtimes: list[ServiceRuntime], end: float) -> None:
        """After the drain: background work, health checks, access logs, the admin endpoint."""
        loop = asyncio.get_running_loop()

        def left() -> float:
            return max(0.1, end - loop.time())

        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=left())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(left()):
                await asyncio.gather(*(r.checker.stop() for r in runtimes))
        for runtime in runtimes:
            if runtime.access_log is not None:
                runtime.access_log.flush()
        if self.admin is not None:
            try:
                async with asyncio.timeout(left()):
                    await self.admin.stop()
            except TimeoutError:
                log.warning("admin endpoint not closed in time; left to the exit")

    def log_summary(self) -> None:
        """One line per backend at the stop, or per service beyond SUMMARY_BACKENDS."""
        for name, runtime in self.services.items():
            backends = list(runtime.pool)
            if len(backends) > SUMMARY_BACKENDS:
                up = sum(1 for b in backends if b.is_up)
                log.info(
                    "summary: service %s: %d backends (%d up), %d requests, %d failures, "
                    "%d connect failures",
                    name,
                    len(backends),
                    up,
                    sum(b.requests for b in backends),
                    sum(b.failures for b in backends),
                    sum(b.connect_failures for b in backends),
                )
                continue
            for b in backends:
                log.info(
                    "summary: service %s backend %s: %s, %d requests, %d failures, "
                    "%d connect failures",
                    name,
                    b.address,
                    b.state,
                    b.requests,
                    b.failures,
                    b.connect_failures,
                )

    # -- the process --------------------------------------------------------------------
    async def run(self, sockets: Mapping[Address, socket.socket] | None = None) -> int:
        """Start, serve until SIGINT/SIGTERM, drain, stop. Returns the exit code.

        The signal handlers come first: a stop during a long start-up cancels it.
        """
        from balancer.net.loops import loop_name

        loop = asyncio.get_running_loop()
        fds_before = resources.FDS
        fds = resources.FDS = resources.FdBudget()
        log.info(
            "balancer starting: %d service(s) from %s, event loop %s; open files: limit %d, "
            "%d kept for health checks, backend connections and the admin endpoint",
            len(self.config.services),
            self.config.source,
            loop_name(),
            fds.limit,
            fds.reserve,
        )
        starting = loop.create_task(self.start(sockets), name="start-up")
        stop = loop.create_task(self._stop.wait(), name="stop request")
        try:
            await asyncio.wait({starting, stop}, return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                starting.result()  # a start-up error ends the process here
                await stop
            else:
                log.warning("stop requested during start-up: abandoning the start")
                starting.cancel()
                await asyncio.wait({starting})
        finally:
            stop.cancel()
            await self.shutdown()
            resources.FDS = fds_before
        log.info("balancer stopped")
        return 0
