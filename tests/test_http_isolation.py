"""No http client ever gets another client's response, nor a request answered twice: many
clients pipelining random requests in random pieces through one service, over backends one
of which closes its kept-alive connections under the proxy (the keep-alive race)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random

import pytest

from balancer.core.http.wire import Body, End, Head, RequestReader
from tests.http_support import (
    STEP,
    RawClient,
    echo_backend,
    get,
    http_service,
    raw_backend,
    until,
)

pytestmark = pytest.mark.usefixtures("http_clients")


async def flaky(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers like the echo backend (its requests read by the sans-IO reader), and closes
    the connection after every third answer without saying so (the next request on it finds
    it closed)."""
    parser = RequestReader()
    path, body, answered = "", bytearray(), 0
    while answered < 3:
        data = await reader.read(65536)
        if not data:
            return
        for event in parser.feed(data):
            if isinstance(event, Head):
                path, body = event.target.decode(), bytearray()
            elif isinstance(event, Body):
                body += event.data
            elif isinstance(event, End):
                doc = {"path": path, "sha": hashlib.sha256(body).hexdigest()}
                text = json.dumps(doc).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text))
                answered += 1
        await writer.drain()


def request_bytes(rng: random.Random, client: int, seq: int) -> tuple[bytes, str, bytes]:
    path = f"/c{client}/r{seq}?q={rng.randrange(10**6)}"
    if rng.random() < 0.5:
        return f"GET {path} HTTP/1.1\r\nHost: iso.test\r\n\r\n".encode(), path, b""
    body = rng.randbytes(rng.choice([0, 1, 100, 5000, 70000]))
    if rng.random() < 0.5:
        head = f"POST {path} HTTP/1.1\r\nHost: iso.test\r\nContent-Length: {len(body)}\r\n\r\n"
        return head.encode() + body, path, body
    cut = rng.randrange(len(body) + 1)
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:cut], body[cut:]) if p)
    head = f"PUT {path} HTTP/1.1\r\nHost: iso.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head.encode() + chunks + b"0\r\n\r\n", path, body


async def one_client(port: int, client: int, rng: random.Random, count: int) -> int:
    conn = await RawClient.open(port)
    sent = [request_bytes(rng, client, seq) for seq in range(count)]
    stream = b"".join(data for data, _, _ in sent)
    at = 0
    while at < len(stream):  # random pieces, the loop turning between them
        size = rng.choice([1, 7, 100, 1500, 65536])
        conn.send(stream[at : at + size])
        at += size
        await asyncio.sleep(0)
    for _, path, body in sent:
        response = await conn.response()
        assert response is not None, (client, path)
        assert response.status == 200, (client, path, response.body[:200])
        doc = response.json()
        assert doc["path"] == path  # this client's own request, in order
        assert doc["sha"] == hashlib.sha256(body).hexdigest()
    return len(sent)


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
async def test_every_client_gets_its_own_answers_in_order(seed: int) -> None:
    rng = random.Random(seed)
    async with echo_backend("a") as a, echo_backend("b") as b, raw_backend(flaky) as c:
        async with http_service([a.address, b.address, c.address]) as (svc, port):
            clients = [random.Random(rng.random()) for _ in range(16)]
            async with asyncio.timeout(STEP * 3):
                done = await asyncio.gather(
                    *(one_client(port, i, r, 12) for i, r in enumerate(clients))
                )
    assert sum(done) == 192
    answered = len(a.requests) + len(b.requests)
    assert answered <= 192  # no request answered twice by the echo backends
    assert svc.race_retries > 0  # the flaky backend's closes were met and survived


async def test_a_client_that_does_not_read_costs_bounded_memory_and_nobody_else_waits() -> None:
    """200 pipelined requests for 100 KB each, never read: the proxy stops answering them
    once the client's socket is full (no 20 MB queued for it), and serves others meanwhile."""
    async with echo_backend("a") as a:
        async with http_service([a.address]) as (svc, port):
            hog = await RawClient.open(port)
            hog.send(b"".join(get(f"/bytes/100000?{i}") for i in range(200)))
            progress: list[int] = []

            def stalled() -> bool:
                progress.append(len(a.requests))
                return len(progress) > 20 and progress[-20] == progress[-1] > 0

            await until(stalled, "the backend to stop getting the hog's requests")
            (conn,) = svc.conns
            assert conn.transport.get_write_buffer_size() < 2 * 1024 * 1024
            assert len(a.requests) < 200
            other = await RawClient.open(port)
            other.send(get("/other"))
            answered = await other.response()
            assert answered is not None
            assert answered.json()["path"] == "/other"
            for _ in range(200):  # and the hog, reading at last, gets every answer whole
                response = await hog.response()
                assert response is not None
                assert len(response.body) == 100000


async def test_a_switch_of_protocols_nobody_asked_for_is_a_502_not_a_tunnel() -> None:
    """A backend answering 101 to a plain request would get the client's connection raw,
    past every route and header rule: the proxy refuses it as a broken response."""

    async def switcher(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n"
        )
        await writer.drain()
        await reader.read()

    async with raw_backend(switcher) as backend:
        async with http_service([backend.address], retries=0) as (svc, port):
            client = await RawClient.open(port)
            client.send(get("/"))
            response = await client.response()
            assert response is not None
            assert response.status == 502
            assert not svc.tunnels
            assert svc.bad_responses == 1


async def test_a_long_lived_connection_is_served_past_any_amount_of_request_heads() -> None:
    """Heads are not queued bytes that wait: 150 requests of 4 KB heads (600 KB, past the
    client's pause threshold) one after another on one connection are all answered."""
    async with echo_backend("a") as a:
        async with http_service([a.address]) as (_svc, port):
            client = await RawClient.open(port)
            big = f"X-Padding: {'p' * 4000}\r\n"
            for i in range(150):
                client.send(get(f"/{i}", extra=big))
                response = await client.response()
                assert response is not None, i
                assert response.json()["path"] == f"/{i}"
