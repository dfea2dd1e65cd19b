"""One persistent connection to a backend: it matches replies to the requests it
carries, in order, and reports what happens to its channel (replies, a local
refusal, idleness, its end); it counts nothing and decides nothing else."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol, cast

from balancer.core.framing import LineFramer, LineTooLong
from balancer.core.pool import Backend
from balancer.net import loopguard
from balancer.net.sockopts import set_nodelay
from balancer.proxy.message.request import BACKEND_MAX_REPLY, RAW, Client, Request
from balancer.wire import BAD_REPLY, INVALID_MESSAGE, LINE_BREAK


class Channel(Protocol):
    """What a backend connection reports to: the channel of its backend."""

    backend: Backend
    raw: bool
    owner: loopguard.Owner

    def replied(self, pending: deque[Request], replies: list[bytes]) -> None: ...

    def refuse(self, req: Request, reply: bytes) -> None: ...

    def connection_idle(self, conn: BackendConnection) -> None: ...

    def connection_closed(
        self, conn: BackendConnection, error: str | None, stale: bool
    ) -> None: ...


class BackendConnection:
    """One persistent connection to a backend, carrying a FIFO of requests.

    An asyncio protocol by its methods, not by inheritance: the compiled build makes it an
    extension type, which cannot derive from `asyncio.Protocol`.

    `out` holds the payloads of the requests queued since the last write, one item
    per request (the write adds the newlines of a line backend): they are always the
    last `len(out)` entries of `pending`.
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

    def __init__(self, channel: Channel) -> None:
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
        self.owner: Client | None = None
        """Raw framing: the client whose requests this connection carries."""
        self._loop_registration: loopguard.Registration | None = None
        self._error: str | None = None
        self._eof = False
        self._by_us = False
        # requests
        self.pending: deque[Request] = deque()
        self.out: list[bytes] = []
        """Payloads queued for the next write (one write per loop turn)."""
        self.served = 0
        self._framer = LineFramer(BACKEND_MAX_REPLY)

    # -- sending ------------------------------------------------------------
    def enqueue(self, req: Request) -> None:
        self.pending.append(req)
        if self._raw:
            self.owner = req.session
        self.out.append(req.payload)

    def flush(self) -> None:
        out = self.out
        transport = self.transport
        # A connection aborted this turn is closing before its connection_lost: what it
        # holds goes again elsewhere then, and nothing is written to it meanwhile.
        if out and self.connected and transport is not None and not transport.is_closing():
            self.out = []
            n = len(out)
            if self._raw:
                data = out[0] if n == 1 else b"".join(out)
            else:
                data = out[0] + b"\n" if n == 1 else b"\n".join(out) + b"\n"
            # Every request to a line backend is exactly one line: as many newlines as
            # requests, none empty, no CR (many line parsers split there too).
            if not self._raw and (
                data.count(b"\n") != n or b"\r" in data or b"\n\n" in data or data[0] == 10
            ):
                data = self._refuse_unsafe(n)
                if not data:
                    return
            transport.write(data)

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
        set_nodelay(transport)
        # Registered before the first write, so a listener of ours that accepts this
        # connection recognises it by the time the request arrives.
        owner = self.channel.owner
        sockname = transport.get_extra_info("sockname")
        peername = transport.get_extra_info("peername")
        self._loop_registration = loopguard.Registration(sockname, peername, owner)
        self.flush()

    def data_received(self, data: bytes) -> None:
        pending = self.pending
        if self._raw:
            if len(pending) <= len(self.out):  # nothing written awaits a reply
                self._fail("unsolicited data from backend")
                return
            reply = data.rstrip(b"\r\n")
            if b"\n" in reply and pending[0].session.framing != RAW:
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
        channel = self.channel
        if replies:
            self.served += len(replies)
            channel.replied(pending, replies)
        if not pending and (self._raw or self.retiring):
            channel.connection_idle(self)

    def eof_received(self) -> bool | None:
        self._eof = True
        self.usable = False
        return None

    def pause_writing(self) -> None:
        """The transport's buffer is full: what is queued stays queued (bounded by the
        client sessions' own limits)."""

    def resume_writing(self) -> None:
        """The transport's buffer drained."""

    def connection_lost(self, exc: Exception | None) -> None:
        self.connected = False
        self.closed = True
        self.usable = False
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
