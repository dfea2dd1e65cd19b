"""Reading what comes before a connection's own bytes: a PROXY header, a TLS ClientHello.

How it works: an accepted socket is read here before any transport owns it. The
bytes are looked at with `MSG_PEEK`, so they stay in the kernel's queue: a
ClientHello is then handed, untouched, to the TLS handshake or relayed as it came
(SNI routing), and of a PROXY header exactly its own bytes are consumed. To wait
for more bytes without reading them, the socket's `SO_RCVLOWAT` is set to the
number the parser needs, so the loop reports it readable only once they are all
there (or at end of stream): no polling, one wake-up per step. Every wait has the
caller's deadline, and each parser bounds the bytes it will ask for. What is there at
the accept (most often all of it) is looked at before any wait.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import TypeVar

from balancer.core import clienthello, proxyproto

PEEK_LIMIT = 16 * 1024 + 5
"""Most bytes of a ClientHello looked at (one full TLS record)."""
PROXY_PEEK = proxyproto.V2_FIXED + proxyproto.DEFAULT_MAX_V2
"""Most bytes of a PROXY header looked at (v2's fixed part and its largest body)."""


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


async def first_bytes(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Wait until `sock` has received something (or ended)."""
    try:
        if sock.recv(1, socket.MSG_PEEK):
            return
    except (BlockingIOError, InterruptedError):
        pass
    except OSError:
        raise PreambleError("reset") from None
    await _readable(loop, sock, 1)


def refuse_plain_text(sock: socket.socket) -> None:
    """Raise PreambleError when what `sock` has received already cannot start TLS (a
    plain-text client), or it has ended; nothing received yet says nothing."""
    try:
        first = sock.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return
    except OSError:
        raise PreambleError("reset") from None
    if not first:
        raise PreambleError("closed_early")
    if first[0] != clienthello.HANDSHAKE:
        raise PreambleError("not_tls")


T = TypeVar("T")


async def _peeked(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    parse: Callable[[bytes], T | int],
    limit: int,
) -> T:
    """What `parse` makes of the bytes `sock` starts with, left unread: tried first on what
    is there already, then each time the kernel holds the bytes it asked for."""
    need = 1
    lowered = False
    data = _peek(sock, limit)
    try:
        while True:
            if len(data) >= need:
                parsed = parse(data)
                if not isinstance(parsed, int):
                    return parsed
                need = parsed
                continue
            await _readable(loop, sock, need)
            lowered = True
            data = _peek(sock, limit)
            if len(data) < need:  # readable with fewer bytes: the stream ended
                raise PreambleError("closed_early")
    finally:
        if lowered:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            except OSError:
                pass


def _proxy_header(data: bytes) -> proxyproto.ProxyHeader | int:
    try:
        return proxyproto.parse(data)
    except proxyproto.ProxyHeaderError as exc:
        raise PreambleError(f"proxy_header_{exc.reason}") from None


def _client_hello(data: bytes) -> clienthello.ClientHello | int:
    try:
        return clienthello.parse(data, limit=PEEK_LIMIT)
    except clienthello.NotTls:
        raise PreambleError("not_tls") from None
    except clienthello.ClientHelloError as exc:
        raise PreambleError(f"client_hello_{exc.reason}") from None


async def read_proxy_header(
    loop: asyncio.AbstractEventLoop, sock: socket.socket
) -> proxyproto.ProxyHeader:
    """Read and consume the PROXY header `sock` starts with (within the caller's timeout)."""
    header = await _peeked(loop, sock, _proxy_header, PROXY_PEEK)
    taken = sock.recv(header.length)  # there: it was just peeked
    if len(taken) != header.length:  # pragma: no cover - the kernel lost peeked bytes
        raise PreambleError("reset")
    return header


async def peek_client_hello(
    loop: asyncio.AbstractEventLoop, sock: socket.socket
) -> clienthello.ClientHello:
    """The ClientHello `sock` starts with, left unread (within the caller's timeout)."""
    return await _peeked(loop, sock, _client_hello, PEEK_LIMIT)
