"""The two sides of a relayed connection, `ClientSide` and `BackendSide` (see `proxy.tcp`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

from balancer.config.hosts import address_of
from balancer.core.pool import Backend
from balancer.net import loopguard, resources
from balancer.net.sockopts import half_close, reset, set_nodelay
from balancer.net.tcpinfo import newly_received
from balancer.proxy.front import Arrival
from balancer.proxy.tcp.context import Relays
from balancer.proxy.tcp.engine import Pair
from balancer.proxy.upstream import (
    OwnListener,
    TlsFailed,
    admit,
    connect_failure,
    dial,
    has_room,
    local_shortage,
    mark_accepted_loop,
    mark_own_listener,
)

log = logging.getLogger("balancer")

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


def _ignore(data: bytes) -> None:
    """What a backend side not attached to its client does with what it receives."""


class BackendSide(asyncio.Protocol):
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
        self, client: ClientSide, backend: Backend, registration: loopguard.Registration
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
        set_nodelay(transport)
        self.transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        self.data_received = client.transport.write
        self.transport.set_protocol(self)  # the loop looks data_received up again
        client.attach(self)

    def account(self) -> None:
        """Add the bytes received from the backend since the last call to its counter."""
        client = self.client
        self.backend.bytes_out += newly_received(self, client.server_eof, client.client_eof)

    def eof_received(self) -> bool:
        if self.client.upstream is self:
            self.client.backend_eof()
            self.account()
        return self.transport.can_write_eof()  # TLS has no half-close: the loop closes

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


class ClientSide(asyncio.Protocol):
    """A client connection: picks and connects the backend, then relays."""

    __slots__ = (
        "arrival",
        "backend",
        "client_eof",
        "closed",
        "connector",
        "counted",
        "cut",
        "data_received",
        "fds",
        "held",
        "loop_suspect",
        "lost",
        "pair",
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

    def __init__(self, svc: Relays, arrival: Arrival | None = None) -> None:
        self.svc = svc
        self.arrival = arrival
        """What the front door read first (PROXY header, ClientHello); None: nothing."""
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.upstream: BackendSide | None = None
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
        self.cut = False
        """Cut by a stop's drain (counted there once)."""
        self.pair: Pair | None = None  # relayed by the io_uring engine (`proxy.tcp.engine`)

    # -- client transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        svc = self.svc
        if svc.stopped:  # one accepted as the listener closed is relayed within the drain
            self._refuse()
            return
        self.peer = address_of(transport.get_extra_info("peername"))
        if self.cut_if_loop():
            return
        # this socket, the backend's about to be opened (and the io_uring engine's dup)
        admitted, self.fds = admit(len(svc.conns), svc.max_connections, svc.descriptors)
        if not admitted:
            self._refuse()
            return
        svc.conns.add(self)
        set_nodelay(transport)
        self.transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
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
        svc = self.svc
        svc.loops += 1
        mark_accepted_loop(found, svc.config.name)
        self.abort()
        origin = found.origin
        if isinstance(origin, ClientSide) and origin.upstream is not None:
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
        upstream.backend.bytes_in += newly_received(self, self.client_eof, self.server_eof)
        upstream.account()

    def eof_received(self) -> bool:
        self.client_eof = True
        self.account()
        upstream = self.upstream
        if upstream is not None:
            if self.server_eof:
                self.close()
            else:
                half_close(upstream.transport)
        return self.transport.can_write_eof()  # TLS has no half-close: the loop closes

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
                    reset(upstream.transport)
                else:
                    upstream.transport.close()
        self._release(ok=True)
        fds = self.fds
        if fds is not None:
            self.fds = None
            fds.release(self.svc.descriptors)
        svc = self.svc
        svc.conns.discard(self)

    # -- backend side events

    def attach(self, upstream: BackendSide) -> None:
        """The backend accepted: send what was held and start relaying."""
        self.upstream = upstream
        backend = upstream.backend
        backend.requests += 1
        backend.total_connections += 1
        held = self.held
        self.held = None
        dst = upstream.transport
        engine = self.svc.engine
        if engine is not None:
            self.pair = engine.take(self, held)
            if self.pair is not None or self.closed:
                return
        if held:
            dst.write(held)
        self.data_received = dst.write
        self.transport.set_protocol(self)  # the loop looks data_received up again
        if self.client_eof:
            half_close(dst)
        elif not self.upstream_full:
            self.transport.resume_reading()

    def backend_eof(self) -> None:
        self.server_eof = True
        if self.client_eof:
            self.close()
        elif not self.closed:
            half_close(self.transport)

    def backend_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.account()
        if exc is not None:
            self._release(ok=False)
            reset(self.transport)
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
        if self.pair is not None:
            self.pair.close()  # the ring sends what it holds, then hands the pair back
            return
        upstream = self.upstream
        if upstream is not None:
            upstream.transport.close()
        self.transport.close()

    def abort(self) -> None:
        """Drop both sides at once."""
        self.closed = True
        self.account()
        pair, self.pair = self.pair, None
        if pair is not None:
            pair.abort()
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

    def _connect_failed(self, backend: Backend, reason: str) -> None:
        self._release(ok=False)
        backend.connect_failures += 1
        backend.failures += 1
        self.svc.pool.report_failure(backend, reason)

    async def _connect(self) -> None:
        svc = self.svc
        pool = svc.pool
        loop = svc.loop
        peer = self.peer
        arrival = self.arrival
        client = arrival.client if arrival is not None else peer
        key = client[0].encode() if client else None
        origination = svc.origination(arrival, self.transport)
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
            if not has_room(backend.active_connections, svc.max_backend_connections):
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
                    sock, registration = await dial(loop, backend, svc.owner(backend), self)
            except OwnListener as exc:
                self._release(ok=None)
                mark_own_listener(pool, backend, exc)
                continue
            except (OSError, TimeoutError) as exc:
                what = f"connecting to backend {backend.address} of service {svc.config.name}"
                if local_shortage(exc, what):
                    # Ours, not the backend's: no failure counted, no other backend tried.
                    self._release(ok=None)
                    shortage = True
                    break
                self._connect_failed(backend, str(connect_failure(exc, svc.connect_timeout)))
                failures += 1
                if self.closed or failures > svc.retry_limit:
                    break
                continue
            side = BackendSide(self, backend, registration)
            try:
                transport = await svc.adopt(side, sock, backend, origination)
            except TlsFailed as exc:
                registration.release()
                self._connect_failed(backend, str(exc))
                failures += 1
                if self.closed or failures > svc.retry_limit:
                    break
                continue
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
