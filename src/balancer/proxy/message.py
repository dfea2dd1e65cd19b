"""Message mode: every request line is balanced on its own.

How it works:
- A `ClientSession` (one per client connection) frames what the client sends
  into requests and keeps them in arrival order. Each request is handed to
  a backend chosen by the service's policy; replies may come back from
  different backends in any order, and the session writes them to the client
  strictly in request order (a reply waits until every earlier one is there).
- Client framing is the service's `client_framing`: `line` (one request per
  line; an unterminated rest at EOF is one last request), `raw` (each read is
  one message, each reply is written unterminated, as the tutorial's
  original programs send), or `auto`: a first chunk without a newline
  followed by a quiet period (RAW_QUIET_PERIOD, restarted by every chunk) means
  raw; a connection found raw that later sends a newline was not raw after
  all, and is answered with an error and closed.
- Each backend has a `BackendChannel`: a few persistent connections
  (`BackendConnection`) over which requests are pipelined. Replies on one
  connection come back in the order its requests were sent, so each
  connection holds a FIFO of the requests it carries. A connection's framing
  is the backend's (`Backend.framing`) when it is opened; when that changes,
  the old connections take no more requests. A raw connection carries one
  request at a time, and only one client's requests, so a reply that comes
  back in two reads can never reach another client.
- Isolation: every request written to a line backend is exactly one line.
  This is checked once per write, where the bytes go out (`flush`): a batch
  with an empty request, a line break or a bare CR inside a request is
  answered locally, request by request, and never written. A backend that
  answers more than it was sent is failed, so a reply is never matched to a
  request the backend has not seen. Empty requests are answered locally
  (`Invalid message`) for every framing.
- When a backend connection fails while it holds requests, those requests
  are re-sent to another backend (at most `retries` times each, never to a
  backend that already failed them) and the backend is marked down. Only
  when no backend is left does the client get `Server not available`. A
  connect that fails for want of our own resources (file descriptors, local
  ports, memory) is not the backend's fault: no failure is counted, and its
  requests go elsewhere without using up their retries.
- Memory: bytes of unfinished lines are counted per service; over
  `max_buffered` the clients holding the most are cut (`shed_buffers`). When
  much has been freed, the sweep asks the C allocator to return it
  (`malloc_trim`), at most every TRIM_INTERVAL seconds.
- Loops: every backend connection registers its local and remote address
  with `loopguard` while open (health checks do the same); a client
  connection whose peer and local address are one of those pairs reversed is
  this balancer talking to itself, and the backend it was opened for is
  marked as a loop. The peer address alone is not proof: a local client may
  get the same ephemeral port as one of our connections to elsewhere.
- Writes are coalesced: everything queued for a connection during one turn
  of the event loop (requests from all clients for a backend connection,
  replies from all backends for a client) goes out as one write at the end
  of that turn. A backend connection is added only when the open ones each
  carry several requests, so requests share connections and writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections import deque
from collections.abc import Callable, Collection
from time import monotonic
from typing import TYPE_CHECKING, Any, cast

from balancer.core.framing import LineFramer, LineTooLong
from balancer.core.lifecycle import DrainCut
from balancer.core.policies.base import Policy
from balancer.core.pool import Backend, BackendPool
from balancer.net import loopguard, resources
from balancer.net.loops import create_listener

if TYPE_CHECKING:
    from balancer.config.model import ServiceConfig
    from balancer.core.stats import LatencyHistogram
    from balancer.observe.accesslog import AccessLog

log = logging.getLogger("balancer")

NOT_AVAILABLE = b"Server not available"
LINE_TOO_LONG = b"Error: line too long"
QUEUE_FULL = b"Error: server busy"
QUEUE_TIMEOUT = b"Error: queue timeout"
TOO_MANY_CONNECTIONS = b"Error: too many connections"
INVALID_MESSAGE = b"Invalid message"
"""An empty request, answered locally as the sample service answers it."""
LINE_BREAK = b"Error: line break inside a message"
"""A request holding a newline or CR, which a line backend would read as two."""
NEWLINE_ON_RAW = b"Error: newline on a raw connection"
MESSAGE_TOO_LONG = b"Error: message too long"
"""A request over RAW_BACKEND_MAX_MESSAGE bytes for a raw backend."""
BAD_REPLY = b"Error: invalid reply from server"
"""A raw backend's reply holding a newline, which a line client would read as two."""
STOPPING = b"Error: balancer stopping"
RAW_QUIET_PERIOD = 0.05
RAW_BACKEND_MAX_MESSAGE = 1024
"""The tutorial's original service reads with recv(1024): a longer message would be
read as two and answered twice."""
MAX_PENDING_PER_CLIENT = 4096
"""A client with this many unanswered requests is paused until replies drain."""
BACKEND_MAX_REPLY = 16 * 1024 * 1024
PIPELINE_OPEN_THRESHOLD = 8
MAX_SHORTAGE_RETRIES = 2
"""Re-sends of one request after local shortages (they do not use up `retries`)."""
TRIM_AFTER_FREED = 1024 * 1024
TRIM_INTERVAL = 2.0
"""malloc_trim(0) took 0.3 ms after 180 MB of line buffers were freed (2-core machine)."""

_NEW = 0
_LINE = 1
_RAW = 2
_DETECTING = 3


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class HeapTrimmer:
    """Asks glibc to give freed heap back to the system, at most every TRIM_INTERVAL seconds.

    Freed bytes of many small buffers stay in the process's heap (RSS does not
    drop) until the allocator is asked to trim it; that costs a walk of the
    heap, so it is done rarely and only after a large release.
    """

    def __init__(self) -> None:
        self.last = -1e9
        self.runs = 0
        self._trim: Callable[[int], int] | None = None
        self._looked_up = False

    def __call__(self, now: float) -> bool:
        """Trim now unless done within TRIM_INTERVAL; True when it ran."""
        if now - self.last < TRIM_INTERVAL:
            return False
        self.last = now
        if not self._looked_up:
            self._looked_up = True
            import ctypes  # only once there is something to give back: it costs memory too

            with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
                self._trim = ctypes.CDLL(None).malloc_trim
        if self._trim is None:
            return False
        self._trim(0)
        self.runs += 1
        return True


TRIM_HEAP = HeapTrimmer()
"""One per process: the heap is the process's."""


RETRY_WINDOW = 10


class RetryBudget:
    """Requests and retries counted per second over the last RETRY_WINDOW seconds.

    The request path only bumps `received` (a plain counter); `advance` turns
    the counter's growth into the per-second buckets.
    """

    __slots__ = ("counted", "received", "requests", "retries", "second")

    def __init__(self, now: float) -> None:
        self.second = int(now)
        self.requests = [0] * RETRY_WINDOW
        self.retries = [0] * RETRY_WINDOW
        self.received = 0
        self.counted = 0

    def advance(self, now: float) -> None:
        self.requests[-1] += self.received - self.counted
        self.counted = self.received
        second = int(now)
        steps = min(second - self.second, RETRY_WINDOW)
        if steps > 0:
            self.requests = self.requests[steps:] + [0] * steps
            self.retries = self.retries[steps:] + [0] * steps
            self.second = second

    def requests_total(self) -> int:
        return sum(self.requests)

    def retries_total(self) -> int:
        return sum(self.retries)


class Request:
    """One request line on its way through the balancer."""

    __slots__ = (
        "attempts",
        "backend",
        "payload",
        "queued_at",
        "reply",
        "sent",
        "session",
        "shortages",
        "started",
        "tried",
    )

    def __init__(self, session: ClientSession, payload: bytes) -> None:
        self.session = session
        self.payload = payload
        self.reply: bytes | None = None
        self.backend: Backend | None = None
        self.tried: list[Backend] | None = None
        self.attempts = 0
        self.shortages = 0
        self.started = 0.0
        self.sent = 0.0
        self.queued_at = 0.0


class BackendConnection(asyncio.Protocol):
    """One persistent connection to a backend, carrying a FIFO of requests.

    `out` holds the bytes of the requests queued since the last write, one item
    per request: they are always the last `len(out)` entries of `pending`.
    """

    __slots__ = (
        "_by_us",
        "_eof",
        "_error",
        "_framer",
        "_loop_registration",
        "_raw",
        "channel",
        "closed",
        "connected",
        "out",
        "owner",
        "pending",
        "retiring",
        "scheduled",
        "served",
        "transport",
        "usable",
    )

    def __init__(self, channel: BackendChannel) -> None:
        # fixed for the connection's life
        self.channel = channel
        self._raw = channel.raw
        """The backend's framing when this connection was opened."""
        # connection state
        self.transport: asyncio.Transport | None = None
        self.connected = False
        self.closed = False
        self.usable = True
        """Takes new requests."""
        self.retiring = False
        """Takes no new requests; closed once those it holds are answered."""
        self.scheduled = False
        self.owner: ClientSession | None = None
        """Raw framing: the client whose requests this connection carries."""
        self._loop_registration: loopguard.Registration | None = None
        self._error: str | None = None
        self._eof = False
        self._by_us = False
        # requests
        self.pending: deque[Request] = deque()
        self.out: list[bytes] = []
        """Bytes queued for the next write (one write per loop turn)."""
        self.served = 0
        self._framer = LineFramer(BACKEND_MAX_REPLY)

    # -- sending ------------------------------------------------------------
    def enqueue(self, req: Request) -> None:
        self.pending.append(req)
        if self._raw:
            self.owner = req.session
            self.out.append(req.payload)
        else:
            self.out.append(req.payload + b"\n")

    def flush(self) -> None:
        out = self.out
        if out and self.connected and self.transport is not None:
            self.out = []
            n = len(out)
            data = out[0] if n == 1 else b"".join(out)
            # Every request to a line backend is exactly one line: as many newlines as
            # requests, none empty, no CR (many line parsers split there too).
            if not self._raw and (
                data.count(b"\n") != n or b"\r" in data or b"\n\n" in data or data[0] == 10
            ):
                data = self._refuse_unsafe(n)
                if not data:
                    return
            self.transport.write(data)

    def _refuse_unsafe(self, n: int) -> bytes:
        """Answer locally the requests of this batch that are not exactly one line;
        return the bytes of the others."""
        pending = self.pending
        batch = [pending.pop() for _ in range(n)]
        batch.reverse()
        keep: list[bytes] = []
        channel = self.channel
        for req in batch:
            payload = req.payload
            if payload and b"\n" not in payload and b"\r" not in payload:
                pending.append(req)
                keep.append(payload + b"\n")
            else:
                channel.refuse(req, LINE_BREAK if payload else INVALID_MESSAGE)
        return b"".join(keep)

    # -- asyncio callbacks ----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        self.connected = True
        if self._by_us or (self.retiring and not self.pending):
            transport.close()
            return
        _nodelay(transport)
        channel = self.channel
        # Registered before the first write, so a listener of ours that accepts this
        # connection recognises it by the time the request arrives.
        owner = (channel.service.pool, channel.backend)
        sockname = transport.get_extra_info("sockname")
        peername = transport.get_extra_info("peername")
        self._loop_registration = loopguard.Registration(sockname, peername, owner)
        self.flush()

    def data_received(self, data: bytes) -> None:
        channel = self.channel
        pending = self.pending
        now = monotonic()
        if self._raw:
            if len(pending) <= len(self.out):  # nothing written awaits a reply
                self._fail("unsolicited data from backend")
                return
            reply = data.rstrip(b"\r\n")
            if b"\n" in reply and pending[0].session.framing != _RAW:
                reply = BAD_REPLY  # a line client would read it as two replies
            replies = [reply]
        else:
            try:
                replies = self._framer.feed(data)
            except LineTooLong:
                self._fail("reply line too long")
                return
            written = len(pending) - len(self.out) if self.out else len(pending)
            if len(replies) > written:
                self._fail("more replies than requests")
                return
        backend = channel.backend
        service = channel.service
        on_finish = service.policy_finish
        if replies:
            backend.consecutive_failures = 0
        for reply in replies:
            req = pending.popleft()
            backend.in_flight -= 1
            backend.requests += 1
            self.served += 1
            if on_finish is not None:
                on_finish(backend, now - req.started, True)
            req.backend = backend
            req.session.complete(req, reply)
        if service.queue:
            service.drain_queue()
        service.flush_sessions()
        if not pending and (self._raw or self.retiring):
            channel.connection_idle(self)

    def eof_received(self) -> bool | None:
        self._eof = True
        self.usable = False
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.connected = False
        self.closed = True
        if self._loop_registration is not None:
            self._loop_registration.release()
            self._loop_registration = None
        if self._error is None and not self._by_us:
            if exc is not None:
                self._error = f"connection lost: {exc}"
            elif self._framer.buffered:
                self._error = "connection closed in the middle of a reply"
            elif self.pending:
                self._error = "connection closed by backend"
        # a close after served replies is a kept-alive connection let go, unless cut mid-reply
        stale = self._eof and self.served > 0 and not self._framer.buffered
        self.channel.connection_closed(self, self._error, stale=stale)

    def _fail(self, reason: str) -> None:
        self.usable = False
        if self._error is None:
            self._error = reason
        if self.transport is not None:
            self.transport.abort()

    def abort(self, reason: str) -> None:
        self._fail(reason)

    def retire(self) -> None:
        """No new requests; close once those held are answered (now, when none)."""
        self.usable = False
        self.retiring = True
        if not self.pending:
            self.close()

    def close(self) -> None:
        """Closed by the balancer: what it held is not the backend's failure."""
        self.usable = False
        self._by_us = True
        if self.transport is not None and not self.closed:
            self.transport.close()

    @property
    def closed_by_us(self) -> bool:
        return self._by_us

    def __repr__(self) -> str:
        framing = "raw" if self._raw else "line"
        return (
            f"<BackendConnection {self.channel.backend.address} {framing} "
            f"pending={len(self.pending)} served={self.served} connected={self.connected}>"
        )


class BackendChannel:
    """The persistent connections to one backend."""

    def __init__(self, service: MessageService, backend: Backend) -> None:
        self.service = service
        self.backend = backend
        self.framing = backend.framing
        """The backend's framing as last seen ("" = not known yet: line)."""
        self.raw = self.framing == "raw"
        self.max_connections = max(1, service.config.backend_connections)
        self.connections: list[BackendConnection] = []
        # raw framing: requests waiting for a free connection
        self.waiting: deque[Request] = deque()
        self.retired = False
        self.resend_on_close = True

    def send(self, req: Request) -> BackendConnection | None:
        """Queue `req` on a connection; return it so the caller can flush, or None if waiting
        (or answered here)."""
        if self.backend.framing != self.framing:
            self._reframe()
        if self.raw:
            return self._send_raw(req)
        conns = self.connections
        if len(conns) == 1:
            # the common case: one pipelined connection with room on it
            conn = conns[0]
            if conn.usable and (
                len(conn.pending) < PIPELINE_OPEN_THRESHOLD or self.max_connections == 1
            ):
                conn.pending.append(req)
                conn.out.append(req.payload + b"\n")
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
        if best is None or (
            best_n >= PIPELINE_OPEN_THRESHOLD and self._usable_count() < self.max_connections
        ):
            best = self._open()
        best.enqueue(req)
        return best

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

    def _raw_connection(self, session: ClientSession) -> BackendConnection | None:
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

    def refuse(self, req: Request, reply: bytes) -> None:
        """Answer a request handed to this backend locally: it must not be sent."""
        self.backend.in_flight -= 1
        service = self.service
        service.invalid += 1
        req.session.complete(req, reply)
        service.flush_sessions()

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

    def _usable_count(self) -> int:
        return sum(1 for c in self.connections if c.usable)

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
        try:
            async with asyncio.timeout(self.service.config.connect_timeout):
                await self.service.loop.create_connection(lambda: conn, backend.host, backend.port)
        except TimeoutError:
            reason = f"connect timeout after {self.service.config.connect_timeout:g}s"
        except OSError as exc:
            if resources.is_local_shortage(exc):
                resources.ALARM.note(exc, f"connecting to backend {backend.address}")
                conn.closed = True
                self.connection_short(conn)
                return
            reason = f"connect failed: {exc.strerror or exc}"
        else:
            return
        conn.closed = True
        if not conn.closed_by_us:
            backend.connect_failures += 1
        self.connection_closed(conn, reason, stale=False)

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
        self.backend.in_flight -= len(failed)
        self.service.retry_short(failed, self.backend)

    def connection_closed(self, conn: BackendConnection, error: str | None, stale: bool) -> None:
        with contextlib.suppress(ValueError):
            self.connections.remove(conn)
        failed = list(conn.pending)
        conn.pending.clear()
        if self.service.stopped:
            # the stop answered these requests with an error: not the backend's failure
            self.backend.in_flight -= len(failed) + len(self.waiting)
            self.waiting.clear()
            return
        if self.raw and not failed and self.waiting and not self.retired:
            self._serve_waiting()  # the connection was closed while idle; keep serving
        if error is None and not failed:
            return
        service = self.service
        backend = self.backend
        if conn.closed_by_us:
            # closed by the balancer (the backend was removed): re-sent elsewhere, no fault
            backend.in_flight -= len(failed)
            if self.resend_on_close:
                service.retry(failed, backend)
        elif not stale:
            # a fresh connection failing, or a reset: the backend is in trouble
            failed.extend(self.waiting)
            self.waiting.clear()
            backend.in_flight -= len(failed)
            backend.failures += len(failed)
            service.pool.report_failure(backend, error or "connection failed")
            service.retry(failed, backend)
        elif failed:
            # A kept-alive connection closed by the backend after serving: the
            # requests it held may go to the same backend again, on a new connection.
            log.info(
                "backend %s closed a kept-alive connection with %d request(s) on it; re-sending",
                backend.address,
                len(failed),
            )
            backend.in_flight -= len(failed)
            service.retry(failed, backend, exclude=False)
        if service.queue:
            # room freed or a backend lost: the queue is served (or answered) now, not at
            # the next reply or its queue_timeout
            service.drain_queue()

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


class ClientSession(asyncio.Protocol):
    """One client connection: frames requests and writes replies in order."""

    __slots__ = (
        "_close_after_flush",
        "_closing",
        "_detected_raw",
        "_dirty",
        "_fds",
        "_out",
        "_paused_reading",
        "_paused_writing",
        "_peername",
        "_raw_buf",
        "_raw_timer",
        "framer",
        "framing",
        "gone",
        "held",
        "last_active",
        "peer",
        "peer_key",
        "pending",
        "service",
        "transport",
    )

    def __init__(self, service: MessageService) -> None:
        # the connection
        self.service = service
        self.transport: asyncio.Transport | None = None
        self.peer = "-"
        self.peer_key = b""
        self._peername: object = None
        self._fds: resources.FdBudget | None = None
        # framing
        self.framing = _NEW
        self.framer = LineFramer(service.config.max_line)
        self._raw_buf = bytearray()
        self._raw_timer: asyncio.TimerHandle | None = None
        self._detected_raw = False
        """`auto` found this client raw: a newline later means it was not."""
        self.held = 0
        """Bytes of an unfinished request held (counted in the service's `buffered`)."""
        # requests and replies
        self.pending: deque[Request] = deque()
        self._out: list[bytes] = []
        self._dirty = False
        # flow control and lifetime
        self._paused_reading = False
        self._paused_writing = False
        self._closing = False
        self._close_after_flush = False
        self.gone = False
        """Closed, or being closed: nobody waits for its replies."""
        self.last_active = monotonic()

    # -- asyncio callbacks ----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        _nodelay(transport)
        peer = transport.get_extra_info("peername")
        self._peername = peer
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"{peer[0]}:{peer[1]}"
            self.peer_key = str(peer[0]).encode()
        service = self.service
        if service.draining:
            self._closing = True
            transport.close()
            return
        owner = self._loop_owner()
        if owner is not None:
            self._loop_detected(owner)
            return
        limit = service.config.max_connections
        if limit and len(service.sessions) >= limit:
            self._refuse()
            return
        fds = resources.FDS
        if fds is not None:
            # a reserve of descriptors stays free for checks, backend connections and admin
            if not fds.admit():
                self._refuse()
                return
            self._fds = fds
        service.sessions.add(self)

    def _loop_owner(self) -> loopguard.Owner | None:
        """The backend whose outgoing connection this client connection is, or None."""
        transport = self.transport
        if transport is None:
            return None
        found = loopguard.check(self._peername, transport.get_extra_info("sockname"))
        return found.owner if isinstance(found, loopguard.Loop) else None

    def _refuse(self) -> None:
        assert self.transport is not None
        self.service.refused += 1
        self._closing = True
        self.transport.write(TOO_MANY_CONNECTIONS + b"\n")
        self.transport.close()

    def _loop_detected(self, owner: loopguard.Owner) -> None:
        """The peer is one of our own backend connections: that backend is this balancer."""
        service = self.service
        service.loops += 1
        self._closing = True
        self._discard_buffers()
        pool, backend = owner
        host, port = service.bound
        pool.mark_loop(
            backend,
            f"its connection came back to service {service.config.name} on {host}:{port}",
        )
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        framing = self.framing
        if framing == _LINE:
            self._lines(data)
        elif framing == _RAW:
            self._raw_message(data)
        elif framing == _DETECTING:
            self._detect(data)
        else:
            self._first_data(data)

    def _first_data(self, data: bytes) -> None:
        # Checked again now: the side that connects registers before it writes, so a
        # loop that connection_made could not see yet is known by the first byte.
        owner = self._loop_owner()
        if owner is not None:
            self._loop_detected(owner)
            return
        mode = self.service.client_framing
        if mode == "line":
            self.framing = _LINE
            self._lines(data)
        elif mode == "raw":
            self.framing = _RAW
            self._raw_message(data)
        else:
            self.framing = _DETECTING
            self._detect(data)

    def _detect(self, data: bytes) -> None:
        buf = self._raw_buf
        buf += data
        self._cancel_raw_timer()
        if b"\n" in data:
            self.framing = _LINE
            self._raw_buf = bytearray()
            self._lines(bytes(buf))
            return
        if len(buf) > self.service.config.max_line:
            self._too_long()
            return
        self._hold(len(buf))
        self._raw_timer = self.service.loop.call_later(RAW_QUIET_PERIOD, self._raw_detected)

    def _cancel_raw_timer(self) -> None:
        if self._raw_timer is not None:
            self._raw_timer.cancel()
            self._raw_timer = None

    def _raw_detected(self) -> None:
        """`auto`: what came so far had no newline and nothing followed: a raw client."""
        self._raw_timer = None
        if self._closing or self.framing != _DETECTING:
            return
        self.framing = _RAW
        self._detected_raw = True
        data = bytes(self._raw_buf)
        self._raw_buf = bytearray()
        self._hold(0)
        self._raw_message(data)

    def _raw_message(self, data: bytes) -> None:
        if self._detected_raw and b"\n" in data:
            self._cut(NEWLINE_ON_RAW)  # found raw by a pause, but it sends lines
            return
        if len(data) > self.service.config.max_line:
            self._too_long()
            return
        self.service.dispatch_batch(self, [data.rstrip(b"\r\n")])
        if len(self.pending) > MAX_PENDING_PER_CLIENT and not self._paused_reading:
            self._pause_for_replies()

    def _lines(self, data: bytes) -> None:
        framer = self.framer
        try:
            lines = framer.feed(data)
        except LineTooLong as exc:
            if exc.lines:
                self.service.dispatch_batch(self, exc.lines)
            self._too_long()
            return
        if lines:
            self.service.dispatch_batch(self, lines)
            if len(self.pending) > MAX_PENDING_PER_CLIENT and not self._paused_reading:
                self._pause_for_replies()
        held = framer.held
        if held != self.held:
            self._hold(held)

    def _pause_for_replies(self) -> None:
        self._paused_reading = True
        if self.transport is not None:
            self.transport.pause_reading()

    def _hold(self, held: int) -> None:
        """Now `held` bytes of an unfinished request are buffered (was `self.held`)."""
        service = self.service
        before = self.held
        self.held = held
        service.buffered += held - before
        if held < before:
            service.freed += before - held
        elif service.buffered > service.max_buffered:
            service.shed_buffers()

    def _discard_buffers(self) -> None:
        self.framer.clear()
        self._raw_buf = bytearray()
        if self.held:
            self._hold(0)

    def _too_long(self) -> None:
        self.service.too_long += 1
        self._cut(LINE_TOO_LONG)

    def _cut(self, reply: bytes) -> None:
        """Answer the requests before it, then `reply`, then close."""
        self._closing = True
        self._cancel_raw_timer()
        self._discard_buffers()
        req = Request(self, b"")
        req.reply = reply
        self.pending.append(req)
        self._close_after_flush = True
        if self.transport is not None:
            self.transport.pause_reading()
        self.try_flush()

    def eof_received(self) -> bool | None:
        # The client will send no more; answer what it sent, then close.
        if not self._closing:
            if self.framing == _DETECTING and self._raw_buf:
                self._cancel_raw_timer()
                self._raw_detected()
            elif self.framing == _LINE:
                rest = self.framer.finish()  # an unterminated last line is a request too
                if rest is not None:
                    self._hold(0)
                    self.service.dispatch_batch(self, [rest])
        self._closing = True
        self._close_after_flush = True
        self.try_flush()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self.gone = True
        self._cancel_raw_timer()
        self._discard_buffers()
        self.service.sessions.discard(self)
        if self._fds is not None:
            self._fds.release()
            self._fds = None
        self.transport = None

    def pause_writing(self) -> None:
        self._paused_writing = True
        if self.transport is not None and not self._paused_reading:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self.transport is not None and not self._paused_reading and not self._closing:
            self.transport.resume_reading()

    # -- replies --------------------------------------------------------------
    def complete(self, req: Request, reply: bytes) -> None:
        req.reply = reply
        if not self._dirty and self.pending and self.pending[0] is req:
            self._dirty = True
            self.service.dirty_sessions.append(self)

    def try_flush(self) -> None:
        """Write every reply at the head of the queue that is ready."""
        self._dirty = False
        pending = self.pending
        transport = self.transport
        if not pending or pending[0].reply is None:
            if not pending and self._close_after_flush and transport is not None:
                transport.close()
            return
        raw = self.framing == _RAW
        out = self._out
        access = self.service.access_log
        observe = self.service.histogram.observe
        now = monotonic()
        self.last_active = now
        done: list[Request] | None = [] if access is not None else None
        while pending and pending[0].reply is not None:
            req = pending.popleft()
            reply = req.reply
            assert reply is not None
            out.append(reply if raw else reply + b"\n")
            if req.started:
                observe(now - req.started)
            if done is not None:
                done.append(req)
        if done and access is not None:
            access.record_batch(self, done, now)
        if transport is not None:
            transport.write(b"".join(out) if len(out) > 1 else out[0])
        out.clear()
        if self._paused_reading and len(pending) < MAX_PENDING_PER_CLIENT // 2:
            self._paused_reading = False
            if transport is not None and not self._paused_writing and not self._closing:
                transport.resume_reading()
        if not pending and self._close_after_flush and transport is not None:
            transport.close()

    @property
    def idle(self) -> bool:
        return not self.pending

    def begin_drain(self) -> None:
        """Accept no more requests; close once the replies to those accepted are written."""
        self._closing = True
        self._cancel_raw_timer()
        if self.transport is not None:
            self.transport.pause_reading()
        if self.pending:
            self._close_after_flush = True

    def cut_unanswered(self) -> int:
        """The stop's deadline: answer what is still unanswered with STOPPING and write
        every reply now (ready ones included, before the close); how many were cut."""
        cut = 0
        for req in self.pending:
            if req.reply is None:
                req.reply = STOPPING
                cut += 1
        if self.pending:
            self.try_flush()
        return cut

    def close(self) -> None:
        self._closing = True
        self.gone = True
        if self.transport is not None:
            self.transport.close()

    def __repr__(self) -> str:
        framing = ("new", "line", "raw", "detecting")[self.framing]
        return f"<ClientSession {self.peer} {framing} pending={len(self.pending)} held={self.held}>"


class MessageService:
    """A message-mode listener and the backend channels behind it."""

    def __init__(
        self,
        config: ServiceConfig,
        pool: BackendPool,
        *,
        histogram: LatencyHistogram,
        access_log: AccessLog | None = None,
    ) -> None:
        # configuration
        self.config = config
        self.pool = pool
        self.histogram = histogram
        self.access_log = access_log
        self.client_framing = config.client_framing
        self.max_buffered = config.max_buffered
        self.hash_by_message = config.hash_key == "message"
        self.drain_close_window = 1.0
        self.policy_start: Callable[[Backend], None] | None = None
        self.policy_finish: Callable[[Backend, float, bool], None] | None = None
        self._bind_policy_hooks()
        # the event loop side
        self.loop = asyncio.get_running_loop()
        self.servers: list[asyncio.Server] = []
        self.bound: tuple[str, int] = (config.listen_host, config.listen_port)
        self._listening: list[Any] = []
        """The listener's bound addresses, entered in `loopguard` while it listens."""
        self.tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self.draining = False
        # connections and requests
        self.sessions: set[ClientSession] = set()
        self.channels: dict[Backend, BackendChannel] = {}
        self.dirty_sessions: list[ClientSession] = []
        self.dirty_conns: list[BackendConnection] = []
        self._flush_scheduled = False
        self.queue: deque[Request] = deque()
        self.budget = RetryBudget(monotonic())
        self.buffered = 0
        """Bytes of unfinished requests held for all clients (capped by max_buffered)."""
        self.freed = 0
        """Bytes of such buffers released since the heap was last trimmed."""
        self.stopped = False
        """The stop cut what was left: backend connections closing now are no failure."""
        # counters
        self.too_long = 0
        self.not_available = 0
        self.retries = 0
        self.retries_over_budget = 0
        self.refused = 0
        self.queue_full = 0
        self.queue_timeouts = 0
        self.idle_closed = 0
        self.invalid = 0
        """Requests answered locally because no backend could take them as they are."""
        self.buffer_cuts = 0
        """Client connections cut because max_buffered was reached."""
        self.loops = 0
        """Connections that were this balancer talking to itself."""
        self.drain_cut = 0
        """Requests left unanswered at the stop's deadline (answered `Error: balancer stopping`)."""
        self._shed_logged_at = -1e9

    def _bind_policy_hooks(self) -> None:
        """Call the policy's hooks only when it has them (most policies do not)."""
        policy = self.pool.policy
        self.policy_start = None
        self.policy_finish = None
        if type(policy).on_start is not Policy.on_start:
            self.policy_start = policy.on_start
        if type(policy).on_finish is not Policy.on_finish:
            self.policy_finish = policy.on_finish

    @property
    def client_connections(self) -> int:
        return len(self.sessions)

    def account(self) -> None:
        """Nothing to do: message mode counts as it goes."""

    async def start(self) -> tuple[str, int]:
        cfg = self.config
        server = await create_listener(
            self.loop, lambda: ClientSession(self), cfg.listen_host, cfg.listen_port, backlog=1024
        )
        self.servers.append(server)
        self._listening = [sock.getsockname() for sock in server.sockets]
        for address in self._listening:
            loopguard.listening(address)  # a tcp service will not connect to it
        self._schedule_sweep()
        addr = self._listening[0]
        self.bound = (str(addr[0]), int(addr[1]))
        return self.bound

    def _schedule_sweep(self) -> None:
        cfg = self.config
        period = min(1.0, cfg.response_timeout / 4, cfg.queue_timeout / 4)
        if cfg.client_timeout > 0:
            period = min(period, cfg.client_timeout / 4)
        self._sweeper = self.loop.call_later(max(0.02, period), self._sweep)

    def _sweep(self) -> None:
        """Timeouts: backend replies, queued requests, idle clients; and memory."""
        now = monotonic()
        cfg = self.config
        self.budget.advance(now)
        for channel in list(self.channels.values()):
            channel.expire(now, cfg.response_timeout)
        queue = self.queue
        while queue and now - queue[0].queued_at > cfg.queue_timeout:
            req = queue.popleft()
            self.queue_timeouts += 1
            req.session.complete(req, QUEUE_TIMEOUT)
        if queue:
            self.drain_queue()  # a backend that came up or was added since takes its share
        if cfg.client_timeout > 0:
            limit = cfg.client_timeout
            for session in [
                s for s in self.sessions if not s.pending and now - s.last_active > limit
            ]:
                self.idle_closed += 1
                session.close()
        if self.freed >= TRIM_AFTER_FREED and TRIM_HEAP(now):
            self.freed = 0
        self.flush_sessions()
        self._schedule_sweep()

    def shed_buffers(self) -> None:
        """Over `max_buffered`: cut the clients holding the most bytes of unfinished lines.

        Cutting, rather than refusing new clients: the bytes are held by
        connections already open, so refusing newcomers would not bring the total
        down, and a few clients holding long partial lines would keep everyone
        else out. The largest holders go first (they hold the memory; clients
        that send whole lines hold nothing), down to three quarters of the cap so
        the chunks that follow do not each come back here.
        """
        target = self.max_buffered * 3 // 4
        holders = sorted((s for s in self.sessions if s.held), key=lambda s: s.held, reverse=True)
        cut = 0
        for session in holders:
            if self.buffered <= target:
                break
            cut += 1
            session._cut(LINE_TOO_LONG)
        self.buffer_cuts += cut
        now = monotonic()
        if cut and now - self._shed_logged_at >= 10.0:
            self._shed_logged_at = now
            log.warning(
                "service %s: unfinished request lines reached max_buffered (%d bytes); "
                "%d client connection(s) holding the most were cut (%d so far)",
                self.config.name,
                self.max_buffered,
                cut,
                self.buffer_cuts,
            )

    def channel(self, backend: Backend) -> BackendChannel:
        ch = self.channels.get(backend)
        if ch is None:
            ch = self.channels[backend] = BackendChannel(self, backend)
        return ch

    # -- request path ---------------------------------------------------------
    def dispatch_batch(self, session: ClientSession, payloads: list[bytes]) -> None:
        pick = self.pool.policy.pick
        start_hook = self.policy_start
        hash_message = self.hash_by_message
        limit = self.config.max_backend_requests
        now = monotonic()
        dirty = self.dirty_conns
        pending = session.pending
        channels = self.channels
        key = session.peer_key
        session.last_active = now  # bytes of an unfinished line do not count as activity
        self.budget.received += len(payloads)
        for payload in payloads:
            req = Request(session, payload)
            req.started = now
            req.sent = now
            pending.append(req)
            if not payload:
                # answered here for every backend framing: a raw backend would wait for
                # bytes that never come, a line backend might skip it and shift replies
                self.invalid += 1
                session.complete(req, INVALID_MESSAGE)
                continue
            if self.queue:
                self._enqueue(req, now)  # keep arrival order behind those already waiting
                continue
            backend = pick(payload if hash_message else key) or self.pool.fallback()
            if backend is None:
                self.not_available += 1
                session.complete(req, NOT_AVAILABLE)
                continue
            assert isinstance(backend, Backend)
            if limit and backend.in_flight >= limit:
                backend = self._pick_below_limit(req, ())
                if backend is None:
                    self._enqueue(req, now)
                    continue
            backend.in_flight += 1
            if start_hook is not None:
                start_hook(backend)
            ch = channels.get(backend)
            if ch is None:
                ch = self.channel(backend)
            conn = ch.send(req)
            if conn is not None and not conn.scheduled:
                conn.scheduled = True
                dirty.append(conn)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush_all)

    def _pick_below_limit(self, req: Request, tried: Collection[Backend]) -> Backend | None:
        """A backend with room under `max_backend_requests`, or None when all are full."""
        limit = self.config.max_backend_requests
        exclude: list[Backend] = list(tried)
        key = req.payload if self.hash_by_message else req.session.peer_key
        for _ in range(len(self.pool.backends)):
            backend = self.pool.pick(key, exclude)
            if backend is None:
                return None
            if not limit or backend.in_flight < limit:
                return backend
            exclude.append(backend)
        return None

    def _assign(self, req: Request, backend: Backend, now: float) -> None:
        req.sent = now
        backend.in_flight += 1
        if self.policy_start is not None:
            self.policy_start(backend)
        conn = self.channel(backend).send(req)
        if conn is not None and not conn.scheduled:
            conn.scheduled = True
            self.dirty_conns.append(conn)

    def schedule_flush(self, conn: BackendConnection) -> None:
        """Write what `conn` has queued at the end of this loop turn."""
        if not conn.scheduled:
            conn.scheduled = True
            self.dirty_conns.append(conn)
        self.flush_sessions()

    def _enqueue(self, req: Request, now: float) -> None:
        if len(self.queue) >= self.config.queue_size:
            self.queue_full += 1
            req.session.complete(req, QUEUE_FULL)
            self.flush_sessions()
            return
        req.queued_at = now
        self.queue.append(req)

    def drain_queue(self) -> None:
        """Hand queued requests to backends that have room again, in arrival order."""
        queue = self.queue
        now = monotonic()
        while queue:
            req = queue[0]
            if req.session.gone or req.reply is not None:
                queue.popleft()
                continue
            if not self.pool.any_eligible:
                queue.popleft()
                self.not_available += 1
                req.session.complete(req, NOT_AVAILABLE)
                continue
            backend = self._pick_below_limit(req, req.tried or ())
            if backend is None:
                break
            queue.popleft()
            self._assign(req, backend, now)
        self.flush_sessions()

    def flush_sessions(self) -> None:
        """Ask for the replies made ready to be written at the end of this loop iteration."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush_all)

    def _flush_all(self) -> None:
        """Write everything queued in this loop iteration: one write per connection."""
        self._flush_scheduled = False
        conns = self.dirty_conns
        if conns:
            self.dirty_conns = []
            for conn in conns:
                conn.scheduled = False
                conn.flush()
        sessions = self.dirty_sessions
        if sessions:
            self.dirty_sessions = []
            for session in sessions:
                session.try_flush()

    def retry_allowed(self) -> bool:
        """The retry budget: retries within a share of recent requests, plus a small floor.

        Over a sliding window of RETRY_WINDOW seconds, retries may be at most
        `retry_budget_percent` of the requests received, or `retry_budget_min`
        per second, whichever allows more. A backend dying under load gets its
        requests retried in full; a full outage cannot turn every request into
        several.
        """
        budget = self.budget
        budget.advance(monotonic())
        cfg = self.config
        allowed = max(
            cfg.retry_budget_min * RETRY_WINDOW,
            cfg.retry_budget_percent / 100.0 * budget.requests_total(),
        )
        if budget.retries_total() >= allowed:
            return False
        budget.retries[-1] += 1
        return True

    def retry(self, failed: list[Request], failed_backend: Backend, exclude: bool = True) -> None:
        """Re-send requests a backend failed to answer, each to a backend it has not tried."""
        if not failed:
            return
        finish = self.policy_finish
        now = monotonic()
        for req in failed:
            if finish is not None and exclude:
                finish(failed_backend, now - req.started, False)
            session = req.session
            if session.gone:
                continue  # the client is gone; nobody waits for this reply
            if exclude:
                if req.tried is None:
                    req.tried = [failed_backend]
                else:
                    req.tried.append(failed_backend)
            req.attempts += 1
            backend = None
            if req.attempts <= self.config.retries:
                if self.retry_allowed():
                    backend = self._pick_below_limit(req, req.tried or ())
                    if (
                        backend is None
                        and self.pool.any_eligible
                        and self.config.max_backend_requests
                    ):
                        self.retries += 1
                        self._enqueue(req, now)
                        continue
                    if backend is None:
                        backend = self.pool.fallback(req.tried or ())
                else:
                    self.retries_over_budget += 1
            if backend is None:
                self.not_available += 1
                session.complete(req, NOT_AVAILABLE)
                continue
            self.retries += 1
            self._assign(req, backend, now)
        self.flush_sessions()

    def retry_short(self, failed: list[Request], short_at: Backend) -> None:
        """Re-send requests whose backend connection could not be made for want of our own
        resources. Not a backend fault: their retries, tried backends and the retry budget
        are untouched; each may be re-sent MAX_SHORTAGE_RETRIES times this way."""
        now = monotonic()
        for req in failed:
            session = req.session
            if session.gone:
                continue
            req.shortages += 1
            backend = None
            if req.shortages <= MAX_SHORTAGE_RETRIES:
                exclude = [short_at, *(req.tried or ())]
                backend = self._pick_below_limit(req, exclude) or self.pool.fallback(exclude)
            if backend is None:
                self.not_available += 1
                session.complete(req, NOT_AVAILABLE)
                continue
            self._assign(req, backend, now)
        self.flush_sessions()

    # -- lifecycle ------------------------------------------------------------
    def stop_accepting(self) -> None:
        self.draining = True
        for server in self.servers:
            server.close()
        for address in self._listening:
            loopguard.not_listening(address)
        self._listening = []

    async def drain(self, timeout: float) -> DrainCut:
        """Let in-flight requests be answered, then close every connection.

        Idle client connections are closed spread over `drain_close_window`
        rather than all at once, so clients do not all reconnect in the same
        instant; busy ones are closed as soon as their last reply is written.
        Requests still unanswered after `timeout` get `Error: balancer stopping`
        (the stop's doing, not a backend failure) and are returned as cut. A call
        with 0 while a drain runs cuts at once.
        """
        deadline = monotonic() + timeout
        window = min(self.drain_close_window, timeout)
        start = monotonic()
        for session in list(self.sessions):
            session.begin_drain()
        # busy sessions close themselves after their last reply (begin_drain)
        idle = [s for s in self.sessions if s.idle]
        total = len(idle)
        closed = 0
        while True:
            now = monotonic()
            if total:
                due = total if window <= 0 else math.ceil(total * min(1.0, (now - start) / window))
                while closed < due and idle:
                    idle.pop().close()
                    closed += 1
            if not self.sessions or now >= deadline:
                break
            await asyncio.sleep(0.01)
        self.stopped = True
        self.queue.clear()
        connections = requests = 0
        for session in list(self.sessions):
            n = session.cut_unanswered()
            if n:
                connections += 1
                requests += n
            session.close()
        self.drain_cut += requests
        self.close_backends()
        return DrainCut(connections, requests)

    def close_backends(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for channel in self.channels.values():
            channel.close(resend=False)

    def reconfigure(self, config: ServiceConfig) -> None:
        """New settings for this service (same listener and mode), from a reload."""
        self.config = config
        self.hash_by_message = config.hash_key == "message"
        self.client_framing = config.client_framing
        self.max_buffered = config.max_buffered
        self._bind_policy_hooks()
        for channel in self.channels.values():
            channel.max_connections = max(1, config.backend_connections)

    def remove_backend(self, backend: Backend) -> None:
        ch = self.channels.pop(backend, None)
        if ch is not None:
            ch.close()

    def __repr__(self) -> str:
        return f"<MessageService {self.config.name} {len(self.sessions)} clients | {self.pool!r}>"
