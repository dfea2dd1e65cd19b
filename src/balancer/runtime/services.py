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

from balancer.config.addresses import format_address
from balancer.config.hosts import points_at
from balancer.config.model import Config, ServiceConfig
from balancer.core.lifecycle import ReloadPlan
from balancer.core.pool import Backend, BackendPool
from balancer.core.stats import LatencyHistogram
from balancer.errors import BalancerError
from balancer.net.loops import ListenerBatch
from balancer.observe.accesslog import AccessLog
from balancer.proxy.base import Proxy
from balancer.proxy.tls import BackendTls, ServerTls
from balancer.runtime.health import HealthChecker

log = logging.getLogger("balancer")

Address = tuple[str, int]


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
    removals: dict[str, Removal] = field(default_factory=dict)
    """Backends leaving, by address."""
    api_added: set[str] = field(default_factory=set)
    """Addresses of backends added through the runtime API (a reload removes them)."""
    discovered: set[str] = field(default_factory=set)
    """Addresses of backends service discovery added (a reload keeps them while the
    service still has `discover`)."""
    discovery_answered: bool = False
    """Service discovery has made the pool its answer once: from then on the pool is
    discovery's, and a reload keeps it as it is rather than list the file's backends."""

    @property
    def listen(self) -> str:
        return format_address(*self.bound)


class ListenError(BalancerError):
    """A service's listen address could not be bound (in use, not local, no permission)."""


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
        if points_at(targets, host, port):
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
    tls: dict[str, tuple[ServerTls | None, BackendTls | None]] = field(default_factory=dict)
    """Each new or changed service's certificates and backend TLS, files read."""

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
