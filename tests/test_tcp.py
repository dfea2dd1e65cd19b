"""TCP mode against real peers: redis-server backends, in-process service on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import random
import re
import resource
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import psutil
import pytest

from balancer.config.load import load_config
from balancer.config.model import BackendConfig, HealthConfig, ServiceConfig
from balancer.core.pool import BackendPool
from balancer.core.states import DOWN, UP
from balancer.net import loopguard, resources, tcpinfo
from balancer.proxy.tcp import relay
from balancer.proxy.tcp import service as tcp_service
from balancer.proxy.tcp.service import TcpService
from tests.peers import HOST, Peer, Resp, free_port, need, redis_server

pytestmark = pytest.mark.peers

STEP = 30.0
"""Upper bound for any single wait on the network, so a broken relay fails instead of hanging."""

ENGINE = ["uvloop"]
"""The relay engine of the services the running test makes (see the `engine` fixture)."""


@pytest.fixture(autouse=True, params=["uvloop", "io_uring"])
def engine(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test here runs on both relay engines (and, by conftest, on both loops)."""
    ENGINE[0] = request.param
    yield request.param
    ENGINE[0] = "uvloop"


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
        **{"engine": ENGINE[0], **options},
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


async def test_drain_closes_remaining_connections(
    redis_pair: tuple[Peer, Peer], start: Starter
) -> None:
    svc, port = await start([redis_pair[0].address])
    client = await Resp.connect(port)
    assert await client.command(b"PING") == "PONG"
    svc.stop_accepting()
    assert await client.command(b"PING") == "PONG", "stop_accepting keeps open connections"
    cut = await svc.drain(0.1)
    assert (cut.connections, cut.requests) == (1, 0), "the open connection was cut"
    assert svc.client_connections == 0
    assert await read_to_eof(client.reader) == b""
    await client.close()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(HOST, port)


async def test_a_second_drain_with_no_time_left_cuts_at_once(
    redis_pair: tuple[Peer, Peer], start: Starter
) -> None:
    """A second stop signal: the drain waiting for a busy connection ends now."""
    svc, port = await start([redis_pair[0].address])
    client = await Resp.connect(port)
    assert await client.command(b"PING") == "PONG"
    first = asyncio.ensure_future(svc.drain(600))
    await asyncio.sleep(0)
    assert not first.done()
    second = await asyncio.wait_for(svc.drain(0), STEP)
    first_cut = await asyncio.wait_for(first, STEP)
    assert (second.connections + first_cut.connections, second.requests) == (1, 0)
    assert await read_to_eof(client.reader) == b""
    await client.close()


async def test_two_drains_at_their_deadline_cut_a_connection_once(
    redis_pair: tuple[Peer, Peer], start: Starter
) -> None:
    """The stop's own drain and the cut that follows it both reach their deadline before the
    aborted connection is gone: the connection was counted as cut twice."""
    svc, port = await start([redis_pair[0].address])
    client = await Resp.connect(port)
    assert await client.command(b"PING") == "PONG"
    first = asyncio.ensure_future(svc.drain(0))
    second = asyncio.ensure_future(svc.drain(0))
    cuts = await asyncio.wait_for(asyncio.gather(first, second), STEP)
    assert sum(cut.connections for cut in cuts) == 1
    assert await read_to_eof(client.reader) == b""
    await client.close()


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


async def test_failover_and_no_backend_are_counted(start: Starter) -> None:
    svc, port = await start([f"{HOST}:{free_port()}", f"{HOST}:{free_port()}"])
    reader, writer = await asyncio.open_connection(HOST, port)
    assert await read_to_eof(reader) == b""
    writer.close()
    await wait_for_count(svc, 0)
    assert svc.retries == 1  # the second backend was tried after the first refused
    assert svc.not_available == 1


async def eventually(predicate: Callable[[], bool], what: str) -> None:
    """Poll a condition reached through real I/O, failing after STEP seconds."""
    try:
        async with asyncio.timeout(STEP):
            while not predicate():  # noqa: ASYNC110 - state of the relay, no event to wait on
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def only_conn(svc: TcpService) -> Any:
    """The service's one relayed connection (its client side)."""
    assert len(svc.conns) == 1, svc
    return next(iter(svc.conns))


# -- resets and closes are passed on as they came


async def test_backend_reset_reaches_the_client_as_a_reset(start: Starter) -> None:
    async def reply_then_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        writer.write(b"world")
        await writer.drain()
        await reader.readexactly(3)  # the client has the reply: nothing unread is lost
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    backend = await asyncio.start_server(reply_then_reset, HOST, 0)
    _, port = await start([f"{HOST}:{backend.sockets[0].getsockname()[1]}"])
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(b"hello")
    assert await asyncio.wait_for(reader.readexactly(5), STEP) == b"world"
    writer.write(b"bye")
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), STEP)
    writer.close()
    backend.close()


async def test_backend_close_reaches_the_client_as_an_orderly_eof(start: Starter) -> None:
    async def reply_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        writer.write(b"world")
        await writer.drain()
        writer.close()

    backend = await asyncio.start_server(reply_then_close, HOST, 0)
    svc, port = await start([f"{HOST}:{backend.sockets[0].getsockname()[1]}"])
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(b"hello")
    # An orderly EOF: read() returns what was sent and then b"", it does not raise.
    assert await asyncio.wait_for(reader.read(), STEP) == b"world"
    writer.close()
    await wait_for_count(svc, 0)
    backend.close()


# -- idle timeout


async def test_one_way_stream_is_not_idle_and_a_quiet_one_is_closed(start: Starter) -> None:
    """Bytes flowing only from the backend keep a connection open however long the client
    is quiet; once both ways are quiet for `idle_timeout`, the sweep closes it."""
    ticks: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def ticker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (tick := await ticks.get()) is not None:
            writer.write(tick)
            await writer.drain()
        await reader.read()
        writer.close()

    backend = await asyncio.start_server(ticker, HOST, 0)
    svc, port = await start([f"{HOST}:{backend.sockets[0].getsockname()[1]}"], idle_timeout=1.0)
    reader, writer = await asyncio.open_connection(HOST, port)
    sent = 0

    async def tick() -> None:
        nonlocal sent
        line = b"tick %d\n" % sent
        sent += 1
        await ticks.put(line)
        assert await asyncio.wait_for(reader.readline(), STEP) == line

    await tick()
    conn = only_conn(svc)
    # The client never writes. Keep the backend talking until the kernel says the client
    # side has been quiet for longer than the idle timeout (the periodic sweep runs all along).
    async with asyncio.timeout(STEP):
        while tcpinfo.quiet_ms(conn.transport) < 1000:
            await tick()
            await asyncio.sleep(0.05)
    await tick()
    assert svc.sweep_idle() == 0, "a connection with bytes flowing one way is not idle"
    assert conn in svc.conns
    await tick()
    # Now quiet both ways: the periodic sweep closes it, in order.
    assert await asyncio.wait_for(reader.read(), STEP) == b""
    await wait_for_count(svc, 0)
    await ticks.put(None)
    writer.close()
    backend.close()


async def test_tcp_service_without_idle_timeout_closes_after_the_default_hour(
    redis_pair: tuple[Peer, Peer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default reaches the relay: a tcp service whose file sets no idle_timeout closes a
    connection quiet both ways for an hour (the kernel's quiet times are made to say so)."""
    path = tmp_path / "tcp.toml"
    path.write_text(
        f'[services.redis]\nlisten = "127.0.0.1:0"\nmode = "tcp"\nengine = "{ENGINE[0]}"\n'
        f'backends = ["{redis_pair[0].address}"]\n'
    )
    config = load_config(str(path)).services[0]
    svc = TcpService(config, BackendPool(config))
    assert svc.idle_timeout == 3600
    _, port = await svc.start()
    client = await Resp.connect(port)
    try:
        assert await client.command(b"PING") == "PONG"
        monkeypatch.setattr(tcp_service, "quiet_ms", lambda transport: 3600 * 1000 - 1)
        assert svc.sweep_idle() == 0
        assert await client.command(b"PING") == "PONG"
        monkeypatch.setattr(tcp_service, "quiet_ms", lambda transport: 3600 * 1000)
        assert svc.sweep_idle() == 1
        assert await asyncio.wait_for(client.reader.read(), STEP) == b""
    finally:
        await client.close()
        await svc.drain(2.0)


# -- flow control and the connect


async def test_a_backend_that_does_not_read_pauses_the_client(start: Starter, engine: str) -> None:
    """Client -> backend flow control: what the relay holds stays bounded while the client
    sends far more than the backend takes, and nothing is lost once the backend reads.
    (The io_uring engine holds one buffer per direction: its client is held back too.)"""
    total = 32 * 1024 * 1024
    payload = os.urandom(1024 * 1024) * (total // (1024 * 1024))
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
        asyncio.get_running_loop().create_future()
    )
    done = asyncio.Event()

    async def stalled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cast(asyncio.Transport, writer.transport).pause_reading()
        accepted.set_result((reader, writer))
        await done.wait()
        writer.close()

    backend = await asyncio.start_server(stalled, HOST, 0, limit=total * 2)
    svc, port = await start([f"{HOST}:{backend.sockets[0].getsockname()[1]}"])
    _reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(payload)
    backend_reader, backend_writer = await asyncio.wait_for(accepted, STEP)
    await eventually(lambda: len(svc.conns) == 1 and only_conn(svc).upstream is not None, "relay")
    conn = only_conn(svc)
    bound = 1024 * 1024

    def relay_buffered() -> int:
        return int(conn.upstream.transport.get_write_buffer_size())

    if engine == "io_uring":
        await eventually(
            lambda: writer.transport.get_write_buffer_size() > 0, "the client to be held back"
        )
        assert conn.pair is not None
    else:
        await eventually(
            lambda: (
                (conn.upstream_full and not conn.transport.is_reading()) or relay_buffered() > bound
            ),
            "the relay to pause reading from the client",
        )
    assert relay_buffered() <= bound, f"relay holds {relay_buffered()} bytes for the backend"
    assert not conn.transport.is_reading()
    assert writer.transport.get_write_buffer_size() > 0, "the client is held back"
    cast(asyncio.Transport, backend_writer.transport).resume_reading()
    got = await asyncio.wait_for(backend_reader.readexactly(total), STEP)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    done.set()
    writer.close()
    backend.close()


@contextmanager
def accept_queue_full() -> Iterator[socket.socket]:
    """A listening socket whose accept queue is full: connects to it hang (SYNs dropped)."""
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname())  # the queue's only place
    try:
        yield listener
    finally:
        filler.close()
        listener.close()


async def test_connect_timeout_ejects_and_the_next_backend_serves(
    redis_pair: tuple[Peer, Peer], start: Starter
) -> None:
    live = redis_pair[0]
    with accept_queue_full() as never:
        never_port = never.getsockname()[1]
        svc, port = await start([f"{HOST}:{never_port}", live.address], connect_timeout=0.3)
        reader, writer = await asyncio.open_connection(HOST, port)
        client = Resp(reader, writer)
        writer.write(Resp.encode(b"SET", b"k", b"v") + Resp.encode(b"GET", b"k"))
        async with asyncio.timeout(STEP):
            assert await client.reply() == "OK"
            assert await client.reply() == b"v"
        await client.close()
    hung, serving = svc.pool.backends
    assert hung.connect_failures == 1
    assert hung.state == DOWN
    assert "connect timeout" in hung.last_reason
    assert serving.total_connections == 1
    assert svc.retries == 1


async def test_connect_buffer_holds_early_bytes_then_pauses_the_client(start: Starter) -> None:
    """Bytes sent before the backend accepted are held up to `connect_buffer`; beyond it the
    client is not read (not dropped), and everything arrives once the backend accepts."""
    loop = asyncio.get_running_loop()
    payload = os.urandom(1024 * 1024)
    buffer = 64 * 1024
    with accept_queue_full() as slow:
        slow.setblocking(False)
        slow_port = slow.getsockname()[1]
        svc, port = await start([f"{HOST}:{slow_port}"], connect_buffer=buffer, connect_timeout=30)
        _reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(payload)
        await eventually(lambda: len(svc.conns) == 1, "the client to be accepted")
        conn = only_conn(svc)
        await eventually(
            lambda: conn.held is None or len(conn.held) >= buffer, "the connect buffer to fill"
        )
        assert conn.upstream is None, "the backend has not accepted yet"
        assert buffer <= len(conn.held) < buffer + 512 * 1024
        assert not conn.transport.is_reading(), "a full connect buffer pauses the client"
        assert not conn.closed
        assert conn in svc.conns
        # Make room in the backend's accept queue: the relay's connect goes through.
        filler_end, _ = await loop.sock_accept(slow)
        filler_end.close()
        backend_end, _ = await asyncio.wait_for(loop.sock_accept(slow), STEP)
        with backend_end:
            got = bytearray()
            async with asyncio.timeout(STEP):
                while len(got) < len(payload):
                    chunk = await loop.sock_recv(backend_end, 1024 * 1024)
                    assert chunk, "the relay closed before delivering everything"
                    got += chunk
            assert bytes(got) == payload
        writer.close()
        await wait_for_count(svc, 0)


# -- a backend that is the balancer itself


async def watch_until_closed(svc: TcpService, reader: asyncio.StreamReader, most: int = 2) -> bytes:
    """Read to EOF while checking the service never holds more than `most` connections."""
    reading = asyncio.ensure_future(read_to_eof(reader))
    try:
        async with asyncio.timeout(STEP):
            while not reading.done():
                assert len(svc.conns) <= most, f"connection chain: {svc}"
                await asyncio.sleep(0.002)
    finally:
        reading.cancel()
    return reading.result()


async def test_backend_that_is_its_own_listener_is_a_loop(start: Starter) -> None:
    svc, port = await start([])
    itself = svc.pool.add(BackendConfig(HOST, port))  # the port is known once bound
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(b"PING\r\n")
    assert await watch_until_closed(svc, reader) == b""
    writer.close()
    await wait_for_count(svc, 0)
    assert itself.looped
    assert itself.state == DOWN
    assert itself.connect_failures == 0, "a loop is not a connect failure"
    assert svc.not_available == 1
    assert loopguard.open_count() == 0
    assert loopguard.open_count() == 0
    # It stays out: the next client is not sent into the loop again.
    reader, writer = await asyncio.open_connection(HOST, port)
    assert await watch_until_closed(svc, reader) == b""
    writer.close()
    assert itself.total_connections == 0


async def test_loop_backend_is_skipped_and_the_client_served_elsewhere(
    redis_pair: tuple[Peer, Peer], start: Starter
) -> None:
    live = redis_pair[0]
    svc, port = await start([live.address])
    itself = svc.pool.add(BackendConfig(HOST, port))
    for _ in range(4):  # round robin sends one of the first two into the loop
        client = await Resp.connect(port)
        assert await client.command(b"PING") == "PONG"
        assert await client.server_port() == live.port
        await client.close()
    assert itself.looped
    assert itself.total_connections == 0
    assert svc.pool.backends[0].total_connections == 4
    assert svc.not_available == 0
    await wait_for_count(svc, 0)
    assert loopguard.open_count() == 0


def outgoing(local: Any, remote: Any, owner: loopguard.Owner) -> loopguard.Registration:
    """Enter a socket as one of the balancer's own backend connections."""
    return loopguard.Registration(local, remote, owner, SimpleNamespace(loop_suspect=False))


async def test_connection_from_our_own_backend_connection_is_cut_at_accept(
    redis_pair: tuple[Peer, Peer], start: Starter
) -> None:
    """A connection whose source is one of our backend connections (a loop no address
    comparison sees, e.g. through a port forward) is closed at accept, before it connects
    anywhere, and the backend that connection was for is marked a loop."""
    loop = asyncio.get_running_loop()
    svc, port = await start([redis_pair[0].address])
    other = make_service([f"{HOST}:{free_port()}"])
    victim = other.pool.backends[0]
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        sock.setblocking(False)
        registration = outgoing(sock.getsockname(), (HOST, port), (other.pool, victim))
        try:
            await loop.sock_connect(sock, (HOST, port))
            assert await asyncio.wait_for(loop.sock_recv(sock, 100), STEP) == b""
        finally:
            registration.release()
    assert victim.looped
    assert victim.state == DOWN
    assert svc.loops == 1
    assert svc.pool.backends[0].total_connections == 0, "the loop went no further"
    assert svc.client_connections == 0


async def test_client_sharing_a_port_with_a_backend_connection_is_served(
    redis_pair: tuple[Peer, Peer], start: Starter
) -> None:
    """Linux gives one local port to connections towards different destinations: a client
    with the address of one of our backend connections is not a loop."""
    loop = asyncio.get_running_loop()
    live = redis_pair[1]
    svc, port = await start([redis_pair[0].address])
    other = make_service([live.address])
    victim = other.pool.backends[0]
    ours = socket.socket()
    theirs = socket.socket()
    registration: loopguard.Registration | None = None
    try:
        for sock in (ours, theirs):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setblocking(False)
        ours.bind((HOST, 0))
        shared = ours.getsockname()
        theirs.bind(shared)
        await loop.sock_connect(ours, (HOST, live.port))
        registration = outgoing(shared, (HOST, live.port), (other.pool, victim))
        await loop.sock_connect(theirs, (HOST, port))
        assert loopguard.owner(theirs.getsockname()) is not None, "the suspect case"
        reader, writer = await asyncio.open_connection(sock=theirs)
        client = Resp(reader, writer)
        assert await client.command(b"PING") == "PONG"
        await client.close()
    finally:
        if registration is not None:
            registration.release()
        ours.close()
        theirs.close()
    assert not victim.looped
    assert svc.loops == 0
    assert svc.pool.backends[0].total_connections == 1


# -- the balancer's own shortages


@contextmanager
def descriptors_left(count: int) -> Iterator[None]:
    """Only `count` free file descriptors in this process until the block ends."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 32, hard))
        while True:
            try:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as exc:
                if exc.errno != errno.EMFILE:
                    raise
                break
        for _ in range(count):
            os.close(fillers.pop())
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_out_of_descriptors_on_connect_is_not_blamed_on_the_backends(
    redis_pair: tuple[Peer, Peer], start: Starter, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, port = await start([p.address for p in redis_pair])
    before = resources.ALARM.counts["file_descriptors"]
    # The process runs out of descriptors between the accept and the backend connect (with
    # none left at the accept itself, asyncio's accept loop would pause the listener).
    original = relay.ClientSide._connect
    exhausted = ExitStack()

    async def connect_out_of_descriptors(self: Any) -> None:
        exhausted.enter_context(descriptors_left(0))
        await original(self)

    monkeypatch.setattr(relay.ClientSide, "_connect", connect_out_of_descriptors)
    with exhausted:
        reader, writer = await asyncio.open_connection(HOST, port)
        assert await read_to_eof(reader) == b""
    monkeypatch.undo()
    writer.close()
    await wait_for_count(svc, 0)
    assert resources.ALARM.counts["file_descriptors"] == before + 1
    assert svc.not_available == 1
    assert svc.retries == 0, "no other backend is tried for a shortage of ours"
    for backend in svc.pool:
        assert backend.state == UP
        failures = (backend.connect_failures, backend.failures, backend.consecutive_failures)
        assert failures == (0, 0, 0)
        assert backend.active_connections == 0
        assert backend.in_flight == 0
    client = await Resp.connect(port)
    assert await client.command(b"PING") == "PONG"
    await client.close()


async def test_descriptor_budget_refuses_clients_beyond_it(
    redis_pair: tuple[Peer, Peer], start: Starter, monkeypatch: pytest.MonkeyPatch, engine: str
) -> None:
    # 2 relayed connections: 2 descriptors each (3 with io_uring: the ring's duplicate)
    per = 3 if engine == "io_uring" else 2
    budget = resources.FdBudget(limit=36 + 2 * per, reserve=36)
    monkeypatch.setattr(resources, "FDS", budget)
    svc, port = await start([redis_pair[0].address])
    a = await Resp.connect(port)
    b = await Resp.connect(port)
    assert await a.command(b"PING") == "PONG"
    assert await b.command(b"PING") == "PONG"
    assert budget.clients == 2 * per
    reader, writer = await asyncio.open_connection(HOST, port)
    assert await read_to_eof(reader) == b""
    writer.close()
    assert svc.refused == 1
    assert budget.refused == 1
    assert svc.pool.backends[0].total_connections == 2, "the refused one took no backend socket"
    await a.close()
    await wait_for_count(svc, 1)
    c = await Resp.connect(port)
    assert await c.command(b"PING") == "PONG"
    await b.close()
    await c.close()
    await wait_for_count(svc, 0)
    assert budget.clients == 0
