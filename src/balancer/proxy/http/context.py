"""What the parts of http mode need of each other, as protocols, so imports run one
way: `upstream` < `connect`, `tunnel` < `response` < `exchange` < `client` < `service`."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Protocol

from balancer.config.model import HttpConfig, ServiceConfig
from balancer.core.http.headers import HeaderRules
from balancer.core.http.wire import Event, Head, HttpError
from balancer.core.pool import Backend, BackendPool
from balancer.core.retry import RetryBudget
from balancer.core.stats import LatencyHistogram
from balancer.net import loopguard
from balancer.observe.accesslog import AccessLog
from balancer.proxy.http.upstream import IdlePool


def count(counts: dict[Any, int], key: Any) -> None:
    counts[key] = counts.get(key, 0) + 1


class Ends(Protocol):
    """A tunnel, as the connections it joins see it."""

    def on_client_eof(self) -> None: ...

    def client_lost(self, exc: Exception | None) -> None: ...

    def client_paused(self, paused: bool) -> None: ...

    def finish(self) -> None: ...

    def quiet_ms(self) -> int: ...


class Serving(Protocol):
    """An http-mode service, as its connections and exchanges see it."""

    config: ServiceConfig
    http: HttpConfig
    rules: HeaderRules
    pool: BackendPool
    loop: asyncio.AbstractEventLoop
    idle: IdlePool
    budget: RetryBudget
    histogram: LatencyHistogram | None
    access_log: AccessLog | None
    accepting: bool
    stopped: bool
    max_connections: int
    conns: set[Any]
    tunnels: set[Ends]
    refused: int
    not_available: int
    loops: int
    requests: int
    retries_made: int
    retries_over_budget: int
    race_retries: int
    reused: int
    dialed: int
    bad_responses: int
    client_errors: int

    queue: deque[asyncio.Future[None]]
    """Requests waiting for a backend under `max_backend_requests`, oldest first."""
    generated: dict[int, int]
    """Responses of our own, by status."""
    statuses: dict[str, int]
    """Responses to clients, by status class ("2xx", ...)."""
    backend_statuses: dict[str, dict[str, int]]

    sticky_name: bytes
    """The sticky cookie's name (empty: none)."""

    def owner(self, backend: Backend) -> loopguard.Owner: ...

    def origination(self, arrival: Any, transport: Any) -> Any: ...

    def pass_turn(self) -> None: ...

    def route(self, head: Head) -> Serving | None: ...

    def sticky_token(self, backend: Backend) -> bytes: ...

    def sticky_backend(self, token: bytes) -> Backend | None: ...


class Client(Protocol):
    """A client connection, as its exchanges and tunnel see it."""

    svc: Serving
    transport: asyncio.Transport
    peer_ip: str
    peer_text: str
    port: int
    lost: bool
    eof: bool
    loop_suspect: bool
    queue: deque[Event | HttpError]
    tunnel: Ends | None
    tunnel_write: Any
    proto: bytes
    """b"https" for a connection whose TLS was terminated here, else b"http"."""
    subject_header: bytes
    """The header carrying the client certificate's subject (b"": none, and no removal)."""
    arrival: Any
    """What the front door read first (PROXY header, ClientHello); None: nothing."""
    tls_log: dict[str, object]
    """What the access log shows of the connection's TLS ({} without)."""

    def with_subject(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """`headers` without any copy of the subject header, then with ours if verified."""
        ...

    def idle_pool(self, svc: Serving) -> IdlePool:
        """Where upstream connections for this client wait between requests: the service's
        pool, or with `send_proxy` one of this connection's own (its PROXY header names
        this client only)."""
        ...

    async def next_event(self) -> Event | HttpError | None: ...

    def take_raw(self) -> bytes: ...

    def abort(self) -> None: ...

    def reset(self) -> None: ...
