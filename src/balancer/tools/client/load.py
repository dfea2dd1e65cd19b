"""The load client's connections and run: requests sent, replies checked, counters kept.

How the load client works: `--client_count` connections each send decimal
numbers (a per-client counter) as lines and check every reply, in order,
against `It’s instance number N`. Closed loop by default: each connection keeps
`--pipeline` requests in flight until it has sent `--requests_per_client` or
`--duration` has passed. With `--rate` the load is open loop: requests are
scheduled at a constant total rate, spread over the connections, and latency
is measured from the scheduled send time (as wrk2 does), so a stall shows up
in the percentiles instead of slowing the schedule down.

Every request ends as ok or as exactly one error:
`wrong_reply`, `server_not_available`, `timeout` (no reply within `--timeout`;
the connection is then abandoned and its outstanding requests count as
timeouts), `connection_error` (refused, reset or closed with requests
outstanding; in a count-bounded run a client that cannot reconnect has its
unsent requests counted too) and `error_reply` (a line starting `Error`).
A reply nobody asked for is counted as `wrong_reply`. Throughput counts
successful replies per second; latencies are those of successful replies.

With `--raw` the client speaks the tutorial's original framing, as its
`client.py` did against its `server.py`: each message is sent unterminated and
each read is one reply (the tutorial read one `recv(1024)` per message), so
the connection runs in lockstep and `--pipeline` must be 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass
from typing import cast

from hdrh.histogram import HdrHistogram

from balancer.wire import INSTANCE_PREFIX as PREFIX

ERROR_KINDS = ("wrong_reply", "server_not_available", "timeout", "connection_error", "error_reply")
SERVER_NOT_AVAILABLE = b"Server not available"
MAX_REPLY_LINE = 1 << 20

LATENCY_MIN_US = 1
LATENCY_MAX_US = 60_000_000


@dataclass
class LoadSettings:
    host: str = "localhost"
    port: int = 8080
    clients: int = 1
    requests_per_client: int = 1000
    pipeline: int = 1
    duration: float | None = None
    rate: float | None = None
    timeout: float = 5.0
    raw: bool = False
    """Unterminated messages, one read per reply (lockstep only)."""
    size: int = 0
    """Each request is its counter zero-padded to this many digits (0: unpadded)."""
    engine: str = "auto"
    """`python`, `compiled` (balancer.tools.client.fast) or `auto`: compiled when it is
    built and covers the settings."""


class LoadStats:
    """Counters and the latency histogram shared by all connections of a run."""

    def __init__(self) -> None:
        self.requests = 0
        self.ok = 0
        self.errors: dict[str, int] = dict.fromkeys(ERROR_KINDS, 0)
        self.histogram = HdrHistogram(LATENCY_MIN_US, LATENCY_MAX_US, 3)

    def error(self, kind: str, count: int = 1) -> None:
        if count > 0:
            self.errors[kind] += count

    def unsent(self, kind: str, count: int = 1) -> None:
        """Requests that failed before they could be sent: counted as made and failed."""
        if count > 0:
            self.requests += count
            self.errors[kind] += count

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())

    @property
    def done(self) -> int:
        return self.ok + self.error_total

    def __repr__(self) -> str:
        kinds = ", ".join(f"{k}={n}" for k, n in self.errors.items() if n)
        return (
            f"<LoadStats {self.requests} requests: {self.ok} ok, "
            f"{self.error_total} errors{' (' + kinds + ')' if kinds else ''}>"
        )


@dataclass
class ClientState:
    """What one load client has left to do; survives reconnects."""

    index: int
    remaining: int | None
    """Requests not yet sent (closed loop) or not yet scheduled (open loop); None: no bound."""
    deadline: float | None
    size: int = 0
    next_number: int = 1
    backlog: deque[float] | None = None
    """Open loop only: scheduled send times not yet sent."""
    first_due: float = 0.0
    interval: float = 0.0
    scheduled: int = 0
    next_due: float = 0.0
    connection: LoadConnection | None = None

    def schedule_done(self, now: float) -> bool:
        if self.remaining is not None and self.remaining <= 0:
            return True
        if self.backlog is not None:
            return self.deadline is not None and self.next_due >= self.deadline
        return self.deadline is not None and now >= self.deadline

    def finished(self, now: float) -> bool:
        return self.schedule_done(now) and not self.backlog

    def unsent(self) -> int:
        """Requests this client still owes (for a count-bounded run that gives up)."""
        return (self.remaining or 0) + (len(self.backlog) if self.backlog else 0)


class LoadConnection(asyncio.Protocol):
    """One client connection: pipelined sends, replies matched in order."""

    def __init__(
        self, state: ClientState, stats: LoadStats, pipeline: int, raw: bool = False
    ) -> None:
        self.state = state
        self.stats = stats
        self.pipeline = pipeline
        self.raw = raw
        self.size = state.size
        self.pending: deque[tuple[bytes, float, float]] = deque()
        """(expected reply, latency start, send time) per request in flight."""
        self.replies = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        self.state.connection = self
        self.fill()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self.state.connection is self:
            self.state.connection = None
        self.stats.error("connection_error", len(self.pending))
        self.pending.clear()
        if not self.done.done():
            self.done.set_result(None)

    def fill(self) -> None:
        """Send as many requests as the pipeline and the budget allow, in one write."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        pending = self.pending
        room = self.pipeline - len(pending)
        state = self.state
        now = time.perf_counter()
        if room > 0:
            parts: list[bytes] = []
            backlog = state.backlog
            number = state.next_number
            if backlog is None:
                if state.deadline is not None and now >= state.deadline:
                    room = 0
                if state.remaining is not None:
                    room = min(room, state.remaining)
                    state.remaining -= room
                size = self.size
                for _ in range(room):
                    nb = b"%0*d" % (size, number)
                    number += 1
                    parts.append(nb)
                    pending.append((PREFIX + nb, now, now))
            else:
                while room and backlog:
                    scheduled = backlog.popleft()
                    nb = b"%0*d" % (self.size, number)
                    number += 1
                    parts.append(nb)
                    pending.append((PREFIX + nb, scheduled, now))
                    room -= 1
            if parts:
                state.next_number = number
                self.stats.requests += len(parts)
                if self.raw:
                    transport.write(parts[0])  # one at a time: the pipeline is 1
                else:
                    parts.append(b"")
                    transport.write(b"\n".join(parts))
        if not pending and state.finished(now):
            transport.close()

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if self.raw:
            self._raw_reply(data.rstrip(b"\r\n"), now)
            return
        if self._buffer:
            data = self._buffer + data
        if b"\n" not in data:
            self._buffer = data
            if len(data) > MAX_REPLY_LINE:
                self.fail("wrong_reply")
            return
        lines = data.split(b"\n")
        self._buffer = lines.pop()
        pending = self.pending
        stats = self.stats
        record = stats.histogram.record_value
        ok = 0
        for line in lines:
            if line[-1:] == b"\r":
                line = line[:-1]
            if not pending:
                stats.error("wrong_reply")
                continue
            expected, start, _ = pending.popleft()
            if line == expected:
                ok += 1
                us = int((now - start) * 1_000_000)
                record(LATENCY_MIN_US if us < LATENCY_MIN_US else min(us, LATENCY_MAX_US))
            elif line == SERVER_NOT_AVAILABLE:
                stats.error("server_not_available")
            elif line.startswith(b"Error"):
                stats.error("error_reply")
            else:
                stats.error("wrong_reply")
        stats.ok += ok
        self.replies += len(lines)
        self.fill()

    def _raw_reply(self, reply: bytes, now: float) -> None:
        """Raw framing: one read is one reply, to the one request in flight."""
        stats = self.stats
        self.replies += 1
        if not self.pending:
            stats.error("wrong_reply")
            return
        expected, start, _ = self.pending.popleft()
        if reply == expected:
            stats.ok += 1
            us = int((now - start) * 1_000_000)
            stats.histogram.record_value(min(max(us, LATENCY_MIN_US), LATENCY_MAX_US))
        elif reply == SERVER_NOT_AVAILABLE:
            stats.error("server_not_available")
        elif reply.startswith(b"Error"):
            stats.error("error_reply")
        else:
            stats.error("wrong_reply")
        self.fill()

    def check_timeout(self, now: float, timeout: float) -> None:
        if self.pending and now - self.pending[0][2] > timeout:
            self.fail("timeout")

    def fail(self, kind: str) -> None:
        """Give up on this connection; its outstanding requests count as `kind`."""
        self.stats.error(kind, len(self.pending))
        self.pending.clear()
        if self._transport is not None:
            self._transport.abort()


class LoadRun:
    """One run of the load client: workers, the open-loop scheduler, the watchdog."""

    def __init__(self, settings: LoadSettings) -> None:
        self.settings = settings
        self.stats = LoadStats()
        self.states: list[ClientState] = []
        self.started = 0.0
        self.finished = 0.0

    @property
    def total(self) -> int | None:
        """Requests the run will make, when bounded by count."""
        if self.settings.duration is not None:
            return None
        return self.settings.clients * self.settings.requests_per_client

    async def run(self) -> LoadStats:
        s = self.settings
        self.started = time.perf_counter()
        deadline = self.started + s.duration if s.duration is not None else None
        remaining = None if s.duration is not None else s.requests_per_client
        for i in range(s.clients):
            state = ClientState(i, remaining, deadline, s.size)
            if s.rate is not None:
                state.backlog = deque()
                state.interval = s.clients / s.rate
                state.first_due = state.next_due = self.started + i / s.rate
            self.states.append(state)
        watchdog = asyncio.create_task(self._watchdog())
        try:
            await asyncio.gather(*(self._worker(state) for state in self.states))
        finally:
            self.finished = time.perf_counter()
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
        return self.stats

    async def _worker(self, state: ClientState) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        scheduler = (
            asyncio.create_task(self._schedule(state)) if state.backlog is not None else None
        )
        failures_in_row = 0
        try:
            while not state.finished(time.perf_counter()):
                progressed = False
                try:
                    _, conn = await asyncio.wait_for(
                        loop.create_connection(
                            lambda: LoadConnection(state, self.stats, s.pipeline, s.raw),
                            s.host,
                            s.port,
                        ),
                        s.timeout,
                    )
                except (OSError, TimeoutError):
                    pass
                else:
                    await conn.done
                    progressed = conn.replies > 0
                if progressed:
                    failures_in_row = 0
                    continue
                failures_in_row += 1
                if state.deadline is None and failures_in_row >= 3:
                    # A count-bounded client that cannot get through owes the rest.
                    if scheduler is not None:
                        scheduler.cancel()
                    self.stats.unsent("connection_error", state.unsent())
                    state.remaining = 0
                    if state.backlog is not None:
                        state.backlog.clear()
                    return
                if state.deadline is not None:
                    if state.backlog is None:
                        self.stats.unsent("connection_error")
                    pause = min(0.05 * failures_in_row, 0.5)
                    pause = min(pause, max(state.deadline - time.perf_counter(), 0.0))
                else:
                    pause = 0.05 * failures_in_row
                await asyncio.sleep(pause)
        finally:
            if scheduler is not None:
                scheduler.cancel()

    async def _schedule(self, state: ClientState) -> None:
        """Open loop: move due send times into the client's backlog."""
        backlog = state.backlog
        assert backlog is not None
        while True:
            now = time.perf_counter()
            while not state.schedule_done(now) and state.next_due <= now:
                backlog.append(state.next_due)
                state.scheduled += 1
                state.next_due = state.first_due + state.scheduled * state.interval
                if state.remaining is not None:
                    state.remaining -= 1
            if state.connection is not None:
                state.connection.fill()
            if state.schedule_done(now):
                return
            await asyncio.sleep(max(state.next_due - time.perf_counter(), 0.0))

    async def _watchdog(self) -> None:
        timeout = self.settings.timeout
        tick = min(max(timeout / 10, 0.01), 0.25)
        while True:
            await asyncio.sleep(tick)
            now = time.perf_counter()
            for state in self.states:
                if state.connection is not None:
                    state.connection.check_timeout(now, timeout)
