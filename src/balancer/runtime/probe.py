"""One health check probe: connect, send, read the reply, say what it means.

How it works: the probe owns a non-blocking socket and waits for it with
readiness callbacks and a deadline timer (never a cancellation), so what the
kernel holds when the deadline comes is still read. Its local address is
registered with `loopguard` from the moment `connect` binds it until it is
closed, with the owner it was given (`(pool, backend)`, see `pool.LoopOwner`).

Framing: "line" sends the probe with a newline and reads one reply line; "raw"
sends it unterminated and takes one read as the reply; "" (`backend_framing =
"auto"`, not known yet) finds out which one the backend speaks, see `probe`.
A line reply without its newline says so ("does it speak raw framing?").

Http checks (`health.type = "http"`) send the request of a `core.http.check.HttpCheck`
on the same kind of connection and read the response, as little of it as the
check needs, within the same deadline; the check judges it.

A probe that timed out while the event loop itself was late by more than
`LATE` (the backend may well have answered) is made once more. A probe that
failed for want of our own resources (`resources.is_local_shortage`) says so
in `ProbeResult.shortage`: it is no check at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import ssl
from dataclasses import dataclass

from balancer.config.model import HealthConfig
from balancer.core.http.check import HttpCheck
from balancer.core.pool import LoopOwner
from balancer.net import loopguard, resources

ProbeTls = tuple[ssl.SSLContext, str | None]
"""TLS for a probe: the client context and the server name to send and verify."""
LINE = "line"
RAW = "raw"
HTTP = "http"
RAW_WINDOW = 0.5
"""`auto` framing: the share of the time left an unterminated probe waits for a raw reply."""
MAX_REPLY = 65536
"""Longest reply line a line-framed probe reads."""
PREVIEW = 10
"""Characters of an unterminated reply quoted in its reason."""
LATE = 0.1
"""Seconds past its deadline a timeout may be noticed before the probe proves nothing."""


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    reason: str
    framing: str = ""
    """`auto` probes: the framing the backend answered in ("line" or "raw")."""
    shortage: OSError | None = None
    """The probe could not run for want of our own resources: no check at all."""
    drain: bool = False
    """Http checks with `disable_on_404`: a 404, the backend is alive but takes no new work."""


class _Closed(Exception):
    """The backend closed the connection; `data` is what it sent first."""

    def __init__(self, data: bytes) -> None:
        self.data = data


class _NoReply(Exception):
    """The deadline came before the connect or a (complete) reply; `data` is what came.

    `reason`, when set, says what was missing (http checks)."""

    def __init__(self, data: bytes, reason: str = "") -> None:
        self.data = data
        self.reason = reason


class _TooLong(Exception):
    pass


async def _addresses(
    loop: asyncio.AbstractEventLoop, host: str, port: int, deadline: float
) -> list[tuple[int, tuple[str, int]]]:
    """(family, sockaddr) to try in turn; numeric hosts without the resolver."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return [(family, (host, port))]
    async with asyncio.timeout_at(deadline):
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out: list[tuple[int, tuple[str, int]]] = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            address = (str(sockaddr[0]), int(sockaddr[1]))
            if (family, address) not in out:
                out.append((family, address))
    return out


class _Connection:
    """One probe connection: a non-blocking socket, registered with `loopguard` while open.

    Every wait is for readiness with a deadline timer, never a cancellation: what the
    kernel holds when the deadline comes (a reply the busy loop had not got to) is
    still read, and nothing read is ever dropped.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, owner: LoopOwner | None) -> None:
        self.loop = loop
        self.owner = owner
        self.sock: socket.socket | None = None
        self.registration: loopguard.Registration | None = None

    async def _ready(self, write: bool, deadline: float) -> bool:
        """Wait until the socket is writable (readable); False when `deadline` came first."""
        assert self.sock is not None
        loop = self.loop
        fd = self.sock.fileno()
        done: asyncio.Future[bool] = loop.create_future()

        def ready() -> None:
            if not done.done():
                done.set_result(True)

        def expired() -> None:
            if not done.done():
                done.set_result(False)

        if write:
            loop.add_writer(fd, ready)
        else:
            loop.add_reader(fd, ready)
        timer = loop.call_at(deadline, expired)
        try:
            return await done
        finally:
            timer.cancel()
            if write:
                loop.remove_writer(fd)
            else:
                loop.remove_reader(fd)

    async def open(self, addresses: list[tuple[int, tuple[str, int]]], deadline: float) -> None:
        """Connect to the first address that accepts; the last error if none does."""
        error: OSError | None = None
        for family, address in addresses:
            try:
                await self._connect(family, address, deadline)
            except OSError as exc:
                if resources.is_local_shortage(exc):
                    raise
                error = exc
                self.close()
                continue
            return
        raise error if error is not None else OSError(errno.EHOSTUNREACH, "no address")

    async def _connect(self, family: int, address: tuple[str, int], deadline: float) -> None:
        sock = self.sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex(address)
        # The local address is bound now: register it before the loop runs anything else,
        # so that a listener of ours accepting this connection finds it.
        if self.owner is not None:
            self.registration = loopguard.Registration(sock.getsockname(), address, self.owner)
        if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY):
            if not await self._ready(True, deadline):
                raise _NoReply(b"")
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))

    async def send(self, data: bytes, deadline: float) -> None:
        assert self.sock is not None
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view) :]
            except (BlockingIOError, InterruptedError):
                pass
            if view and not await self._ready(True, deadline):
                raise _NoReply(b"")

    async def read(self, line: bool, deadline: float) -> bytes:
        """The reply: one read (raw) or up to the first newline (line) by `deadline`."""
        buf = b""
        while True:
            ready = await self._ready(False, deadline)
            chunk = self._recv()
            if chunk is None:
                if ready:
                    continue
                raise _NoReply(buf)
            if not chunk:
                raise _Closed(buf)
            buf += chunk
            if not line or b"\n" in buf:
                return buf
            if len(buf) > MAX_REPLY:
                raise _TooLong

    def _recv(self) -> bytes | None:
        """What the kernel holds (b"" at the end of the stream); None when nothing yet."""
        assert self.sock is not None
        try:
            return self.sock.recv(MAX_REPLY)
        except (BlockingIOError, InterruptedError):
            return None

    def close(self) -> None:
        if self.registration is not None:
            self.registration.release()
            self.registration = None
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None


class _TlsConnection(_Connection):
    """A probe connection that speaks TLS (a service with `backend_tls`), on memory BIOs
    over the same socket, so every wait keeps its deadline."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, owner: LoopOwner | None, tls: ProbeTls
    ) -> None:
        super().__init__(loop, owner)
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = tls[0].wrap_bio(self.incoming, self.outgoing, server_hostname=tls[1])

    async def open(self, addresses: list[tuple[int, tuple[str, int]]], deadline: float) -> None:
        await super().open(addresses, deadline)
        while True:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                await super().send(self.outgoing.read(), deadline)
                while (raw := super()._recv()) is None:
                    if not await self._ready(False, deadline):
                        raise _NoReply(b"") from None
                if not raw:
                    raise _Closed(b"") from None
                self.incoming.write(raw)
                continue
            await super().send(self.outgoing.read(), deadline)
            return

    async def send(self, data: bytes, deadline: float) -> None:
        self.tls.write(data)
        await super().send(self.outgoing.read(), deadline)

    def _recv(self) -> bytes | None:
        while True:
            try:
                return self.tls.read(MAX_REPLY)
            except ssl.SSLWantReadError:
                raw = super()._recv()
            except ssl.SSLZeroReturnError:
                return b""
            if not raw:
                return raw
            self.incoming.write(raw)


def _connection(
    loop: asyncio.AbstractEventLoop, owner: LoopOwner | None, tls: ProbeTls | None
) -> _Connection:
    return _Connection(loop, owner) if tls is None else _TlsConnection(loop, owner, tls)


def _preview(data: bytes) -> str:
    text = data.decode("utf-8", "replace")
    return repr(text if len(text) <= PREVIEW else text[:PREVIEW] + "...")


def _judge(reply: bytes, health: HealthConfig, ok_reason: str = "reply ok") -> tuple[bool, str]:
    text = reply.rstrip(b"\r\n").decode("utf-8", "replace")
    if health.expect is not None and text != health.expect:
        return False, f"unexpected reply {text[:80]!r}"
    return True, ok_reason


async def _exchange(
    loop: asyncio.AbstractEventLoop,
    addresses: list[tuple[int, tuple[str, int]]],
    payload: bytes | None,
    line: bool,
    deadline: float,
    owner: LoopOwner | None,
    tls: ProbeTls | None,
    read_share: float = 1.0,
) -> bytes | None:
    """Connect, send `payload` and read the reply by `deadline` (None: connect only).

    The reply is waited for `read_share` of the time left once the payload is sent.
    """
    conn = _connection(loop, owner, tls)
    try:
        await conn.open(addresses, deadline)
        if payload is None:
            return None
        await conn.send(payload, deadline)
        now = loop.time()
        return await conn.read(line, now + max(0.0, deadline - now) * read_share)
    finally:
        conn.close()


async def _http_exchange(
    loop: asyncio.AbstractEventLoop,
    addresses: list[tuple[int, tuple[str, int]]],
    check: HttpCheck,
    deadline: float,
    owner: LoopOwner | None,
    tls: ProbeTls | None,
) -> ProbeResult:
    """Connect, send the check's request and read its response (as little as it needs)."""
    conn = _connection(loop, owner, tls)
    try:
        await conn.open(addresses, deadline)
        await conn.send(check.request, deadline)
        while not check.done:
            try:
                check.feed(await conn.read(False, deadline))
            except _Closed:
                check.feed_eof()
            except _NoReply:
                raise _NoReply(b"", "no complete response" if check.received else "") from None
    finally:
        conn.close()
    verdict = check.verdict()
    return ProbeResult(verdict.ok, verdict.reason, drain=verdict.drain)


async def probe(
    host: str,
    port: int,
    health: HealthConfig,
    *,
    framing: str = LINE,
    owner: LoopOwner | None = None,
    tls: ProbeTls | None = None,
) -> ProbeResult:
    """One check: connect, and when `health.send` is set, send it and check the reply;
    an http check (`health.type`) sends its request and checks the response.

    `framing` "line": the probe ends with a newline and the reply is one line.
    "raw": the probe goes unterminated and the reply is one read. "" (not known
    yet, `backend_framing = "auto"`): the probe goes unterminated first; a reply
    within `RAW_WINDOW` of the time left once it is sent means raw framing.
    Without one, that connection is closed (a line backend drops the unfinished
    line unanswered) and a second one sends the whole line and reads a line
    reply. So a line backend sees one complete request, a raw one that answers
    in time one message, and no backend ever gets a second message on the
    connection where it answered the first. The result says which framing
    answered.

    A probe that timed out while this event loop was itself late (the timeout
    fired more than `LATE` seconds after its deadline: the loop was busy, the
    backend may well have answered) proves nothing: it is made once more.
    """
    result, late = await _probe_once(host, port, health, framing, owner, tls)
    if late:
        result, _ = await _probe_once(host, port, health, framing, owner, tls)
    return result


async def _probe_once(
    host: str,
    port: int,
    health: HealthConfig,
    framing: str,
    owner: LoopOwner | None,
    tls: ProbeTls | None,
) -> tuple[ProbeResult, bool]:
    """A probe's result, and whether it timed out with the loop late (inconclusive)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + health.timeout
    send = health.send.encode() if health.send is not None else None
    no_answer = f"no answer within {health.timeout:g}s"
    try:
        addresses = await _addresses(loop, host, port, deadline)
        if health.type == HTTP:
            check = HttpCheck(health, host, port)
            return await _http_exchange(loop, addresses, check, deadline, owner, tls), False
        if send is None:
            await _exchange(loop, addresses, None, True, deadline, owner, tls)
            return ProbeResult(True, "connect ok"), False
        if framing in (RAW, LINE):
            payload = send if framing == RAW else send + b"\n"
            reply = await _exchange(loop, addresses, payload, framing == LINE, deadline, owner, tls)
            assert reply is not None
            return ProbeResult(*_judge(reply, health)), False
        try:
            reply = await _exchange(loop, addresses, send, False, deadline, owner, tls, RAW_WINDOW)
        except _NoReply:
            pass
        else:
            assert reply is not None
            ok, reason = _judge(reply, health, "reply ok (raw framing)")
            return ProbeResult(ok, reason, RAW if ok else ""), False
        reply = await _exchange(loop, addresses, send + b"\n", True, deadline, owner, tls)
        assert reply is not None
        ok, reason = _judge(reply, health, "reply ok (line framing)")
        return ProbeResult(ok, reason, LINE if ok else ""), False
    except _NoReply as exc:
        late = loop.time() - deadline > LATE
        if exc.reason:
            return ProbeResult(False, f"{exc.reason} within {health.timeout:g}s"), late
        if exc.data:
            return ProbeResult(False, _unterminated(exc.data)), late
        return ProbeResult(False, no_answer), late
    except TimeoutError:  # resolving the name
        late = loop.time() - deadline > LATE
        return ProbeResult(False, f"cannot resolve {host!r} within {health.timeout:g}s"), late
    except _Closed as exc:
        if exc.data:
            return ProbeResult(False, _unterminated(exc.data)), False
        return ProbeResult(False, "connection closed before a reply"), False
    except _TooLong:
        return ProbeResult(False, "reply too long"), False
    except socket.gaierror as exc:
        return ProbeResult(False, f"cannot resolve {host!r}: {exc.strerror or exc}"), False
    except ConnectionRefusedError:
        return ProbeResult(False, "connection refused"), False
    except ssl.SSLCertVerificationError as exc:
        return ProbeResult(
            False, f"TLS: {exc.verify_message or 'certificate verify failed'}"
        ), False
    except ssl.SSLError as exc:
        return ProbeResult(False, f"TLS handshake failed: {exc.reason or exc}"), False
    except OSError as exc:
        if resources.is_local_shortage(exc):
            return ProbeResult(False, exc.strerror or str(exc), shortage=exc), False
        return ProbeResult(False, exc.strerror or type(exc).__name__), False


def _unterminated(data: bytes) -> str:
    return f"reply without a newline: {_preview(data)} — does it speak raw framing?"
