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
`refused`); a backend at its limit is skipped for the next one. When the
process's descriptor budget (`resources.FDS`) is set, each relayed connection
takes two descriptors of it (the client's socket and the backend's) at
accept, and one that would eat into the reserve kept for health checks,
backend connects and the admin endpoint is refused the same way.
`idle_timeout` closes a connection that moved no byte in either direction for
that long, checked by one periodic sweep rather than a timer per connection,
from the time since each socket last received data (`tcpi_last_data_recv`).

Local shortages: a backend connect that fails because this process is out of
descriptors, socket memory or local ports (`resources.is_local_shortage`) says
nothing about the backend: no failure is counted against it, no other backend
is tried, the alarm notes it and the client connection is closed (counted in
`not_available`).

Loops (a backend that is this balancer itself): a backend address that
resolves to one of this process's listeners is marked a loop
(`pool.mark_loop`: down for good) before any connect, and the next backend is
tried. For loops no address comparison sees (address translation, probes of
the health checker), the backend socket is made and its connect started here,
not by `loop.create_connection`, so its local address is registered
(`balancer.net.loopguard`) before the
event loop can run the accept on the other end. An accepted connection that
`loopguard` finds to be one of our own backend connections is closed at once,
before it picks a backend, and that backend is marked a loop. The connection
that opened it goes on to the next backend if it is not relaying yet, and is
closed if it is. The check is made again before each connect and when the
backend side attaches, for sockets registered late by others.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any, cast

from balancer.config.addresses import format_address
from balancer.config.model import ServiceConfig
from balancer.core.lifecycle import DrainCut
from balancer.core.pool import Backend, BackendPool
from balancer.net import loopguard, resources
from balancer.net.loops import create_listener

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


def _numeric_addresses(host: str, port: int) -> list[Any] | None:
    """`getaddrinfo` rows for a numeric host, without the resolver; None for a name."""
    try:
        return socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP,
            flags=socket.AI_NUMERICHOST,
        )  # fmt: skip
    except (socket.gaierror, UnicodeError):
        return None


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Wait until a connecting socket is writable (its connect has ended, either way)."""
    future: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, _set_done, future)
    try:
        await future
    finally:
        loop.remove_writer(fd)


def _ignore(data: bytes) -> None:
    """What a backend side not attached to its client does with what it receives."""


class _OwnListener(Exception):
    """A backend address resolves to a listener of this process."""


class _BackendSide(asyncio.Protocol):
    """The backend socket of one relayed connection."""

    __slots__ = (
        "backend",
        "client",
        "counted",
        "data_received",
        "lost",
        "registration",
        "transport",
    )

    data_received: Callable[[bytes], None]  # type: ignore[assignment]
    """The client transport's write: what the backend sends goes straight to the client."""

    def __init__(
        self, client: _ClientSide, backend: Backend, registration: loopguard.Registration
    ) -> None:
        self.client = client
        self.backend = backend
        self.registration = registration
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.data_received = _ignore
        self.counted = 0
        """Bytes received from the backend and already added to `backend.bytes_out`."""
        self.lost = False
        """connection_lost has run: the socket is closed and its number may be reused."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        client = self.client
        if client.closed or self.backend.looped or client.cut_if_loop():
            # Not attached; the connector aborts it once the loop has handed it over
            # (uvloop mishandles a socket given to create_connection whose transport
            # is closed inside connection_made: it would later close a reused fd).
            self.transport.pause_reading()
            return
        _set_nodelay(transport)
        self.transport.set_write_buffer_limits(_HIGH_WATER, _LOW_WATER)
        self.data_received = client.transport.write
        self.transport.set_protocol(self)  # the loop looks data_received up again
        client.attach(self)

    def account(self) -> None:
        """Add the bytes received from the backend since the last call to its counter."""
        client = self.client
        self.backend.bytes_out += _newly_received(self, client.server_eof, client.client_eof)

    def eof_received(self) -> bool:
        if self.client.upstream is self:
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
        self.registration.release()
        if self.client.upstream is not self:
            self.lost = True
            return  # never attached
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
        "fds",
        "held",
        "loop_suspect",
        "lost",
        "peer",
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
        self.peer: Any = None
        self.loop_suspect = False
        """The peer's address is one of our own backend connections' (see `loopguard`)."""
        self.fds: resources.FdBudget | None = None
        """The descriptor budget this connection holds two descriptors of."""

    # -- client transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        svc = self.svc
        if not svc.accepting:
            self._refuse()
            return
        self.peer = loopguard.address_of(transport.get_extra_info("peername"))
        if self.cut_if_loop():
            return
        if svc.max_connections and len(svc.conns) >= svc.max_connections:
            self._refuse()
            return
        fds = resources.FDS
        if fds is not None:
            # Two descriptors: this socket, and the backend's about to be opened.
            if not fds.admit():
                self._refuse()
                return
            if not fds.admit():
                fds.release()
                self._refuse()
                return
            self.fds = fds
        svc.conns.add(self)
        _set_nodelay(transport)
        self.transport.set_write_buffer_limits(_HIGH_WATER, _LOW_WATER)
        self.held = bytearray()
        self.connector = svc.loop.create_task(self._connect())

    def _refuse(self) -> None:
        self.svc.refused += 1
        self.closed = True
        self.transport.close()

    def cut_if_loop(self) -> bool:
        """Close this connection if it is one of our own backend connections; True if so."""
        if self.closed:
            return False
        found = loopguard.check(self.peer, self.transport.get_extra_info("sockname"))
        if found is None:
            return False
        if not isinstance(found, loopguard.Loop):
            self.loop_suspect = True
            return False
        pool, backend = found.owner
        svc = self.svc
        svc.loops += 1
        pool.mark_loop(
            backend,
            f"service {svc.config.name} accepted a connection from its own connection "
            f"to {backend.address}",
        )
        self.abort()
        origin = found.origin
        if isinstance(origin, _ClientSide) and origin.upstream is not None:
            origin.close()  # already relaying into the loop; one not attached tries the next
        return True

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
        fds = self.fds
        if fds is not None:
            self.fds = None
            fds.release()
            fds.release()
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

    def _release(self, ok: bool | None) -> None:
        """The backend no longer holds this connection; `ok` None: no verdict for the policy."""
        backend = self.backend
        if backend is None:
            return
        self.backend = None
        backend.active_connections -= 1
        backend.in_flight -= 1
        if ok is not None:
            self.svc.pool.policy.on_finish(backend, self.svc.loop.time() - self.started, ok)

    async def _dial(self, backend: Backend) -> tuple[socket.socket, loopguard.Registration]:
        """A socket connected to `backend`, registered as ours from its first moment.

        The connect is started here so that the socket's local address is known,
        and registered, before the loop can run the accept of a connection to
        ourselves.
        """
        loop = self.svc.loop
        rows = _numeric_addresses(backend.host, backend.port)
        if rows is None:
            rows = await loop.getaddrinfo(
                backend.host, backend.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
        own = next((row[4] for row in rows if loopguard.is_listener(row[4])), None)
        if own is not None:
            raise _OwnListener(loopguard.address_of(own))
        error: OSError = OSError(f"no address for {backend.address}")
        owner = self.svc.owner(backend)
        for family, kind, proto, _, address in rows:
            sock = socket.socket(family, kind, proto)
            registration: loopguard.Registration | None = None
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                code = sock.connect_ex(address)
                if code not in (0, errno.EINPROGRESS):
                    raise OSError(code, os.strerror(code))
                registration = loopguard.Registration(sock.getsockname(), address, owner, self)
                if code:
                    await _writable(loop, sock)
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if code:
                        raise OSError(code, os.strerror(code))
            except OSError as exc:
                if registration is not None:
                    registration.release()
                sock.close()
                if resources.is_local_shortage(exc):
                    raise
                error = exc
                continue
            except BaseException:
                if registration is not None:
                    registration.release()
                sock.close()
                raise
            return sock, registration
        raise error

    async def _connect(self) -> None:
        svc = self.svc
        pool = svc.pool
        loop = svc.loop
        peer = self.peer
        key = peer[0].encode() if peer else None
        tried: list[Backend] = []
        failures = 0
        at_limit = False
        shortage = False
        while not self.closed:
            if self.cut_if_loop():
                break
            backend = pool.pick(key, tried) or pool.fallback(tried)
            if backend is None:
                break
            tried.append(backend)
            if backend.looped:
                continue
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
            try:
                async with asyncio.timeout(svc.connect_timeout):
                    sock, registration = await self._dial(backend)
            except _OwnListener as exc:
                self._release(ok=None)
                host, port = exc.args[0]
                pool.mark_loop(
                    backend,
                    f"{backend.address} is {format_address(host, port)}, where this "
                    "balancer listens",
                )
                continue
            except (OSError, TimeoutError) as exc:
                if resources.is_local_shortage(exc):
                    # Ours, not the backend's: no failure counted, no other backend tried.
                    self._release(ok=None)
                    resources.ALARM.note(
                        exc, f"connecting to backend {backend.address} of service {svc.config.name}"
                    )
                    shortage = True
                    break
                reason = (
                    f"connect timeout after {svc.connect_timeout:g}s"
                    if isinstance(exc, TimeoutError)
                    else f"connect failed: {exc.strerror or exc}"
                )
                self._release(ok=False)
                backend.connect_failures += 1
                backend.failures += 1
                pool.report_failure(backend, reason)
                failures += 1
                if self.closed or failures > svc.retry_limit:
                    break
                continue
            side = _BackendSide(self, backend, registration)
            try:
                transport = await _adopt(loop, side, sock)
            except OSError as exc:  # pragma: no cover - a connected socket the loop refused
                registration.release()
                self._release(ok=None)
                log.warning("service %s: backend connection lost: %s", svc.config.name, exc)
                break
            if self.upstream is not side:
                # Connected but not attached: a loop found at attach, or the client went.
                transport.abort()
                self._release(ok=None)
                continue
            self.connector = None
            return
        self.connector = None
        if self.closed:
            return
        if at_limit and not failures and not shortage:
            svc.refused += 1
        else:
            svc.not_available += 1
        log.debug("service %s: no backend for %s", svc.config.name, peer)
        self.close()


def _abort_adopted(task: asyncio.Task[tuple[asyncio.Transport, _BackendSide]]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result()[0].abort()


async def _adopt(
    loop: asyncio.AbstractEventLoop, side: _BackendSide, sock: socket.socket
) -> asyncio.Transport:
    """Hand a connected socket to the loop as `side`'s transport.

    Not cancelled half-way (a client that goes meanwhile): the hand-over
    finishes and its transport is aborted then, so that no loop is left with a
    socket object whose descriptor it has already closed.
    """
    handover: asyncio.Task[tuple[asyncio.Transport, _BackendSide]] = loop.create_task(
        loop.create_connection(lambda: side, sock=sock)
    )
    try:
        transport, _ = await asyncio.shield(handover)
    except asyncio.CancelledError:
        handover.add_done_callback(_abort_adopted)
        raise
    except OSError:  # pragma: no cover - the loop refused a connected socket
        if type(loop).__module__.startswith("uvloop"):
            sock.detach()  # uvloop has closed the descriptor already
        raise
    return transport


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
        self.loops = 0
        """Accepted connections that were our own backend connections (closed at once)."""
        self._apply(config)
        self.conns: set[_ClientSide] = set()
        self.accepting = False
        self.drained: asyncio.Event | None = None
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._bound: list[Any] = []
        """The listener's bound addresses, entered in `loopguard` while it listens."""
        self._owners: dict[Backend, loopguard.Owner] = {}
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

    def owner(self, backend: Backend) -> loopguard.Owner:
        """What this service's connections to `backend` are registered for (one per backend)."""
        owner = self._owners.get(backend)
        if owner is None:
            owner = self._owners[backend] = (self.pool, backend)
        return owner

    def remove_backend(self, backend: Backend) -> None:
        """Close what is still relayed to a backend being removed (after its drain)."""
        self._owners.pop(backend, None)
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
        self._bound = [sock.getsockname() for sock in self._server.sockets]
        for address in self._bound:
            loopguard.listening(address)
        self.accepting = True
        if self.idle_timeout > 0:
            self._sweeper = self.loop.create_task(self._sweep_idle())
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    def stop_accepting(self) -> None:
        self.accepting = False
        if self._server is not None:
            self._server.close()
        for address in self._bound:
            loopguard.not_listening(address)
        self._bound = []

    async def drain(self, timeout: float) -> DrainCut:
        """Stop accepting; wait up to `timeout` for the relayed connections to end, then
        abort what is left and return it as cut. A call with 0 while a drain waits
        cuts at once (the first call then returns too)."""
        self.stop_accepting()
        cut = 0
        if self.conns:
            if self.drained is None:
                self.drained = asyncio.Event()
            drained = self.drained
            try:
                async with asyncio.timeout(timeout):
                    await drained.wait()
            except TimeoutError:
                cut = len(self.conns)
                for conn in list(self.conns):
                    conn.abort()
                if self.conns:
                    # Aborted transports report connection_lost on the next loop turns.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            await drained.wait()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
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
            if min(_quiet_ms(conn.transport), _quiet_ms(upstream.transport)) >= limit_ms:
                expired.append(conn)
        for conn in expired:
            conn.close()
        return len(expired)

    async def _sweep_idle(self) -> None:
        while True:
            await asyncio.sleep(self.idle_timeout / _IDLE_SWEEPS)
            self.sweep_idle()
