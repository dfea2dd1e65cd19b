"""Reaching backends, the same way in every mode.

- `dial` makes a socket connected to a backend whose local address is in the
  loop registry (`balancer.net.loopguard`) from its first moment, so a
  listener of ours that accepts it knows it for our own; a backend address
  that is one of our listeners raises `OwnListener` before any connect.
  `adopt` hands such a socket to the event loop.
- `connect_failure` is the backend error a failed connect is, worded the one
  way the logs and `/status` show it; `local_shortage` tells our own shortages (descriptors,
  socket memory, local ports) from the backend's failures and notes them.
- `admit` decides whether one more client connection may in: under the
  service's `max_connections` and within the descriptor budget, which keeps
  a reserve for health checks, backend connects and the admin endpoint.
- `has_room` says whether a backend is under a per-backend limit.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import ssl
from dataclasses import dataclass
from typing import Any

from balancer.config.addresses import format_address
from balancer.config.hosts import address_of
from balancer.core.pool import Backend
from balancer.errors import BackendError, ConnectRefused, ConnectTimeout
from balancer.net import loopguard, resources
from balancer.proxy.tls import BackendTls


class OwnListener(Exception):
    """A backend address resolves to a listener of this process."""


def mark_own_listener(pool: loopguard.Pool, backend: Backend, exc: OwnListener) -> None:
    """`backend` is one of our own listeners (`dial` said so): a loop, marked as such."""
    host, port = exc.args[0]
    where = format_address(host, port)
    pool.mark_loop(backend, f"{backend.address} is {where}, where this balancer listens")


def mark_accepted_loop(found: loopguard.Loop, service: str) -> None:
    """A listener of `service` accepted one of our own backend connections: the backend it
    went to is a loop, marked as such."""
    pool, backend = found.owner
    pool.mark_loop(
        backend,
        f"service {service} accepted a connection from its own connection to {backend.address}",
    )


def numeric_addresses(host: str, port: int) -> list[Any] | None:
    """`getaddrinfo` rows for a numeric host, without the resolver; None for a name."""
    try:
        return socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP,
            flags=socket.AI_NUMERICHOST,
        )  # fmt: skip
    except (socket.gaierror, UnicodeError):
        return None


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Wait until a connecting socket is writable (its connect has ended, either way)."""
    future: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, _set_done, future)
    try:
        await future
    finally:
        loop.remove_writer(fd)


async def dial(
    loop: asyncio.AbstractEventLoop,
    backend: Backend,
    owner: loopguard.Owner,
    origin: loopguard.Origin | None,
) -> tuple[socket.socket, loopguard.Registration]:
    """A socket connected to `backend`, registered as ours from its first moment.

    The connect is started here so that the socket's local address is known,
    and registered, before the loop can run the accept of a connection to
    ourselves.
    """
    rows = numeric_addresses(backend.host, backend.port)
    if rows is None:
        rows = await loop.getaddrinfo(
            backend.host, backend.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    own = next((row[4] for row in rows if loopguard.is_listener(row[4])), None)
    if own is not None:
        raise OwnListener(address_of(own))
    error: OSError = OSError(f"no address for {backend.address}")
    for family, kind, proto, _, address in rows:
        sock = socket.socket(family, kind, proto)
        registration: loopguard.Registration | None = None
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = sock.connect_ex(address)
            if code not in (0, errno.EINPROGRESS):
                raise OSError(code, os.strerror(code))
            registration = loopguard.Registration(sock.getsockname(), address, owner, origin)
            if code:
                await writable(loop, sock)
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    raise OSError(code, os.strerror(code))
        except OSError as exc:
            if registration is not None:
                registration.release()
            sock.close()
            if resources.is_local_shortage(exc):
                raise
            error = exc
            continue
        except BaseException:
            if registration is not None:
                registration.release()
            sock.close()
            raise
        return sock, registration
    raise error


def _abort_adopted(task: asyncio.Task[tuple[asyncio.Transport, asyncio.BaseProtocol]]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result()[0].abort()


TICKET_LOOKS = (0.002, 0.02, 0.2)
"""Seconds after a backend handshake its session is looked at again for a TLS 1.3 ticket
(the ticket comes after the handshake, read with the connection's first bytes)."""


class TlsFailed(Exception):
    """The TLS handshake with a backend failed (the message says why): its failure."""


@dataclass(frozen=True)
class Origination:
    """What starts a backend connection after its connect: a PROXY header, a handshake."""

    header: bytes = b""
    tls: BackendTls | None = None
    timeout: float = 10.0


async def send_first(loop: asyncio.AbstractEventLoop, sock: socket.socket, data: bytes) -> None:
    """Write `data` on a connected socket not yet handed to the loop (`loop.sock_sendall`
    would leave uvloop unable to take the socket after)."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except (BlockingIOError, InterruptedError):
            pass
        if view:
            await writable(loop, sock)


async def adopt(
    loop: asyncio.AbstractEventLoop,
    side: asyncio.BaseProtocol,
    sock: socket.socket,
    backend: Backend | None = None,
    origination: Origination | None = None,
) -> asyncio.Transport:
    """Hand a connected socket to the loop as `side`'s transport, after what
    `origination` says comes first (raises TlsFailed when the handshake fails).

    Not cancelled half-way (a client that goes meanwhile): the hand-over
    finishes and its transport is aborted then, so that no loop is left with a
    socket object whose descriptor it has already closed.
    """
    tls = origination.tls if origination is not None else None
    if origination is not None and origination.header:
        await send_first(loop, sock, origination.header)
    if tls is None or backend is None:
        connecting = loop.create_connection(lambda: side, sock=sock)
    else:
        connecting = loop.create_connection(
            lambda: side,
            sock=sock,
            ssl=tls.context_for(backend.address),
            server_hostname=tls.server_name(backend.host),
            ssl_handshake_timeout=origination.timeout if origination is not None else None,
        )
    handover: asyncio.Task[tuple[asyncio.Transport, asyncio.BaseProtocol]] = loop.create_task(
        connecting
    )
    try:
        transport, _ = await asyncio.shield(handover)
    except asyncio.CancelledError:
        handover.add_done_callback(_abort_adopted)
        raise
    except OSError as exc:
        if tls is not None:  # the handshake failed: the loop has closed the socket
            raise TlsFailed(f"TLS handshake failed: {_tls_why(exc)}") from None
        if type(loop).__module__.startswith("uvloop"):  # pragma: no cover
            sock.detach()  # uvloop has closed the descriptor already
        raise  # pragma: no cover - the loop refused a connected socket
    if tls is not None and backend is not None:
        tls.handshake_done(backend.address, transport)
        # a TLS 1.3 session ticket comes just after the handshake: kept once it is there
        sslobj = transport.get_extra_info("ssl_object")
        for delay in TICKET_LOOKS:
            loop.call_later(delay, tls.keep_session, backend.address, sslobj)
    return transport


def _tls_why(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return exc.verify_message or "certificate verify failed"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return str(exc) or type(exc).__name__


def connect_failure(exc: BaseException, timeout: float) -> BackendError:
    """The backend's error a failed connect is (its `str` is how it is reported)."""
    if isinstance(exc, TimeoutError):
        return ConnectTimeout(f"connect timeout after {timeout:g}s")
    if isinstance(exc, OSError):
        return ConnectRefused(f"connect failed: {exc.strerror or exc}")
    return ConnectRefused(f"connect failed: {exc}")


def local_shortage(exc: BaseException, what: str) -> bool:
    """True when `exc` is our own shortage, not the backend's failure (and note it)."""
    if isinstance(exc, OSError) and resources.is_local_shortage(exc):
        resources.ALARM.note(exc, what)
        return True
    return False


def admit(open_now: int, limit: int, descriptors: int) -> tuple[bool, resources.FdBudget | None]:
    """May one more client connection in, holding `descriptors` descriptors?

    Returns whether it may, and the budget it then holds them of (None when
    the process keeps no budget): the caller gives them back when it ends.
    """
    if limit and open_now >= limit:
        return False, None
    fds = resources.FDS
    if fds is None:
        return True, None
    for taken in range(descriptors):
        if not fds.admit():
            for _ in range(taken):
                fds.release()
            return False, None
    return True, fds


def has_room(load: int, limit: int) -> bool:
    """Under a per-backend limit (0: none)."""
    return not limit or load < limit
