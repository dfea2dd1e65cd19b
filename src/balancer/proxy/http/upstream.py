"""Connections to backends in http mode, and the keep-alive pool that keeps them.

An `UpstreamConnection` reads responses with a `ResponseReader` and hands
what it parsed to the exchange it serves (its `sink`). Between exchanges it
waits in its backend's `IdlePool`, newest first (the least likely to have
been closed by the backend); it is put back only after a complete,
well-framed exchange, and closed when it has been idle `upstream_idle_timeout`,
served `max_requests_per_connection` requests, or does not fit in `max_idle`.
Bytes from an idle connection (a backend may not speak unasked) or its end
close it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol, cast

from balancer.core.http.wire import Event, HttpError, ResponseReader
from balancer.core.pool import Backend
from balancer.net import loopguard
from balancer.net.sockopts import set_nodelay

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


class Sink(Protocol):
    """What an upstream connection tells the exchange it serves."""

    def upstream_events(self, events: list[Event]) -> None: ...

    def upstream_error(self, error: HttpError) -> None: ...

    def upstream_lost(self, exc: Exception | None) -> None: ...

    def upstream_paused(self, paused: bool) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """One connection to a backend, serving one exchange at a time."""

    __slots__ = (
        "backend",
        "data_received",
        "idle_since",
        "lost",
        "on_eof",
        "paused",
        "reader",
        "received",
        "registration",
        "served",
        "sink",
        "transport",
    )

    data_received: Callable[[bytes], None]  # type: ignore[assignment]

    def __init__(
        self, backend: Backend, registration: loopguard.Registration, max_header_bytes: int
    ) -> None:
        self.backend = backend
        self.registration = registration
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.reader = ResponseReader(max_header_bytes, 1000)
        self.sink: Sink | None = None
        self.served = 0
        """Exchanges begun on this connection."""
        self.received = False
        """A byte of the current exchange's response came."""
        self.idle_since = 0.0
        self.lost = False
        self.paused = False
        """Not read for now: the client it answers is not reading."""
        self.on_eof: Callable[[], None] | None = None
        """Set by a tunnel: the backend's EOF is a half-close to pass on."""
        self.data_received = self._parse

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        set_nodelay(transport)
        self.transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        self.backend.active_connections += 1
        self.backend.total_connections += 1

    def begin(self, sink: Sink, method: bytes) -> None:
        self.sink = sink
        self.served += 1
        self.received = False
        self.reader.expect(method)

    def _parse(self, data: bytes) -> None:
        sink = self.sink
        self.received = True
        if sink is None:
            self.transport.abort()  # idle: nothing was asked
            return
        try:
            events = self.reader.feed(data)
        except HttpError as exc:
            parsed = self.reader.events
            if parsed:
                sink.upstream_events(parsed)
            if self.sink is sink:
                sink.upstream_error(exc)
            return
        if events:
            sink.upstream_events(events)

    def eof_received(self) -> bool:
        if self.on_eof is not None:
            self.on_eof()
            return self.transport.can_write_eof()
        sink = self.sink
        if sink is not None:
            try:
                events = self.reader.feed_eof()
            except HttpError as exc:
                sink.upstream_error(exc)
            else:
                if events:
                    sink.upstream_events(events)
        return False

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_paused(True)

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_paused(False)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        self.registration.release()
        self.backend.active_connections -= 1
        sink = self.sink
        if sink is not None:
            sink.upstream_lost(exc)

    def pause(self, paused: bool) -> None:
        """Stop (or go back to) reading the backend, for the client's flow control."""
        if paused != self.paused and not self.lost:
            self.paused = paused
            if paused:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def close(self) -> None:
        self.sink = None
        self.transport.close()

    def abort(self) -> None:
        self.sink = None
        self.transport.abort()


class IdlePool:
    """Idle connections per backend, newest last."""

    def __init__(self) -> None:
        self.idle: dict[Backend, list[UpstreamConnection]] = {}
        self.max_idle = 32
        self.idle_timeout = 4.0
        self.max_requests = 0

    def take(self, backend: Backend, now: float) -> UpstreamConnection | None:
        conns = self.idle.get(backend)
        while conns:
            conn = conns.pop()
            if not conn.lost and now - conn.idle_since < self.idle_timeout:
                return conn
            conn.close()
        return None

    def put(self, conn: UpstreamConnection, now: float) -> None:
        """Keep `conn` for reuse, or close it when the pool is full or it has served enough."""
        conn.sink = None
        if conn.lost:
            return
        conn.pause(False)  # the next exchange on it reads it from the start
        if self.max_requests and conn.served >= self.max_requests:
            conn.close()
            return
        conns = self.idle.setdefault(conn.backend, [])
        if len(conns) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = now
        conns.append(conn)

    def count(self) -> int:
        return sum(len(c) for c in self.idle.values())

    def sweep(self, now: float) -> None:
        """Close the connections idle for `idle_timeout`, and forget lost ones."""
        for backend, conns in list(self.idle.items()):
            keep = []
            for conn in conns:
                if conn.lost:
                    continue
                if now - conn.idle_since >= self.idle_timeout:
                    conn.close()
                else:
                    keep.append(conn)
            if keep:
                self.idle[backend] = keep
            else:
                del self.idle[backend]

    def drop(self, backend: Backend | None = None) -> None:
        """Close the idle connections (of one backend, or all)."""
        for b in [backend] if backend is not None else list(self.idle):
            for conn in self.idle.pop(b, []):
                conn.close()
