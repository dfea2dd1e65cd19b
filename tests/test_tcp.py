"""TCP mode against real peers: redis-server backends, in-process service on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import re
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import psutil
import pytest

from balancer.config import BackendConfig, HealthConfig, ServiceConfig
from balancer.pool import DOWN, UP, BackendPool
from balancer.proxy.tcp import TcpService
from tests.peers import HOST, Peer, Resp, free_port, need, redis_server

pytestmark = pytest.mark.peers

STEP = 30.0
"""Upper bound for any single wait on the network, so a broken relay fails instead of hanging."""


def make_service(backends: list[str], **options: Any) -> TcpService:
    config = ServiceConfig(
        name="tcp",
        listen_host=HOST,
        listen_port=0,
        backends=tuple(
            BackendConfig(host, int(port)) for host, port in (b.split(":") for b in backends)
        ),
        mode="tcp",
        health=HealthConfig(enabled=False),
        **options,
    )
    return TcpService(config, BackendPool(config))


Starter = Callable[..., Awaitable[tuple[TcpService, int]]]


@pytest.fixture
async def start() -> AsyncIterator[Starter]:
    """Start TcpServices in the test's loop; drain them afterwards."""
    started: list[TcpService] = []

    async def _start(backends: list[str], **options: Any) -> tuple[TcpService, int]:
        svc = make_service(backends, **options)
        _, port = await svc.start()
        started.append(svc)
        return svc, port

    yield _start
    for svc in started:
        await svc.drain(2.0)


@pytest.fixture
def redis_pair() -> Iterator[tuple[Peer, Peer]]:
    with redis_server() as a, redis_server() as b:
        yield a, b


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    """Everything until the peer closes; a reset counts as closed."""
    async with asyncio.timeout(STEP):
        try:
            return await reader.read()
        except ConnectionResetError:
            return b""


def value_sizes(rng: random.Random, count: int) -> list[int]:
    """Sizes from 1 B to 1 MiB, mostly small: 90% up to 1 KiB, the rest log-uniform."""
    sizes = [1, 1024 * 1024]
    while len(sizes) < count:
        if rng.random() < 0.9:
            sizes.append(rng.randint(1, 1024))
        else:
            sizes.append(int(2 ** rng.uniform(10, 20)))
    return sizes


# -- redis through the relay


async def set_get_roundtrip(backends: list[str], ops: int = 2000, clients: int = 8) -> None:
    svc = make_service(backends)
    _, port = await svc.start()
    try:
        rng = random.Random(7)
        sizes = value_sizes(rng, ops)
        chunks = [sizes[i::clients] for i in range(clients)]

        async def worker(n: int, my_sizes: list[int]) -> int:
            client = await Resp.connect(port)
            try:
                for i, size in enumerate(my_sizes):
                    key = b"k:%d:%d" % (n, i)
                    value = os.urandom(size)
                    assert await client.command(b"SET", key, value) == "OK"
                    got = await client.command(b"GET", key)
                    assert got == value, f"value of {size} bytes came back altered"
                return len(my_sizes)
            finally:
                await client.close()

        done = await asyncio.gather(*(worker(n, c) for n, c in enumerate(chunks)))
        assert sum(done) == ops
        backends_used = [b for b in svc.pool if b.total_connections]
        assert len(backends_used) == 2, "round robin should spread connections over both"
        svc.account()  # as /status and /metrics do before they read the counters
        assert sum(b.bytes_in for b in svc.pool) > sum(sizes)
        assert sum(b.bytes_out for b in svc.pool) > sum(sizes)
        assert sum(b.requests for b in svc.pool) == clients
    finally:
        await svc.drain(2.0)
    assert svc.client_connections == 0
    assert all(b.active_connections == 0 and b.in_flight == 0 for b in svc.pool)


async def test_redis_set_get_binary_values_intact(redis_pair: tuple[Peer, Peer]) -> None:
    await set_get_roundtrip([p.address for p in redis_pair])


async def test_redis_benchmark_through_relay(redis_pair: tuple[Peer, Peer], start: Starter) -> None:
    bench = need("redis-benchmark")
    svc, port = await start([p.address for p in redis_pair])
    proc = await asyncio.create_subprocess_exec(
        bench, "-h", HOST, "-p", str(port), "-n", "20000", "-c", "20", "-t", "set,get", "--csv",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    async with asyncio.timeout(90):
        out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "error" not in text.lower(), text
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(r'"(SET|GET)","([\d.]+)"', text)}
    assert set(rows) == {"SET", "GET"}, text
    assert all(rps > 0 for rps in rows.values())
    assert sum(b.requests for b in svc.pool) >= 20


# -- flow control, half-close, failures


async def large_transfer_to_slow_reader() -> None:
    total = 128 * 1024 * 1024
    block = os.urandom(1024 * 1024)
    expected = hashlib.sha256()
    for _ in range(total // len(block)):
        expected.update(block)

    async def send_all(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(total // len(block)):
            writer.write(block)
            await writer.drain()
        writer.close()

    backend = await asyncio.start_server(send_all, HOST, 0)
    backend_port = backend.sockets[0].getsockname()[1]
    svc = make_service([f"{HOST}:{backend_port}"])
    _, port = await svc.start()
    proc = psutil.Process()
    rss_before = proc.memory_info().rss
    peak_rss = rss_before
    peak_buffered = 0

    reader, writer = await asyncio.open_connection(HOST, port, limit=64 * 1024)
    got = hashlib.sha256()
    received = 0
    async with asyncio.timeout(90):
        while True:
            data = await reader.read(64 * 1024)
            if not data:
                break
            got.update(data)
            received += len(data)
            if received % (1024 * 1024) < len(data):
                # A slow reader: a pause every MiB lets the backend run far ahead.
                await asyncio.sleep(0.002)
                for conn in svc.conns:
                    buffered = conn.transport.get_write_buffer_size()
                    if conn.upstream is not None:
                        buffered += conn.upstream.transport.get_write_buffer_size()
                    peak_buffered = max(peak_buffered, buffered)
                peak_rss = max(peak_rss, proc.memory_info().rss)
    writer.close()
    backend.close()
    await svc.drain(2.0)
    assert received == total
    assert got.digest() == expected.digest()
    assert peak_buffered < 2 * 1024 * 1024, f"relay buffered {peak_buffered} bytes"
    assert peak_rss - rss_before < 60 * 1024 * 1024


async def test_large_transfer_to_slow_reader_keeps_memory_bounded() -> None:
    await large_transfer_to_slow_reader()


async def test_half_close_reply_still_arrives(start: Starter) -> None:
    async def reply_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the client's EOF
        writer.write(b"got %d bytes: " % len(data) + data[::-1])
        await writer.drain()
        writer.close()

    backend = await asyncio.start_server(reply_after_eof, HOST, 0)
    svc, port = await start([f"{HOST}:{backend.sockets[0].getsockname()[1]}"])
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(b"hello, half-closed world")
    writer.write_eof()
    assert await read_to_eof(reader) == b"got 24 bytes: dlrow desolc-flah ,olleh"
    writer.close()
    backend.close()
    assert svc.pool.backends[0].bytes_in == 24


async def test_backend_killed_mid_connection(redis_pair: tuple[Peer, Peer], start: Starter) -> None:
    _, port = await start([p.address for p in redis_pair])
    first = await Resp.connect(port)
    second = await Resp.connect(port)
    assert await first.command(b"SET", b"k", b"v") == "OK"
    assert await second.command(b"SET", b"k", b"w") == "OK"
    first_port = await first.server_port()
    victim = next(p for p in redis_pair if p.port == first_port)
    assert await second.server_port() != victim.port

    victim.kill()
    assert await read_to_eof(first.reader) == b""
    assert await second.command(b"GET", b"k") == b"w"
    await first.close()
    await second.close()


async def test_connect_failover_delivers_early_bytes(
    redis_pair: tuple[Peer, Peer], start: Starter
) -> None:
    live = redis_pair[0]
    dead = f"{HOST}:{free_port()}"  # nothing listens there
    svc, port = await start([dead, live.address])
    value = os.urandom(200 * 1024)
    reader, writer = await asyncio.open_connection(HOST, port, limit=1024 * 1024)
    client = Resp(reader, writer)
    # Sent at once, before the relay has a backend: held, then delivered.
    writer.write(Resp.encode(b"SET", b"early", value) + Resp.encode(b"GET", b"early"))
    async with asyncio.timeout(STEP):
        assert await client.reply() == "OK"
        assert await client.reply() == value
    await client.close()
    dead_backend, live_backend = svc.pool.backends
    assert dead_backend.state == DOWN
    assert dead_backend.connect_failures == 1
    assert live_backend.state == UP
    assert live_backend.total_connections == 1


async def test_all_backends_refusing_closes_client(start: Starter) -> None:
    svc, port = await start([f"{HOST}:{free_port()}", f"{HOST}:{free_port()}"])
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(b"PING\r\n")
    assert await read_to_eof(reader) == b""
    writer.close()
    # both were tried; outlier detection ejects one of the two (max_ejection_percent 50)
    assert [b.connect_failures for b in svc.pool] == [1, 1]
    assert sum(b.state == DOWN for b in svc.pool) == 1
    assert svc.client_connections == 0 or await wait_for_count(svc, 0)


async def wait_for_count(svc: TcpService, count: int) -> bool:
    """Poll until the service holds `count` client connections (bounded)."""
    async with asyncio.timeout(STEP):
        while svc.client_connections != count:  # noqa: ASYNC110 - a counter, no event to wait on
            await asyncio.sleep(0.01)
    return True


async def test_service_connection_limit_refuses_excess(
    redis_pair: tuple[Peer, Peer], start: Starter
) -> None:
    svc, port = await start([p.address for p in redis_pair], max_connections=2)
    a = await Resp.connect(port)
    b = await Resp.connect(port)
    assert await a.command(b"PING") == "PONG"
    assert await b.command(b"PING") == "PONG"
    reader, writer = await asyncio.open_connection(HOST, port)
    assert await read_to_eof(reader) == b""
    writer.close()
    assert svc.refused == 1
    assert await a.command(b"PING") == "PONG"

    await a.close()
    await wait_for_count(svc, 1)
    c = await Resp.connect(port)
    assert await c.command(b"PING") == "PONG"
    await b.close()
    await c.close()


async def test_backend_connection_limit_tries_next_then_refuses(
    redis_pair: tuple[Peer, Peer], start: Starter
) -> None:
    svc, port = await start([p.address for p in redis_pair], max_backend_connections=1)
    a = await Resp.connect(port)
    b = await Resp.connect(port)
    assert await a.command(b"PING") == "PONG"
    assert await b.command(b"PING") == "PONG"
    assert {await a.server_port(), await b.server_port()} == {p.port for p in redis_pair}
    reader, writer = await asyncio.open_connection(HOST, port)
    assert await read_to_eof(reader) == b""
    writer.close()
    assert svc.refused == 1
    assert [backend.active_connections for backend in svc.pool] == [1, 1]
    assert all(backend.state == UP for backend in svc.pool)
    await a.close()
    await b.close()


async def test_an_ejected_backend_that_recovered_serves_when_the_other_is_dead(
    redis_pair: tuple[Peer, Peer], start: Starter
) -> None:
    """The case a soak with redis kills found: one backend still serving its ejection time
    after restarting, the other just killed (and not ejectable, max_ejection_percent 50)."""
    alive = redis_pair[0]
    svc, port = await start([alive.address, f"{HOST}:{free_port()}"])
    recovered, dead = svc.pool.backends
    assert svc.pool.report_failure(recovered, "killed a moment ago")  # ejected for 2 s
    client = await Resp.connect(port)
    assert await client.command(b"PING") == "PONG"
    assert await client.server_port() == alive.port
    assert dead.connect_failures == 1, "the dead one was tried first"
    assert dead.state == UP, "and not ejected: that would eject both"
    assert recovered.state == DOWN, "the fallback does not end the ejection"
    assert svc.not_available == 0
    await client.close()


async def test_idle_connection_is_closed(redis_pair: tuple[Peer, Peer], start: Starter) -> None:
    svc, port = await start([redis_pair[0].address], idle_timeout=0.2)
    client = await Resp.connect(port)
    assert await client.command(b"PING") == "PONG"
    assert await read_to_eof(client.reader) == b""
    await client.close()
    await wait_for_count(svc, 0)


async def test_drain_closes_remaining_connections(
    redis_pair: tuple[Peer, Peer], start: Starter
) -> None:
    svc, port = await start([redis_pair[0].address])
    client = await Resp.connect(port)
    assert await client.command(b"PING") == "PONG"
    svc.stop_accepting()
    assert await client.command(b"PING") == "PONG", "stop_accepting keeps open connections"
    await svc.drain(0.1)
    assert svc.client_connections == 0
    assert await read_to_eof(client.reader) == b""
    await client.close()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(HOST, port)


async def test_byte_counters_are_exact_when_the_backend_resets(start: Starter) -> None:
    """The counters come from the kernel: settled before either socket closes, reset or not."""

    async def reply_then_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(10)
        writer.write(b"x" * 50_000)
        await writer.drain()
        await reader.readexactly(3)  # the client has read the reply
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    backend = await asyncio.start_server(reply_then_reset, HOST, 0)
    svc, port = await start([f"{HOST}:{backend.sockets[0].getsockname()[1]}"])
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(b"0123456789")
    assert await asyncio.wait_for(reader.readexactly(50_000), STEP) == b"x" * 50_000
    writer.write(b"bye")
    assert await read_to_eof(reader) == b""
    writer.close()
    backend.close()
    counted = svc.pool.backends[0]
    assert (counted.bytes_in, counted.bytes_out) == (13, 50_000)
    await wait_for_count(svc, 0)
    svc.account()
    assert (counted.bytes_in, counted.bytes_out) == (13, 50_000), "nothing counted twice"


async def test_client_reset_is_passed_to_backend(start: Starter) -> None:
    backend_saw: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def watch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hi\n")
        try:
            data = await reader.read()
            backend_saw.set_result(f"eof after {data!r}")
        except ConnectionResetError:
            backend_saw.set_result("reset")
        writer.close()

    backend = await asyncio.start_server(watch, HOST, 0)
    _, port = await start([f"{HOST}:{backend.sockets[0].getsockname()[1]}"])
    reader, writer = await asyncio.open_connection(HOST, port)
    assert await asyncio.wait_for(reader.readline(), STEP) == b"hi\n"
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    assert await asyncio.wait_for(backend_saw, STEP) == "reset"
    backend.close()


async def test_one_way_stream_is_not_idle(start: Starter) -> None:
    """Bytes flowing only from the backend keep the connection alive past the idle timeout."""
    lines = 30

    async def ticker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for i in range(lines):
            writer.write(b"tick %d\n" % i)
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.close()

    backend = await asyncio.start_server(ticker, HOST, 0)
    svc, port = await start([f"{HOST}:{backend.sockets[0].getsockname()[1]}"], idle_timeout=0.2)
    reader, writer = await asyncio.open_connection(HOST, port)
    # The client never writes; 30 ticks 50 ms apart outlast the 0.2 s idle timeout.
    received = await read_to_eof(reader)
    writer.close()
    backend.close()
    assert received.splitlines() == [b"tick %d" % i for i in range(lines)]
    assert svc.pool.backends[0].bytes_out == len(received)


async def test_failover_and_no_backend_are_counted(start: Starter) -> None:
    svc, port = await start([f"{HOST}:{free_port()}", f"{HOST}:{free_port()}"])
    reader, writer = await asyncio.open_connection(HOST, port)
    assert await read_to_eof(reader) == b""
    writer.close()
    await wait_for_count(svc, 0)
    assert svc.retries == 1  # the second backend was tried after the first refused
    assert svc.not_available == 1
