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
- Ready (every listener serves, the first health round done: `balancer ready`): the
  process that took its listeners over from another tells it so (`--takeover`), the
  handover socket opens (`--handover-socket`, `balancer.runtime.handover`) and the
  service manager hears `READY=1` (`balancer.net.notify`; `RELOADING=1` and `READY=1`
  around a SIGHUP reload, `STOPPING=1` at a stop). A process whose listeners were taken
  over stops as at SIGTERM, its admin endpoint closed at once rather than after the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable, Mapping

from balancer.config.addresses import format_address
from balancer.config.model import Config
from balancer.core.lifecycle import DrainCut
from balancer.net import resources
from balancer.net.handover import Handed, HandoverError
from balancer.net.loops import listening_socket
from balancer.net.notify import Notifier
from balancer.runtime.handover import HandoverListener, Takeover
from balancer.runtime.reloading import ServerReloads
from balancer.runtime.services import (
    Address,
    ServiceRuntime,
)
from balancer.runtime.starting import AdminFactory
from balancer.runtime.stop import STOP_GRACE, drain_all, log_cut

log = logging.getLogger("balancer")

HANDOVER_GRACE = 0.5
"""Seconds a process that handed its listeners over keeps reading its connections before
its drain (requests on their way on connections made just before the switch)."""
SUMMARY_BACKENDS = 100
"""A service with more backends is summed up in one line at the stop."""


class Server(ServerReloads):
    """Runs every service of a `Config` in one event loop, plus the admin endpoint."""

    def __init__(
        self,
        config: Config,
        reader: Callable[[], Config] | None = None,
        admin: AdminFactory | None = None,
    ) -> None:
        super().__init__(config, reader, admin)
        # restarts and the service manager (`balancer.app` sets them from the command line)
        self.notifier = Notifier.from_environ()
        self.handover_path: str | None = None
        """Once ready, listen there for a new process to take the listeners over."""
        self.takeover: Takeover | None = None
        """The control connection to the process this one took its listeners from."""
        self.handover: HandoverListener | None = None
        self.handed_to: int | None = None
        """The pid of the process that took this one's listeners over."""
        self.ready = False
        self._admin_stop: asyncio.Task[None] | None = None

    # -- readiness, reloads, hand-over ----------------------------------------------------
    async def _ready(self) -> None:
        """Every listener serves and the first health round is done: say so."""
        if self.handed_admin is not None:
            log.warning("takeover: the admin endpoint is off: its socket handed over is closed")
            self.handed_admin.close()
            self.handed_admin = None
        for name, sock in self.handed_services.items():
            log.warning(
                "takeover: service %s did not start: its socket handed over is closed", name
            )
            sock.close()
        self.handed_services.clear()
        if self.handover_path is not None:
            listener = HandoverListener(self.handover_path, self, self._reload_lock)
            try:
                listener.open(replacing=self.takeover.path if self.takeover else None)
            except (HandoverError, OSError) as exc:
                log.error(
                    "handover socket not opened: %s; no new process can take over from this one",
                    exc,
                )
            else:
                self.handover = listener
        if self.takeover is not None:
            self._background(self.takeover.ready(), "takeover: ready")
        self.ready = True
        self.notifier.ready(self.status_text())

    def status_text(self) -> str:
        listening = ", ".join(format_address(*a) for a in self.listen_addresses())
        return f"serving {len(self.services)} service(s); listening on {listening or 'nothing'}"

    def reload_on_signal(self) -> None:
        """SIGHUP: reload, the service manager told `RELOADING=1`, then `READY=1`."""
        if self.ready and not self.stopping:
            self.notifier.reloading()
        log.info("SIGHUP: reloading %s", self.config.source)
        task = self._background(self._reload_logged(), "reload")
        task.add_done_callback(lambda _: self._reloaded())

    def _reloaded(self) -> None:
        if self.ready and not self._stop.is_set():
            self.notifier.ready(self.status_text())

    def handover_listeners(self) -> list[tuple[Handed, socket.socket]]:
        """Duplicates of every listening socket (the same kernel sockets), with what each
        is; the caller closes them."""
        out: list[tuple[Handed, socket.socket]] = []
        for name, runtime in self.services.items():
            svc = runtime.config
            sock = listening_socket(runtime.bound)
            if sock is None:
                log.warning(
                    "handover: service %s listens on several addresses (%s is a name): not "
                    "handed over, the new process binds its own",
                    name,
                    svc.listen,
                )
                continue
            out.append(
                (Handed(f"service {name}", (svc.listen_host, svc.listen_port), runtime.bound), sock)
            )
        admin = self.admin_socket
        if self.admin_address is not None and admin is not None and admin.fileno() >= 0:
            cfg = self.config.admin
            dup = socket.socket(fileno=os.dup(admin.fileno()))
            out.append((Handed("admin", (cfg.host, cfg.port), self.admin_address), dup))
        return out

    def handed_over(self, pid: int) -> None:
        """The process `pid` serves on this one's listeners: stop accepting, drain, exit 0."""
        log.info(
            "handover: the balancer pid %d serves on every listener now; this process stops "
            "accepting, drains for at most %gs and exits",
            pid,
            self.config.drain_timeout,
        )
        self.handed_to = pid
        if not self._stop.is_set():
            self.notifier.stopping(f"handed over to pid {pid}; draining")
            self._stop.set()

    # -- stop ---------------------------------------------------------------------------
    def request_stop(self, sig: int | None = None) -> None:
        """A stop signal: the first drains, a second one cuts what is left at once."""
        what = signal.Signals(sig).name if sig is not None else "stop"
        if not self._stop.is_set():
            self.notifier.stopping()
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
        if self.handover is not None:
            self.handover.close()
        if self.handed_to is not None and self.admin is not None:
            # the new process serves the admin endpoint on the same socket: leave it that
            self._admin_stop = loop.create_task(self._stop_admin(end), name="admin stop")
        if self.handed_to is not None and not self._hurry.is_set():
            # Handed over: no connection comes any more, and those just made may have a
            # request on its way: they go on being read for a moment before the drain, which
            # stops reading (a message-mode request in flight would be closed unanswered).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(HANDOVER_GRACE, timeout)):
                    await self._hurry.wait()
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
        if self._admin_stop is not None:
            await self._admin_stop
        else:
            await self._stop_admin(end)

    async def _stop_admin(self, end: float) -> None:
        if self.admin is None:
            return
        left = max(0.1, end - asyncio.get_running_loop().time())
        try:
            async with asyncio.timeout(left):
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
                await self._ready()
                await stop
            else:
                log.warning("stop requested during start-up: abandoning the start")
                starting.cancel()
                await asyncio.wait({starting})
        finally:
            stop.cancel()
            await self.shutdown()
            resources.FDS = fds_before
            if self.takeover is not None:
                self.takeover.close()
        log.info("balancer stopped")
        return 0
