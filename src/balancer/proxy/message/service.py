"""A message-mode service: its listener, its periodic sweep, reloads and drain.

The request path (framing aside) is `Dispatcher`'s; this adds what a service
does over time: listening, the sweep that enforces timeouts and gives memory
back, reconfiguration on reload, and the stop's drain.
"""

from __future__ import annotations

import asyncio
from time import monotonic
from typing import TYPE_CHECKING, cast

from balancer.core.lifecycle import DrainCut
from balancer.core.pool import Backend, BackendPool
from balancer.net.heap import TRIM_AFTER_FREED, TRIM_HEAP
from balancer.net.periodic import Periodic
from balancer.proxy.base import LATE_ACCEPTS, Listener, wait_closed
from balancer.proxy.edge import Edge
from balancer.proxy.message.dispatch import Dispatcher
from balancer.proxy.message.session import ClientSession
from balancer.wire import QUEUE_TIMEOUT

if TYPE_CHECKING:
    from balancer.config.model import Config, ServiceConfig
    from balancer.core.stats import LatencyHistogram
    from balancer.observe.accesslog import AccessLog


class MessageService(Dispatcher, Edge):
    """A message-mode listener and the backend channels behind it."""

    def __init__(
        self,
        config: ServiceConfig,
        pool: BackendPool,
        *,
        histogram: LatencyHistogram,
        access_log: AccessLog | None = None,
    ) -> None:
        super().__init__(config, pool, histogram=histogram, access_log=access_log)
        self.drain_close_window = 1.0
        self._listener = Listener()
        self.init_edge()
        self._sweeper = Periodic(self._sweep_period, self._sweep)

    @property
    def client_connections(self) -> int:
        return len(self.sessions)

    def account(self) -> None:
        """Nothing to do: message mode counts as it goes."""

    def mode_status(self) -> None:
        """Nothing beyond the counters every mode has."""

    async def start(self) -> tuple[str, int]:
        self.bound = await self.open_listener(
            self._listener,
            self.loop,
            lambda arrival: cast(asyncio.Protocol, ClientSession(self, arrival)),
        )
        self._sweeper.start()
        return self.bound

    def configure(self, config: Config) -> None:
        self.drain_close_window = config.drain_close_window

    def _sweep_period(self) -> float:
        cfg = self.config
        period = min(1.0, cfg.response_timeout / 4, cfg.queue_timeout / 4)
        if cfg.client_timeout > 0:
            period = min(period, cfg.client_timeout / 4)
        return max(0.02, period)

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

    # -- lifecycle ------------------------------------------------------------
    def stop_accepting(self) -> None:
        self.draining = True
        self._listener.close()

    async def drain(self, timeout: float) -> DrainCut:
        """Let in-flight requests be answered, then close every connection.

        Idle client connections are closed spread over `drain_close_window`
        rather than all at once, so clients do not all reconnect in the same
        instant; busy ones are closed as soon as their last reply is written.
        Requests still unanswered after `timeout` get `Error: balancer stopping`
        (the stop's doing, not a backend failure) and are returned as cut. A call
        with 0 while a drain runs cuts at once.
        """
        if not self.draining:
            self.stop_accepting()
        for session in list(self.sessions):
            session.begin_drain()
        # busy sessions close themselves after their last reply (begin_drain); idle ones
        # are closed spread over the close window
        idle = [s for s in self.sessions if s.idle]
        sessions = self.sessions
        # connections the loop accepted as the listener closed still arrive: each answers
        # what it sent first, then closes (`ClientSession._first_data`)
        await wait_closed(
            lambda: len(sessions), timeout, idle, self.drain_close_window,
            clock=monotonic, settle=LATE_ACCEPTS,
        )  # fmt: skip
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
        self._sweeper.stop()
        for channel in self.channels.values():
            channel.close(resend=False)

    def reconfigure(self, config: ServiceConfig) -> None:
        """New settings for this service (same listener and mode), from a reload."""
        self.config = config
        self.hash_by_message = config.hash_key == "message"
        self.client_framing = config.client_framing
        self.max_buffered = config.max_buffered
        self._bind_policy_hooks()
        self.refront()
        for channel in self.channels.values():
            channel.max_connections = max(1, config.backend_connections)

    def remove_backend(self, backend: Backend) -> None:
        ch = self.channels.pop(backend, None)
        if ch is not None:
            ch.close()

    def __repr__(self) -> str:
        return f"<MessageService {self.config.name} {len(self.sessions)} clients | {self.pool!r}>"
