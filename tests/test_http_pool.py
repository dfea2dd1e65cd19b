"""The upstream keep-alive pool of http mode: what is kept, for how long, and when a
client connection may go on after an answer."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import aiohttp
import pytest

from balancer.proxy.http.upstream import IdlePool
from tests.http_support import (
    RawClient,
    echo_backend,
    get,
    http_service,
    raw_backend,
    read_request,
    until,
)

pytestmark = pytest.mark.usefixtures("http_clients")


async def sequential(port: int, count: int) -> None:
    async with aiohttp.ClientSession() as session:
        for i in range(count):
            async with session.get(f"http://127.0.0.1:{port}/{i}") as resp:
                assert resp.status == 200
                await resp.read()


async def test_an_upstream_connection_idle_past_upstream_idle_timeout_is_not_reused() -> None:
    async with echo_backend() as a:
        async with http_service([a.address], upstream_idle_timeout=0.2) as (svc, port):
            await sequential(port, 2)
            assert (svc.dialed, svc.reused) == (1, 1)
            await until(lambda: svc.idle.count() == 0, "the idle connection closed")
            await sequential(port, 1)
    assert (svc.dialed, svc.reused) == (2, 1)
    assert len(a.peers) == 2


async def test_max_requests_per_connection_closes_a_connection_that_served_enough() -> None:
    async with echo_backend() as a:
        async with http_service([a.address], max_requests_per_connection=2) as (svc, port):
            await sequential(port, 5)
    assert svc.dialed == 3  # 2 + 2 + 1
    assert len(a.peers) == 3


async def test_at_most_max_idle_connections_wait_per_backend() -> None:
    async with echo_backend() as a:
        async with http_service([a.address], max_idle=1) as (svc, port):
            await asyncio.gather(*(sequential(port, 3) for _ in range(4)))
            assert svc.idle.count() == 1
            assert svc.dialed > 1


async def test_an_answer_before_the_whole_body_was_read_closes_the_client_connection() -> None:
    """The rest of that body is still coming: read as a next request, it would be parsed
    out of step. The answer says Connection: close and the connection ends."""

    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 4\r\n\r\nnope")
        await writer.drain()
        await reader.read()

    async with raw_backend(early) as backend:
        async with http_service([backend.address]) as (svc, port):
            client = await RawClient.open(port)
            client.send(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\npart")
            response = await client.response(b"POST")
            assert response is not None
            assert response.status == 401
            assert response.header(b"connection") == b"close"
            client.send(b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")  # inside the body
            assert await client.response() is None
            assert svc.idle.count() == 0  # nor is the upstream connection kept


async def test_a_close_delimited_response_ends_its_upstream_connection() -> None:
    async def old_style(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
        await writer.drain()
        writer.close()

    async with raw_backend(old_style) as backend:
        async with http_service([backend.address]) as (svc, port):
            client = await RawClient.open(port)
            for _ in range(2):
                client.send(get("/"))
                response = await client.response()
                assert response is not None
                assert response.body == b"until the end"
    assert backend.connections == 2
    assert svc.reused == 0


class FakeConnection:
    """What the idle pool reads and does of an upstream connection."""

    def __init__(self, backend: object) -> None:
        self.backend = backend
        self.lost = False
        self.served = 1
        self.idle_since = 0.0
        self.closed = False
        self.sink: object = None

    def pause(self, paused: bool) -> None:
        assert not paused

    def close(self) -> None:
        self.closed = True


def test_the_pool_hands_out_the_newest_connection_and_never_one_idle_too_long() -> None:
    pool = IdlePool()
    pool.idle_timeout = 4.0
    backend = object()
    old, new = FakeConnection(backend), FakeConnection(backend)
    pool.put(cast(Any, old), now=100.0)
    pool.put(cast(Any, new), now=103.0)
    taken: object = pool.take(cast(Any, backend), now=103.5)
    assert taken is new  # newest first
    # 4.5 s after it went idle: past the timeout, closed rather than reused (even before
    # the service's sweep would have come by)
    assert pool.take(cast(Any, backend), now=104.5) is None
    assert old.closed
