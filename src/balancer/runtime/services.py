"""What the server keeps per service, and what a start-up or reload prepares.

`ServiceRuntime` is one running service: its config, pool, proxy (the `Proxy`
protocol: message or tcp mode), health checker and counters, the removals under way
and the backends added through the runtime API. `Prepared` is what a start-up or a
reload built before it commits: bound listeners not accepting yet, new services,
backends checked once. The helpers at the end tell whether a backend address is one
of this process's own listeners (a connection loop).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from balancer.admin.metrics import LatencyHistogram
from balancer.config.addresses import format_address
from balancer.config.model import Config, ServiceConfig
from balancer.core.lifecycle import DrainCut, ReloadPlan
from balancer.core.pool import Backend, BackendPool
from balancer.net import loopguard
from balancer.net.loops import ListenerBatch
from balancer.observe.accesslog import AccessLog
from balancer.runtime.health import HealthChecker

log = logging.getLogger("balancer")

Address = tuple[str, int]


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

    async def drain(self, timeout: float) -> DrainCut | None:
        """Let what is in flight finish for at most `timeout` seconds, then cut the rest.

        What it had to cut is returned (None: the proxy does not count it). It may be
        called again, with 0, while a drain runs: the second call cuts at once.
        """
        ...

    @property
    def client_connections(self) -> int: ...


@dataclass
class Removal:
    """A backend leaving its service once it has finished what it holds."""

    backend: Backend
    admin_state: str
    """Its admin state before the drain, given back if a reload calls the removal off."""
    task: asyncio.Task[None] | None = None


@dataclass(eq=False)
class ServiceRuntime:
    config: ServiceConfig
    pool: BackendPool
    proxy: Proxy
    checker: HealthChecker
    histogram: LatencyHistogram
    access_log: AccessLog | None = None
    bound: tuple[str, int] = ("", 0)
    extra: dict[str, object] = field(default_factory=dict)
    removals: dict[str, Removal] = field(default_factory=dict)
    """Backends leaving, by address."""
    api_added: set[str] = field(default_factory=set)
    """Addresses of backends added through the runtime API (a reload removes them)."""

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


# -- connection loops: a backend that is one of our own listeners ----------------------------


def numeric_addresses(host: str, port: int) -> set[Address] | None:
    """`{(ip, port)}` for a numeric `host` (IPv4-mapped IPv6 as IPv4); None for a name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return {(str(ip), port)}


def own_listener(
    resolved: Iterable[Address], listeners: Iterable[tuple[str, Address]]
) -> str | None:
    """Which of `listeners` ((what, bound address)) a connection to `resolved` would reach."""
    targets = list(resolved)
    for what, (host, port) in listeners:
        if loopguard.points_at(targets, host, port):
            return f"{what} listens on {format_address(host, port)}"
    return None


# -- a prepared start-up or reload -----------------------------------------------------------


@dataclass(eq=False)
class Prepared:
    """What a reload's prepare step built: bound listeners, new services, not serving yet."""

    config: Config
    plan: ReloadPlan
    batch: ListenerBatch = field(default_factory=ListenerBatch)
    runtimes: dict[str, ServiceRuntime] = field(default_factory=dict)
    joining: dict[str, dict[str, Backend]] = field(default_factory=dict)
    """Backends a service changed in place gains, first check done: service -> address ->."""

    async def abandon(self) -> None:
        """Close and stop everything prepared (it has served nothing)."""
        self.batch.close()
        for runtime in self.runtimes.values():
            runtime.proxy.stop_accepting()
            try:
                await runtime.proxy.drain(0)
            except Exception:
                log.exception("closing prepared service %s failed", runtime.config.name)
            await runtime.checker.stop()
        self.runtimes.clear()


async def resolve(loop: asyncio.AbstractEventLoop, host: str, port: int) -> set[Address]:
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return set()
    out: set[Address] = set()
    for info in infos:
        numeric = numeric_addresses(str(info[4][0]), int(info[4][1]))
        if numeric:
            out |= numeric
    return out
