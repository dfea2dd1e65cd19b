"""Tcp and message services side by side in one `balancer serve` process, with real redis."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.peers import HOST, Peer, Resp, free_port, need, redis_server, wait_connectable
from tests.support import (
    PYTHON,
    BalancerProc,
    LineClient,
    backend_rows,
    ready_balancer,
    reply_for,
    start_balancer,
    start_service,
    wait_until,
)

pytestmark = [pytest.mark.peers, pytest.mark.e2e]


@pytest.fixture(params=["uvloop", "io_uring"])
def engine(request: pytest.FixtureRequest) -> str:
    """Each test runs with both relay engines."""
    return str(request.param)


@pytest.fixture
def redis_pair() -> Iterator[tuple[Peer, Peer]]:
    with redis_server() as a, redis_server() as b:
        yield a, b


def test_tcp_and_message_services_run_side_by_side(
    engine: str, tmp_path: Path, redis_pair: tuple[Peer, Peer]
) -> None:
    numbers = start_service()
    cfg = tmp_path / "both.toml"
    cfg.write_text(
        f"""
[services.redis]
listen = "127.0.0.1:0"
mode = "tcp"
engine = "{engine}"
algorithm = "round_robin"
backends = ["{redis_pair[0].address}", "{redis_pair[1].address}"]
[services.redis.health]
interval = 0.5

[services.numbers]
listen = "127.0.0.1:0"
backends = ["127.0.0.1:{numbers.port}"]
"""
    )
    bal = start_balancer(cfg)
    try:
        redis_port = bal.ports["redis"]

        sent = received = 0

        async def redis_work() -> None:
            nonlocal sent, received
            clients = [await Resp.connect(redis_port) for _ in range(4)]
            for i in range(200):
                value = os.urandom(1 + (i * 37) % 5000)
                c = clients[i % 4]
                assert await c.command(b"SET", b"k%d" % i, value) == "OK"
                assert await c.command(b"GET", b"k%d" % i) == value
                sent += len(
                    Resp.encode(b"SET", b"k%d" % i, value) + Resp.encode(b"GET", b"k%d" % i)
                )
                received += len(b"+OK\r\n" + b"$%d\r\n%s\r\n" % (len(value), value))
            for c in clients:
                c.writer.close()
                await c.writer.wait_closed()

        asyncio.run(redis_work())
        line = LineClient(bal.ports["numbers"])
        assert line.request("12") == reply_for(12)

        status = bal.status()["services"]
        assert status["redis"]["mode"] == "tcp"
        tcp_backends = status["redis"]["backends"]
        assert [b["state"] for b in tcp_backends] == ["up", "up"]
        # round robin per connection: 4 connections, 2 each
        assert [b["total_connections"] for b in tcp_backends] == [2, 2]
        assert [b["requests"] for b in tcp_backends] == [2, 2]
        # Counted by the kernel (TCP_INFO), exactly what crossed the relay each way.
        assert sum(b["bytes_in"] for b in tcp_backends) == sent
        assert sum(b["bytes_out"] for b in tcp_backends) == received
        assert status["numbers"]["backends"][0]["requests"] == 1
        metrics = bal.metrics()
        assert 'balancer_backend_bytes_sent_total{backend="127.0.0.1:' in metrics
        assert 'balancer_client_connections{service="redis"}' in metrics
        # Numeric listen addresses are bound without the resolver, whose thread pool would
        # otherwise make every system call of the relay pay for a multi-threaded process.
        assert os.listdir(f"/proc/{bal.popen.pid}/task") == [str(bal.popen.pid)]
    finally:
        assert bal.stop() == 0
        numbers.stop()


@contextmanager
def redis_on(port: int) -> Iterator[subprocess.Popen[bytes]]:
    """redis-server on a port chosen by the test (a backend that comes up later)."""
    args = [need("redis-server"), "--bind", HOST, "--port", str(port), "--save", "",
            "--appendonly", "no", "--protected-mode", "no", "--loglevel", "warning"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_connectable(port, proc, "redis-server")
        yield proc
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def served_by(port: int, connections: int) -> list[int]:
    """The redis port that served each of `connections` new connections through `port`."""

    async def ask() -> list[int]:
        ports = []
        for _ in range(connections):
            client = await Resp.connect(port)
            assert await client.command(b"PING") == "PONG"
            ports.append(await client.server_port())
            await client.close()
        return ports

    return asyncio.run(ask())


def test_tcp_backend_down_at_start_is_skipped_then_found_by_connect_checks(
    engine: str, tmp_path: Path, redis_pair: tuple[Peer, Peer]
) -> None:
    alive = redis_pair[0]
    later = free_port()  # nothing listens there yet
    cfg = tmp_path / "tcp.toml"
    cfg.write_text(
        f"""
[services.redis]
listen = "127.0.0.1:0"
mode = "tcp"
engine = "{engine}"
backends = ["{alive.address}", "127.0.0.1:{later}"]
[services.redis.health]
interval = 0.2
rise = 2
"""
    )
    bal = start_balancer(cfg)
    try:
        rows = backend_rows(bal.status(), "redis")
        assert rows[f"127.0.0.1:{later}"]["state"] == "down"
        assert served_by(bal.port, 4) == [alive.port] * 4, "the down backend is skipped"
        with redis_on(later):
            # A plain connect check (no `send` in a tcp service) finds it up after `rise`.
            wait_until(
                lambda: backend_rows(bal.status(), "redis")[f"127.0.0.1:{later}"]["state"] == "up",
                what="the backend that came up to be found by the connect checks",
            )
            ports = served_by(bal.port, 6)
            assert ports.count(later) == 3, ports  # round robin per connection
            rows = backend_rows(bal.status(), "redis")
            assert rows[f"127.0.0.1:{later}"]["total_connections"] == 3
    finally:
        assert bal.stop() == 0


def test_refused_connections_in_status_and_metrics(
    engine: str, tmp_path: Path, redis_pair: tuple[Peer, Peer]
) -> None:
    cfg = tmp_path / "tcp.toml"
    cfg.write_text(
        f"""
[services.redis]
listen = "127.0.0.1:0"
mode = "tcp"
engine = "{engine}"
max_connections = 1
backends = ["{redis_pair[0].address}"]
"""
    )
    bal = start_balancer(cfg)
    try:

        async def one_over_the_limit() -> None:
            held = await Resp.connect(bal.port)
            assert await held.command(b"PING") == "PONG"
            reader, writer = await asyncio.open_connection(HOST, bal.port)
            try:
                assert await asyncio.wait_for(reader.read(), 30) == b""
            except ConnectionResetError:
                pass  # closed before it read anything: a reset is fine too
            writer.close()
            assert await held.command(b"PING") == "PONG", "the admitted one is unaffected"
            await held.close()

        asyncio.run(one_over_the_limit())
        assert bal.status()["services"]["redis"]["refused"] == 1
        assert 'balancer_refused_connections_total{service="redis"} 1.0' in bal.metrics()
    finally:
        assert bal.stop() == 0


NOFILE = 128
SET_NOFILE = (
    "import resource, runpy, sys; "
    f"resource.setrlimit(resource.RLIMIT_NOFILE, ({NOFILE}, {NOFILE})); "
    "sys.argv[0] = 'balancer'; runpy.run_module('balancer', run_name='__main__')"
)


def start_with_nofile_limit(config: Path) -> BalancerProc:
    """`balancer serve CONFIG` in a child whose RLIMIT_NOFILE is NOFILE (soft and hard)."""
    return ready_balancer(
        [PYTHON, "-c", SET_NOFILE, "serve", str(config), "--admin", "127.0.0.1:0"]
    )


def test_more_clients_than_descriptors_are_refused_and_the_backend_stays_up(
    engine: str, tmp_path: Path, redis_pair: tuple[Peer, Peer]
) -> None:
    """`ulimit -n 128` and 200 clients at once: the balancer refuses those beyond its
    descriptor budget, serves the others, keeps its backend up and its admin answering."""
    redis = redis_pair[0]
    cfg = tmp_path / "tcp.toml"
    cfg.write_text(
        f"""
[services.redis]
listen = "127.0.0.1:0"
mode = "tcp"
engine = "{engine}"
backends = ["{redis.address}"]
[services.redis.health]
interval = 0.5
"""
    )
    bal = start_with_nofile_limit(cfg)
    clients = 200
    served: list[socket.socket] = []
    refused = 0
    try:
        for _ in range(clients):
            sock = socket.create_connection((HOST, bal.port), timeout=30)
            try:
                sock.sendall(b"PING\r\n")
                reply = sock.recv(100)
            except ConnectionResetError:
                reply = b""
            if reply == b"+PONG\r\n":
                served.append(sock)
            else:
                assert reply == b"", reply
                refused += 1
                sock.close()
        status = bal.status()  # the admin endpoint answers with every admitted client open
        service = status["services"]["redis"]
        assert refused == clients - len(served)
        assert len(served) >= 16, "clients within the budget are served"
        assert len(served) <= NOFILE // 2, "each relayed connection takes two descriptors"
        assert service["refused"] == refused
        assert service["not_available"] == 0, "no admitted client went without its backend"
        assert service["client_connections"] == len(served)
        backend = service["backends"][0]
        assert backend["state"] == "up"
        assert backend["connect_failures"] == 0
        for sock in served:  # every admitted connection still works
            sock.sendall(b"PING\r\n")
            assert sock.recv(100) == b"+PONG\r\n"
        assert "is DOWN" not in bal.output()
        assert "Too many open files" not in bal.output()
    finally:
        for sock in served:
            sock.close()
        assert bal.stop() == 0
