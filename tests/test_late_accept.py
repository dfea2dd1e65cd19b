"""A connection the loop accepted just as the listener closed (a reload that retires the
service, a hand-over to a new process) is served within the drain, in every mode; once
the drain is over, one is refused."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import cast

import pytest

from balancer.proxy.base import Proxy
from tests.http_support import echo_backend
from tests.support import Numbers, reply_for
from tests.tls_test_support import HOST, recorder, running, service_config

pytestmark = pytest.mark.usefixtures("http_clients")


@asynccontextmanager
async def accepted() -> AsyncIterator[tuple[socket.socket, socket.socket]]:
    """A connected pair: the client's socket, and the accepted one no loop owns yet."""
    listener = socket.create_server((HOST, 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    client.setblocking(False)
    try:
        yield client, server
    finally:
        client.close()


async def late(proxy: Proxy, factory: Callable[[], asyncio.BaseProtocol], request: bytes) -> bytes:
    """Stop `proxy` accepting, hand it an accepted connection, send `request`: the reply
    (b"" when the connection is closed unanswered)."""
    loop = asyncio.get_running_loop()
    async with accepted() as (client, server):
        proxy.stop_accepting()
        drain = loop.create_task(proxy.drain(5.0))
        await loop.connect_accepted_socket(factory, server)
        await loop.sock_sendall(client, request)
        async with asyncio.timeout(10):
            reply = await loop.sock_recv(client, 65536)
        await drain
        return reply


def factory_of(proxy: Proxy) -> Callable[[], asyncio.BaseProtocol]:
    make = proxy.client if hasattr(proxy, "client") else None  # tcp mode
    if make is not None:
        return lambda: make(None)
    from balancer.proxy.http.client import ClientConnection
    from balancer.proxy.http.service import HttpService
    from balancer.proxy.message.session import ClientSession

    if isinstance(proxy, HttpService):
        return lambda: ClientConnection(proxy, None)
    return lambda: cast(asyncio.BaseProtocol, ClientSession(proxy, None))  # type: ignore[arg-type]


async def test_tcp_mode_relays_a_connection_accepted_as_the_listener_closed() -> None:
    async with recorder() as backend:
        async with running(service_config("t", [f"{HOST}:{backend.port}"])) as [(svc, _)]:
            assert await late(svc, factory_of(svc), b"ping") == b"ping"
            assert backend.connections == 1


async def test_http_mode_answers_a_request_accepted_as_the_listener_closed() -> None:
    async with echo_backend() as echo:
        cfg = service_config("web", [echo.address], mode="http")
        async with running(cfg) as [(svc, _)]:
            reply = await late(svc, factory_of(svc), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 200 ")
            assert len(echo.requests) == 1


async def test_message_mode_answers_a_line_accepted_as_the_listener_closed() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Numbers, HOST, 0)
    try:
        backend = server.sockets[0].getsockname()[1]
        cfg = service_config("numbers", [f"{HOST}:{backend}"], mode="message")
        async with running(cfg) as [(svc, _)]:
            reply = await late(svc, factory_of(svc), b"5\n")
            assert reply == (reply_for(5) + "\n").encode()
    finally:
        server.close()


async def test_once_drained_a_late_connection_is_refused() -> None:
    async with recorder() as backend:
        async with running(service_config("t", [f"{HOST}:{backend.port}"])) as [(svc, _)]:
            await svc.drain(1.0)
            loop = asyncio.get_running_loop()
            async with accepted() as (client, server):
                await loop.connect_accepted_socket(factory_of(svc), server)
                async with asyncio.timeout(10):
                    assert await loop.sock_recv(client, 100) == b""
            assert backend.connections == 0
