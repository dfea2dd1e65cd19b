"""Http mode when backends and clients misbehave: retries and what is never replayed,
timeouts, smuggling attempts, limits, broken responses, drain."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest

from balancer.core.http.wire import HttpError
from tests.http_support import (
    STEP,
    RawClient,
    echo_backend,
    get,
    http_service,
    post,
    raw_backend,
    read_request,
    reset,
    until,
)

pytestmark = pytest.mark.usefixtures("http_clients")


def dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


async def test_the_keepalive_race_costs_the_client_nothing_whatever_the_method() -> None:
    """A backend that closes an idle connection just as it is reused: the request goes
    again on a fresh connection, POST included, and is processed once."""
    answered: list[bytes] = []

    async def one_per_connection(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        answered.append(await read_request(reader))
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        await read_request(reader)  # the next request on this connection: closed unanswered

    async with raw_backend(one_per_connection) as backend:
        async with http_service([backend.address], retries=0) as (svc, port):
            client = await RawClient.open(port)
            for i in range(10):
                client.send(post(f"/{i}", b"payment %d" % i))
                response = await client.response()
                assert response is not None
                assert response.status == 200, i
    assert len(answered) == 10
    assert [r.rsplit(b"\r\n\r\n", 1)[1] for r in answered] == [b"payment %d" % i for i in range(10)]
    assert svc.race_retries == 9  # every reuse met a closing backend


async def test_a_post_sent_to_a_failing_backend_is_not_replayed_but_a_get_is() -> None:
    seen: list[bytes] = []

    async def resetter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append((await read_request(reader)).split(b" ", 1)[0])
        reset(writer)

    async with raw_backend(resetter) as bad, echo_backend("good") as good:
        async with http_service([bad.address, good.address]) as (svc, port):
            client = await RawClient.open(port)
            client.send(post("/pay", b"once"))
            response = await client.response()
            assert response is not None
            assert response.status == 502
            assert not good.requests  # never sent twice
            svc.pool.mark_up(next(iter(svc.pool)), "test")  # the resetter takes traffic again
            client = await RawClient.open(port)
            client.send(get("/read"))
            response = await client.response()
            assert response is not None
            assert response.status == 200
            assert response.json()["backend"] == "good"
    assert seen == [b"POST", b"GET"]


async def test_a_post_whose_race_retry_finds_the_backend_gone_goes_to_no_other() -> None:
    """The backend takes the POST on a kept-alive connection, then goes down: the fresh
    try of the keep-alive race is refused, and the POST, maybe acted on, stops there."""
    seen: list[bytes] = []
    listening: list[asyncio.Server] = []

    async def crashing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = await read_request(reader)
            seen.append(request.split(b" ", 1)[0])
            if request.startswith(b"POST"):
                listening[0].close()  # the whole backend is gone: no new connection either
                writer.transport.abort()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    listening.append(await asyncio.start_server(crashing, "127.0.0.1", 0))
    crash = f"127.0.0.1:{listening[0].sockets[0].getsockname()[1]}"
    async with echo_backend("good") as good:
        async with http_service([crash, good.address]) as (svc, port):
            client = await RawClient.open(port)
            for path in ("/warm-crash", "/warm-good"):  # one idle connection to each
                client.send(get(path))
                assert (await client.response()) is not None
            client.send(post("/pay", b"once"))
            response = await client.response(b"POST")
            assert response is not None
            assert response.status == 502
    assert seen == [b"GET", b"POST"]
    assert svc.race_retries == 1
    assert [r["method"] for r in good.requests] == ["GET"], "the POST went to a second backend"


async def test_a_refused_connect_is_retried_elsewhere_for_any_method() -> None:
    async with echo_backend("good") as good:
        async with http_service([dead_address(), good.address]) as (svc, port):
            client = await RawClient.open(port)
            client.send(post("/a", b"x"))
            response = await client.response()
            assert response is not None
            assert response.status == 200
    assert svc.retries_made == 1
    assert len(good.requests) == 1


async def test_no_response_head_in_time_is_a_504_or_a_retry_for_idempotent_methods() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()  # never answers

    async with raw_backend(silent) as slow, echo_backend("good") as good:
        async with http_service([slow.address], response_header_timeout=0.2) as (_, port):
            client = await RawClient.open(port)
            client.send(post("/p", b"x"))
            response = await client.response()
            assert response is not None
            assert response.status == 504
        backends = [slow.address, good.address]
        async with http_service(backends, response_header_timeout=0.2) as (_, port):
            client = await RawClient.open(port)
            client.send(get("/g"))
            response = await client.response()
            assert response is not None
            assert response.status == 200
            assert response.json()["backend"] == "good"


async def test_retry_on_status_is_opt_in() -> None:
    async def unavailable(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy")
            await writer.drain()

    async with raw_backend(unavailable) as busy, echo_backend("good") as good:
        backends = [busy.address, good.address]
        async with http_service(backends) as (_, port):
            client = await RawClient.open(port)
            client.send(get("/"))
            response = await client.response()
            assert response is not None
            assert response.status == 503
            assert response.body == b"busy"
        async with http_service(backends, retry_on_status=(503,)) as (_, port):
            client = await RawClient.open(port)
            client.send(get("/"))
            response = await client.response()
            assert response is not None
            assert response.status == 200


async def test_a_response_that_breaks_framing_is_a_502_and_the_connection_is_dropped() -> None:
    async def smuggler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecret"
        )
        await writer.drain()
        await reader.read()

    async with raw_backend(smuggler) as backend:
        async with http_service([backend.address]) as (svc, port):
            client = await RawClient.open(port)
            client.send(get("/"))
            response = await client.response()
            assert response is not None
            assert response.status == 502
            assert b"secret" not in response.body
            assert svc.idle.count() == 0
            assert svc.bad_responses >= 1


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX A: 1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
async def test_smuggling_attempts_are_refused_and_closed_after_earlier_requests(
    request_bytes: bytes,
) -> None:
    async with echo_backend() as a:
        async with http_service([a.address]) as (svc, port):
            client = await RawClient.open(port)
            client.send(get("/first") + request_bytes + get("/smuggled"))
            first = await client.response()
            assert first is not None
            assert first.json()["path"] == "/first"
            refused = await client.response()
            assert refused is not None
            assert refused.status in (400, 501)
            assert refused.header(b"connection") == b"close"
            assert await client.response() is None
    assert [r["path"] for r in a.requests] == ["/first"]
    assert svc.client_errors == 1


async def test_a_slow_request_head_gets_408_while_others_are_served() -> None:
    async with echo_backend() as a:
        async with http_service([a.address], header_timeout=0.3) as (_, port):
            slow = await RawClient.open(port)
            slow.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            other = await RawClient.open(port)
            other.send(get("/fast"))
            served = await other.response()
            assert served is not None
            assert served.status == 200
            response = await slow.response()
            assert response is not None
            assert response.status == 408
            assert await slow.response() is None
    assert [r["path"] for r in a.requests] == ["/fast"]


async def test_limits_on_heads_and_bodies() -> None:
    async with echo_backend() as a:
        async with http_service(
            [a.address], max_header_bytes=1024, max_headers=10, max_body_bytes=100
        ) as (_, port):  # fmt: skip
            cases = [
                (get("/", extra=f"X-Big: {'a' * 2000}\r\n"), 431),
                (get("/", extra="".join(f"X-{i}: 1\r\n" for i in range(20))), 431),
                (post("/", b"x" * 101), 413),
                (
                    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + b"40\r\n" + b"x" * 64 + b"\r\n" + b"40\r\n" + b"x" * 64 + b"\r\n0\r\n\r\n",
                    413,
                ),
            ]  # fmt: skip
            for data, status in cases:
                client = await RawClient.open(port)
                client.send(data)
                response = await client.response()
                assert response is not None
                assert response.status == status, data[:40]
                assert response.header(b"connection") == b"close"


async def test_a_backend_dying_mid_response_cuts_the_client_instead_of_ending_it_short() -> None:
    async def dies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        await writer.drain()
        reset(writer)

    async with raw_backend(dies) as backend:
        async with http_service([backend.address]) as (_, port):
            client = await RawClient.open(port)
            client.send(get("/"))
            with pytest.raises((HttpError, ConnectionError)):
                await client.response()


async def test_an_idle_client_is_closed_after_keepalive_timeout() -> None:
    async with echo_backend() as a:
        async with http_service([a.address], keepalive_timeout=0.2) as (svc, port):
            client = await RawClient.open(port)
            client.send(get("/"))
            assert await client.response() is not None
            assert await client.at_eof()
            await until(lambda: not svc.conns)


async def test_a_drain_lets_the_exchange_under_way_finish_with_connection_close() -> None:
    gate = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await gate.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")
        await writer.drain()
        await reader.read()

    async with raw_backend(slow) as backend, echo_backend() as _:
        async with http_service([backend.address]) as (svc, port):
            idle = await RawClient.open(port)
            busy = await RawClient.open(port)
            busy.send(get("/"))
            await until(lambda: backend.connections > 0 and len(svc.conns) == 2)
            drain = asyncio.create_task(svc.drain(STEP))
            assert await idle.at_eof()
            gate.set()
            response = await busy.response()
            assert response is not None
            assert response.body == b"done"
            assert response.header(b"connection") == b"close"
            cut = await drain
            assert cut.connections == 0


async def test_a_response_that_stalls_mid_body_is_cut_after_response_header_timeout() -> None:
    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        await writer.drain()
        await reader.read()  # sends nothing more

    async with raw_backend(stalls) as backend:
        async with http_service([backend.address], response_header_timeout=0.3) as (svc, port):
            client = await RawClient.open(port)
            client.send(get("/"))
            with pytest.raises((HttpError, ConnectionError)):
                await client.response()
            await until(lambda: not svc.conns)


async def test_a_backend_closing_idle_connections_sooner_than_we_do_costs_no_request() -> None:
    """The keep-alive race as servers make it: the backend's idle timeout (0.1 s) is shorter
    than ours (4 s), and requests come about that far apart, so reused connections are
    closed before, while and after they are reused."""
    async with echo_backend("a", keepalive_timeout=0.1) as a:
        async with http_service([a.address]) as (svc, port):
            async with aiohttp.ClientSession() as session:
                statuses = []
                for i in range(24):
                    async with session.get(f"http://127.0.0.1:{port}/{i}") as resp:
                        statuses.append(resp.status)
                        await resp.read()
                    await asyncio.sleep(0.07 + (i % 7) * 0.01)  # the gaps are the test
    assert statuses == [200] * 24
    assert len(a.requests) == 24  # each request reached the backend once
    assert len(a.peers) > 1  # the backend did close connections under us
    assert svc.dialed == len(a.peers)


async def test_requests_over_max_backend_requests_wait_their_turn_or_get_503() -> None:
    gate = asyncio.Event()

    async def held(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            await gate.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    limits = {"max_backend_requests": 1, "queue_size": 1, "queue_timeout": STEP}
    async with raw_backend(held) as backend:
        async with http_service([backend.address], service=limits) as (svc, port):
            first, second, third = [await RawClient.open(port) for _ in range(3)]
            first.send(get("/1"))
            await until(lambda: backend.connections == 1)
            second.send(get("/2"))
            await until(lambda: len(svc.queue) == 1)  # waits for the busy backend
            third.send(get("/3"))
            refused = await third.response()  # the queue holds one: no room
            assert refused is not None
            assert refused.status == 503
            assert refused.header(b"retry-after") == b"1"
            gate.set()
            answered = [await first.response(), await second.response()]
            assert [r.status for r in answered if r is not None] == [200, 200]
            (only,) = svc.pool
            assert only.in_flight == 0
            assert only.requests == 2
            assert only.bytes_out == 4  # the body bytes relayed from it, 2 per response


async def test_a_client_over_max_connections_gets_503_and_the_others_are_served() -> None:
    async with echo_backend() as a:
        async with http_service([a.address], service={"max_connections": 1}) as (svc, port):
            inside = await RawClient.open(port)
            inside.send(get("/in"))
            assert await inside.response() is not None
            over = await RawClient.open(port)
            refused = await over.response()
            assert refused is not None
            assert refused.status == 503
            assert refused.header(b"retry-after") == b"1"
            assert await over.response() is None  # and closed
            inside.send(get("/again"))
            again = await inside.response()
            assert again is not None
            assert again.status == 200
            assert svc.refused == 1
