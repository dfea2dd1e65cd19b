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
- Each side's `data_received` is, once connected, the other side's bound
  `transport.write` itself (an instance attribute, handed to the loop again
  with `set_protocol`): on uvloop a chunk goes from the read to the write in
  C, with no Python frame per chunk, the system calls of a C relay and little
  more.
- Byte counters and idleness come from the kernel (`TCP_INFO`), not from
  counting chunks: a side's bytes received are added to its backend's
  counters when the peer's EOF arrives, when the connection ends (the loop
  calls `connection_lost` before it closes the socket) and when `/status` or
  `/metrics` asks (`TcpService.account`).

Limits: `max_connections` per service and `max_backend_connections` per
backend refuse excess connections cleanly (accepted, closed, counted in
`refused`); a backend at its limit is skipped for the next one. `idle_timeout`
closes a connection that moved no byte in either direction for that long,
checked by one periodic sweep rather than a timer per connection, from the
time since each socket last received data (`tcpi_last_data_recv`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import sys
from collections.abc import Callable
from typing import cast

from balancer.config import ServiceConfig
from balancer.loops import create_listener
from balancer.pool import Backend, BackendPool

log = logging.getLogger("balancer")

_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
_IDLE_SWEEPS = 4
"""The idle timeout is checked this many times per period (detection within +25%)."""
_LINGER_RESET = struct.pack("ii", 1, 0)

_TCP_INFO_LEN = 136
"""`struct tcp_info` up to `tcpi_bytes_received` (Linux)."""
_FIN_RECEIVED = frozenset({6, 8, 9, 11})
"""TCP states after the peer's FIN: TIME_WAIT, CLOSE_WAIT, LAST_ACK, CLOSING."""
_TCP_CLOSE = 7
"""Also where a socket that sent its FIN first ends once the peer's FIN arrives."""


def _tcp_info(transport: asyncio.BaseTransport) -> bytes | None:
    """The kernel's `TCP_INFO` of a transport's socket, None where there is none."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        info: bytes = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except (OSError, AttributeError):
        return None
    return info if len(info) >= _TCP_INFO_LEN else None


def _bytes_received(transport: asyncio.BaseTransport, eof_seen: bool, eof_sent: bool) -> int:
    """Bytes the socket has received from its peer, the FIN not counted; -1 if unknown.

    The FIN takes a sequence number and `tcpi_bytes_received` counts it. It has
    arrived if the loop reported the EOF (`eof_seen`), or the state says so, or
    the socket is closed after sending its own FIN (`eof_sent`): the kernel then
    moves it to TIME_WAIT and leaves the socket itself in CLOSE.
    """
    info = _tcp_info(transport)
    if info is None:
        return -1
    received = int.from_bytes(info[128:136], sys.byteorder)
    state = info[0]
    if received and (eof_seen or state in _FIN_RECEIVED or (eof_sent and state == _TCP_CLOSE)):
        received -= 1
    return received


def _newly_received(side: _BackendSide | _ClientSide, eof_seen: bool, eof_sent: bool) -> int:
    """Bytes `side`'s socket received since the last call (0 once the side is lost)."""
    if side.lost:
        return 0
    received = _bytes_received(side.transport, eof_seen, eof_sent)
    if received <= side.counted:
        return 0
    new = received - side.counted
    side.counted = received
    return new


def _quiet_ms(transport: asyncio.BaseTransport) -> int:
    """Milliseconds since the socket last received data (0 if unknown)."""
    info = _tcp_info(transport)
    if info is None:
        return 0
    return int.from_bytes(info[52:56], sys.byteorder)


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


class _BackendSide(asyncio.Protocol):
    """The backend socket of one relayed connection."""

    __slots__ = ("backend", "client", "counted", "data_received", "lost", "transport")

    data_received: Callable[[bytes], None]  # type: ignore[assignment]
    """The client transport's write: what the backend sends goes straight to the client."""

    def __init__(self, client: _ClientSide, backend: Backend) -> None:
        self.client = client
        self.backend = backend
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.data_received = client.transport.write
        self.counted = 0
        """Bytes received from the backend and already added to `backend.bytes_out`."""
        self.lost = False
        """connection_lost has run: the socket is closed and its number may be reused."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.client.closed:
            self.transport.abort()
            return
        _set_nodelay(transport)
        self.transport.set_write_buffer_limits(_HIGH_WATER, _LOW_WATER)
        self.client.attach(self)

    def account(self) -> None:
        """Add the bytes received from the backend since the last call to its counter."""
        client = self.client
        self.backend.bytes_out += _newly_received(self, client.server_eof, client.client_eof)

    def eof_received(self) -> bool:
        self.client.backend_eof()
        self.account()
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
        # The socket is still open here: the loop closes it after this call.
        self.account()
        self.lost = True
        self.client.backend_lost(exc)


class _ClientSide(asyncio.Protocol):
    """A client connection: picks and connects the backend, then relays."""

    __slots__ = (
        "backend",
        "client_eof",
        "closed",
        "connector",
        "counted",
        "data_received",
        "held",
        "lost",
        "server_eof",
        "started",
        "svc",
        "transport",
        "upstream",
        "upstream_full",
    )

    data_received: Callable[[bytes], None]  # type: ignore[assignment]
    """Holds what the client sends until a backend accepts, then is its transport's write."""

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
        self.data_received = self._hold
        self.counted = 0
        """Bytes received from the client and already added to the backend's `bytes_in`."""
        self.lost = False
        """connection_lost has run: the socket is closed and its number may be reused."""
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

    def _hold(self, data: bytes) -> None:
        held = self.held
        if held is not None:
            held += data
            if len(held) >= self.svc.connect_buffer:
                self.transport.pause_reading()

    def account(self) -> None:
        """Add the bytes both sides received since the last call to the backend's counters."""
        upstream = self.upstream
        if upstream is None:
            return
        upstream.backend.bytes_in += _newly_received(self, self.client_eof, self.server_eof)
        upstream.account()

    def eof_received(self) -> bool:
        self.client_eof = True
        self.account()
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
        # The socket is still open here: the loop closes it after this call.
        self.account()
        self.lost = True
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
        backend = upstream.backend
        backend.requests += 1
        backend.total_connections += 1
        held = self.held
        self.held = None
        dst = upstream.transport
        if held:
            dst.write(held)
        self.data_received = dst.write
        self.transport.set_protocol(self)  # the loop looks data_received up again
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
        if self.closed:
            return
        self.closed = True
        self.account()
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
        self.account()
        upstream = self.upstream
        if upstream is not None:
            upstream.transport.close()
        self.transport.close()

    def abort(self) -> None:
        """Drop both sides at once."""
        self.closed = True
        self.account()
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
            backend = pool.pick(key, tried) or pool.fallback(tried)
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
        self._server = await create_listener(
            self.loop,
            lambda: _ClientSide(self),
            self.config.listen_host,
            self.config.listen_port,
            backlog=4096,
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

    def account(self) -> None:
        """Bring the backends' byte counters up to date with the open connections."""
        for conn in self.conns:
            conn.account()

    async def _sweep_idle(self) -> None:
        period = self.idle_timeout / _IDLE_SWEEPS
        while True:
            await asyncio.sleep(period)
            limit_ms = self.idle_timeout * 1000
            expired = []
            for conn in self.conns:
                upstream = conn.upstream
                if upstream is None or upstream.lost:
                    continue  # still connecting (the connect timeout applies), or closing
                # Quiet both ways means idle: neither socket received data for that long.
                if min(_quiet_ms(conn.transport), _quiet_ms(upstream.transport)) >= limit_ms:
                    expired.append(conn)
            for conn in expired:
                conn.close()
