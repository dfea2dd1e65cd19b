"""The supervisor of `balancer serve --workers N`: binds once, runs N workers, keeps them.

How it works:
- Start-up: every service's listener and the admin endpoint are bound here, once (a
  service listening on a name binds its first address). With `sockets = "shared"` every
  worker inherits the same listening socket and the kernel wakes whichever worker's
  event loop accepts first; with "reuseport" each worker gets its own socket of one
  SO_REUSEPORT group, and the kernel spreads connections over them by a hash of their
  addresses. Either way the sockets live in the supervisor: a worker's restart loses
  nothing that waits in a backlog. A private directory (mode 0700) holds each worker's
  control socket (its admin API) and notify socket (its readiness).
- Workers (`balancer.runtime.workers`) are started with the supervisor's own command
  line; the supervisor is ready (`balancer ready`) once every worker is, and then serves
  the admin endpoint (`balancer.admin.cluster`: one balancer's view of all workers). A
  worker that fails during start-up stops the rest; the exit code is its own.
- A worker that dies later is restarted after RESTART_DELAY, doubled on each death in a
  row of a worker that lived less than STABLE_AFTER, up to MAX_RESTART_DELAY; the other
  workers go on, and their connections with them.
- SIGHUP: the supervisor reads the file, binds the listeners it adds or moves and sends
  them down each worker's channel (SCM_RIGHTS; `sync_listeners`), closes its copy of
  those it no longer has, then forwards SIGHUP (each worker reloads its config, taking
  the listeners it was sent); one that cannot be bound stops the reload there. SIGTERM
  or SIGINT are forwarded (each worker drains within drain_timeout; a second signal cuts
  at once); the supervisor waits for them all (killing one still there after
  drain_timeout and a grace) and exits 0.
  The supervisor itself never accepts a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from balancer.config.addresses import format_address
from balancer.config.errors import ConfigError
from balancer.config.model import Config, ServiceConfig
from balancer.net.loops import listen_socket, worker_listener
from balancer.net.notify import Notifier
from balancer.runtime.services import ListenError
from balancer.runtime.stop import STOP_GRACE
from balancer.runtime.workers import WORKER_ENV, WorkerSpec, send_listeners

log = logging.getLogger("balancer")

SOCKET_MODES = ("shared", "reuseport")
BACKLOG = 4096
RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
STABLE_AFTER = 10.0
"""A worker that lived this long restarts after RESTART_DELAY again."""
KILL_MARGIN = 5.0
"""After drain_timeout and STOP_GRACE, a worker still running gets this long, then SIGKILL."""


def restart_delay(quick_deaths: int) -> float:
    """Seconds before restarting a worker that died `quick_deaths` times in a row early."""
    return min(MAX_RESTART_DELAY, RESTART_DELAY * 2.0 ** max(0, quick_deaths - 1))


class ClusterControl(Protocol):
    """The supervisor's admin side: its endpoint (when enabled) and the state relay."""

    async def start(self, sock: socket.socket | None) -> tuple[str, int] | None: ...

    async def stop(self) -> None: ...


@dataclass
class WorkerSlot:
    """One worker's place: restarted processes take the same index and sockets."""

    index: int
    control_path: str
    listeners: dict[str, socket.socket]
    control: socket.socket
    notify: socket.socket
    channel: tuple[socket.socket, socket.socket] = field(
        default_factory=lambda: socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    )
    """The supervisor's end and the worker's: listening sockets a reload adds, sent to
    the worker (`balancer.runtime.workers.send_listeners`) before it reloads."""
    process: asyncio.subprocess.Process | None = None
    ready: bool = False
    started: float = 0.0
    started_wall: float = 0.0
    starts: int = 0
    quick_deaths: int = 0
    last_exit: str | None = None
    became_ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def restarts(self) -> int:
        return max(0, self.starts - 1)


def exit_text(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


class Supervisor:
    """Binds every listener once and keeps `count` worker processes serving on them."""

    def __init__(
        self,
        config: Config,
        count: int,
        argv: Sequence[str],
        *,
        sockets: str = "shared",
        reader: Callable[[], Config] | None = None,
        control: Callable[[Supervisor], ClusterControl] | None = None,
    ) -> None:
        # for the life of the process
        self.config = config
        self.count = count
        self.argv = list(argv)
        self.mode = sockets
        self.reader = reader
        self.control_factory = control
        self.notifier = Notifier.from_environ()
        self.directory = ""
        self.slots: list[WorkerSlot] = []
        self.bound_for: dict[str, tuple[str, int]] = {}
        """Each service's listen address (of its config) its listeners were bound for."""
        self.checker = 0
        """The index of the worker that runs the health checks (another one is elected
        while it is not ready: `ClusterAdmin._elect`)."""
        self.admin_socket: socket.socket | None = None
        # the stop
        self.stopping = False
        self._stop = asyncio.Event()
        self._failed: int | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- binding ----------------------------------------------------------------------
    def bind(self) -> None:
        """Bind every listener, the admin endpoint and the workers' sockets; ListenError
        (everything bound closed) when a listen address cannot be had."""
        self.directory = tempfile.mkdtemp(prefix="balancer-workers-")
        os.chmod(self.directory, 0o700)
        try:
            bound = self._bind_all(self.config.services)
            self.bound_for = {s.name: (s.listen_host, s.listen_port) for s in self.config.services}
            for index in range(self.count):
                self.slots.append(self._slot(index, bound[index]))
            cfg = self.config.admin
            if cfg.enabled:
                try:
                    self.admin_socket = listen_socket(cfg.host, cfg.port, backlog=128)
                except OSError as exc:
                    log.warning(
                        "admin endpoint not started: cannot listen on %s: %s; balancing goes on",
                        cfg.listen,
                        exc.strerror or exc,
                    )
        except BaseException:
            self.close()
            raise

    def _bind_all(self, services: Sequence[ServiceConfig]) -> list[dict[str, socket.socket]]:
        """Each worker's listening sockets of `services` (the same one for all, or one
        SO_REUSEPORT socket each); ListenError, with what it bound closed, when one
        cannot be had."""
        reuse = self.mode == "reuseport"
        out: list[dict[str, socket.socket]] = [{} for _ in range(self.count)]
        try:
            for svc in services:
                first: socket.socket | None = None
                for index in range(self.count):
                    if first is not None and not reuse:
                        out[index][svc.name] = first
                        continue
                    port = first.getsockname()[1] if first is not None else svc.listen_port
                    try:
                        sock = worker_listener(svc.listen_host, port, reuse, BACKLOG)
                    except OSError as exc:
                        raise ListenError(
                            f"service {svc.name}: cannot listen on {svc.listen}: "
                            f"{exc.strerror or exc}"
                        ) from exc
                    out[index][svc.name] = sock
                    if first is None:
                        first = sock
                        host, bound = sock.getsockname()[:2]
                        log.info(
                            "service %s listening on %s (%d workers, %s sockets)",
                            svc.name,
                            format_address(host, bound),
                            self.count,
                            self.mode,
                        )
        except BaseException:
            for sock in {id(s): s for d in out for s in d.values()}.values():
                sock.close()
            raise
        return out

    def sync_listeners(self) -> bool:
        """Make the listeners the config just read names: new (or moved) ones bound and
        sent to every worker before it reloads, those of services gone closed here (the
        workers' own copies drain and close; a restarted worker no longer gets them).
        False, with nothing changed, when a new one cannot be bound (the reload is then
        not made: its workers would bind apart)."""
        if not self.slots:
            return True
        wanted = {svc.name: svc for svc in self.config.services}
        new = [
            svc
            for name, svc in wanted.items()
            if self.bound_for.get(name) != (svc.listen_host, svc.listen_port)
        ]
        try:
            bound = self._bind_all(new)
        except ListenError as exc:
            log.error("reload: not made, no worker changes: %s", exc)
            return False
        gone: dict[int, socket.socket] = {}
        for slot, added in zip(self.slots, bound, strict=True):
            for name in [n for n in slot.listeners if n not in wanted or n in added]:
                sock = slot.listeners.pop(name)
                gone[id(sock)] = sock
            slot.listeners.update(added)
            if added:
                send_listeners(slot.channel[0], added)
        for sock in gone.values():
            sock.close()
        self.bound_for = {n: (svc.listen_host, svc.listen_port) for n, svc in wanted.items()}
        return True

    def _slot(self, index: int, listeners: dict[str, socket.socket]) -> WorkerSlot:
        path = os.path.join(self.directory, f"worker-{index}.sock")
        control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        control.bind(path)
        control.listen(64)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(os.path.join(self.directory, f"notify-{index}.sock"))
        notify.setblocking(False)
        return WorkerSlot(index, path, listeners, control, notify)

    def close(self) -> None:
        closed: set[int] = set()
        for slot in self.slots:
            for sock in (*slot.listeners.values(), slot.control, slot.notify, *slot.channel):
                if id(sock) not in closed:
                    closed.add(id(sock))
                    sock.close()
        if self.admin_socket is not None:
            self.admin_socket.close()
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    # -- the workers ----------------------------------------------------------------------
    async def _spawn(self, slot: WorkerSlot) -> None:
        fds = {name: sock.fileno() for name, sock in slot.listeners.items()}
        checks = slot.index == self.checker
        channel = slot.channel[1].fileno()
        spec = WorkerSpec(slot.index, self.count, fds, slot.control.fileno(), checks, channel)
        env = dict(os.environ)
        env[WORKER_ENV] = spec.to_env()
        env["NOTIFY_SOCKET"] = slot.notify.getsockname()
        slot.ready = False
        slot.became_ready.clear()
        slot.process = await asyncio.create_subprocess_exec(
            *self.argv, pass_fds=[*fds.values(), slot.control.fileno(), channel], env=env
        )
        slot.started = time.monotonic()
        slot.started_wall = time.time()
        slot.starts += 1
        log.info("worker %d started: pid %d", slot.index, slot.process.pid)
        self._background(self._watch(slot, slot.process), f"worker {slot.index}")

    def _background(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _notified(self, slot: WorkerSlot) -> None:
        while True:
            try:
                data = slot.notify.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            lines = data.decode(errors="replace").splitlines()
            if "READY=1" in lines and not self.stopping:
                slot.ready = True
                slot.became_ready.set()
            if "STOPPING=1" in lines:
                slot.ready = False

    async def _watch(self, slot: WorkerSlot, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        slot.ready = False
        slot.last_exit = exit_text(code)
        if self.stopping:
            log.info("worker %d (pid %d) %s", slot.index, process.pid, slot.last_exit)
            return
        if slot.starts == 1 and not slot.became_ready.is_set():
            log.error(
                "worker %d (pid %d) %s during start-up: stopping",
                slot.index,
                process.pid,
                slot.last_exit,
            )
            self._failed = code if code in (1, 2) else 1
            self._stop.set()
            return
        lived = time.monotonic() - slot.started
        slot.quick_deaths = 0 if lived >= STABLE_AFTER else slot.quick_deaths + 1
        delay = restart_delay(slot.quick_deaths)
        log.warning(
            "worker %d (pid %d) %s after %.1fs; restarting it in %gs (the other workers serve on)",
            slot.index,
            process.pid,
            slot.last_exit,
            lived,
            delay,
        )
        await asyncio.sleep(delay)
        if not self.stopping:
            await self._spawn(slot)

    def live(self) -> list[WorkerSlot]:
        return [s for s in self.slots if s.process is not None and s.process.returncode is None]

    def _signal_all(self, sig: int) -> None:
        for slot in self.live():
            assert slot.process is not None
            with contextlib.suppress(ProcessLookupError):
                slot.process.send_signal(sig)

    # -- signals ----------------------------------------------------------------------------
    def request_stop(self, sig: int | None = None) -> None:
        """SIGTERM/SIGINT: every worker drains (a second signal: cuts at once)."""
        what = signal.Signals(sig).name if sig is not None else "stop"
        if not self.stopping:
            log.info(
                "%s: stopping %d workers; each drains for at most %gs",
                what,
                len(self.live()),
                self.config.drain_timeout,
            )
            self.notifier.stopping()
        else:
            log.warning("%s again: the workers stop now, cutting what is left", what)
        self.stopping = True
        self._stop.set()
        self._signal_all(signal.SIGTERM)

    def reload_on_signal(self) -> None:
        """SIGHUP: every worker reloads its config; the supervisor re-reads its own."""
        log.info("SIGHUP: every worker reloads %s", self.config.source)
        if self.reread() and not self.sync_listeners():
            return
        self._signal_all(signal.SIGHUP)

    def reread(self) -> bool:
        """The config read again, for the supervisor's own settings (the relay's pace, the
        listeners; the admin endpoint keeps its listener and tokens until a restart);
        whether it could be read."""
        if self.reader is not None:
            try:
                self.config = self.reader()
            except ConfigError as exc:
                log.error("reload: the supervisor keeps its settings: %s", exc)
                return False
        return True

    # -- the process ------------------------------------------------------------------------
    async def run(self) -> int:
        """Start the workers, serve until a stop, stop them all; the exit code."""
        loop = asyncio.get_running_loop()
        for slot in self.slots:
            loop.add_reader(slot.notify.fileno(), self._notified, slot)
        control = self.control_factory(self) if self.control_factory is not None else None
        try:
            for slot in self.slots:
                await self._spawn(slot)
            readiness = loop.create_task(self._all_ready())
            stop = loop.create_task(self._stop.wait())
            await asyncio.wait({readiness, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not stop.done():
                if control is not None:
                    address = await control.start(self.admin_socket)
                    if address is not None:
                        log.info("admin listening on http://%s:%d", *address)
                log.info("balancer ready (%d workers)", self.count)
                self.notifier.ready(f"{self.count} workers serving")
                await stop
            readiness.cancel()
        finally:
            self.stopping = True
            await self._stop_workers()
            if control is not None:
                await control.stop()
            for slot in self.slots:
                loop.remove_reader(slot.notify.fileno())
            for task in list(self._tasks):
                task.cancel()
            self.close()
        log.info("balancer stopped")
        return self._failed if self._failed is not None else 0

    async def _all_ready(self) -> None:
        for slot in self.slots:
            await slot.became_ready.wait()

    async def _stop_workers(self) -> None:
        self._signal_all(signal.SIGTERM)
        waits = [s.process.wait() for s in self.live() if s.process is not None]
        if not waits:
            return
        limit = self.config.drain_timeout + STOP_GRACE + KILL_MARGIN
        try:
            async with asyncio.timeout(limit):
                await asyncio.gather(*waits)
        except TimeoutError:
            for slot in self.live():
                log.error(
                    "worker %d (pid %s) still runs after %gs: killed", slot.index, slot.pid, limit
                )
                assert slot.process is not None
                with contextlib.suppress(ProcessLookupError):
                    slot.process.kill()
                await slot.process.wait()
