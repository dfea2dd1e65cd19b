"""An http-mode service: its listener, limits, upstream keep-alive pool, counters and drain."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from balancer.config.addresses import parse_networks
from balancer.config.model import Config, HttpConfig, RouteConfig, ServiceConfig
from balancer.core.http.affinity import backend_token
from balancer.core.http.headers import HeaderRules
from balancer.core.http.routing import RouteTable
from balancer.core.http.wire import Head
from balancer.core.lifecycle import DrainCut
from balancer.core.pool import Backend, BackendPool
from balancer.core.retry import RetryBudget
from balancer.core.stats import LatencyHistogram
from balancer.net.periodic import Periodic
from balancer.observe.accesslog import AccessLog
from balancer.proxy.base import LATE_ACCEPTS, HttpStatus, Listener, Owners, wait_closed
from balancer.proxy.edge import Edge
from balancer.proxy.http.client import ClientConnection
from balancer.proxy.http.context import Ends
from balancer.proxy.http.upstream import IdlePool

log = logging.getLogger("balancer")

_RUNNING: dict[str, list[HttpService]] = {}
"""The http services of this process by name, newest last: what routes resolve to (a
reload may hold an old and a new service of one name for a while)."""


def running(name: str) -> HttpService | None:
    """The service a route naming `name` uses: the newest accepting one, else the newest."""
    services = _RUNNING.get(name)
    if not services:
        return None
    for svc in reversed(services):
        if svc.accepting:
            return svc
    return services[-1]


_SWEEPS = 4
"""Idle upstream connections and tunnels are looked at this many times per timeout."""


def header_rules(http: HttpConfig) -> HeaderRules:
    return HeaderRules(
        trusted_proxies=parse_networks(http.trusted_proxies),
        forwarded=http.forwarded,
        via=http.via.encode() if http.via else None,
        set_headers=tuple((k.encode(), v.encode()) for k, v in http.set_headers),
        remove_headers=frozenset(n.lower().encode() for n in http.remove_headers),
        request_id=http.request_id,
        strip_prefix=http.strip_prefix.encode(),
        host_rewrite=http.host_rewrite.encode() if http.host_rewrite else None,
    )


def describe_route(route: RouteConfig) -> str:
    """`hosts path methods headers -> service`, what is not set left out (`*`: any)."""
    parts = [",".join(route.hosts) or "*"]
    if route.path_prefix:
        parts.append(route.path_prefix)
    if route.methods:
        parts.append(",".join(route.methods))
    parts += [f"{name}={value}" for name, value in route.headers]
    return f"{' '.join(parts)} -> {route.service}"


class HttpService(Edge):
    """An http-mode service: each request balanced on its own."""

    def __init__(
        self,
        config: ServiceConfig,
        pool: BackendPool,
        histogram: LatencyHistogram | None = None,
        access_log: AccessLog | None = None,
    ) -> None:
        self.pool = pool
        self.histogram = histogram
        self.access_log = access_log
        self.refused = 0
        self.not_available = 0
        self.retries_made = 0
        self.retries_over_budget = 0
        self.race_retries = 0
        """Requests sent again on a fresh connection after a reused one failed."""
        self.loops = 0
        self.requests = 0
        self.reused = 0
        """Requests sent on a kept-alive upstream connection."""
        self.dialed = 0
        """Upstream connections made."""
        self.bad_responses = 0
        self.client_errors = 0
        self.generated: dict[int, int] = {}
        """Responses of our own, by status."""
        self.statuses: dict[str, int] = {}
        self.backend_statuses: dict[str, dict[str, int]] = {}
        """Responses relayed from each backend (by address), by status class."""
        """Responses sent to clients, by status class ("2xx", ...)."""
        self.budget = RetryBudget(time.monotonic())
        self.idle = IdlePool()
        self.queue: deque[asyncio.Future[None]] = deque()
        self.conns: set[ClientConnection] = set()
        self.tunnels: set[Ends] = set()
        self.accepting = False
        self.stopped = False
        """The drain is over: a connection the loop still hands over gets a 503."""
        self._listener = Listener()
        self.owner = Owners(pool)
        self._tokens: dict[Backend, bytes] = {}
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._apply(config)
        self.init_edge()
        self._sweeper = Periodic(self._sweep_period, self.sweep)
        _RUNNING.setdefault(config.name, []).append(self)

    def _apply(self, config: ServiceConfig) -> None:
        self.config = config
        self.http = config.http
        self.rules = header_rules(config.http)
        self.routes = RouteTable(config.routes)
        self.max_connections = config.max_connections
        self.sticky_name = config.http.sticky_cookie.encode()
        idle = self.idle
        idle.max_idle = config.http.max_idle
        idle.idle_timeout = config.http.upstream_idle_timeout
        idle.max_requests = config.http.max_requests_per_connection

    def _sweep_period(self) -> float:
        period = min(self.http.upstream_idle_timeout, self.http.response_header_timeout)
        if self.http.tunnel_timeout > 0:
            period = min(period, self.http.tunnel_timeout)
        return max(0.05, period / _SWEEPS)

    def reconfigure(self, config: ServiceConfig) -> None:
        self._apply(config)
        self.refront()

    def configure(self, config: Config) -> None:
        """Nothing of the whole process's settings concerns http mode."""

    def route(self, head: Head) -> HttpService | None:
        """The service that serves `head`: a route's, else this one (None: 404, when this
        one has no backends of its own)."""
        if self.routes:
            name = self.routes.match(head)
            if name is not None:
                return running(name)
        return self if len(self.pool) else None

    def pass_turn(self) -> None:
        """A backend may take one more request: the oldest request waiting for one goes."""
        queue = self.queue
        while queue:
            turn = queue.popleft()
            if not turn.done():
                turn.set_result(None)
                return

    def sticky_token(self, backend: Backend) -> bytes:
        token = self._tokens.get(backend)
        if token is None:
            token = self._tokens[backend] = backend_token(backend.address)
        return token

    def sticky_backend(self, token: bytes) -> Backend | None:
        """The backend a sticky cookie names, if it is still one of the service's."""
        for backend in self.pool:
            if self.sticky_token(backend) == token:
                return backend
        return None

    def remove_backend(self, backend: Backend) -> None:
        self._tokens.pop(backend, None)
        self.owner.forget(backend)
        self.idle.drop(backend)

    @property
    def client_connections(self) -> int:
        return len(self.conns)

    @property
    def retries(self) -> int:
        return self.retries_made

    def mode_status(self) -> HttpStatus:
        return {
            "requests": self.requests,
            "responses": dict(sorted(self.statuses.items())),
            "generated": {str(status): n for status, n in sorted(self.generated.items())},
            "retries": {
                "backend": self.retries_made,
                "keepalive_race": self.race_retries,
                "over_budget": self.retries_over_budget,
            },
            "upstream_connections": {"new": self.dialed, "reused": self.reused},
            "idle_upstream_connections": self.idle.count(),
            "tunnels": len(self.tunnels),
            "client_errors": self.client_errors,
            "bad_responses": self.bad_responses,
            "routes": [describe_route(r) for r in self.config.routes],
            "backend_responses": {
                address: dict(sorted(classes.items()))
                for address, classes in sorted(self.backend_statuses.items())
            },
        }

    def __repr__(self) -> str:
        return (
            f"<HttpService {self.config.name} {self.config.listen}: "
            f"{len(self.conns)} connections, {self.requests} requests>"
        )

    async def start(self) -> tuple[str, int]:
        self.loop = asyncio.get_running_loop()
        bound = await self.open_listener(
            self._listener, self.loop, lambda arrival: ClientConnection(self, arrival)
        )
        self.accepting = True
        self._sweeper.start()
        return bound

    def stop_accepting(self) -> None:
        self.accepting = False
        self._listener.close()

    async def drain(self, timeout: float) -> DrainCut:
        """Stop accepting; close idle clients, let exchanges under way finish (their
        responses say `Connection: close`) for up to `timeout`, then cut the rest."""
        self.stop_accepting()
        conns = self.conns
        idle = [c for c in conns if c.idle and not c.queue and not c.reader.in_head]
        cut = 0
        if not await wait_closed(lambda: len(conns), timeout, idle, settle=LATE_ACCEPTS):
            left = list(conns)
            cut = len(left)
            for conn in left:
                conn.abort()
            await wait_closed(lambda: len(conns), 1.0)
        self.stopped = True
        self.idle.drop()
        self._sweeper.stop()
        services = _RUNNING.get(self.config.name, [])
        if self in services:
            services.remove(self)
            if not services:
                del _RUNNING[self.config.name]
        return DrainCut(cut, 0)

    def account(self) -> None:
        self.budget.advance(time.monotonic())

    def sweep(self) -> None:
        """Close idle upstream connections, quiet tunnels, and responses whose backend
        stopped sending mid-body."""
        now = time.monotonic()
        self.idle.sweep(now)
        for conn in self.conns:
            exchange = conn.exchange
            if exchange is not None:
                exchange.cut_if_stalled(now)
        limit = self.http.tunnel_timeout * 1000
        if limit > 0:
            for tunnel in [t for t in self.tunnels if t.quiet_ms() >= limit]:
                tunnel.finish()
