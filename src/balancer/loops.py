"""Event loop selection: uvloop when installed, asyncio otherwise."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - depends on the platform
        return asyncio.new_event_loop
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:  # pragma: no cover
        return "asyncio"
    return "uvloop"


def listen_socket(host: str, port: int, backlog: int) -> socket.socket | None:
    """A listening socket on a numeric `host`, bound with no resolver call; None for a name.

    uvloop resolves a `create_server()` host on libuv's thread pool, even a numeric
    one, and that pool then keeps four threads for the life of the process. A
    process with threads pays for them in every system call on a socket (file
    reference counts, libc's cancellation points): about 4 % of a relay's CPU.
    Raises OSError as `create_server()` would when the address cannot be bound.
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def create_listener(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], asyncio.BaseProtocol],
    host: str,
    port: int,
    backlog: int,
) -> asyncio.Server:
    """`loop.create_server()` for (host, port), without the resolver for a numeric host."""
    sock = listen_socket(host, port, backlog)
    if sock is None:
        return await loop.create_server(factory, host, port, backlog=backlog, reuse_address=True)
    try:
        return await loop.create_server(factory, sock=sock, backlog=backlog)
    except BaseException:
        sock.close()
        raise
