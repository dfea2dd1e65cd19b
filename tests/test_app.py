"""The composition root and start-up on sockets bound beforehand (by a supervisor, say)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from balancer.app import build_server
from balancer.config.model import AdminConfig, BackendConfig, Config, HealthConfig, ServiceConfig
from balancer.runtime.server import Server
from tests.message_doubles import LineTagger, tag


@pytest_asyncio.fixture
async def backend_port() -> AsyncIterator[int]:
    server = await asyncio.get_running_loop().create_server(LineTagger, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()


def listening_socket() -> socket.socket:
    """A listening socket on a free loopback port, without SO_REUSEADDR: nobody else can
    bind that port while it is open."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def config_for(listen: int, backend_port: int, **admin: object) -> Config:
    service = ServiceConfig(
        name="numbers",
        listen_host="127.0.0.1",
        listen_port=listen,
        backends=(BackendConfig("127.0.0.1", backend_port),),
        health=HealthConfig(enabled=False),
    )
    return Config(services=(service,), admin=AdminConfig(**admin))  # type: ignore[arg-type]


async def ask(port: int, line: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(line + b"\n")
        async with asyncio.timeout(10):
            return await reader.readline()
    finally:
        writer.close()


async def test_a_service_serves_on_the_socket_it_was_handed(backend_port: int) -> None:
    sock = listening_socket()
    port = sock.getsockname()[1]
    server = Server(config_for(port, backend_port, enabled=False))
    # The port is held by `sock` (no SO_REUSEADDR): a start that bound anew would fail.
    await server.start({("127.0.0.1", port): sock})
    try:
        assert server.services["numbers"].bound == ("127.0.0.1", port)
        assert await ask(port, b"7") == tag(b"7") + b"\n"
    finally:
        await server.shutdown()
    assert sock.fileno() == -1, "the listener owned the socket and closed it at the stop"


async def test_a_socket_no_service_listens_on_is_closed_with_a_warning(
    backend_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    stray = listening_socket()
    stray_port = stray.getsockname()[1]
    own = listening_socket()
    port = own.getsockname()[1]
    own.close()
    server = Server(config_for(port, backend_port, enabled=False))
    with caplog.at_level(logging.WARNING, logger="balancer"):
        await server.start({("127.0.0.1", stray_port): stray})
    try:
        assert stray.fileno() == -1
        assert f"no service listens on 127.0.0.1:{stray_port}" in caplog.text
        assert await ask(port, b"8") == tag(b"8") + b"\n"
    finally:
        await server.shutdown()


async def test_a_start_that_fails_closes_the_sockets_it_was_handed(backend_port: int) -> None:
    sock = listening_socket()
    port = sock.getsockname()[1]
    # a backend that is the balancer itself: the start is refused before it serves
    server = Server(config_for(port, port, enabled=False))
    with pytest.raises(Exception, match="this balancer itself"):
        await server.start({("127.0.0.1", port): sock})
    await server.shutdown()
    assert sock.fileno() == -1
    with socket.create_server(("127.0.0.1", port)):
        pass  # the port is free again


async def test_the_composed_balancer_starts_its_admin_endpoint(backend_port: int) -> None:
    sock = listening_socket()
    port = sock.getsockname()[1]
    sock.close()
    server = build_server(config_for(port, backend_port, host="127.0.0.1", port=0))
    await server.start()
    try:
        assert server.admin is not None
        assert server.admin_address is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", server.admin_address[1])
        writer.write(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(10):
            answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200")
        assert b'"numbers"' in answer
    finally:
        await server.shutdown()
    without = Server(config_for(port, backend_port, host="127.0.0.1", port=0))
    await without.start()
    try:
        assert without.admin is None, "the runtime alone has no admin endpoint"
    finally:
        await without.shutdown()
