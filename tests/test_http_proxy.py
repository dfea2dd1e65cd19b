"""Http mode in process, against real aiohttp backends on 127.0.0.1: forwarding,
framing, keep-alive, pipelining, header rules and the errors we generate."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import aiohttp
import pytest

from tests.http_support import (
    STEP,
    RawClient,
    echo_backend,
    get,
    http_service,
    post,
    raw_backend,
    read_request,
    until,
)

pytestmark = pytest.mark.usefixtures("http_clients")


def headers_of(seen: dict[str, Any]) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in seen["headers"]}


async def test_requests_are_balanced_one_by_one_with_forwarding_headers() -> None:
    async with echo_backend("a") as a, echo_backend("b") as b:
        async with http_service([a.address, b.address]) as (svc, port):
            client = await RawClient.open(port)
            names = []
            for i in range(4):
                client.send(post(f"/p?i={i}", b"hello %d" % i, host="shop.test"))
                response = await client.response()
                assert response is not None
                assert response.status == 200
                seen = response.json()
                names.append(seen["backend"])
                assert seen["method"] == "POST"
                assert seen["path"] == f"/p?i={i}"
                assert seen["sha"] == hashlib.sha256(b"hello %d" % i).hexdigest()
                h = headers_of(seen)
                assert h["host"] == "shop.test"
                assert h["x-forwarded-for"] == "127.0.0.1"
                assert h["x-forwarded-proto"] == "http"
                assert h["x-forwarded-host"] == "shop.test"
                assert h["x-forwarded-port"] == str(port)
                assert len(h["x-request-id"]) >= 16
            client.close()
    assert names == ["a", "b", "a", "b"]  # one client connection, each request balanced
    assert svc.requests == 4


async def test_forwarding_headers_from_an_untrusted_client_are_replaced() -> None:
    spoof = "X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nForwarded: for=6.6.6.6\r\n"
    async with echo_backend() as a:
        async with http_service([a.address]) as (_, port):
            client = await RawClient.open(port)
            hop = "Connection: X-Forwarded-For, X-Secret\r\nX-Secret: 1\r\n"
            hop += "Keep-Alive: timeout=5\r\nTE: trailers\r\n"
            client.send(get("/", extra=spoof + hop))
            response = await client.response()
            assert response is not None
            h = headers_of(response.json())
            client.close()
        async with http_service([a.address], trusted_proxies=("127.0.0.0/8",)) as (_, port):
            client = await RawClient.open(port)
            client.send(get("/", extra=spoof))
            trusted = await client.response()
            assert trusted is not None
            t = headers_of(trusted.json())
            client.close()
    assert h["x-forwarded-for"] == "127.0.0.1"  # not "6.6.6.6, ..." nor removed by Connection
    assert h["x-forwarded-proto"] == "http"
    assert "forwarded" not in h
    assert "x-secret" not in h
    assert "keep-alive" not in h
    assert "te" not in h
    assert t["x-forwarded-for"] == "6.6.6.6, 127.0.0.1"
    assert t["x-forwarded-proto"] == "https"


async def test_header_rules_of_the_service_apply() -> None:
    async with echo_backend() as a:
        async with http_service(
            [a.address], set_headers=(("X-Env", "prod"),), remove_headers=("X-Debug",),
            strip_prefix="/api", host_rewrite="internal.test", via="lb1", forwarded=True,
        ) as (_, port):  # fmt: skip
            client = await RawClient.open(port)
            client.send(get("/api/items?x=1", extra="X-Debug: yes\r\nX-Env: dev\r\n"))
            response = await client.response()
            assert response is not None
            seen = response.json()
            client.close()
    h = headers_of(seen)
    assert seen["path"] == "/items?x=1"
    assert h["host"] == "internal.test"
    assert h["x-env"] == "prod"
    assert "x-debug" not in h
    assert h["via"] == "1.1 lb1"
    assert h["forwarded"] == 'for=127.0.0.1;proto=http;host="example.test"'
    assert response.header(b"via") == b"1.1 lb1"


async def test_upstream_connections_are_kept_alive_and_reused() -> None:
    async with echo_backend() as a:
        async with http_service([a.address]) as (svc, port):
            async with aiohttp.ClientSession() as session:
                for _ in range(20):
                    async with session.get(f"http://127.0.0.1:{port}/") as resp:
                        assert resp.status == 200
                        await resp.read()
    assert len(a.peers) == 1  # 20 sequential requests, one upstream connection
    assert svc.dialed == 1
    assert svc.reused == 19


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with echo_backend("a") as a, echo_backend("b") as b:
        async with http_service([a.address, b.address]) as (_, port):
            client = await RawClient.open(port)
            client.send(get("/1") + post("/2", b"body") + get("/3") + get("/4"))
            paths = []
            for _ in range(4):
                response = await client.response()
                assert response is not None
                assert response.status == 200
                paths.append(response.json()["path"])
            client.close()
    assert paths == ["/1", "/2", "/3", "/4"]


async def test_http10_clients_and_connection_close() -> None:
    async with echo_backend() as a:
        async with http_service([a.address]) as (_, port):
            client = await RawClient.open(port)
            client.send(b"GET /old HTTP/1.0\r\n\r\n")
            response = await client.response()
            assert response is not None
            assert response.status == 200
            assert response.header(b"connection") == b"close"
            assert response.json()["path"] == "/old"
            assert await client.at_eof()
            client = await RawClient.open(port)
            client.send(b"GET /ka HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" + get("/next"))
            first = await client.response()
            second = await client.response()
            assert first is not None
            assert first.header(b"connection") == b"keep-alive"
            assert second is not None
            assert second.json()["path"] == "/next"
            client.send(get("/last", extra="Connection: close\r\n"))
            last = await client.response()
            assert last is not None
            assert last.header(b"connection") == b"close"
            assert await client.at_eof()


async def test_chunked_responses_and_uploads_stream_through() -> None:
    async with echo_backend() as a:
        async with http_service([a.address]) as (_, port):
            client = await RawClient.open(port)
            client.send(get("/chunked"))
            response = await client.response()
            assert response is not None
            assert response.body == b"one,two,three"
            assert response.header(b"transfer-encoding") == b"chunked"
            client.send(
                b"PUT /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Check: 1\r\n\r\n"
            )
            up = await client.response()
            assert up is not None
            assert up.json()["sha"] == hashlib.sha256(b"hello world").hexdigest()
            client.send(b"GET /chunked HTTP/1.0\r\n\r\n")
            old = await client.response()  # an HTTP/1.0 client gets it close-delimited
            assert old is not None
            assert old.body == b"one,two,three"
            assert old.header(b"transfer-encoding") is None
            assert old.header(b"connection") == b"close"


async def test_head_204_and_304_responses_have_no_body_and_the_connection_goes_on() -> None:
    async def lying(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = await read_request(reader)
            if request.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
            elif b"/304" in request:
                writer.write(b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()

    async with raw_backend(lying) as backend:
        async with http_service([backend.address]) as (_, port):
            client = await RawClient.open(port)
            client.send(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await client.response(b"HEAD")
            assert head is not None
            assert head.header(b"content-length") == b"100"
            client.send(get("/304"))
            not_modified = await client.response()
            assert not_modified is not None
            assert not_modified.status == 304
            client.send(get("/204"))
            empty = await client.response()
            assert empty is not None
            assert empty.status == 204
            assert empty.body == b""
    assert backend.connections == 1


async def test_expect_100_continue_is_passed_on() -> None:
    async with echo_backend() as a:
        async with http_service([a.address]) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
            )
            async with asyncio.timeout(STEP):
                interim = await reader.readuntil(b"\r\n\r\n")
            assert interim.startswith(b"HTTP/1.1 100")
            writer.write(b"data")
            client = RawClient(reader, writer)
            response = await client.response()
            assert response is not None
            assert response.json()["length"] == 4
            writer.close()


async def test_a_websocket_is_relayed_both_ways() -> None:
    async with echo_backend("a") as a:
        async with http_service([a.address]) as (svc, port):
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(f"http://127.0.0.1:{port}/ws") as ws:
                    for word in ("hello", "x" * 100_000, "bye"):
                        await ws.send_str(word)
                        msg = await ws.receive(timeout=STEP)
                        assert msg.data == f"a:{word}"
                    assert len(svc.tunnels) == 1
            await until(lambda: not svc.tunnels and not svc.conns)


async def test_no_healthy_backend_is_a_503_with_retry_after() -> None:
    async with echo_backend() as a:
        async with http_service([a.address]) as (svc, port):
            for backend in svc.pool:
                svc.pool.mark_down(backend, "test")
            client = await RawClient.open(port)
            client.send(get("/"))
            response = await client.response()
            assert response is not None
            assert response.status == 503
            assert response.header(b"retry-after") == b"1"
            assert svc.generated == {503: 1}
            assert not a.requests


async def test_consistent_hash_on_a_header_sends_each_user_to_one_backend() -> None:
    hashing = {"algorithm": "consistent_hash", "hash_key": "header:X-User"}
    async with echo_backend("a") as a, echo_backend("b") as b, echo_backend("c") as c:
        async with http_service([a.address, b.address, c.address], service=hashing) as (_, port):
            client = await RawClient.open(port)
            chosen: dict[str, set[str]] = {}
            for round_ in range(3):
                for user in range(12):
                    client.send(get(f"/{round_}", extra=f"X-User: user-{user}\r\n"))
                    response = await client.response()
                    assert response is not None
                    chosen.setdefault(f"user-{user}", set()).add(response.json()["backend"])
    assert all(len(names) == 1 for names in chosen.values())
    assert len(set().union(*chosen.values())) > 1  # the users are spread, each kept


async def test_a_sticky_cookie_pins_a_client_while_its_backend_is_up() -> None:
    async with echo_backend("a") as a, echo_backend("b") as b:
        async with http_service([a.address, b.address], sticky_cookie="lb") as (svc, port):
            client = await RawClient.open(port)
            client.send(get("/"))
            first = await client.response()
            assert first is not None
            cookie = first.header(b"set-cookie")
            assert cookie is not None
            assert cookie.startswith(b"lb=")
            value = cookie.split(b";")[0].decode()
            pinned = first.json()["backend"]
            for _ in range(4):
                client.send(get("/", extra=f"Cookie: theme=dark; {value}\r\n"))
                again = await client.response()
                assert again is not None
                assert again.json()["backend"] == pinned
                assert again.header(b"set-cookie") is None
            backend = next(x for x in svc.pool if x.port == (a if pinned == "a" else b).port)
            svc.pool.mark_down(backend, "test")
            client.send(get("/", extra=f"Cookie: {value}\r\n"))
            moved = await client.response()
            assert moved is not None
            assert moved.json()["backend"] != pinned
            assert moved.header(b"set-cookie") is not None  # re-pinned to the one up


async def test_a_body_too_big_to_replay_never_rides_a_kept_alive_connection() -> None:
    """Should a kept-alive connection be closed under it, such a request could not be sent
    again: it gets a new connection, and the pool keeps serving the others."""
    async with echo_backend() as a:
        async with http_service([a.address], replay_buffer=1024) as (svc, port):
            client = await RawClient.open(port)
            for data in (get("/warm"), post("/big", b"x" * 2000), post("/small", b"x" * 10)):
                client.send(data)
                response = await client.response()
                assert response is not None
                assert response.status == 200
    assert svc.dialed == 2  # /warm's connection was not used for /big
    assert svc.reused == 1  # /small took a kept-alive one
