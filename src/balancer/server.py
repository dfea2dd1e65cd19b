"""Start-up, listeners, signals and shutdown of a balancer process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from balancer.accesslog import AccessLog
from balancer.config import Config, ServiceConfig
from balancer.health import HealthChecker
from balancer.metrics import LatencyHistogram
from balancer.pool import BackendPool

if TYPE_CHECKING:
    from balancer.admin import AdminServer

log = logging.getLogger("balancer")


class Proxy(Protocol):
    """What the server needs of a service's listener (message or tcp mode)."""

    refused: int

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
        host, port = self.bound
        return f"{host}:{port}"


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


class Server:
    """Runs every service of a `Config` in one event loop, plus the admin endpoint."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.services: dict[str, ServiceRuntime] = {}
        self.admin: AdminServer | None = None
        self.admin_address: tuple[str, int] | None = None
        self._stop = asyncio.Event()
        self.stopping = False

    async def _start_service(self, svc: ServiceConfig) -> ServiceRuntime:
        pool = BackendPool(svc)
        histogram = LatencyHistogram()
        access_log = AccessLog(svc.name) if self.config.access_log else None
        proxy = build_proxy(svc, pool, histogram, access_log)
        checker = HealthChecker(pool)
        runtime = ServiceRuntime(svc, pool, proxy, checker, histogram, access_log)
        await checker.initial_round()
        runtime.bound = await proxy.start()
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
        try:
            await self.start()
            await self.wait_stopped()
        finally:
            await self.shutdown()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
        log.info("balancer stopped")
        return 0
