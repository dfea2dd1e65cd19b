"""A tcp-mode service: its listener, limits, idle sweep and drain."""

from __future__ import annotations

import asyncio
import logging
import socket

from balancer.config.model import Config, ServiceConfig
from balancer.core.lifecycle import DrainCut
from balancer.core.pool import Backend, BackendPool
from balancer.net.periodic import Periodic
from balancer.net.tcpinfo import quiet_ms
from balancer.proxy.base import LATE_ACCEPTS, Listener, Owners, wait_closed
from balancer.proxy.edge import Edge
from balancer.proxy.front import Arrival, ArrivalFactory, Router
from balancer.proxy.tcp.engine import EngineUnavailable, UringRelay, choose, shared
from balancer.proxy.tcp.held import HeldSocket
from balancer.proxy.tcp.relay import ClientSide
from balancer.proxy.upstream import Origination, adopt, send_first

log = logging.getLogger("balancer")

_IDLE_SWEEPS = 4
"""The idle timeout is checked this many times per period (detection within +25%)."""


_RUNNING: dict[str, list[TcpService]] = {}
"""The tcp services of this process by name, newest last: where SNI routes send
connections (a reload may hold an old and a new service of one name for a while)."""


def running(name: str) -> TcpService | None:
    """The newest accepting tcp service named `name`."""
    for svc in reversed(_RUNNING.get(name, ())):
        if svc.accepting:
            return svc
    return None


class TcpService(Edge):
    """A tcp-mode service: its listener and its relayed connections."""

    def __init__(self, config: ServiceConfig, pool: BackendPool) -> None:
        self.config = config
        self.pool = pool
        self.refused = 0
        self.not_available = 0
        """Connections closed because no backend could take them."""
        self.retries_made = 0
        """Connects tried again on another backend."""
        self.loops = 0
        """Accepted connections that were our own backend connections (closed at once)."""
        self._apply(config)
        self.conns: set[ClientSide] = set()
        self.accepting = False
        self.stopped = False
        """The drain is over: a connection the loop still hands over is refused."""
        self._listener = Listener()
        self._sweeper = Periodic(lambda: self.idle_timeout / _IDLE_SWEEPS, self.sweep_idle)
        self.owner = Owners(pool)
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.engine: UringRelay | None = None
        """The io_uring relay that takes connected pairs; None: the loop's transports relay."""
        self.engine_name = "uvloop"
        self.descriptors = 2
        """Descriptors a relayed connection holds: its socket, its backend's (and, with
        io_uring, the ring's duplicate of the client's); held from the accept to the close."""
        self.init_edge()

    def _apply(self, config: ServiceConfig) -> None:
        self.config = config
        self.idle_timeout = config.idle_timeout
        self.max_connections = config.max_connections
        self.max_backend_connections = config.max_backend_connections
        self.connect_buffer = config.connect_buffer
        self.connect_timeout = config.connect_timeout
        self.retry_limit = config.retries

    def reconfigure(self, config: ServiceConfig) -> None:
        """New settings for this service (same listener and mode), from a reload."""
        had_idle = self.idle_timeout > 0
        engine = self.config.engine
        self._apply(config)
        if config.engine != engine and self.loop is not None:
            try:
                self._choose_engine()
            except EngineUnavailable as exc:
                log.error("%s; new connections stay on %s", exc, self.engine_name)
        self.refront()
        if self.idle_timeout > 0 and not had_idle and self.accepting:
            self._sweeper.start()
        elif self.idle_timeout <= 0:
            self._sweeper.stop()

    def configure(self, config: Config) -> None:
        """Nothing of the whole process's settings concerns tcp mode."""

    def remove_backend(self, backend: Backend) -> None:
        """Close what is still relayed to a backend being removed (after its drain)."""
        self.owner.forget(backend)
        for conn in list(self.conns):
            if conn.backend is backend:
                conn.close()

    def __repr__(self) -> str:
        return (
            f"<TcpService {self.config.name} {self.config.listen}: "
            f"{len(self.conns)} connections, {self.refused} refused>"
        )

    @property
    def client_connections(self) -> int:
        return len(self.conns)

    @property
    def retries(self) -> int:
        """Connects tried again on another backend (a counter, as message mode's)."""
        return self.retries_made

    def mode_status(self) -> None:
        """Nothing beyond the counters every mode has."""

    def client(self, arrival: Arrival | None) -> ClientSide:
        return ClientSide(self, arrival)

    def sni_router(self) -> Router | None:
        routes = self.config.sni_routes
        if not routes:
            return None
        exact: dict[str, str] = {}
        wildcard: dict[str, str] = {}
        for sni in routes:
            for name in sni.server_names:
                if name.startswith("*."):
                    wildcard.setdefault(name[2:], sni.service)
                else:
                    exact.setdefault(name, sni.service)
        own = self.client if self.config.backends else None
        stats = self.front_stats

        def route(name: str | None) -> ArrivalFactory | None:
            target = None
            if name:
                target = exact.get(name)
                if target is None and "." in name:
                    target = wildcard.get(name.split(".", 1)[1])
            if target is None:
                return own
            svc = running(target)
            if svc is None:
                return None
            stats.routed[target] = stats.routed.get(target, 0) + 1
            return svc.client

        return route

    async def adopt(
        self,
        side: asyncio.Protocol,
        sock: socket.socket,
        backend: Backend,
        origination: Origination | None,
    ) -> asyncio.Transport:
        """The backend side's transport: the loop's, or, for a pair the io_uring engine will
        relay (plain sockets both), a `HeldSocket` the loop never reads."""
        engine = self.engine
        client = getattr(side, "client", None)
        plain = client is not None and client.transport.get_extra_info("ssl_object") is None
        if engine is None or not plain or (origination is not None and origination.tls):
            return await adopt(self.loop, side, sock, backend, origination)
        if origination is not None and origination.header:
            await send_first(self.loop, sock, origination.header)
        transport = HeldSocket(self.loop, sock, side)
        side.connection_made(transport)
        return transport

    def _choose_engine(self) -> None:
        """Pick the relay engine of new connections, and say which in the log."""
        name, words = choose(self.config.name, self.config.engine)
        self.engine = shared(self.loop) if name == "io_uring" else None
        if self.engine is not None:  # never lowered: connections give back what they took
            self.descriptors = 3
        self.engine_name = name
        log.info("service %s: tcp relay engine %s", self.config.name, words)

    async def start(self) -> tuple[str, int]:
        self.loop = asyncio.get_running_loop()
        self._choose_engine()
        bound = await self.open_listener(self._listener, self.loop, self.client)
        self.accepting = True
        _RUNNING.setdefault(self.config.name, []).append(self)
        if self.idle_timeout > 0:
            self._sweeper.start()
        return bound

    def stop_accepting(self) -> None:
        self.accepting = False
        self._listener.close()
        services = _RUNNING.get(self.config.name, [])
        if self in services:
            services.remove(self)
            if not services:
                del _RUNNING[self.config.name]

    async def drain(self, timeout: float) -> DrainCut:
        """Stop accepting; wait up to `timeout` for the relayed connections to end, then
        abort what is left and return it as cut. A call with 0 while a drain waits
        cuts at once (the first call then returns too)."""
        self.stop_accepting()
        cut = 0
        conns = self.conns
        if not await wait_closed(lambda: len(conns), timeout, settle=LATE_ACCEPTS):
            # a connection is cut (and counted) once, by whichever call gets there first
            left = [conn for conn in conns if not conn.cut]
            cut = len(left)
            for conn in left:
                conn.cut = True
                conn.abort()
            # aborted transports report connection_lost on the next loop turns
            await wait_closed(lambda: len(conns), 1.0)
        self.stopped = True
        self._sweeper.stop()
        return DrainCut(cut, 0)

    def account(self) -> None:
        """Bring the backends' byte counters up to date with the open connections."""
        for conn in self.conns:
            conn.account()

    def sweep_idle(self) -> int:
        """Close the connections quiet both ways for `idle_timeout`; how many were closed."""
        limit_ms = self.idle_timeout * 1000
        expired = []
        for conn in self.conns:
            upstream = conn.upstream
            if upstream is None or upstream.lost:
                continue  # still connecting (the connect timeout applies), or closing
            # Quiet both ways means idle: neither socket received data for that long.
            if min(quiet_ms(conn.transport), quiet_ms(upstream.transport)) >= limit_ms:
                expired.append(conn)
        for conn in expired:
            conn.close()
        return len(expired)
