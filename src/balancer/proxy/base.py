"""What every proxy mode is to the rest of the balancer (`Proxy`), and the drain
they share.

A mode is a class built from a service's config and pool (see
`balancer.proxy.registry`); the runtime starts it, reconfigures it on reloads,
reads its counters, and stops it with `stop_accepting` and `drain`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, TypeVar

from balancer.core.pool import Backend, BackendPool
from balancer.net import loopguard
from balancer.net.loops import create_listener
from balancer.proxy.front import Arrival, Front, FrontStats, open_front

if TYPE_CHECKING:
    from balancer.config.model import Config, ServiceConfig
    from balancer.core.lifecycle import DrainCut
    from balancer.proxy.tls import BackendTls, ServerTls

DRAIN_POLL = 0.01
"""How often a drain looks at what is left (seconds)."""
LATE_ACCEPTS = 0.02
"""How long a drain waits, however few connections are left, for those the loop accepted
before the listener closed (seconds): they are served within the drain, not refused."""


class HttpStatus(TypedDict):
    """What only http mode counts, for `/status` (its "http" object) and `/metrics`."""

    requests: int
    responses: dict[str, int]
    """Responses sent to clients, by status class ("2xx", ...), ours included."""
    generated: dict[str, int]
    """Responses of our own (errors the balancer made), by status ("503", ...)."""
    retries: dict[str, int]
    """"backend": sent again to another backend; "keepalive_race": sent again on a fresh
    connection after a kept-alive one closed under it; "over_budget": not sent again for
    want of retry budget."""
    upstream_connections: dict[str, int]
    """"new": upstream connections made; "reused": requests sent on a kept-alive one."""
    idle_upstream_connections: int
    tunnels: int
    """Upgraded connections (WebSocket, ...) relayed as byte tunnels now."""
    client_errors: int
    """Requests refused with a 4xx of ours: malformed, too large, too slow."""
    bad_responses: int
    """Backend responses that broke the protocol."""
    routes: list[str]
    """The service's routes in order, each as `conditions -> service`."""
    backend_responses: dict[str, dict[str, int]]
    """Responses relayed from each backend (by address), by status class."""


class CertView(TypedDict):
    path: str
    server_names: list[str]
    subject: str
    not_after: float
    days_left: float


class EdgeStatus(TypedDict):
    """What `/status` shows of a service's TLS and PROXY protocol ("tls" object)."""

    terminating: bool
    certificates: list[CertView]
    loaded_at: float
    handshakes: int
    proxied: int
    errors: dict[str, int]
    """Connections closed before their mode got them, by reason."""
    routed: dict[str, int]
    backend_handshakes: int
    backend_resumed: int


class Proxy(Protocol):
    """What the server needs of a service's listener (message, tcp or http mode)."""

    refused: int
    """Client connections refused by limits."""
    not_available: int
    """Requests (message mode) or connections (tcp mode) no backend could take."""

    @property
    def retries(self) -> int:
        """Requests re-sent, or connects tried again, on another backend."""
        ...

    @property
    def client_connections(self) -> int: ...

    def configure(self, config: Config) -> None:
        """Take the settings of the whole process that concern this mode."""
        ...

    def reconfigure(self, config: ServiceConfig) -> None:
        """New settings for this service (same listener and mode), from a reload."""
        ...

    def remove_backend(self, backend: Backend) -> None: ...

    def set_tls(self, server: ServerTls | None, backend: BackendTls | None) -> None:
        """The certificates and backend TLS of the prepared config (start-up, reload)."""
        ...

    def edge_status(self) -> EdgeStatus:
        """What the service counted of TLS and the PROXY protocol, and its certificates."""
        ...

    def account(self) -> None:
        """Bring counters kept outside the loop's callbacks up to date (before a read)."""
        ...

    def mode_status(self) -> HttpStatus | None:
        """The counters only this mode keeps: http mode's, None in message and tcp mode."""
        ...

    async def start(self) -> tuple[str, int]: ...

    def stop_accepting(self) -> None: ...

    async def drain(self, timeout: float) -> DrainCut | None:
        """Let what is in flight finish for at most `timeout` seconds, then cut the rest.

        What it had to cut is returned (None: the proxy does not count it). It may be
        called again, with 0, while a drain runs: the second call cuts at once.
        """
        ...


class Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=Closable)


async def wait_closed(
    open_count: Callable[[], int],
    timeout: float,
    closing: list[C] | None = None,
    window: float = 0.0,
    settle: float = 0.0,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """Wait at most `timeout` seconds for a service's client connections to end.

    Meanwhile the connections in `closing` (idle ones) are closed spread over
    `window` rather than all at once, so clients do not all reconnect in the
    same instant. None left counts only once `settle` seconds have passed (connections
    accepted as the listener closed may still be on their way). True when none is left,
    False at the timeout.
    """
    start = clock()
    deadline = start + timeout
    window = min(window, timeout)
    closing = closing or []
    total = len(closing)
    closed = 0
    while True:
        now = clock()
        if total:
            due = total if window <= 0 else math.ceil(total * min(1.0, (now - start) / window))
            while closed < due and closing:
                closing.pop().close()
                closed += 1
        if not open_count() and now - start >= settle:
            return True
        if now >= deadline:
            return False
        await asyncio.sleep(DRAIN_POLL)


class Listener:
    """A service's listening socket, entered in the loop guard while it listens (so that
    a connection from one of our own backend connections to it is known for a loop)."""

    def __init__(self) -> None:
        self._server: asyncio.AbstractServer | None = None
        self._bound: list[Any] = []

    async def open(
        self,
        loop: asyncio.AbstractEventLoop,
        factory: Callable[[], asyncio.BaseProtocol],
        host: str,
        port: int,
    ) -> tuple[str, int]:
        """Listen on (host, port); the (host, port) it is bound to."""
        self._server = server = await create_listener(loop, factory, host, port, backlog=4096)
        return self._listening(server)

    async def open_front(
        self,
        loop: asyncio.AbstractEventLoop,
        factory: Callable[[Arrival], asyncio.BaseProtocol],
        host: str,
        port: int,
        front: Callable[[], Front],
        stats: FrontStats,
    ) -> tuple[str, int]:
        """Listen on (host, port) through a front door (PROXY header, TLS: `proxy.front`)."""
        self._server = server = await open_front(loop, factory, host, port, front, stats)
        return self._listening(server)

    def _listening(self, server: asyncio.AbstractServer) -> tuple[str, int]:
        sockets = list(getattr(server, "sockets", ()))
        self._bound = [sock.getsockname() for sock in sockets]
        for address in self._bound:
            loopguard.listening(address)
        bound_host, bound_port = sockets[0].getsockname()[:2]
        return str(bound_host), int(bound_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for address in self._bound:
            loopguard.not_listening(address)
        self._bound = []


class Owners:
    """What a service's connections to each backend are registered for in the loop guard
    (one owner per backend)."""

    def __init__(self, pool: BackendPool) -> None:
        self.pool = pool
        self._owners: dict[Backend, loopguard.Owner] = {}

    def __call__(self, backend: Backend) -> loopguard.Owner:
        owner = self._owners.get(backend)
        if owner is None:
            owner = self._owners[backend] = (self.pool, backend)
        return owner

    def forget(self, backend: Backend) -> None:
        self._owners.pop(backend, None)
