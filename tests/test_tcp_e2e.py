"""Tcp and message services side by side in one `balancer serve` process, with real redis."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import Peer, Resp, redis_server
from tests.support import LineClient, reply_for, start_balancer, start_service

pytestmark = [pytest.mark.peers, pytest.mark.e2e]


@pytest.fixture
def redis_pair() -> Iterator[tuple[Peer, Peer]]:
    with redis_server() as a, redis_server() as b:
        yield a, b


def test_tcp_and_message_services_run_side_by_side(
    tmp_path: Path, redis_pair: tuple[Peer, Peer]
) -> None:
    numbers = start_service()
    cfg = tmp_path / "both.toml"
    cfg.write_text(
        f"""
[services.redis]
listen = "127.0.0.1:0"
mode = "tcp"
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


def test_tcp_backend_down_at_start_is_skipped_and_detected_by_connect_checks(
    tmp_path: Path, redis_pair: tuple[Peer, Peer]
) -> None:
    alive, dead = redis_pair
    dead.kill()
    cfg = tmp_path / "tcp.toml"
    cfg.write_text(
        f"""
[services.redis]
listen = "127.0.0.1:0"
mode = "tcp"
backends = ["{alive.address}", "{dead.address}"]
"""
    )
    bal = start_balancer(cfg)
    try:
        states = [b["state"] for b in bal.status()["services"]["redis"]["backends"]]
        assert states == ["up", "down"]

        async def ping_many() -> None:
            for _ in range(6):
                c = await Resp.connect(bal.port)
                assert await c.command(b"PING") == "PONG"
                c.writer.close()
                await c.writer.wait_closed()

        asyncio.run(ping_many())
    finally:
        bal.stop()
