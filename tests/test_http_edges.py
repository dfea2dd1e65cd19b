"""Http mode at its edges: a client pipelining past the queue, bodies past the limits and the
replay buffer, the retry count, 1xx for HTTP/1.0 clients, half-closed tunnels."""

from __future__ import annotations

import asyncio

import pytest

from balancer.proxy.http.client import HIGH_WATER, MAX_QUEUED, PARSE_PIECE
from tests.http_support import (
    STEP,
    RawClient,
    echo_backend,
    get,
    http_service,
    raw_backend,
    read_request,
    reset,
    until,
)

pytestmark = pytest.mark.usefixtures("http_clients")


async def test_a_client_pipelining_past_the_queue_is_not_read_meanwhile() -> None:
    gate = asyncio.Event()

    async def held(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            await gate.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async with raw_backend(held) as backend:
        async with http_service([backend.address]) as (svc, port):
            client = await RawClient.open(port)
            client.send(b"".join(get(f"/{i}") for i in range(2000)))
            (conn,) = [c for c in svc.conns]
            await until(lambda: conn.paused, "the client not read any more")
            # at most one piece parsed past the bound: a head and an end per request in it
            assert len(conn.queue) <= MAX_QUEUED + 2 * (PARSE_PIECE // len(get("/0")))
            gate.set()
            for i in range(2000):  # and every request is answered, in order, once it reads
                response = await client.response()
                assert response is not None, i
                assert response.body == b"ok"


async def test_a_body_announced_over_max_body_bytes_never_reaches_a_backend() -> None:
    async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with raw_backend(counted) as backend:
        async with http_service([backend.address], max_body_bytes=100) as (_, port):
            client = await RawClient.open(port)
            client.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n" + b"x" * 101)
            response = await client.response(b"POST")
            assert response is not None
            assert response.status == 413
    assert backend.connections == 0


async def test_a_body_past_the_replay_buffer_is_not_sent_again_one_within_it_is() -> None:
    async def resetter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        reset(writer)

    async with raw_backend(resetter) as bad, echo_backend("good") as good:
        backends = [bad.address, good.address]
        async with http_service(backends, replay_buffer=1024) as (svc, port):
            client = await RawClient.open(port)
            head = "PUT /big HTTP/1.1\r\nHost: x\r\nContent-Length: 4096\r\n\r\n"
            client.send(head.encode() + b"x" * 4096)
            response = await client.response(b"PUT")
            assert response is not None
            assert response.status == 502  # its body could not be sent again
            assert not good.requests
            svc.pool.mark_up(next(iter(svc.pool)), "test")
            client = await RawClient.open(port)
            client.send(
                b"PUT /small HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"y" * 100
            )
            response = await client.response(b"PUT")
            assert response is not None
            assert response.status == 200
            assert response.json()["length"] == 100  # sent again, whole, to the other one


async def test_retries_stop_at_the_services_retries() -> None:
    async def resetter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        reset(writer)

    async with raw_backend(resetter) as a, raw_backend(resetter) as b, raw_backend(resetter) as c:
        async with http_service([a.address, b.address, c.address], retries=1) as (svc, port):
            client = await RawClient.open(port)
            client.send(get("/"))
            response = await client.response()
            assert response is not None
            assert response.status == 502
    assert a.connections + b.connections + c.connections == 2  # the first try and one more
    assert svc.retries_made == 1


async def test_an_http10_client_gets_no_1xx() -> None:
    async def continues(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()

    async with raw_backend(continues) as backend:
        async with http_service([backend.address]) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            async with asyncio.timeout(STEP):
                answer = await reader.read()  # until the proxy closes (HTTP/1.0)
            writer.close()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b" 100 " not in answer


async def test_a_tunnel_passes_a_half_close_on_and_the_other_way_keeps_flowing() -> None:
    async def upgrader(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n"
        )
        await writer.drain()
        received = await reader.read()  # until the client's half-close comes through
        writer.write(b"got " + received)
        await writer.drain()

    async with raw_backend(upgrader) as backend:
        async with http_service([backend.address]) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(get("/t", extra="Connection: upgrade\r\nUpgrade: x\r\n"))
            async with asyncio.timeout(STEP):
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"hello")
                writer.write_eof()
                rest = await reader.read()
            writer.close()
    assert rest == b"got hello"


async def test_an_upload_to_a_backend_not_reading_it_waits_in_bounded_memory() -> None:
    gate = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await gate.wait()
        got = 0
        while got < 50_000_000:
            got += len(await reader.read(1 << 20))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()

    async with raw_backend(slow) as backend:
        async with http_service([backend.address]) as (svc, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"PUT /up HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n")
            body = b"z" * 50_000_000
            sending = asyncio.ensure_future(writer.drain())
            writer.write(body)
            await until(lambda: len(svc.conns) == 1 and next(iter(svc.conns)).paused)
            (conn,) = svc.conns
            assert conn.queued <= HIGH_WATER + PARSE_PIECE  # not the whole body
            gate.set()
            client = RawClient(reader, writer)
            response = await client.response(b"PUT")
            assert response is not None
            assert response.status == 200
            await sending
