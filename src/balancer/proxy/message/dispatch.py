"""The request path of message mode: one place that assigns, settles and fails
every request.

`Dispatcher` picks a backend for each request (or queues it), hands it to the
backend's channel, and is told by the channels what became of it: answered
(`settle`), answered locally (`answer_locally`) or left unanswered when a
connection ended (`unanswered`). Only here do `in_flight`, the policy's
hooks and the backends' failure counters change, and only here is a retry or
an error reply decided. Writes are coalesced: everything queued during one
turn of the event loop goes out at its end (`_flush_all`), one write per
connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Collection
from time import monotonic
from typing import TYPE_CHECKING

from balancer.core.policies.base import Policy
from balancer.core.pool import Backend, BackendPool
from balancer.core.retry import RetryBudget
from balancer.proxy.message.channel import (
    FAULT,
    KEPT_ALIVE,
    REMOVED,
    SHORTAGE,
    STOPPED,
    BackendChannel,
)
from balancer.proxy.message.connection import BackendConnection
from balancer.proxy.message.request import MAX_SHORTAGE_RETRIES, Request, Session
from balancer.proxy.upstream import has_room
from balancer.wire import (
    INVALID_MESSAGE,
    LINE_TOO_LONG,
    NOT_AVAILABLE,
    QUEUE_FULL,
)

if TYPE_CHECKING:
    from balancer.config.model import ServiceConfig
    from balancer.core.stats import LatencyHistogram
    from balancer.observe.accesslog import AccessLog

log = logging.getLogger("balancer")


class Dispatcher:
    """The requests of one message-mode service, from framing to reply."""

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
        self.policy_start: Callable[[Backend], None] | None = None
        self.policy_finish: Callable[[Backend, float, bool], None] | None = None
        self._bind_policy_hooks()
        # the event loop side
        self.loop = asyncio.get_running_loop()
        self.bound: tuple[str, int] = (config.listen_host, config.listen_port)
        self.tasks: set[asyncio.Task[None]] = set()
        self.draining = False
        # connections and requests
        self.sessions: set[Session] = set()
        self.channels: dict[Backend, BackendChannel] = {}
        self.dirty_sessions: list[Session] = []
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

    # -- the one place a request's accounting changes ---------------------------
    def settle(self, backend: Backend, pending: deque[Request], replies: list[bytes]) -> None:
        """`backend` answered the first `len(replies)` requests of `pending` (a connection's
        FIFO) with `replies`, in order: they leave it."""
        now = monotonic()
        on_finish = self.policy_finish
        backend.consecutive_failures = 0
        n = len(replies)
        backend.in_flight -= n
        backend.requests += n
        popleft = pending.popleft
        for reply in replies:
            req = popleft()
            if on_finish is not None:
                on_finish(backend, now - req.started, True)
            req.backend = backend
            req.session.complete(req, reply)
        if self.queue:
            self.drain_queue()
        self.flush_sessions()

    def answer_locally(self, backend: Backend, req: Request, reply: bytes) -> None:
        """A request handed to `backend` is answered here instead: it must not be sent."""
        backend.in_flight -= 1
        self.invalid += 1
        req.session.complete(req, reply)
        self.flush_sessions()

    def unanswered(
        self,
        backend: Backend,
        failed: list[Request],
        outcome: int,
        error: str | None,
        connect_failed: bool = False,
    ) -> None:
        """A connection to `backend` ended holding `failed`; `outcome` says how (see
        `channel`): count what is the backend's fault, then retry or answer each."""
        if connect_failed:
            backend.connect_failures += 1
        backend.in_flight -= len(failed)
        if outcome == STOPPED:
            return  # the stop answered these requests with an error: not the backend's failure
        if outcome == SHORTAGE:
            self.retry_short(failed, backend)
            return
        if outcome == FAULT:
            backend.failures += len(failed)
            self.pool.report_failure(backend, error or "connection failed")
            self.retry(failed, backend)
        elif outcome == REMOVED:
            self.retry(failed, backend)
        elif outcome == KEPT_ALIVE and failed:
            # the requests it held may go to the same backend again, on a new connection
            log.info(
                "backend %s closed a kept-alive connection with %d request(s) on it; re-sending",
                backend.address,
                len(failed),
            )
            self.retry(failed, backend, exclude=False)
        if self.queue:
            # room freed or a backend lost: the queue is served (or answered) now, not at
            # the next reply or its queue_timeout
            self.drain_queue()

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
            session.cut(LINE_TOO_LONG)
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
    def dispatch_batch(self, session: Session, payloads: list[bytes]) -> None:
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
        if not self._flush_scheduled and (dirty or self.dirty_sessions):
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
            if has_room(backend.in_flight, limit):
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
        """The retry budget (`balancer.core.retry`): retries within `retry_budget_percent`
        of recent requests, or `retry_budget_min` per second, whichever allows more."""
        cfg = self.config
        return self.budget.allow(monotonic(), cfg.retry_budget_percent, cfg.retry_budget_min)

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
