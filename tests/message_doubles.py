"""Doubles for message-mode tests in the protocol tier: fake transports, a service whose
backend connections are fake, and backends that tag every reply with the request it answers."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from balancer.config.model import BackendConfig, HealthConfig, ServiceConfig
from balancer.core.pool import Backend, BackendPool
from balancer.core.stats import LatencyHistogram
from balancer.proxy.message import dispatch, service, session
from balancer.proxy.message.channel import BackendChannel
from balancer.proxy.message.connection import BackendConnection
from balancer.proxy.message.service import MessageService
from balancer.proxy.message.session import ClientSession

Opened = dict[int, list[tuple[BackendConnection, "FakeTransport"]]]


class FakeTransport(asyncio.Transport):
    def __init__(
        self,
        peer: tuple[str, int] = ("127.0.0.1", 5555),
        sockname: tuple[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed = False
        self.aborted = False
        self.paused = False
        self.peer = peer
        self.sockname = sockname
        self.protocol: Any = None
        """The protocol object it serves (the message mode's are protocols by their methods)."""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self.peer
        if name == "sockname" and self.sockname is not None:
            return self.sockname
        return default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "write after close"
        self.written.append(bytes(data))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.protocol is not None:
                asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.aborted = True
        if not self.closed:
            self.closed = True
            if self.protocol is not None:
                asyncio.get_running_loop().call_soon(
                    self.protocol.connection_lost, ConnectionResetError("aborted")
                )

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def data(self) -> bytes:
        return b"".join(self.written)


class FakeChannel(BackendChannel):
    """Opens fake connections at once (connected in the same turn) and records them."""

    def _open(self) -> BackendConnection:
        service = self.service
        assert isinstance(service, FakeBackendsService)
        conn = BackendConnection(self)
        self.connections.append(conn)
        t = FakeTransport()
        t.protocol = conn
        conn.connection_made(t)
        service.opened.setdefault(self.backend.port, []).append((conn, t))
        return conn


class FakeBackendsService(MessageService):
    """A MessageService whose backend connections are fake transports."""

    opened: Opened

    def channel(self, backend: Backend) -> BackendChannel:
        ch = self.channels.get(backend)
        if ch is None:
            ch = self.channels[backend] = FakeChannel(self, backend)
        return ch


def service_config(n_backends: int = 2, **kw: Any) -> ServiceConfig:
    kw.setdefault("backend_connections", 1)
    kw.setdefault("health", HealthConfig(enabled=False))
    return ServiceConfig(
        name="t",
        listen_host="127.0.0.1",
        listen_port=0,
        backends=tuple(BackendConfig("127.0.0.1", 9000 + i) for i in range(n_backends)),
        **kw,
    )


def make_service(
    n_backends: int = 2, *, framings: Iterable[str] = (), **kw: Any
) -> tuple[FakeBackendsService, Opened]:
    """A service on `n_backends` fake backends (ports 9000, 9001, ...).

    `framings` gives each backend's `Backend.framing` in order ("line" or "raw").
    """
    cfg = service_config(n_backends, **kw)
    pool = BackendPool(cfg)
    for backend, framing in zip(pool.backends, framings, strict=False):
        backend.framing = framing
    service = FakeBackendsService(cfg, pool, histogram=LatencyHistogram())
    service.opened = {b.port: [] for b in pool}
    return service, service.opened


async def turn() -> None:
    """Let the loop run the end-of-turn flush (and the callbacks it schedules)."""
    await asyncio.sleep(0)


async def settle(turns: int = 4) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


def client(
    service: MessageService,
    peer: tuple[str, int] = ("127.0.0.1", 5555),
    sockname: tuple[str, int] | None = None,
) -> tuple[ClientSession, FakeTransport]:
    """A client connection from `peer` (to `sockname`, the listener's address)."""
    s = ClientSession(service)
    t = FakeTransport(peer, sockname)
    t.protocol = s
    s.connection_made(t)
    return s, t


# -- a backend that names the request each reply answers ---------------------------------


def tag(payload: bytes) -> bytes:
    """The tagging backends' reply to `payload`: unambiguous whatever the bytes."""
    return b"ok:" + payload.hex().encode()


def untag(reply: bytes) -> bytes | None:
    if reply.startswith(b"ok:"):
        try:
            return bytes.fromhex(reply[3:].decode())
        except ValueError:
            return None
    return None


RAW_RECV = 1024
"""The raw double reads like the tutorial's service: recv(1024) per message."""


class TaggingBackends:
    """Answers what the balancer wrote to the fake backends, naming each request.

    Line backends parse as strictly as many real line parsers do: a line ends at
    `\\n` or `\\r`, and empty lines are skipped (no reply). So a request that is not
    exactly one line gets a reply count that does not match, which shows up as a
    reply naming another request. Raw backends answer each write, `RAW_RECV` bytes
    at a time, the replies glued into one read; a zero-byte write gets no reply.
    """

    def __init__(self, opened: Opened, raw_ports: Iterable[int] = ()) -> None:
        self.opened = opened
        self.raw_ports = set(raw_ports)
        self._seen: dict[int, int] = {}
        self._partial: dict[int, bytes] = {}
        self._due: dict[int, list[bytes]] = {}
        self.requests_seen: list[bytes] = []

    def _collect(self, port: int, t: FakeTransport) -> list[bytes]:
        key = id(t)
        seen = self._seen.get(key, 0)
        new = t.written[seen:]
        self._seen[key] = len(t.written)
        due = self._due.setdefault(key, [])
        if port in self.raw_ports:
            for w in new:
                if w:
                    pieces = [w[i : i + RAW_RECV] for i in range(0, len(w), RAW_RECV)]
                    self.requests_seen.extend(pieces)
                    due.append(b"".join(tag(p) for p in pieces))
        else:
            buf = self._partial.get(key, b"") + b"".join(new)
            *lines, rest = buf.split(b"\n")
            self._partial[key] = rest
            for line in lines:
                for piece in line.split(b"\r"):
                    if piece:
                        self.requests_seen.append(piece)
                        due.append(tag(piece) + b"\n")
        return due

    def answer(self, port: int | None = None, limit: int | None = None) -> int:
        """Deliver up to `limit` due replies on each connection (of `port`); how many."""
        delivered = 0
        for p, conns in self.opened.items():
            if port is not None and p != port:
                continue
            for conn, t in conns:
                due = self._collect(p, t)
                if t.closed or not due:
                    continue
                n = len(due) if limit is None else min(limit, len(due))
                batch = due[:n]
                del due[:n]
                delivered += n
                if p in self.raw_ports:
                    for reply in batch:  # one read per reply
                        if not t.closed:
                            conn.data_received(reply)
                else:
                    conn.data_received(b"".join(batch))
        return delivered

    def unanswered(self) -> int:
        return sum(len(self._collect(p, t)) for p, conns in self.opened.items() for _, t in conns)


async def answer_all(backends: TaggingBackends, rounds: int = 60) -> None:
    """Answer until nothing more is written (raw connections send one request at a time)."""
    for _ in range(rounds):
        await settle(3)
        if not backends.answer():
            await settle(3)
            if not backends.answer():
                return
    raise AssertionError("backends still being written to after many rounds")


# -- the same over real sockets ----------------------------------------------------------


class LineTagger(asyncio.Protocol):
    """A real line backend that tags its replies, parsing as `TaggingBackends` does."""

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        *lines, self.buf = (self.buf + data).split(b"\n")
        out = [tag(p) + b"\n" for line in lines for p in line.split(b"\r") if p]
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


class RawTagger(asyncio.Protocol):
    """A real raw backend that tags its replies, reading like recv(1024)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        pieces = [data[i : i + RAW_RECV] for i in range(0, len(data), RAW_RECV)]
        self.transport.write(b"".join(tag(p) for p in pieces))


KNOWN_REPLIES = (
    b"Invalid message",
    b"Server not available",
    b"Error: line too long",
    b"Error: line break inside a message",
    b"Error: newline on a raw connection",
    b"Error: message too long",
    b"Error: invalid reply from server",
    b"Error: server busy",
    b"Error: queue timeout",
    b"Error: balancer stopping",
    b"Error: too many connections",
)
_RAW_REPLY = re.compile(
    b"ok:[0-9a-f]*|" + b"|".join(re.escape(r) for r in sorted(KNOWN_REPLIES, key=len, reverse=True))
)


def split_raw_replies(data: bytes) -> list[bytes]:
    """Unterminated replies written back to back, told apart (they are tagged or known)."""
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        m = _RAW_REPLY.match(data, pos)
        assert m is not None, f"unparseable reply bytes {data[pos:]!r}"
        assert m.end() > pos, f"unparseable reply bytes {data[pos:]!r}"
        out.append(m.group())
        pos = m.end()
    return out


def split_line_replies(data: bytes) -> list[bytes]:
    *lines, rest = data.split(b"\n")
    assert rest == b"", f"unterminated reply bytes {rest!r} to a line client"
    return lines


def set_clock(monkeypatch: pytest.MonkeyPatch, clock: Callable[[], float]) -> None:
    """`time.monotonic` as message mode sees it, set by the test."""
    for module in (dispatch, service, session):
        monkeypatch.setattr(module, "monotonic", clock)
