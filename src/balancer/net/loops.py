"""Event loop selection, and the listeners: bound without the resolver, switched together.

How it works (listeners): `create_listener` binds a service's listening socket. Outside a
`ListenerBatch` it serves at once. Inside one (`with batch.binding():`, the prepare step
of a start-up or a reload) it binds and listens but accepts nothing yet: connections
wait in the kernel's backlog, and the batch either serves every listener it holds
(`serve()`, the commit) or closes them all (`close()`, a rejected reload), so a failed
bind of one service changes nothing for any other. A listener may also take over the
socket of a running one on the same address (a service whose mode changed, renamed or
swapped ports with another): `listening_socket()` duplicates the running listener's
socket, which is the same kernel socket, so not one connection in its backlog is lost
when the old listener closes and the new one starts accepting.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ipaddress
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

Address = tuple[str, int]


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


class ListenerBatch:
    """Listeners bound now and served later, all together (see the module docstring)."""

    def __init__(self) -> None:
        self.servers: list[asyncio.AbstractServer] = []
        self.handover: dict[Address, socket.socket] = {}
        """Requested (host, port) -> a listening socket the listener there takes over."""

    @contextlib.contextmanager
    def binding(self) -> Iterator[ListenerBatch]:
        """Within this block (and the tasks it awaits), `create_listener` joins this batch."""
        token = _BATCH.set(self)
        try:
            yield self
        finally:
            _BATCH.reset(token)

    def hand_over(self, address: Address, sock: socket.socket) -> None:
        self.handover[address] = sock

    async def serve(self) -> None:
        """Start accepting on every listener of the batch."""
        for server in self.servers:
            await server.start_serving()
            _remember(server)

    def close(self) -> None:
        """Close every listener of the batch (they have accepted nothing)."""
        for server in self.servers:
            server.close()
        self.servers.clear()
        for sock in self.handover.values():
            sock.close()
        self.handover.clear()

    def __repr__(self) -> str:
        return f"<ListenerBatch {len(self.servers)} listener(s), {len(self.handover)} handed over>"


_BATCH: contextvars.ContextVar[ListenerBatch | None] = contextvars.ContextVar(
    "listener_batch", default=None
)
_SERVING: dict[Address, asyncio.AbstractServer] = {}
"""Bound address of each serving listener made here -> its server (`listening_socket`)."""


def _bound(sock: object) -> Address | None:
    name = getattr(sock, "getsockname", None)
    if name is None:
        return None
    addr = name()
    if isinstance(addr, tuple) and len(addr) >= 2:
        return str(addr[0]), int(addr[1])
    return None


def _remember(server: asyncio.AbstractServer) -> None:
    for gone in [k for k, s in _SERVING.items() if not _sockets(s)]:
        del _SERVING[gone]
    socks = _sockets(server)
    bound = _bound(socks[0]) if socks else None
    if bound is not None:
        _SERVING[bound] = server


def _sockets(server: asyncio.AbstractServer) -> list[object]:
    return list(getattr(server, "sockets", None) or [])


def listening_socket(bound: Address) -> socket.socket | None:
    """A duplicate of the socket of the running listener bound at `bound`.

    None when there is none, or when that listener holds several sockets (a name that
    resolved to several addresses): it cannot be handed to one new listener.
    """
    server = _SERVING.get(bound)
    if server is None:
        return None
    socks = _sockets(server)
    if len(socks) != 1:
        return None
    fileno = getattr(socks[0], "fileno", None)
    if fileno is None or fileno() < 0:
        return None
    return socket.socket(fileno=os.dup(fileno()))


def listening_addresses(bound: Address) -> list[Address]:
    """Every address the listener bound at `bound` listens on ([] when unknown)."""
    server = _SERVING.get(bound)
    if server is None:
        return []
    return [a for a in map(_bound, _sockets(server)) if a is not None]


def bind_listener(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets for (host, port), not accepting: the one handed over for it in
    the current `ListenerBatch`, else one bound now (every address of a name)."""
    batch = _BATCH.get()
    handed = batch.handover.pop((host, port), None) if batch is not None else None
    if handed is not None:
        return [handed]
    sock = listen_socket(host, port, backlog)
    if sock is not None:
        return [sock]
    bound: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            if any(s.family == family and s.getsockname()[:2] == address[:2] for s in bound):
                continue
            bound.append(_listening(family, address, backlog, proto=proto, kind=kind))
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    return bound


def enlist(server: asyncio.AbstractServer) -> bool:
    """Enter a listener made of `bind_listener`'s sockets in the current batch; whether
    it is to serve at once (there is no batch)."""
    batch = _BATCH.get()
    if batch is None:
        _remember(server)
        return True
    batch.servers.append(server)
    return False


async def create_listener(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], asyncio.BaseProtocol],
    host: str,
    port: int,
    backlog: int,
) -> asyncio.Server:
    """`loop.create_server()` for (host, port), without the resolver for a numeric host.

    Inside a `ListenerBatch` the listener is bound but does not accept until the batch
    serves, and it takes over a socket handed over for (host, port) if there is one.
    """
    batch = _BATCH.get()
    serve_now = batch is None
    sock = batch.handover.pop((host, port), None) if batch is not None else None
    if sock is None:
        sock = listen_socket(host, port, backlog)
    if sock is None:
        server = await loop.create_server(
            factory, host, port, backlog=backlog, reuse_address=True, start_serving=serve_now
        )
    else:
        try:
            server = await loop.create_server(
                factory, sock=sock, backlog=backlog, start_serving=serve_now
            )
        except BaseException:
            sock.close()
            raise
    if batch is not None:
        batch.servers.append(server)
    else:
        _remember(server)
    return server


def worker_listener(host: str, port: int, reuseport: bool, backlog: int) -> socket.socket:
    """A listening TCP socket at (host, port) for worker processes to share (with
    `reuseport`, one of an SO_REUSEPORT group); a name binds its first address."""
    if not reuseport:
        sock = listen_socket(host, port, backlog)
        if sock is not None:
            return sock
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    return _listening(family, address, backlog, reuseport=reuseport)


def _listening(
    family: int,
    address: Any,
    backlog: int,
    *,
    reuseport: bool = False,
    proto: int = 0,
    kind: int = socket.SOCK_STREAM,
) -> socket.socket:
    """A non-blocking socket listening at `address` (SO_REUSEADDR; IPv6 only for an IPv6
    address; SO_REUSEPORT with `reuseport`); closed again when a step fails."""
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
