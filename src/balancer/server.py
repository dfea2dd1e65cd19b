"""Start-up, listeners, signals and shutdown of a balancer process."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from balancer.accesslog import AccessLog
from balancer.config import BackendConfig, Config, ServiceConfig, format_address
from balancer.health import HealthChecker
from balancer.metrics import LatencyHistogram
from balancer.pool import DOWN, DRAIN, MAINT, READY, Backend, BackendPool

if TYPE_CHECKING:
    from balancer.admin import AdminServer

log = logging.getLogger("balancer")


class Proxy(Protocol):
    """What the server needs of a service's listener (message or tcp mode)."""

    refused: int
    """Client connections refused by limits."""
    not_available: int
    """Requests (message mode) or connections (tcp mode) no backend could take."""

    @property
    def retries(self) -> int:
        """Requests re-sent, or connects tried again, on another backend."""
        ...

    def reconfigure(self, config: ServiceConfig) -> None: ...

    def remove_backend(self, backend: Backend) -> None: ...

    def account(self) -> None:
        """Bring counters kept outside the loop's callbacks up to date (before a read)."""
        ...

    async def start(self) -> tuple[str, int]: ...

    def stop_accepting(self) -> None: ...

    async def drain(self, timeout: float) -> None: ...

    @property
    def client_connections(self) -> int: ...


@dataclass
class ServiceRuntime:
    config: ServiceConfig
    pool: BackendPool
    proxy: Proxy
    checker: HealthChecker
    histogram: LatencyHistogram
    access_log: AccessLog | None = None
    bound: tuple[str, int] = ("", 0)
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def listen(self) -> str:
        return format_address(*self.bound)


def build_proxy(
    config: ServiceConfig,
    pool: BackendPool,
    histogram: LatencyHistogram,
    access_log: AccessLog | None,
) -> Proxy:
    if config.mode == "tcp":
        from balancer.proxy.tcp import TcpService

        return TcpService(config, pool)
    from balancer.proxy.message import MessageService

    return MessageService(config, pool, histogram=histogram, access_log=access_log)


def configure_proxy(proxy: Proxy, config: Config) -> None:
    """Settings of the whole process a proxy needs."""
    if hasattr(proxy, "drain_close_window"):
        proxy.drain_close_window = config.drain_close_window


class ListenError(Exception):
    """A service's listen address could not be bound (in use, not local, no permission)."""


class RuntimeChangeError(Exception):
    """A runtime change that cannot be made; `status` is the HTTP status that fits."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(message)


ADMIN_STATES = {"up": READY, "ready": READY, "drain": DRAIN, "maint": MAINT}


class Server:
    """Runs every service of a `Config` in one event loop, plus the admin endpoint."""

    def __init__(self, config: Config, reader: Callable[[], Config] | None = None) -> None:
        self.config = config
        self.reader = reader
        """Re-reads the config for a reload (the CLI's overrides applied again)."""
        self.services: dict[str, ServiceRuntime] = {}
        self.retired: set[asyncio.Task[None]] = set()
        self.admin: AdminServer | None = None
        self.admin_address: tuple[str, int] | None = None
        self._stop = asyncio.Event()
        self.stopping = False

    async def _start_service(self, svc: ServiceConfig) -> ServiceRuntime:
        pool = BackendPool(svc)
        histogram = LatencyHistogram()
        access_log = AccessLog(svc.name) if self.config.access_log else None
        proxy = build_proxy(svc, pool, histogram, access_log)
        configure_proxy(proxy, self.config)
        checker = HealthChecker(pool)
        runtime = ServiceRuntime(svc, pool, proxy, checker, histogram, access_log)
        await checker.initial_round()
        try:
            runtime.bound = await proxy.start()
        except OSError as exc:
            raise ListenError(
                f"service {svc.name}: cannot listen on {svc.listen}: {exc.strerror or exc}"
            ) from exc
        checker.start()
        return runtime

    async def start(self) -> None:
        for svc in self.config.services:
            runtime = await self._start_service(svc)
            self.services[svc.name] = runtime
            up = sum(1 for b in runtime.pool if b.is_up)
            log.info(
                "service %s listening on %s (mode %s, algorithm %s); %d of %d backends up",
                svc.name,
                runtime.listen,
                svc.mode,
                svc.algorithm,
                up,
                len(runtime.pool),
            )
        if self.config.admin.enabled:
            from balancer.admin import AdminServer

            admin = AdminServer(self)
            try:
                self.admin_address = await admin.start()
            except OSError as exc:
                log.warning(
                    "admin endpoint not started: cannot listen on %s: %s; balancing goes on",
                    self.config.admin.listen,
                    exc.strerror or exc,
                )
            else:
                self.admin = admin
                host, port = self.admin_address
                log.info("admin listening on http://%s:%d", host, port)
        log.info("balancer ready")

    # -- runtime changes (admin API, reload) ------------------------------------
    def runtime(self, service: str) -> ServiceRuntime:
        runtime = self.services.get(service)
        if runtime is None:
            known = ", ".join(sorted(self.services)) or "none"
            raise RuntimeChangeError(404, f"no service {service!r} (services: {known})")
        return runtime

    def backend(self, service: str, address: str) -> tuple[ServiceRuntime, Backend]:
        runtime = self.runtime(service)
        backend = runtime.pool.get(address)
        if backend is None:
            known = ", ".join(b.address for b in runtime.pool) or "none"
            raise RuntimeChangeError(
                404, f"service {service!r} has no backend {address!r} (backends: {known})"
            )
        return runtime, backend

    def set_backend(
        self, service: str, address: str, *, state: str | None = None, weight: int | None = None
    ) -> Backend:
        """Change a backend's admin state ("up", "drain", "maint") and/or weight, at once."""
        runtime, backend = self.backend(service, address)
        if state is not None and state not in ADMIN_STATES:
            raise RuntimeChangeError(
                400, f"invalid state {state!r}: expected one of up, drain, maint"
            )
        if weight is not None and (
            isinstance(weight, bool) or not isinstance(weight, int) or weight < 0
        ):
            raise RuntimeChangeError(400, f"invalid weight {weight!r}: expected an integer >= 0")
        if state is not None:
            new = ADMIN_STATES[state]
            if new != backend.admin_state:
                log.warning(
                    "backend %s of service %s: admin state %s -> %s",
                    address,
                    service,
                    backend.admin_state,
                    new,
                )
                backend.admin_state = new
        if weight is not None and weight != backend.weight:
            log.warning(
                "backend %s of service %s: weight %d -> %d",
                address,
                service,
                backend.weight,
                weight,
            )
            backend.weight = weight
        runtime.pool.refresh()
        return backend

    def add_backend(self, service: str, config: BackendConfig) -> Backend:
        """Add a backend; it takes traffic once health checks pass (at once if they are off)."""
        runtime = self.runtime(service)
        if runtime.pool.get(config.address) is not None:
            raise RuntimeChangeError(
                409, f"service {service!r} already has backend {config.address!r}"
            )
        backend = runtime.pool.add(config)
        if runtime.config.health.enabled:
            backend.state = DOWN
            backend.last_reason = "added; waiting for health checks"
            runtime.pool.refresh()
            runtime.checker.watch(backend)
        log.warning("backend %s added to service %s", config.address, service)
        return backend

    async def remove_backend(
        self, service: str, address: str, timeout: float | None = None
    ) -> None:
        """Stop sending new work to a backend, let it finish what it holds, then remove it."""
        runtime, backend = self.backend(service, address)
        backend.admin_state = DRAIN
        runtime.pool.refresh()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.config.drain_timeout if timeout is None else timeout)
        # in_flight is a plain counter bumped on the hot path; poll it rather than signal
        while backend.in_flight > 0 and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        runtime.checker.unwatch(backend)
        if backend in runtime.pool.backends:
            runtime.pool.remove(backend)
        runtime.proxy.remove_backend(backend)
        log.warning("backend %s removed from service %s", address, service)

    # -- reload -------------------------------------------------------------------
    def _reload_on_signal(self) -> None:
        log.info("SIGHUP: reloading %s", self.config.source)
        task = asyncio.get_running_loop().create_task(self._reload_logged())
        self.retired.add(task)
        task.add_done_callback(self.retired.discard)

    async def _reload_logged(self) -> None:
        with contextlib.suppress(RuntimeChangeError):
            await self.reload()

    def read_config(self) -> Config:
        if self.reader is not None:
            return self.reader()
        from balancer.config import load_config

        return load_config(self.config.source)

    async def reload(self) -> None:
        """Re-read the config and apply it without dropping connections.

        Services are added, removed (after draining) or changed in place;
        within a service, backends are added (health-checked first), removed
        (after finishing what they hold) or re-weighted. A service whose
        listen address or mode changed gets a new listener while the old one
        drains. An invalid config is rejected with its error, and the running
        one is kept.
        """
        from balancer.config import ConfigError

        if self.stopping:
            raise RuntimeChangeError(409, "the balancer is stopping")
        try:
            new = self.read_config()
        except ConfigError as exc:
            log.error("reload rejected, keeping the running config: %s", exc)
            raise RuntimeChangeError(400, str(exc)) from None
        old = self.config
        if new.admin != old.admin:
            log.warning("reload: admin settings changed; they take effect on restart")
            new = dataclasses.replace(new, admin=old.admin)
        new_names = {s.name for s in new.services}
        for name in [n for n in self.services if n not in new_names]:
            self._retire_service(self.services.pop(name), "removed from the config")
        for svc in new.services:
            runtime = self.services.get(svc.name)
            if runtime is None:
                self.services[svc.name] = await self._start_logged(svc)
            elif (svc.listen_host, svc.listen_port, svc.mode) != (
                runtime.config.listen_host,
                runtime.config.listen_port,
                runtime.config.mode,
            ):
                runtime.proxy.stop_accepting()
                self._retire_service(runtime, "listen address or mode changed")
                self.services[svc.name] = await self._start_logged(svc)
            else:
                self._update_service(runtime, svc)
        self.config = dataclasses.replace(new, access_log=old.access_log)
        log.info("reload done: %d service(s)", len(self.services))

    async def _start_logged(self, svc: ServiceConfig) -> ServiceRuntime:
        runtime = await self._start_service(svc)
        log.info(
            "service %s listening on %s (mode %s, algorithm %s)",
            svc.name,
            runtime.listen,
            svc.mode,
            svc.algorithm,
        )
        return runtime

    def _retire_service(self, runtime: ServiceRuntime, why: str) -> None:
        log.warning("service %s retired (%s); draining", runtime.config.name, why)
        runtime.proxy.stop_accepting()

        async def finish() -> None:
            await runtime.proxy.drain(self.config.drain_timeout)
            await runtime.checker.stop()
            if runtime.access_log is not None:
                runtime.access_log.flush()

        task = asyncio.get_running_loop().create_task(finish())
        self.retired.add(task)
        task.add_done_callback(self.retired.discard)

    def _update_service(self, runtime: ServiceRuntime, svc: ServiceConfig) -> None:
        from balancer.policies import make_policy

        old = runtime.config
        pool = runtime.pool
        wanted = {b.address: b for b in svc.backends}
        for backend in list(pool.backends):
            if backend.address not in wanted:
                task = asyncio.get_running_loop().create_task(
                    self.remove_backend(svc.name, backend.address)
                )
                self.retired.add(task)
                task.add_done_callback(self.retired.discard)
        runtime.config = svc
        pool.service = svc
        for b in pool.backends:
            b.slow_start = svc.slow_start
        policy_changed = (old.algorithm, old.policy_options, old.hash_balance_factor) != (
            svc.algorithm,
            svc.policy_options,
            svc.hash_balance_factor,
        )
        if policy_changed:
            pool.policy = make_policy(svc)
        runtime.proxy.reconfigure(svc)
        if svc.health != old.health or svc.backend_framing != old.backend_framing:
            runtime.checker.reconfigure()
        for bc in svc.backends:
            existing = pool.get(bc.address)
            if existing is None:
                self.add_backend(svc.name, bc)
            elif existing.config.weight != bc.weight:
                existing.config = bc
                existing.weight = bc.weight
        # config order for the status page and the policies
        order = {b.address: i for i, b in enumerate(svc.backends)}
        pool.backends.sort(key=lambda b: order.get(b.address, len(order)))
        for i, b in enumerate(pool.backends):
            b.index = i
        pool.refresh()
        if svc != old:
            log.info("service %s updated", svc.name)

    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.info("stop requested; draining")
            self._stop.set()

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    async def shutdown(self) -> None:
        self.stopping = True
        for runtime in self.services.values():
            runtime.proxy.stop_accepting()
        timeout = self.config.drain_timeout
        await asyncio.gather(*(r.proxy.drain(timeout) for r in self.services.values()))
        if self.retired:
            await asyncio.gather(*self.retired, return_exceptions=True)
        for runtime in self.services.values():
            await runtime.checker.stop()
            if runtime.access_log is not None:
                runtime.access_log.flush()
        if self.admin is not None:
            await self.admin.stop()
        self.log_summary()

    def log_summary(self) -> None:
        for name, runtime in self.services.items():
            for b in runtime.pool:
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

    async def run(self) -> int:
        """Start, serve until SIGINT/SIGTERM, drain, stop. Returns the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
            loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        try:
            await self.start()
            await self.wait_stopped()
        finally:
            await self.shutdown()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
        log.info("balancer stopped")
        return 0
