"""A client connection in http mode: its requests read, queued in order, answered.

`ClientConnection` parses what the client sends with a `RequestReader` into a
queue of events that one task (`serve`) takes in order, one exchange at a
time, so pipelined requests are answered in the order they came. The queue
is bounded: past `HIGH_WATER` bytes (or `MAX_QUEUED` events) the client is
not read until it drains. A parse error is queued as well, behind the
requests before it: those are answered first, then the error, then the
connection is closed.

Timers: between requests the connection may be idle `keepalive_timeout`;
from the first byte of a request head, the whole head must arrive within
`header_timeout` (408, a slowloris defence: the time is total, not per byte).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, cast

from balancer.config.hosts import address_of
from balancer.core.http.wire import Body, End, Event, Head, HttpError, RequestReader, Upgrade
from balancer.core.http.writer import error_response
from balancer.net import loopguard, resources
from balancer.net.sockopts import reset, set_nodelay
from balancer.proxy.front import Arrival, client_subject, tls_details
from balancer.proxy.http.context import Ends, Serving, count
from balancer.proxy.http.exchange import Exchange
from balancer.proxy.http.upstream import IdlePool
from balancer.proxy.upstream import admit, mark_accepted_loop

log = logging.getLogger("balancer")

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
MAX_QUEUED = 256
"""Events (heads, body pieces) queued before the client is paused."""
PARSE_PIECE = 16 * 1024
"""Bytes parsed at a time, the queue's room looked at between pieces."""


class ClientConnection(asyncio.Protocol):
    """One client connection: the request queue, its timers, and the task serving it."""

    def __init__(self, svc: Serving, arrival: Arrival | None = None) -> None:
        self.svc = svc
        self.arrival = arrival
        self.proto = b"http"
        self.subject_header = b""
        self.subject = b""
        self.tls_log: dict[str, object] = {}
        self.private: IdlePool | None = None
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.reader = RequestReader(svc.http.max_header_bytes, svc.http.max_headers)
        self.queue: deque[Event | HttpError] = deque()
        self.queued = 0
        """Bytes of request bodies (or of an upgrade's tunnel) received and not yet taken."""
        self.waiter: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.peer: Any = None
        self.peer_ip = ""
        self.peer_text = "-"
        self.port = 0
        self.closed = False
        self.eof = False
        self.lost = False
        self.paused = False
        self.write_paused = False
        self.unparsed: bytearray | None = None
        """Bytes received while the queue was full, parsed as it drains."""
        self.raw: bytearray | None = None
        """After an upgrade request: the bytes that follow it, held for the tunnel."""
        self.tunnel_write: Any = None
        self.tunnel: Ends | None = None
        self.idle = True
        """Waiting for a request with nothing of it received (a drain may close it)."""
        self.exchange: Exchange | None = None
        self.head_timer: asyncio.TimerHandle | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.fds: resources.FdBudget | None = None
        self.loop_suspect = False
        """The peer's address is one of our own backend connections' (see `loopguard`)."""

    # -- transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        svc = self.svc
        if svc.stopped:  # one accepted as the listener closed is served within the drain
            self.refuse()
            return
        peername = transport.get_extra_info("peername")
        self.peer = address_of(peername)
        arrival = self.arrival
        if arrival is not None:
            self._arrived(arrival, transport)
            peername = arrival.client
        self.peer_ip = str(peername[0]) if peername else ""
        self.peer_text = f"{self.peer_ip}:{peername[1]}" if peername else "-"
        sockname = transport.get_extra_info("sockname")
        self.port = int(sockname[1]) if sockname else 0
        header = arrival.header if arrival is not None else None
        if header is not None and header.destination is not None:
            self.port = header.destination[1]  # the port the client reached, in front of us
        if self._loop_found(sockname):
            return
        admitted, self.fds = admit(len(svc.conns), svc.max_connections, 2)
        if not admitted:
            self.refuse()
            return
        svc.conns.add(self)
        set_nodelay(transport)
        self.transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        self._arm_idle()
        self.task = svc.loop.create_task(self.serve())

    def _arrived(self, arrival: Arrival, transport: asyncio.BaseTransport) -> None:
        tls = self.svc.config.tls
        if not arrival.terminated or tls is None:
            return
        self.proto = b"https"
        self.tls_log = tls_details(transport)
        if tls.subject_header:  # a client's own copy is removed, verifying or not
            self.subject_header = tls.subject_header.encode()
            sslobj = transport.get_extra_info("ssl_object")
            if tls.verify_client != "none" and sslobj is not None:
                self.subject = client_subject(sslobj).encode()

    def with_subject(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        name = self.subject_header.lower()
        out = [h for h in headers if h[0].lower() != name]
        if self.subject:
            out.append((self.subject_header, self.subject))
        return out

    def idle_pool(self, svc: Serving) -> IdlePool:
        if not svc.config.send_proxy:
            return svc.idle
        private = self.private
        if private is None:
            private = self.private = IdlePool()
            private.max_idle = 1
            private.idle_timeout = svc.http.upstream_idle_timeout
        return private

    def refuse(self) -> None:
        """Over a limit (or stopping): a 503 and the connection closed."""
        self.svc.refused += 1
        self.closed = True
        count(self.svc.generated, 503)
        count(self.svc.statuses, "5xx")
        self.transport.write(error_response(503, close=True, retry_after=1))
        self.transport.close()

    def _loop_found(self, sockname: Any) -> bool:
        found = loopguard.check(self.peer, sockname)
        if not isinstance(found, loopguard.Loop):
            self.loop_suspect = found is not None
            return False
        svc = self.svc
        svc.loops += 1
        mark_accepted_loop(found, svc.config.name)
        self.closed = True
        self.transport.abort()
        return True

    def data_received(self, data: bytes) -> None:
        if self.tunnel_write is not None:
            self.tunnel_write(data)
            return
        if self.raw is not None:
            self.raw += data
            self._hold(len(data))
            return
        if self.closed or self.reader.broken is not None:
            return
        self._cancel_idle()
        if self.unparsed is not None:
            self.unparsed += data  # a read under way when the client was paused
            return
        self._parse(data)

    def _parse(self, data: bytes) -> None:
        """Parse `data` a piece at a time while the queue has room; what is left waits,
        unparsed, with the client not read, until the queue drains (so a burst of tiny
        pipelined requests costs a bounded number of parsed events, not one per request)."""
        at = 0
        end = len(data)
        while at < end:
            if len(self.queue) >= MAX_QUEUED:
                self.unparsed = bytearray(data[at:])
                if not self.paused:
                    self.paused = True
                    self.transport.pause_reading()
                break
            piece = data[at : at + PARSE_PIECE]
            at += len(piece)
            self._feed(piece)
            if self.raw is not None:  # an upgrade request: the rest is for the tunnel
                rest = data[at:]
                self.raw += rest
                self._hold(len(rest))
                break
            if self.reader.broken is not None:
                break
        reader = self.reader
        if reader.in_head and reader.broken is None:
            if self.head_timer is None:
                self.head_timer = self.svc.loop.call_later(
                    self.svc.http.header_timeout, self._head_expired
                )
        elif self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        self._wake()

    def _feed(self, piece: bytes) -> None:
        reader = self.reader
        failed: HttpError | None = None
        try:
            events: list[Event | HttpError] = list(reader.feed(piece))
        except HttpError as exc:
            events = list(reader.events)
            failed = exc
        held = 0
        for event in events:
            kind = type(event)
            if kind is Body:
                held += len(event.data)  # type: ignore[union-attr]
            elif kind is Upgrade:
                self.raw = bytearray(event.rest)  # type: ignore[union-attr]
                held += len(event.rest)  # type: ignore[union-attr]
        if failed is not None:
            events.append(failed)
            self.transport.pause_reading()
        self.queue.extend(events)
        self._hold(held)

    def _hold(self, size: int) -> None:
        """`size` more bytes of body wait in the queue (heads are bounded by their count:
        each by `max_header_bytes`, and at most MAX_QUEUED events wait)."""
        self.queued += size
        if not self.paused and (self.queued > HIGH_WATER or len(self.queue) > MAX_QUEUED):
            self.paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        if self.tunnel is not None:
            self.tunnel.on_client_eof()
            return self.transport.can_write_eof()
        self._wake()
        # the answers to what was sent may still go out (TLS: the loop closes after them)
        return self.transport.can_write_eof()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.tunnel is not None:
            self.tunnel.client_paused(True)
        elif self.exchange is not None:
            self.exchange.client_paused(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake()
        if self.tunnel is not None:
            self.tunnel.client_paused(False)
        elif self.exchange is not None:
            self.exchange.client_paused(False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.closed = True
        self._cancel_idle()
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        if self.tunnel is not None:
            self.tunnel.client_lost(exc)
        if self.exchange is not None:
            self.exchange.client_lost()
        if self.task is not None and not self.task.done():
            self._wake()
        fds = self.fds
        if fds is not None:
            self.fds = None
            fds.release()
            fds.release()
        if self.private is not None:
            self.private.drop()
        self.svc.conns.discard(self)

    # -- the queue

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _woken(self) -> None:
        self.waiter = self.svc.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    async def next_event(self) -> Event | HttpError | None:
        """The next event in order; None once the client has closed (or gone)."""
        while not self.queue:
            if self.eof or self.lost:
                return None
            self.waiter = self.svc.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        event = self.queue.popleft()
        if type(event) is Body:
            self.queued -= len(event.data)
        if self.unparsed is not None and len(self.queue) < MAX_QUEUED // 2:
            data = bytes(self.unparsed)
            self.unparsed = None
            self._parse(data)
        if (
            self.paused
            and self.unparsed is None
            and self.queued < LOW_WATER
            and len(self.queue) < MAX_QUEUED // 2
        ):
            self.paused = False
            if not self.closed:
                self.transport.resume_reading()
        return event

    def take_raw(self) -> bytes:
        """The bytes held after an upgrade request (the tunnel takes the rest directly)."""
        raw = bytes(self.raw or b"")
        self.raw = None
        self.queued = 0
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        return raw

    # -- timers

    def _arm_idle(self) -> None:
        timeout = self.svc.http.keepalive_timeout
        if timeout > 0 and self.idle_timer is None:
            self.idle_timer = self.svc.loop.call_later(timeout, self._idle_expired)

    def _cancel_idle(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def _idle_expired(self) -> None:
        self.idle_timer = None
        if self.idle and not self.queue and not self.reader.in_head:
            self.close()

    def _head_expired(self) -> None:
        self.head_timer = None
        if self.reader.in_head and not self.closed:
            self.reader.broken = HttpError(408, "request head not received in time")
            self.queue.append(self.reader.broken)
            self.transport.pause_reading()
            self._wake()

    # -- serving

    async def serve(self) -> None:
        svc = self.svc
        try:
            while not self.closed:
                while self.write_paused and not self.lost:
                    # A client not reading what it was sent gets no more answers until it
                    # does: its pipelined requests wait (and it is not read meanwhile).
                    await self._woken()
                self.idle = True
                if not self.queue and not self.reader.in_head:
                    self._arm_idle()
                event = await self.next_event()
                self.idle = False
                self._cancel_idle()
                if event is None:
                    break
                if isinstance(event, HttpError):
                    self.refuse_request(event)
                    self.transport.write(
                        error_response(event.status, close=True, detail=event.reason)
                    )
                    break
                if type(event) is End:
                    continue  # the end of a request without a body
                if type(event) is not Head:
                    break  # pragma: no cover - the reader gives a head first
                exchange = self.exchange = Exchange(self, event)
                try:
                    keep = await exchange.run()
                finally:
                    self.exchange = None
                    exchange.record()
                if not keep or not svc.accepting:
                    break
        except Exception:  # pragma: no cover - a bug must not leave the client hanging
            log.exception("service %s: http client connection failed", svc.config.name)
            self.transport.abort()
        finally:
            self.close()

    def refuse_request(self, error: HttpError) -> None:
        """Count and log a request refused before any exchange (malformed, too large,
        too slow); the error response follows."""
        svc = self.svc
        svc.client_errors += 1
        count(svc.generated, error.status)
        count(svc.statuses, f"{error.status // 100}xx")
        access = svc.access_log
        if access is not None:
            fields = {"status": error.status, "term": "CR", "error": error.reason}
            access.record_http(self.peer_text, dict(fields))

    def close(self) -> None:
        self.closed = True
        if not self.lost:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if not self.lost:
            self.transport.abort()

    def reset(self) -> None:
        """Cut the connection with an RST: what the client got is not a whole response."""
        self.closed = True
        if not self.lost:
            reset(self.transport)
