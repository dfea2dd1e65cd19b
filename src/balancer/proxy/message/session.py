"""One client connection in message mode (`ClientSession`): it frames what the
client sends into requests, hands them to the dispatcher, and writes the replies
strictly in request order (a reply waits until every earlier one is there).

Client framing is the service's `client_framing`: `line` (one request per
line; an unterminated rest at EOF is one last request), `raw` (each read is
one message, each reply is written unterminated, as the tutorial's original
programs send), or `auto`: a first chunk without a newline followed by a
quiet period (RAW_QUIET_PERIOD, restarted by every chunk) means raw; a
connection found raw that later sends a newline was not raw after all, and is
answered with an error and closed.
"""

from __future__ import annotations

import asyncio
from collections import deque
from time import monotonic
from typing import Any, cast

from balancer.core.framing import LineFramer, LineTooLong
from balancer.net import loopguard, resources
from balancer.net.sockopts import set_nodelay
from balancer.proxy.message.dispatch import Dispatcher
from balancer.proxy.message.request import (
    DETECTING,
    LINE,
    MAX_PENDING_PER_CLIENT,
    NEW,
    RAW,
    Request,
)
from balancer.proxy.upstream import admit
from balancer.wire import LINE_TOO_LONG, NEWLINE_ON_RAW, STOPPING, TOO_MANY_CONNECTIONS

RAW_QUIET_PERIOD = 0.05
"""`auto`: a first chunk without a newline followed by this much quiet means raw."""


class ClientSession:
    """One client connection: frames requests and writes replies in order.

    An asyncio protocol by its methods, not by inheritance: the compiled build makes it an
    extension type, which cannot derive from `asyncio.Protocol`.
    """

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
        "arrival",
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

    def __init__(self, service: Dispatcher, arrival: Any = None) -> None:
        # the connection
        self.service = service
        self.arrival = arrival
        """What the front door read first (`proxy.front.Arrival`: PROXY header, TLS)."""
        self.transport: asyncio.Transport | None = None
        self.peer = "-"
        self.peer_key = b""
        self._peername: object = None
        self._fds: resources.FdBudget | None = None
        # framing
        self.framing = NEW
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
        set_nodelay(transport)
        peer = transport.get_extra_info("peername")
        self._peername = peer
        if self.arrival is not None:
            peer = self.arrival.client
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"{peer[0]}:{peer[1]}"
            self.peer_key = str(peer[0]).encode()
        service = self.service
        if service.stopped:
            self._closing = True
            transport.close()
            return
        owner = self._loop_owner()
        if owner is not None:
            self._loop_detected(owner)
            return
        admitted, self._fds = admit(len(service.sessions), service.config.max_connections, 1)
        if not admitted:
            self._refuse()
            return
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
        if framing == LINE:
            self._lines(data)
        elif framing == RAW:
            self._raw_message(data)
        elif framing == DETECTING:
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
        self._framed(data)
        if self.service.draining:
            # accepted while the listener was closing: what it sent first is answered,
            # then it is closed like every other connection of the drain
            self.begin_drain()

    def _framed(self, data: bytes) -> None:
        mode = self.service.client_framing
        if mode == "line":
            self.framing = LINE
            self._lines(data)
        elif mode == "raw":
            self.framing = RAW
            self._raw_message(data)
        else:
            self.framing = DETECTING
            self._detect(data)

    def _detect(self, data: bytes) -> None:
        buf = self._raw_buf
        buf += data
        self._cancel_raw_timer()
        if b"\n" in data:
            self.framing = LINE
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
        if self._closing or self.framing != DETECTING:
            return
        self.framing = RAW
        self._detected_raw = True
        data = bytes(self._raw_buf)
        self._raw_buf = bytearray()
        self._hold(0)
        self._raw_message(data)

    def _raw_message(self, data: bytes) -> None:
        if self._detected_raw and b"\n" in data:
            self.cut(NEWLINE_ON_RAW)  # found raw by a pause, but it sends lines
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
        self.cut(LINE_TOO_LONG)

    def cut(self, reply: bytes) -> None:
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
            if self.framing == DETECTING and self._raw_buf:
                self._cancel_raw_timer()
                self._raw_detected()
            elif self.framing == LINE:
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
        pending = self.pending
        if not self._dirty and pending and pending[0] is req:
            if len(pending) == 1:
                # lockstep: the only reply awaited is ready; nothing to batch it with
                self.try_flush()
                return
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
        raw = self.framing == RAW
        out = self._out
        access = self.service.access_log
        histogram = self.service.histogram
        now = monotonic()
        self.last_active = now
        done: list[Request] | None = [] if access is not None else None
        while pending and pending[0].reply is not None:
            req = pending.popleft()
            reply = req.reply
            assert reply is not None
            out.append(reply)
            if req.started:
                histogram.observe(now - req.started)
            if done is not None:
                done.append(req)
        if done and access is not None:
            access.record_batch(self, done, now)
        if transport is not None:
            if raw:
                transport.write(b"".join(out) if len(out) > 1 else out[0])
            else:
                transport.write(b"\n".join(out) + b"\n" if len(out) > 1 else out[0] + b"\n")
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
