"""What a relayed connection needs of its tcp service, as a protocol, so imports run one
way: `context` < `relay` < `service`."""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Protocol

from balancer.config.model import ServiceConfig
from balancer.core.pool import Backend, BackendPool
from balancer.net import loopguard
from balancer.proxy.front import Arrival
from balancer.proxy.tcp.engine import UringRelay
from balancer.proxy.upstream import Origination


class Relays(Protocol):
    """What a relayed connection needs of its service."""

    config: ServiceConfig
    pool: BackendPool
    loop: asyncio.AbstractEventLoop
    conns: set[Any]
    accepting: bool
    stopped: bool
    """The drain is over: a connection accepted now is refused."""
    max_connections: int
    max_backend_connections: int
    connect_buffer: int
    connect_timeout: float
    retry_limit: int
    refused: int
    not_available: int
    retries_made: int
    loops: int
    engine: UringRelay | None
    descriptors: int
    """Descriptors a relayed connection holds: 2, or 3 with io_uring (the ring's dup)."""
    """The io_uring relay that takes connected pairs; None: the loop's transports relay."""

    def owner(self, backend: Backend) -> loopguard.Owner: ...

    async def adopt(
        self,
        side: asyncio.Protocol,
        sock: socket.socket,
        backend: Backend,
        origination: Origination | None,
    ) -> asyncio.Transport:
        """The transport of a connected backend socket (`upstream.adopt`, or held for the
        io_uring engine)."""
        ...

    def origination(self, arrival: Arrival | None, transport: Any) -> Origination | None: ...
