"""An upgraded connection (WebSocket and other `Upgrade`s): bytes relayed both ways.

After a 101 response the client and upstream connections become a byte relay
as in tcp mode: each side's reads go straight to the other's transport, a
full transport pauses the other side's reads, an EOF is passed on as a
half-close, a reset as a reset. The service closes tunnels quiet both ways
for `tunnel_timeout`.
"""

from __future__ import annotations

import asyncio

from balancer.core.http.wire import Event, HttpError
from balancer.net.sockopts import half_close, reset
from balancer.net.tcpinfo import quiet_ms
from balancer.proxy.http.context import Client, Serving
from balancer.proxy.http.upstream import UpstreamConnection


class Tunnel:
    """The relay of one upgraded client connection and its upstream connection."""

    def __init__(self, client: Client, conn: UpstreamConnection, svc: Serving) -> None:
        self.client = client
        self.conn = conn
        self.svc = svc
        self.done: asyncio.Future[None] = svc.loop.create_future()
        self.client_eof = False
        self.upstream_eof = False

    async def run(self, rest: bytes) -> None:
        """Relay until both sides have ended (`rest`: upstream bytes after the 101)."""
        client = self.client
        conn = self.conn
        if rest:
            client.transport.write(rest)
        raw = client.take_raw()
        conn.sink = self
        conn.on_eof = self.on_upstream_eof
        conn.data_received = client.transport.write
        conn.transport.set_protocol(conn)  # the loop looks data_received up again
        client.tunnel = self
        client.tunnel_write = conn.transport.write
        if raw:
            conn.transport.write(raw)
        if client.lost or conn.lost:
            self.finish()
        elif client.eof:
            self.on_client_eof()
        self.svc.tunnels.add(self)
        try:
            await self.done
        finally:
            self.svc.tunnels.discard(self)
            client.tunnel = None
            client.tunnel_write = None

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
        if not self.conn.lost:
            self.conn.transport.close()
        if not self.client.lost:
            self.client.transport.close()

    def quiet_ms(self) -> int:
        """Milliseconds since either side last sent a byte."""
        return min(quiet_ms(self.client.transport), quiet_ms(self.conn.transport))

    # -- events

    def on_client_eof(self) -> None:
        self.client_eof = True
        if self.upstream_eof:
            self.finish()
        elif not self.conn.lost:
            half_close(self.conn.transport)

    def on_upstream_eof(self) -> None:
        self.upstream_eof = True
        if self.client_eof:
            self.finish()
        elif not self.client.lost:
            half_close(self.client.transport)

    def client_lost(self, exc: Exception | None) -> None:
        if exc is not None and not self.conn.lost:
            reset(self.conn.transport)
        self.finish()

    def upstream_lost(self, exc: Exception | None) -> None:
        if exc is not None and not self.client.lost:
            reset(self.client.transport)
        self.finish()

    def client_paused(self, paused: bool) -> None:
        if not self.conn.lost:
            if paused:
                self.conn.transport.pause_reading()
            else:
                self.conn.transport.resume_reading()

    def upstream_paused(self, paused: bool) -> None:
        if not self.client.lost:
            if paused:
                self.client.transport.pause_reading()
            else:
                self.client.transport.resume_reading()

    def upstream_events(self, events: list[Event]) -> None:
        """Not called: the upstream's reads go straight to the client."""

    def upstream_error(self, error: HttpError) -> None:
        """Not called: nothing is parsed in a tunnel."""
