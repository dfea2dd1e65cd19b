"""TCP (L4) mode: each client connection is relayed, byte for byte, to one backend.

How it works: the listener accepts a connection and a `_ClientSide` protocol
takes it. It asks the pool for a backend (keyed by the client's address) and
connects to it; bytes the client sends meanwhile are held, up to
`connect_buffer`, after which the client is not read until the backend
answers. A backend that refuses or does not answer within `connect_timeout` is
marked down and the next one is tried (at most `retries` more), the held bytes
going to whichever accepts. Once connected, a `_BackendSide` protocol owns the
backend socket and the two sides relay to each other:

- Flow control: when one side's transport buffers more than `_HIGH_WATER`
  bytes it pauses reading on the other side, and resumes it below
  `_LOW_WATER`, so a fast sender and a slow reader cost bounded memory.
- Half-close: an EOF from one peer is passed on with `write_eof()`; the other
  direction keeps flowing until it ends too, then both sockets are closed.
- Resets: a side lost with an error aborts the other with an RST (SO_LINGER 0).
- Each chunk read from one side is written, as the bytes object the loop
  delivered, to the other side's transport with a write method bound at
  connect time: one Python call per chunk. On uvloop the read and the write
  (batched per loop turn) run in C, with no Python socket call in between;
  a C relay's system calls and little more.

Limits: `max_connections` per service and `max_backend_connections` per
backend refuse excess connections cleanly (accepted, closed, counted in
`refused`); a backend at its limit is skipped for the next one. `idle_timeout`
closes a connection that moved no byte in either direction for that long,
checked by one periodic sweep rather than a timer per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from typing import cast

from balancer.config import ServiceConfig
from balancer.pool import Backend, BackendPool

log = logging.getLogger("balancer")

_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
_IDLE_SWEEPS = 4
"""The idle timeout is checked this many times per period (detection within +25%)."""
_LINGER_RESET = struct.pack("ii", 1, 0)


def _set_nodelay(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY (uvloop sets it on every TCP transport; plain asyncio needs it set)."""
    if type(transport).__module__.startswith("uvloop"):
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # pragma: no cover - closed under us
            pass


def _reset(transport: asyncio.Transport) -> None:
    """Abort `transport` so that the peer sees a reset, not an orderly close."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass
    transport.abort()


def _discard(data: bytes) -> None:
    """The write of a side with no peer (yet, or any more)."""


class _BackendSide(asyncio.Protocol):
    """The backend socket of one relayed connection."""

    __slots__ = ("backend", "client", "idle", "transport", "write")

    def __init__(self, client: _ClientSide, backend: Backend) -> None:
        self.client = client
        self.backend = backend
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.write: Callable[[bytes], None] = client.transport.write
        """Writes to the client."""
        self.idle = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.client.closed:
            self.transport.abort()
            return
        _set_nodelay(transport)
        self.transport.set_write_buffer_limits(_HIGH_WATER, _LOW_WATER)
        self.client.attach(self)

    def data_received(self, data: bytes) -> None:
        self.idle = 0
        self.backend.bytes_out += len(data)
        self.write(data)

    def eof_received(self) -> bool:
        self.client.backend_eof()
        return True

    def pause_writing(self) -> None:
        self.client.upstream_full = True
        self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        client = self.client
        client.upstream_full = False
        if not client.closed:
            client.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.write = _discard
        self.client.backend_lost(exc)


class _ClientSide(asyncio.Protocol):
    """A client connection: picks and connects the backend, then relays."""

    __slots__ = (
        "backend",
        "client_eof",
        "closed",
        "connector",
        "held",
        "idle",
        "server_eof",
        "started",
        "svc",
        "transport",
        "upstream",
        "upstream_full",
        "write",
    )

    def __init__(self, svc: TcpService) -> None:
        self.svc = svc
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.upstream: _BackendSide | None = None
        self.backend: Backend | None = None
        self.held: bytearray | None = None
        self.connector: asyncio.Task[None] | None = None
        self.closed = False
        self.client_eof = False
        self.server_eof = False
        self.upstream_full = False
        self.write: Callable[[bytes], None] = _discard
        """Writes to the backend, once connected."""
        self.idle = 0
        self.started = 0.0

    # -- client transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        svc = self.svc
        if not svc.accepting or (svc.max_connections and len(svc.conns) >= svc.max_connections):
            svc.refused += 1
            self.closed = True
            self.transport.close()
            return
        svc.conns.add(self)
        _set_nodelay(transport)
        self.transport.set_write_buffer_limits(_HIGH_WATER, _LOW_WATER)
        self.held = bytearray()
        self.connector = svc.loop.create_task(self._connect())

    def data_received(self, data: bytes) -> None:
        self.idle = 0
        upstream = self.upstream
        if upstream is None:
            self._hold(data)
            return
        upstream.backend.bytes_in += len(data)
        self.write(data)

    def _hold(self, data: bytes) -> None:
        held = self.held
        if held is not None:
            held += data
            if len(held) >= self.svc.connect_buffer:
                self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.client_eof = True
        upstream = self.upstream
        if upstream is not None:
            if self.server_eof:
                self.close()
            else:
                upstream.transport.write_eof()
        return True

    def pause_writing(self) -> None:
        upstream = self.upstream
        if upstream is not None:
            upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        upstream = self.upstream
        if upstream is not None and not self.closed:
            upstream.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.write = _discard
        if self.connector is not None:
            self.connector.cancel()
            self.connector = None
        if not self.closed:
            self.closed = True
            upstream = self.upstream
            if upstream is not None:
                if exc is not None:
                    _reset(upstream.transport)
                else:
                    upstream.transport.close()
        self._release(ok=True)
        svc = self.svc
        svc.conns.discard(self)
        if svc.drained is not None and not svc.conns:
            svc.drained.set()

    # -- backend side events

    def attach(self, upstream: _BackendSide) -> None:
        """The backend accepted: send what was held and start relaying."""
        self.upstream = upstream
        self.write = upstream.transport.write
        backend = upstream.backend
        backend.requests += 1
        backend.total_connections += 1
        held = self.held
        self.held = None
        dst = upstream.transport
        if held:
            backend.bytes_in += len(held)
            dst.write(held)
        if self.client_eof:
            dst.write_eof()
        elif not self.upstream_full:
            self.transport.resume_reading()

    def backend_eof(self) -> None:
        self.server_eof = True
        if self.client_eof:
            self.close()
        elif not self.closed:
            self.transport.write_eof()

    def backend_lost(self, exc: Exception | None) -> None:
        self.write = _discard
        if self.closed:
            return
        self.closed = True
        if exc is not None:
            self._release(ok=False)
            _reset(self.transport)
        else:
            self._release(ok=True)
            self.transport.close()

    # -- life cycle

    def close(self) -> None:
        """Close both sides, flushing what is queued."""
        if self.closed:
            return
        self.closed = True
        upstream = self.upstream
        if upstream is not None:
            upstream.transport.close()
        self.transport.close()

    def abort(self) -> None:
        """Drop both sides at once."""
        self.closed = True
        upstream = self.upstream
        if upstream is not None:
            upstream.transport.abort()
        self.transport.abort()

    def _release(self, ok: bool) -> None:
        backend = self.backend
        if backend is None:
            return
        self.backend = None
        backend.active_connections -= 1
        backend.in_flight -= 1
        self.svc.pool.policy.on_finish(backend, self.svc.loop.time() - self.started, ok)

    async def _connect(self) -> None:
        svc = self.svc
        pool = svc.pool
        loop = svc.loop
        peer = self.transport.get_extra_info("peername")
        key = peer[0].encode() if peer else None
        tried: list[Backend] = []
        failures = 0
        at_limit = False
        while True:
            backend = pool.pick(key, tried)
            if backend is None:
                break
            tried.append(backend)
            limit = svc.max_backend_connections
            if limit and backend.active_connections >= limit:
                at_limit = True
                continue
            if failures:
                svc.retries_made += 1
            self.backend = backend
            self.started = loop.time()
            backend.active_connections += 1
            backend.in_flight += 1
            pool.policy.on_start(backend)
            factory = _side_factory(self, backend)
            try:
                async with asyncio.timeout(svc.connect_timeout):
                    await loop.create_connection(factory, backend.host, backend.port)
            except (OSError, TimeoutError) as exc:
                reason = f"connect failed: {exc}" if isinstance(exc, OSError) else "connect timeout"
                self._release(ok=False)
                backend.connect_failures += 1
                backend.failures += 1
                pool.report_failure(backend, reason)
                failures += 1
                if self.closed or failures > svc.retry_limit:
                    break
                continue
            self.connector = None
            return
        self.connector = None
        if self.closed:
            return
        if at_limit and not failures:
            svc.refused += 1
        else:
            svc.not_available += 1
        log.debug("service %s: no backend for %s", svc.config.name, peer)
        self.close()


def _side_factory(client: _ClientSide, backend: Backend) -> Callable[[], _BackendSide]:
    return lambda: _BackendSide(client, backend)


class TcpService:
    """A tcp-mode service: its listener and its relayed connections."""

    def __init__(self, config: ServiceConfig, pool: BackendPool) -> None:
        self.config = config
        self.pool = pool
        self.refused = 0
        self.not_available = 0
        """Connections closed because no backend could take them."""
        self.retries_made = 0
        """Connects tried again on another backend."""
        self._apply(config)
        self.conns: set[_ClientSide] = set()
        self.accepting = False
        self.drained: asyncio.Event | None = None
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]

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
        self._apply(config)
        if self.idle_timeout > 0 and not had_idle and self.accepting:
            self._sweeper = self.loop.create_task(self._sweep_idle())
        elif self.idle_timeout <= 0 and self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def remove_backend(self, backend: Backend) -> None:
        """Close what is still relayed to a backend being removed (after its drain)."""
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

    async def start(self) -> tuple[str, int]:
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(
            lambda: _ClientSide(self),
            self.config.listen_host,
            self.config.listen_port,
            backlog=4096,
            reuse_address=True,
        )
        self.accepting = True
        if self.idle_timeout > 0:
            self._sweeper = self.loop.create_task(self._sweep_idle())
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    def stop_accepting(self) -> None:
        self.accepting = False
        if self._server is not None:
            self._server.close()

    async def drain(self, timeout: float) -> None:
        self.stop_accepting()
        if self.conns:
            self.drained = asyncio.Event()
            try:
                async with asyncio.timeout(timeout):
                    await self.drained.wait()
            except TimeoutError:
                for conn in list(self.conns):
                    conn.abort()
                self.drained.clear()
                if self.conns:
                    # Aborted transports report connection_lost on the next loop turns.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            await self.drained.wait()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    async def _sweep_idle(self) -> None:
        period = self.idle_timeout / _IDLE_SWEEPS
        while True:
            await asyncio.sleep(period)
            expired = []
            for conn in self.conns:
                # Each side notes its own reads; quiet both ways means idle.
                conn.idle += 1
                upstream = conn.upstream
                idle = conn.idle
                if upstream is not None:
                    upstream.idle += 1
                    idle = min(idle, upstream.idle)
                if idle > _IDLE_SWEEPS:
                    expired.append(conn)
            for conn in expired:
                conn.close()
