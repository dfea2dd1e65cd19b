"""The persistent connections to one backend (`BackendChannel`).

A channel opens connections, hands each request to one of them and passes
on what they report to its dispatcher, naming what happened to requests a
connection could not answer (`FAULT`, `REMOVED`, `KEPT_ALIVE`...): the
dispatcher does the accounting and decides retry or reply.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import TYPE_CHECKING, Protocol, cast

from balancer.core.pool import Backend, BackendPool
from balancer.net import loopguard
from balancer.proxy.message.connection import BackendConnection
from balancer.proxy.message.request import (
    PIPELINE_BATCH_LIMIT,
    PIPELINE_OPEN_THRESHOLD,
    Client,
    Request,
)
from balancer.proxy.upstream import connect_failure, local_shortage
from balancer.wire import INVALID_MESSAGE, MESSAGE_TOO_LONG, RAW_BACKEND_MAX_MESSAGE

if TYPE_CHECKING:
    from balancer.config.model import ServiceConfig

# what became of the requests a connection held when it ended unanswered
FAULT = 0
"""The backend failed them (a failed connect, a reset, a close mid-reply)."""
REMOVED = 1
"""The balancer closed the connection (the backend was removed): re-sent, no fault."""
DROPPED = 2
"""The balancer closed the connection and nobody waits for them."""
KEPT_ALIVE = 3
"""A kept-alive connection closed by the backend after serving: may go to it again."""
SHORTAGE = 4
"""The connect failed for want of our own resources: not the backend's fault."""
STOPPED = 5
"""The stop answered them already."""


class Upstream(Protocol):
    """What a channel reports to: the dispatcher of its service."""

    config: ServiceConfig
    pool: BackendPool
    loop: asyncio.AbstractEventLoop
    tasks: set[asyncio.Task[None]]
    stopped: bool

    def settle(self, backend: Backend, pending: deque[Request], replies: list[bytes]) -> None: ...

    def answer_locally(self, backend: Backend, req: Request, reply: bytes) -> None: ...

    def unanswered(
        self,
        backend: Backend,
        failed: list[Request],
        outcome: int,
        error: str | None,
        connect_failed: bool = False,
    ) -> None: ...

    def schedule_flush(self, conn: BackendConnection) -> None: ...


class BackendChannel:
    """The persistent connections to one backend."""

    def __init__(self, service: Upstream, backend: Backend) -> None:
        self.service = service
        self.backend = backend
        self.owner: loopguard.Owner = (service.pool, backend)
        """Whose connections these are, for the loop registry."""
        self.framing = backend.framing
        """The backend's framing as last seen ("" = not known yet: line)."""
        self.raw = self.framing == "raw"
        self.max_connections = max(1, service.config.backend_connections)
        self.connections: list[BackendConnection] = []
        # raw framing: requests waiting for a free connection
        self.waiting: deque[Request] = deque()
        self.retired = False
        self.resend_on_close = True
        self.last: BackendConnection | None = None
        """Line framing: the connection that took the latest request."""

    def send(self, req: Request) -> BackendConnection | None:
        """Queue `req` on a connection; return it so the caller can flush, or None if waiting
        (or answered here)."""
        if self.backend.framing != self.framing:
            self._reframe()
        if self.raw:
            return self._send_raw(req)
        last = self.last
        if last is not None and last.scheduled and last.usable and not last.closed:
            # A write to this backend is already queued in this loop turn: join it (up to
            # PIPELINE_BATCH_LIMIT requests), so a turn costs one write per backend, not one
            # per connection that the least-loaded choice below would spread them over;
            # but while the backend's connections are still growing (each open one carries
            # PIPELINE_OPEN_THRESHOLD and there is room), the rest of a burst opens another.
            if len(last.out) < PIPELINE_BATCH_LIMIT and (
                len(last.pending) < PIPELINE_OPEN_THRESHOLD or not self._would_open()
            ):
                last.pending.append(req)
                last.out.append(req.payload)
                return last
        conns = self.connections
        if len(conns) == 1:
            # the common case: one pipelined connection with room on it
            conn = conns[0]
            if conn.usable and (
                len(conn.pending) < PIPELINE_OPEN_THRESHOLD or self.max_connections == 1
            ):
                conn.pending.append(req)
                conn.out.append(req.payload)
                self.last = conn
                return conn
        # Line framing pipelines: a new connection is opened only when every open one
        # already carries PIPELINE_OPEN_THRESHOLD requests (fewer connections, bigger writes).
        best: BackendConnection | None = None
        best_n = 1 << 30
        for conn in conns:
            if not conn.usable:
                continue
            n = len(conn.pending)
            if n < best_n:
                best, best_n = conn, n
                if n == 0:
                    break
        if best is None or (best_n >= PIPELINE_OPEN_THRESHOLD and self._would_open()):
            best = self._open()
        best.enqueue(req)
        self.last = best
        return best

    def _would_open(self) -> bool:
        """The rule for another connection: every usable one carries PIPELINE_OPEN_THRESHOLD
        and there is room for one more."""
        usable = 0
        for conn in self.connections:
            if not conn.usable:
                continue
            usable += 1
            if len(conn.pending) < PIPELINE_OPEN_THRESHOLD:
                return False
        return usable < self.max_connections

    def _send_raw(self, req: Request) -> BackendConnection | None:
        payload = req.payload
        if not payload:
            self.refuse(req, INVALID_MESSAGE)  # zero bytes: the backend would never answer
            return None
        if len(payload) > RAW_BACKEND_MAX_MESSAGE:
            self.refuse(req, MESSAGE_TOO_LONG)
            return None
        conn = self._raw_connection(req.session)
        if conn is None:
            self.waiting.append(req)
            return None
        conn.enqueue(req)
        return conn

    def _raw_connection(self, session: Client) -> BackendConnection | None:
        """A free raw connection for `session`'s next request, or None: all are busy.

        A raw connection serves one client: an idle one of another client is
        closed and replaced rather than reused, so the late part of a reply that
        came in two reads can never be taken for another client's reply.
        """
        usable = 0
        other: BackendConnection | None = None
        for conn in self.connections:
            if not conn.usable:
                continue
            usable += 1
            if not conn.pending:
                if conn.owner is session:
                    return conn
                if other is None:
                    other = conn
        if usable >= self.max_connections:
            if other is None:
                return None
            other.retire()
        return self._open()

    def _serve_waiting(self) -> None:
        """Raw framing: hand waiting requests to free connections, in arrival order."""
        waiting = self.waiting
        while waiting and not self.retired:
            conn = self._raw_connection(waiting[0].session)
            if conn is None:
                return
            conn.enqueue(waiting.popleft())
            conn.flush()

    # -- what its connections report -----------------------------------------
    def replied(self, pending: deque[Request], replies: list[bytes]) -> None:
        """The first requests of a connection's `pending` were answered with `replies`."""
        self.service.settle(self.backend, pending, replies)

    def refuse(self, req: Request, reply: bytes) -> None:
        """Answer a request handed to this backend locally: it must not be sent."""
        self.service.answer_locally(self.backend, req, reply)

    def _reframe(self) -> None:
        """The backend's framing changed (found out by its checks, or a restart of another
        kind): connections of the old framing finish what they hold and take no more."""
        framing = self.backend.framing
        raw = framing == "raw"
        self.framing = framing
        if raw == self.raw:
            return
        self.raw = raw
        for old in list(self.connections):
            old.retire()
        waiting = list(self.waiting)
        self.waiting.clear()
        for req in waiting:
            conn = self.send(req)
            if conn is not None:
                self.service.schedule_flush(conn)

    def _open(self) -> BackendConnection:
        conn = BackendConnection(self)
        self.connections.append(conn)
        loop = self.service.loop
        task = loop.create_task(self._connect(conn))
        self.service.tasks.add(task)
        task.add_done_callback(self.service.tasks.discard)
        return conn

    async def _connect(self, conn: BackendConnection) -> None:
        backend = self.backend
        tls = getattr(self.service, "backend_tls", None)
        extra = {}
        if tls is not None:
            extra = {"ssl": tls.context_for(backend.address),
                     "server_hostname": tls.server_name(backend.host)}  # fmt: skip
        try:
            async with asyncio.timeout(self.service.config.connect_timeout):
                transport, _ = await self.service.loop.create_connection(
                    lambda: cast(asyncio.Protocol, conn), backend.host, backend.port, **extra
                )
            if tls is not None:
                tls.handshake_done(backend.address, transport)
        except OSError as exc:  # TimeoutError and TLS handshake failures included
            if local_shortage(exc, f"connecting to backend {backend.address}"):
                conn.closed = True
                self.connection_short(conn)
                return
            reason = str(connect_failure(exc, self.service.config.connect_timeout))
        else:
            return
        conn.closed = True
        self.connection_closed(conn, reason, stale=False, connect_failed=not conn.closed_by_us)

    def connection_idle(self, conn: BackendConnection) -> None:
        """A raw connection finished its request, or a retiring one its last."""
        if not conn.usable or conn.closed:
            conn.close()
            return
        waiting = self.waiting
        if waiting:
            if waiting[0].session is conn.owner:
                conn.enqueue(waiting.popleft())
                conn.flush()
                return
            self._serve_waiting()

    def connection_short(self, conn: BackendConnection) -> None:
        """A connect failed for want of our own resources: not the backend's fault."""
        with contextlib.suppress(ValueError):
            self.connections.remove(conn)
        failed = list(conn.pending)
        conn.pending.clear()
        if self.waiting and not any(c.usable for c in self.connections):
            failed.extend(self.waiting)
            self.waiting.clear()
        self.service.unanswered(self.backend, failed, SHORTAGE, None)

    def connection_closed(
        self,
        conn: BackendConnection,
        error: str | None,
        stale: bool,
        connect_failed: bool = False,
    ) -> None:
        """`conn` ended (`error` says why when it is a failure; `stale`: a kept-alive
        connection let go by the backend); what it held goes to the dispatcher."""
        with contextlib.suppress(ValueError):
            self.connections.remove(conn)
        failed = list(conn.pending)
        conn.pending.clear()
        service = self.service
        if service.stopped:
            failed.extend(self.waiting)
            self.waiting.clear()
            service.unanswered(self.backend, failed, STOPPED, error, connect_failed)
            return
        if self.raw and not failed and self.waiting and not self.retired:
            self._serve_waiting()  # the connection was closed while idle; keep serving
        if error is None and not failed:
            return
        outcome = KEPT_ALIVE
        if conn.closed_by_us:
            outcome = REMOVED if self.resend_on_close else DROPPED
        elif not stale:
            # a fresh connection failing, or a reset: the backend is in trouble
            outcome = FAULT
            failed.extend(self.waiting)
            self.waiting.clear()
        service.unanswered(self.backend, failed, outcome, error, connect_failed)

    def close(self, resend: bool = True) -> None:
        """Close every connection; with `resend`, what they held goes to other backends."""
        self.retired = True
        self.resend_on_close = resend
        for conn in list(self.connections):
            conn.close()

    def expire(self, now: float, timeout: float) -> None:
        """Fail connections whose oldest request waited longer than `timeout`."""
        for conn in list(self.connections):
            if conn.pending and now - conn.pending[0].sent > timeout:
                conn.abort(f"no reply within {timeout:g}s")

    def __repr__(self) -> str:
        return (
            f"<BackendChannel {self.backend.address} {'raw' if self.raw else 'line'} "
            f"connections={len(self.connections)} waiting={len(self.waiting)}>"
        )
