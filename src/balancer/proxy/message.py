"""Message mode: every request line is balanced on its own.

How it works:
- A `ClientSession` (one per client connection) frames what the client sends
  into requests and keeps them in arrival order. Each request is handed to
  a backend chosen by the service's policy; replies may come back from
  different backends in any order, and the session writes them to the client
  strictly in request order (a reply waits until every earlier one is there).
- Each backend has a `BackendChannel`: a few persistent connections
  (`BackendConnection`) over which requests are pipelined. Replies on one
  connection come back in the order its requests were sent, so each
  connection holds a FIFO of the requests it carries. With raw backend
  framing a connection carries one request at a time.
- When a backend connection fails while it holds requests, those requests
  are re-sent to another backend (at most `retries` times each, never to a
  backend that already failed them) and the backend is marked down. Only
  when no backend is left does the client get `Server not available`.
- Client framing is detected per connection: a first chunk with a newline
  means lines; a first chunk without one, followed by a short quiet period,
  means raw (each read is one message, each reply is written unterminated),
  as the tutorial's original programs send.
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
from typing import TYPE_CHECKING, cast

from balancer.framing import LineFramer, LineTooLong
from balancer.lifecycle import DrainCut
from balancer.loops import create_listener
from balancer.policies.base import Policy
from balancer.pool import Backend, BackendPool

if TYPE_CHECKING:
    from balancer.accesslog import AccessLog
    from balancer.config import ServiceConfig
    from balancer.metrics import LatencyHistogram

log = logging.getLogger("balancer")

NOT_AVAILABLE = b"Server not available"
LINE_TOO_LONG = b"Error: line too long"
QUEUE_FULL = b"Error: server busy"
QUEUE_TIMEOUT = b"Error: queue timeout"
TOO_MANY_CONNECTIONS = b"Error: too many connections"
STOPPING = b"Error: balancer stopping"
RAW_QUIET_PERIOD = 0.05
MAX_PENDING_PER_CLIENT = 4096
"""A client with this many unanswered requests is paused until replies drain."""
BACKEND_MAX_REPLY = 16 * 1024 * 1024
PIPELINE_OPEN_THRESHOLD = 8

_UNDETECTED = 0
_LINE = 1
_RAW = 2


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


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
        self.started = 0.0
        self.sent = 0.0
        self.queued_at = 0.0


class BackendConnection(asyncio.Protocol):
    """One persistent connection to a backend, carrying a FIFO of requests."""

    def __init__(self, channel: BackendChannel) -> None:
        self.channel = channel
        self.pending: deque[Request] = deque()
        self.transport: asyncio.Transport | None = None
        self.connected = False
        self.closed = False
        self.served = 0
        self.out: list[bytes] = []
        """Bytes queued for the next write (one write per loop turn)."""
        self._framer = LineFramer(BACKEND_MAX_REPLY)
        self._raw = channel.raw
        self._error: str | None = None
        self._eof = False
        self.scheduled = False
        self.usable = True

    # -- sending ------------------------------------------------------------
    def enqueue(self, req: Request) -> None:
        self.pending.append(req)
        if self._raw:
            self.out.append(req.payload)
        else:
            self.out.append(req.payload + b"\n")

    def flush(self) -> None:
        if self.out and self.connected and self.transport is not None:
            out = self.out
            self.out = []
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    # -- asyncio callbacks ----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        self.connected = True
        _nodelay(transport)
        self.flush()

    def data_received(self, data: bytes) -> None:
        channel = self.channel
        now = monotonic()
        if self._raw:
            if not self.pending:
                self._fail("unsolicited data from backend")
                return
            replies = [data.rstrip(b"\r\n")]
        else:
            try:
                replies = self._framer.feed(data)
            except LineTooLong:
                self._fail("reply line too long")
                return
            if len(replies) > len(self.pending):
                self._fail("more replies than requests")
                return
        pending = self.pending
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
        if self._raw and not pending:
            channel.connection_idle(self)

    def eof_received(self) -> bool | None:
        self._eof = True
        self.usable = False
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.connected = False
        self.closed = True
        if self._error is None:
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

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def __repr__(self) -> str:
        return (
            f"<BackendConnection {self.channel.backend.address} pending={len(self.pending)} "
            f"served={self.served} connected={self.connected}>"
        )


class BackendChannel:
    """The persistent connections to one backend."""

    def __init__(self, service: MessageService, backend: Backend) -> None:
        self.service = service
        self.backend = backend
        self.raw = service.config.backend_framing == "raw"
        self.max_connections = max(1, service.config.backend_connections)
        # Line framing pipelines: a new connection is opened only when every open one
        # already carries this many requests (fewer connections, bigger writes).
        self.open_threshold = 1 if self.raw else PIPELINE_OPEN_THRESHOLD
        self.connections: list[BackendConnection] = []
        # raw framing: requests waiting for a free connection
        self.waiting: deque[Request] = deque()
        self.retired = False

    def send(self, req: Request) -> BackendConnection | None:
        """Queue `req` on a connection; return it so the caller can flush, or None if waiting."""
        conns = self.connections
        if len(conns) == 1 and not self.raw:
            # the common case: one pipelined connection with room on it
            conn = conns[0]
            if conn.usable and (
                len(conn.pending) < self.open_threshold or self.max_connections == 1
            ):
                conn.pending.append(req)
                conn.out.append(req.payload + b"\n")
                return conn
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
            best_n >= self.open_threshold and self._usable_count() < self.max_connections
        ):
            best = self._open()
        elif best_n > 0 and self.raw:
            self.waiting.append(req)
            return None
        best.enqueue(req)
        return best

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
            reason = f"connect failed: {exc.strerror or exc}"
        else:
            return
        conn.closed = True
        backend.connect_failures += 1
        self.connection_closed(conn, reason, stale=False)

    def connection_idle(self, conn: BackendConnection) -> None:
        """Raw framing: a connection finished its request; give it the next waiting one."""
        if self.waiting and not conn.closed:
            conn.enqueue(self.waiting.popleft())
            conn.flush()

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
            # the connection was closed while idle; keep serving the queue
            nxt = self.waiting.popleft()
            c = self.send(nxt)
            if c is not None:
                c.flush()
        if error is None and not failed:
            return
        service = self.service
        backend = self.backend
        if not stale:
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

    def close(self) -> None:
        self.retired = True
        for conn in list(self.connections):
            conn.close()

    def expire(self, now: float, timeout: float) -> None:
        """Fail connections whose oldest request waited longer than `timeout`."""
        for conn in list(self.connections):
            if conn.pending and now - conn.pending[0].sent > timeout:
                conn.abort(f"no reply within {timeout:g}s")

    def __repr__(self) -> str:
        return (
            f"<BackendChannel {self.backend.address} connections={len(self.connections)} "
            f"waiting={len(self.waiting)}>"
        )


class ClientSession(asyncio.Protocol):
    """One client connection: frames requests and writes replies in order."""

    def __init__(self, service: MessageService) -> None:
        self.service = service
        self.transport: asyncio.Transport | None = None
        self.peer = "-"
        self.peer_key = b""
        self.pending: deque[Request] = deque()
        self.framer = LineFramer(service.config.max_line)
        self.framing = _UNDETECTED
        self._raw_buf = bytearray()
        self._raw_timer: asyncio.TimerHandle | None = None
        self._out: list[bytes] = []
        self._dirty = False
        self._paused_reading = False
        self._paused_writing = False
        self._closing = False
        self._close_after_flush = False
        self.last_active = monotonic()

    # -- asyncio callbacks ----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        _nodelay(transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"{peer[0]}:{peer[1]}"
            self.peer_key = str(peer[0]).encode()
        service = self.service
        limit = service.config.max_connections
        if service.draining:
            transport.close()
            return
        if limit and len(service.sessions) >= limit:
            service.refused += 1
            self._closing = True
            transport.write(TOO_MANY_CONNECTIONS + b"\n")
            transport.close()
            return
        service.sessions.add(self)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        framing = self.framing
        if framing == _LINE:
            self._lines(data)
        elif framing == _RAW:
            self._raw_message(data)
        else:
            self._detect(data)

    def _detect(self, data: bytes) -> None:
        buf = self._raw_buf
        buf += data
        if b"\n" in data:
            self.framing = _LINE
            self._cancel_raw_timer()
            self._raw_buf = bytearray()
            self._lines(bytes(buf))
            return
        if len(buf) > self.service.config.max_line:
            self._too_long()
            return
        if self._raw_timer is None:
            self._raw_timer = self.service.loop.call_later(RAW_QUIET_PERIOD, self._raw_detected)

    def _cancel_raw_timer(self) -> None:
        if self._raw_timer is not None:
            self._raw_timer.cancel()
            self._raw_timer = None

    def _raw_detected(self) -> None:
        self._raw_timer = None
        if self._closing or self.framing != _UNDETECTED:
            return
        self.framing = _RAW
        data = bytes(self._raw_buf)
        self._raw_buf = bytearray()
        self._raw_message(data)

    def _raw_message(self, data: bytes) -> None:
        if len(data) > self.service.config.max_line:
            self._too_long()
            return
        message = data.rstrip(b"\r\n")
        self.service.dispatch_batch(self, [message])

    def _lines(self, data: bytes) -> None:
        try:
            lines = self.framer.feed(data)
        except LineTooLong as exc:
            if exc.lines:
                self.service.dispatch_batch(self, exc.lines)
            self._too_long()
            return
        if lines:
            self.service.dispatch_batch(self, lines)
            if len(self.pending) > MAX_PENDING_PER_CLIENT and not self._paused_reading:
                self._paused_reading = True
                assert self.transport is not None
                self.transport.pause_reading()

    def _too_long(self) -> None:
        """Answer the requests before it, then the error, then close."""
        self._closing = True
        self._cancel_raw_timer()
        req = Request(self, b"")
        self.pending.append(req)
        req.reply = LINE_TOO_LONG
        self._close_after_flush = True
        self.service.too_long += 1
        if self.transport is not None:
            self.transport.pause_reading()
        self.try_flush()

    def eof_received(self) -> bool | None:
        # The client will send no more; answer what it sent, then close.
        if self.framing == _UNDETECTED and self._raw_buf:
            self._cancel_raw_timer()
            self._raw_detected()
        self._closing = True
        self._close_after_flush = True
        self.try_flush()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._cancel_raw_timer()
        self.service.sessions.discard(self)
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

    def close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    def cut(self, reply: bytes) -> int:
        """Answer every request still unanswered with `reply`, write, close; how many."""
        cut = 0
        for req in self.pending:
            if req.reply is None:
                req.reply = reply
                cut += 1
        self._closing = True
        self._close_after_flush = True
        self.try_flush()
        return cut

    def __repr__(self) -> str:
        return f"<ClientSession {self.peer} pending={len(self.pending)}>"


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
        self.config = config
        self.pool = pool
        self.histogram = histogram
        self.access_log = access_log
        self.loop = asyncio.get_running_loop()
        self.sessions: set[ClientSession] = set()
        self.dirty_sessions: list[ClientSession] = []
        self.dirty_conns: list[BackendConnection] = []
        self._flush_scheduled = False
        self.channels: dict[Backend, BackendChannel] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.servers: list[asyncio.Server] = []
        self.draining = False
        self.stopped = False
        """The stop cut what was left: backend connections closing now are no failure."""
        self.too_long = 0
        self.not_available = 0
        self.retries = 0
        self.retries_over_budget = 0
        self.refused = 0
        self.queue_full = 0
        self.queue_timeouts = 0
        self.idle_closed = 0
        self.queue: deque[Request] = deque()
        self.budget = RetryBudget(monotonic())
        self.drain_close_window = 1.0
        self.hash_by_message = config.hash_key == "message"
        self.policy_start: Callable[[Backend], None] | None = None
        self.policy_finish: Callable[[Backend, float, bool], None] | None = None
        self._bind_policy_hooks()
        self._sweeper: asyncio.TimerHandle | None = None

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
        self._schedule_sweep()
        sock = server.sockets[0]
        addr = sock.getsockname()
        return str(addr[0]), int(addr[1])

    def _schedule_sweep(self) -> None:
        cfg = self.config
        period = min(1.0, cfg.response_timeout / 4, cfg.queue_timeout / 4)
        if cfg.client_timeout > 0:
            period = min(period, cfg.client_timeout / 4)
        self._sweeper = self.loop.call_later(max(0.02, period), self._sweep)

    def _sweep(self) -> None:
        """Timeouts: backend replies, queued requests, idle clients."""
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
        if cfg.client_timeout > 0:
            limit = cfg.client_timeout
            for session in [
                s for s in self.sessions if not s.pending and now - s.last_active > limit
            ]:
                self.idle_closed += 1
                session.close()
        self.flush_sessions()
        self._schedule_sweep()

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
            if req.session.transport is None or req.reply is not None:
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
            if session.transport is None:
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

    # -- lifecycle ------------------------------------------------------------
    def stop_accepting(self) -> None:
        self.draining = True
        for server in self.servers:
            server.close()

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
            cut = session.cut(STOPPING)
            if cut:
                connections += 1
                requests += cut
        self.close_backends()
        return DrainCut(connections, requests)

    def close_backends(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for channel in self.channels.values():
            channel.close()

    def reconfigure(self, config: ServiceConfig) -> None:
        """New settings for this service (same listener and mode), from a reload."""
        self.config = config
        self.hash_by_message = config.hash_key == "message"
        self._bind_policy_hooks()
        for channel in self.channels.values():
            channel.max_connections = max(1, config.backend_connections)

    def remove_backend(self, backend: Backend) -> None:
        ch = self.channels.pop(backend, None)
        if ch is not None:
            ch.close()

    def __repr__(self) -> str:
        return f"<MessageService {self.config.name} {len(self.sessions)} clients | {self.pool!r}>"
