"""Building and starting the services of a balancer process (`ServerStart`).

Start-up and reload go through the same two steps (see `balancer.runtime.server`):
prepare builds and binds what a plan needs and checks it, commit swaps it in.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from balancer.config.addresses import format_address
from balancer.config.errors import ConfigError
from balancer.config.model import Config, ServiceConfig
from balancer.core.lifecycle import ReloadPlan
from balancer.core.pool import Backend, BackendPool
from balancer.core.states import DOWN
from balancer.core.stats import LatencyHistogram
from balancer.errors import Conflict, InvalidInput
from balancer.net import resources
from balancer.net.loops import listen_socket, listening_addresses, listening_socket
from balancer.observe.accesslog import AccessLog
from balancer.proxy.registry import build_proxy
from balancer.proxy.tls import load_service_tls, probe_tls
from balancer.runtime.health import HealthChecker, check_concurrency
from balancer.runtime.probe import ProbeResult, probe
from balancer.runtime.services import (
    Address,
    ListenError,
    Prepared,
    ServiceRuntime,
    numeric_addresses,
    own_listener,
    resolve,
)

if TYPE_CHECKING:
    from balancer.runtime.discovery import Discovery
    from balancer.runtime.etcd import EtcdDiscovery

log = logging.getLogger("balancer")

ADMIN_BACKLOG = 128


class AdminEndpoint(Protocol):
    """What the runtime needs of the admin endpoint: start it, stop it."""

    async def start(self, sock: socket.socket | None = None) -> tuple[str, int]:
        """Serve on `sock` (a listening socket, bound beforehand) or bind the listen
        address; the bound (host, port)."""
        ...

    async def stop(self) -> None: ...


AdminFactory = Callable[["ServerStart"], AdminEndpoint]


class ServerStart:
    """The services of a `Config` in one event loop: building, binding, starting."""

    def __init__(
        self,
        config: Config,
        reader: Callable[[], Config] | None = None,
        admin: AdminFactory | None = None,
    ) -> None:
        # for the life of the process
        self.config = config
        self.reader = reader
        """Re-reads the config for a reload (the CLI's overrides applied again)."""
        self.admin_factory = admin
        """Makes the admin endpoint (`balancer.app` gives the aiohttp one); None: no admin."""
        self.services: dict[str, ServiceRuntime] = {}
        self.admin: AdminEndpoint | None = None
        self.admin_address: tuple[str, int] | None = None
        self.admin_socket: socket.socket | None = None
        """The admin endpoint's listening socket (None when it listens on a name)."""
        self.handed_admin: socket.socket | None = None
        """A listening socket handed over for the admin endpoint (a takeover), until used."""
        self.handed_services: dict[str, socket.socket] = {}
        """Listening sockets handed over (a takeover), by the service to serve on each."""
        """A listening socket handed over for the admin endpoint (a takeover), until used."""
        # background work: reloads on SIGHUP, retired services draining
        self._tasks: set[asyncio.Task[None]] = set()
        self.draining: dict[ServiceRuntime, asyncio.Task[None]] = {}
        """Services retired by a reload, still draining."""
        self._reload_lock = asyncio.Lock()
        self.discovery: Discovery | EtcdDiscovery | None = None
        """Re-resolves the services' `discover` names (`runtime.discovery`), or watches
        etcd (`runtime.etcd`), once started."""
        self._discovery_task: asyncio.Task[None] | None = None
        self._preparing: asyncio.Task[Prepared] | None = None
        # the stop
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()
        self.stopping = False

    def _background(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(log_failure)
        return task

    # -- building services -------------------------------------------------------------
    def _build(self, svc: ServiceConfig, config: Config) -> ServiceRuntime:
        pool = BackendPool(svc)
        histogram = LatencyHistogram()
        access_log = AccessLog(svc.name) if self.config.access_log else None
        proxy = build_proxy(svc, pool, histogram, access_log)
        proxy.configure(config)
        checker = HealthChecker(pool)
        return ServiceRuntime(svc, pool, proxy, checker, histogram, access_log)

    async def _prepare(
        self,
        new: Config,
        plan: ReloadPlan,
        *,
        admin: bool = False,
        sockets: Mapping[Address, socket.socket] | None = None,
    ) -> Prepared:
        """Bind and build what `plan` needs, check it; nothing serves yet. Raises
        ListenError (a listen address cannot be bound), ConfigError (a backend is this
        balancer itself) or Conflict, having closed what it bound (and `sockets`)."""
        prepared = Prepared(new, plan)
        for address, handed in (sockets or {}).items():
            prepared.batch.hand_over(address, handed)
        try:
            for name, old in (plan.takeover or {}).items():
                svc = new.service(name)
                sock = listening_socket(self.services[old].bound)
                if sock is None:
                    raise Conflict(
                        f"service {name}: cannot take over {svc.listen} from service {old}: "
                        "its listener is bound to several addresses; restart to make this change",
                    )
                prepared.batch.hand_over((svc.listen_host, svc.listen_port), sock)
            prepared.tls = load_service_tls((*plan.listeners, *plan.update), new.source)
            with prepared.batch.binding():
                for svc in plan.listeners:
                    runtime = prepared.runtimes[svc.name] = self._build(svc, new)
                    runtime.proxy.set_tls(*prepared.tls[svc.name])
                    self._hand_over(prepared, svc)
                    try:
                        runtime.bound = await runtime.proxy.start()
                    except OSError as exc:
                        raise ListenError(
                            f"service {svc.name}: cannot listen on {svc.listen}: "
                            f"{exc.strerror or exc}"
                        ) from exc
            if admin:
                await self._start_admin()
            await self._check_loops(new, prepared)
            await asyncio.gather(
                *(r.checker.initial_round() for r in prepared.runtimes.values()),
                *(self._first_checks(svc, prepared) for svc in plan.update),
            )
        except BaseException:
            await prepared.abandon()
            raise
        return prepared

    def _hand_over(self, prepared: Prepared, svc: ServiceConfig) -> None:
        """The socket handed over for this very service (a takeover) is the one it binds:
        by name, as two services on port 0 name the same (host, port)."""
        sock = self.handed_services.pop(svc.name, None)
        if sock is None:
            return
        replaced = prepared.batch.handover.get((svc.listen_host, svc.listen_port))
        if replaced is not None:
            replaced.close()
        prepared.batch.hand_over((svc.listen_host, svc.listen_port), sock)

    async def _first_checks(self, svc: ServiceConfig, prepared: Prepared) -> None:
        """The backends an updated service gains, checked once as at start-up: those that
        pass join up at the commit (a file replacing every backend is no blackout)."""
        pool = self.services[svc.name].pool
        running = {b.address for b in pool}
        joining = prepared.joining[svc.name] = {
            bc.address: pool.new_backend(bc) for bc in svc.backends if bc.address not in running
        }
        if not joining or not svc.health.enabled:
            return
        backends = list(joining.values())
        bound = asyncio.Semaphore(check_concurrency())

        async def check(backend: Backend) -> ProbeResult:
            async with bound:
                return await probe(
                    backend.host,
                    backend.port,
                    svc.health,
                    framing=backend.framing,
                    owner=(pool, backend),
                    tls=probe_tls(svc, backend.host),
                )

        results = await asyncio.gather(*(check(b) for b in backends))
        now = time.time()
        for backend, result in zip(backends, results, strict=True):
            if result.shortage is not None:
                resources.ALARM.note(result.shortage, f"checking backend {backend.address}")
                backend.state = DOWN
                backend.last_reason = "added; waiting for health checks"
                continue
            backend.last_check = now
            backend.last_check_ok = result.ok
            if result.ok:
                if result.framing:
                    backend.framing = result.framing
                backend.last_reason = f"added; first check: {result.reason}"
            else:
                backend.state = DOWN
                backend.last_reason = f"added; first check failed: {result.reason}"

    def _listeners(self, prepared: Prepared) -> list[tuple[str, Address]]:
        """Every listener of this process once `prepared` is committed: (what, bound)."""
        out: list[tuple[str, Address]] = []
        for svc in prepared.config.services:
            runtime = prepared.runtimes.get(svc.name) or self.services.get(svc.name)
            if runtime is not None and runtime.bound[1]:
                what = f"service {svc.name}"
                out.extend((what, a) for a in listening_addresses(runtime.bound) or [runtime.bound])
        if self.admin_address is not None:
            out.append(("the admin endpoint", self.admin_address))
        return out

    def _running_listeners(self) -> list[tuple[str, Address]]:
        return self._listeners(Prepared(self.config, NO_CHANGE))

    def listen_addresses(self) -> list[tuple[str, int]]:
        """The bound (host, port) of every service's listener and of the admin endpoint."""
        return [bound for _, bound in self._running_listeners()]

    async def _check_loops(self, new: Config, prepared: Prepared) -> None:
        listeners = self._listeners(prepared)
        ports = {port for _, (_, port) in listeners}
        loop = asyncio.get_running_loop()
        for svc in new.services:
            for b in svc.backends:
                if b.port not in ports:
                    continue
                resolved = numeric_addresses(b.host, b.port)
                if resolved is None:
                    resolved = await resolve(loop, b.host, b.port)
                what = own_listener(resolved, listeners)
                if what is not None:
                    raise ConfigError(
                        new.source,
                        f"services.{svc.name}.backends",
                        f"expected backends other than this balancer itself, got "
                        f"{b.address!r}: {what} (a connection loop)",
                    )

    def loop_listener(self, host: str, port: int) -> str | None:
        """Which of our listeners a backend at (host, port) is, for a numeric host; else None.

        Names are not resolved here (that may block): the proxies catch such loops when
        the balancer connects to itself (see `balancer.net.loopguard`).
        """
        resolved = numeric_addresses(host, port)
        if resolved is None:
            return None
        return own_listener(resolved, self._running_listeners())

    async def check_backend_address(self, host: str, port: int) -> None:
        """Raise InvalidInput if a backend at (host, port) would be this balancer
        itself (names resolved without blocking the loop)."""
        listeners = self._running_listeners()
        if port not in {p for _, (_, p) in listeners}:
            return
        resolved = numeric_addresses(host, port)
        if resolved is None:
            resolved = await resolve(asyncio.get_running_loop(), host, port)
        what = own_listener(resolved, listeners)
        if what is not None:
            raise InvalidInput(
                f"backend {format_address(host, port)} is this balancer itself ({what}): "
                "refused, it would be a connection loop",
            )

    # -- the admin endpoint ---------------------------------------------------------------
    async def _start_admin(self) -> None:
        if self.admin_factory is None:
            return
        cfg = self.config.admin
        admin = self.admin_factory(self)
        sock, self.handed_admin = self.handed_admin, None
        try:
            if sock is None:  # bound here: its socket can be handed over at a restart
                sock = listen_socket(cfg.host, cfg.port, backlog=ADMIN_BACKLOG)
            self.admin_address = await admin.start(sock)
        except OSError as exc:
            if sock is not None:
                sock.close()
            log.warning(
                "admin endpoint not started: cannot listen on %s: %s; balancing goes on",
                self.config.admin.listen,
                exc.strerror or exc,
            )
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        else:
            self.admin = admin
            self.admin_socket = sock
            host, port = self.admin_address
            log.info("admin listening on http://%s:%d", host, port)


NO_CHANGE = ReloadPlan(order=())


def log_failure(task: asyncio.Task[None]) -> None:
    """A background task's error, logged (never "Task exception was never retrieved")."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("%s failed: %r", task.get_name(), exc, exc_info=exc)
