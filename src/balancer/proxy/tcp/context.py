"""What a relayed connection needs of its tcp service, as a protocol, so imports run one
way: `context` < `relay` < `service`."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from balancer.config.model import ServiceConfig
from balancer.core.pool import Backend, BackendPool
from balancer.net import loopguard
from balancer.proxy.front import Arrival
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

    def owner(self, backend: Backend) -> loopguard.Owner: ...

    def origination(self, arrival: Arrival | None, transport: Any) -> Origination | None: ...
