"""Reading what comes before a connection's own bytes: a PROXY header, a TLS ClientHello.

How it works: an accepted socket is read here before any transport owns it. The
bytes are looked at with `MSG_PEEK`, so they stay in the kernel's queue: a
ClientHello is then handed, untouched, to the TLS handshake or relayed as it came
(SNI routing), and of a PROXY header exactly its own bytes are consumed. To wait
for more bytes without reading them, the socket's `SO_RCVLOWAT` is set to the
number the parser needs, so the loop reports it readable only once they are all
there (or at end of stream): no polling, one wake-up per step. Every wait has the
caller's deadline, and each parser bounds the bytes it will ask for.
"""

from __future__ import annotations

import asyncio
import socket

from balancer.core import clienthello, proxyproto

PEEK_LIMIT = 16 * 1024 + 5
"""Most bytes of a ClientHello looked at (one full TLS record)."""


class PreambleError(Exception):
    """The connection is closed: `reason` says why (a label of the counters)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket, low: int) -> None:
    """Wait until `low` bytes can be read from `sock` (or it has ended)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, max(1, low))
    future: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    loop.add_reader(fd, _set_done, future)
    try:
        await future
    finally:
        loop.remove_reader(fd)


def _peek(sock: socket.socket, limit: int) -> bytes:
    try:
        return sock.recv(limit, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return b""
    except OSError:
        raise PreambleError("reset") from None


async def read_proxy_header(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, *, what: str = "proxy_header"
) -> proxyproto.ProxyHeader:
    """Read and consume the PROXY header `sock` starts with (within the caller's timeout)."""
    need = 1
    while True:
        await _readable(loop, sock, need)
        data = _peek(sock, 16 + 2048)
        if len(data) < need:
            raise PreambleError("closed_early")
        try:
            parsed = proxyproto.parse(data)
        except proxyproto.ProxyHeaderError as exc:
            raise PreambleError(f"{what}_{exc.reason}") from None
        if isinstance(parsed, int):
            need = parsed
            continue
        taken = sock.recv(parsed.length)  # there: it was just peeked
        if len(taken) != parsed.length:  # pragma: no cover - the kernel lost peeked bytes
            raise PreambleError("reset")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        return parsed


async def peek_client_hello(
    loop: asyncio.AbstractEventLoop, sock: socket.socket
) -> clienthello.ClientHello:
    """The ClientHello `sock` starts with, left unread (within the caller's timeout)."""
    need = 1
    try:
        while True:
            await _readable(loop, sock, need)
            data = _peek(sock, PEEK_LIMIT)
            if len(data) < need:
                raise PreambleError("closed_early")
            try:
                parsed = clienthello.parse(data, limit=PEEK_LIMIT)
            except clienthello.NotTls:
                raise PreambleError("not_tls") from None
            except clienthello.ClientHelloError as exc:
                raise PreambleError(f"client_hello_{exc.reason}") from None
            if isinstance(parsed, int):
                need = parsed
                continue
            return parsed
    finally:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        except OSError:
            pass
