"""Tcp mode's relay engines: which one a service runs, the fallback when io_uring cannot be
set up, and the ring's hand-back, on real sockets (127.0.0.1, port 0)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import pytest

from balancer import native
from balancer.config.errors import ConfigError
from balancer.config.model import BackendConfig, HealthConfig, ServiceConfig
from balancer.core.pool import BackendPool
from balancer.proxy.tcp import engine
from balancer.proxy.tcp.service import TcpService
from tests.peers import HOST

STEP = 30.0

_ring = pytest.mark.skipif(
    engine.unavailable() is not None, reason=f"io_uring: {engine.unavailable()}"
)


def needs_ring(test: Any) -> Any:
    """A test of the ring itself: compiled builds only (the pure Python tier leaves it
    out), and a kernel that allows io_uring (a skip, which ./scripts/test fails)."""
    return pytest.mark.compiled(_ring(test))


def forbid_io_uring(monkeypatch: pytest.MonkeyPatch) -> None:
    """io_uring_setup refused, as a seccomp filter does (EPERM)."""

    def refused(entries: int = engine.RING_ENTRIES) -> Any:
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(engine, "open_ring", refused)


def service(port: int, which: str) -> TcpService:
    config = ServiceConfig(
        name="echo",
        listen_host=HOST,
        listen_port=0,
        backends=(BackendConfig(HOST, port),),
        mode="tcp",
        health=HealthConfig(enabled=False),
        engine=which,
    )
    return TcpService(config, BackendPool(config))


@pytest.fixture
async def echo() -> AsyncIterator[int]:
    """An echo server: what it reads it writes back, its EOF after the client's."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, HOST, 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(payload)
    writer.write_eof()
    async with asyncio.timeout(STEP):
        got = await reader.read()
    writer.close()
    return got


def test_auto_falls_back_to_uvloop_when_io_uring_setup_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    forbid_io_uring(monkeypatch)
    name, words = engine.choose("redis", "auto")
    assert name == "uvloop"
    assert "io_uring_setup failed" in words, words
    assert "seccomp" in words, words


def test_io_uring_asked_for_by_name_and_refused_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    forbid_io_uring(monkeypatch)
    with pytest.raises(ConfigError) as caught:
        engine.choose("redis", "io_uring")
    message = str(caught.value)
    assert message.startswith("services.redis.engine: "), message
    assert "io_uring_setup failed" in message, message
    assert 'engine = "auto"' in message, message


def test_uvloop_asked_for_is_never_probed(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_io_uring(monkeypatch)
    assert engine.choose("redis", "uvloop") == ("uvloop", "uvloop (configured)")


def test_without_extensions_there_is_no_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.ENV_VAR, "1")
    why = engine.unavailable()
    assert why is not None
    assert native.ENV_VAR in why
    assert engine.choose("redis", "auto")[0] == "uvloop"


async def test_a_service_on_auto_relays_with_uvloop_when_io_uring_is_refused(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, echo: int
) -> None:
    forbid_io_uring(monkeypatch)
    svc = service(echo, "auto")
    with caplog.at_level(logging.INFO, logger="balancer"):
        _, port = await svc.start()
    try:
        assert svc.engine is None
        assert svc.engine_name == "uvloop"
        assert "service echo: tcp relay engine uvloop (auto: io_uring_setup failed" in caplog.text
        payload = os.urandom(300_000)
        assert await roundtrip(port, payload) == payload
    finally:
        await svc.drain(2.0)


async def test_a_service_asking_for_io_uring_where_it_is_refused_does_not_start(
    monkeypatch: pytest.MonkeyPatch, echo: int
) -> None:
    forbid_io_uring(monkeypatch)
    svc = service(echo, "io_uring")
    with pytest.raises(engine.EngineUnavailable):
        await svc.start()
    assert not svc.accepting


@needs_ring
async def test_the_ring_relays_and_hands_the_pair_back(
    caplog: pytest.LogCaptureFixture, echo: int
) -> None:
    svc = service(echo, "auto")
    with caplog.at_level(logging.INFO, logger="balancer"):
        _, port = await svc.start()
    try:
        assert svc.engine_name == "io_uring"
        assert svc.engine is not None
        assert "service echo: tcp relay engine io_uring (auto)" in caplog.text
        relayed = svc.engine.relayed
        payload = os.urandom(1024 * 1024 + 7)
        assert await roundtrip(port, payload) == payload
        assert svc.engine.relayed == relayed + 1
        async with asyncio.timeout(STEP):
            while svc.conns:  # noqa: ASYNC110 - the hand-back closes it on a later turn
                await asyncio.sleep(0.005)
        svc.account()
        backend = next(iter(svc.pool))
        # the kernel's counts, as with uvloop: both ways, the FINs not counted
        assert (backend.bytes_in, backend.bytes_out) == (len(payload), len(payload))
        assert backend.active_connections == 0
        assert backend.in_flight == 0
        assert svc.engine.ring.active == 0
    finally:
        await svc.drain(2.0)


@needs_ring
async def test_the_ring_counts_what_it_relays_while_open(echo: int) -> None:
    svc = service(echo, "io_uring")
    _, port = await svc.start()
    try:
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"x" * 1000)
        async with asyncio.timeout(STEP):
            assert await reader.readexactly(1000) == b"x" * 1000
        conn = next(iter(svc.conns))
        assert conn.pair is not None
        # bytes that came before the backend connected were read by the loop, not the ring
        client, backend = conn.pair.counts()
        assert backend == 1000
        writer.write(b"y" * 500)
        async with asyncio.timeout(STEP):
            assert await reader.readexactly(500) == b"y" * 500
        assert conn.pair.counts() == (client + 500, 1500)
        writer.close()
    finally:
        await svc.drain(2.0)


def pump(ring: Any, done: Callable[[], bool], finished: list[Any]) -> None:
    """Process the ring's completions until `done()` (bounded)."""
    for _ in range(2000):
        if done():
            return
        select.select([ring.fileno()], [], [], 0.01)
        finished += ring.reap()
    raise AssertionError("the ring made no progress")


@needs_ring
def test_a_ring_pair_of_socketpairs_passes_eof_and_reports_it() -> None:
    """The C engine alone: bytes held before the hand-over go first, an EOF is passed on as
    shutdown(SHUT_WR), and the pair is reported done with both byte counts."""
    ring = engine.open_ring(8)
    client_peer, client = socket.socketpair()
    backend, backend_peer = socket.socketpair()
    with client_peer, client, backend, backend_peer:
        for sock in (client, backend, backend_peer):
            sock.setblocking(False)
        slot = ring.add(client.fileno(), backend.fileno(), b"held ", False, "token")
        ring.flush()
        client_peer.sendall(b"hello")
        client_peer.shutdown(socket.SHUT_WR)
        got = bytearray()
        finished: list[tuple[Any, int, int, int, int]] = []

        def relayed() -> bool:
            try:
                while chunk := backend_peer.recv(100):
                    got.extend(chunk)
            except BlockingIOError:
                return False
            return True  # the EOF passed on

        pump(ring, relayed, finished)
        assert got == b"held hello"
        assert ring.counts(slot) == (5, 0)
        backend_peer.sendall(b"world")
        backend_peer.close()
        pump(ring, lambda: bool(finished), finished)
        assert finished == [("token", 0, 0, 5, 5)]
        client_peer.settimeout(STEP)
        assert client_peer.recv(100) == b"world"
        assert client_peer.recv(100) == b""
    ring.close()


@needs_ring
def test_more_completions_at_once_than_the_completion_queue_holds_are_all_reaped() -> None:
    """40 pairs ending at once post 80 completions to a ring whose completion queue holds
    64: those past it wait in the kernel, and every pair is still reported."""
    ring = engine.open_ring(8)
    pairs = []
    with ExitStack() as stack:
        for n in range(40):
            client_peer, client = socket.socketpair()
            backend, backend_peer = socket.socketpair()
            for sock in (client_peer, client, backend, backend_peer):
                stack.enter_context(sock)
            for sock in (client, backend):
                sock.setblocking(False)
            ring.add(client.fileno(), backend.fileno(), b"", False, n)
            pairs.append((client_peer, backend_peer))
        ring.flush()
        for client_peer, backend_peer in pairs:
            client_peer.shutdown(socket.SHUT_WR)
            backend_peer.shutdown(socket.SHUT_WR)
        finished: list[Any] = []
        pump(ring, lambda: len(finished) == 40, finished)
        assert sorted(token for token, *_ in finished) == list(range(40))
        assert all(reason == 0 for _, reason, *_ in finished)
    ring.close()


@dataclass
class Flow:
    """One pair's two outer ends in a test: what was sent in, what came out."""

    client_peer: socket.socket
    backend_peer: socket.socket
    sent: int = 0
    got: bytearray = field(default_factory=bytearray)


@needs_ring
def test_more_stalled_directions_than_pool_buffers_wait_and_lose_nothing() -> None:
    """300 pairs whose backends do not read hold more buffers than the pool has (256):
    the recvs past it wait for a buffer; once the backends read, every byte arrives."""
    ring = engine.open_ring(64)
    payload = os.urandom(512 * 1024)
    flows: list[Flow] = []
    with ExitStack() as stack:
        for n in range(300):
            client_peer, client = socket.socketpair()
            backend, backend_peer = socket.socketpair()
            for sock in (client_peer, client, backend, backend_peer):
                stack.enter_context(sock)
                sock.setblocking(False)
            ring.add(client.fileno(), backend.fileno(), b"", False, n)
            flows.append(Flow(client_peer, backend_peer))
        ring.flush()
        finished: list[Any] = []

        def step(reading: bool) -> bool:
            for flow in flows:
                if flow.sent < len(payload):
                    try:
                        flow.sent += flow.client_peer.send(payload[flow.sent : flow.sent + 65536])
                    except BlockingIOError:
                        pass
                    if flow.sent == len(payload):
                        flow.client_peer.shutdown(socket.SHUT_WR)
                if reading:
                    try:
                        while chunk := flow.backend_peer.recv(1 << 20):
                            flow.got += chunk
                    except BlockingIOError:
                        pass
            return all(len(flow.got) == len(payload) for flow in flows)

        for _ in range(50):  # the backends not reading: the pool runs out
            step(reading=False)
            select.select([ring.fileno()], [], [], 0.01)
            finished += ring.reap()
        assert ring.pooled
        assert ring.waits > 0, "the pool never ran out: the test proves nothing"
        pump(ring, lambda: step(reading=True), finished)
        assert all(bytes(flow.got) == payload for flow in flows)
    ring.close()
