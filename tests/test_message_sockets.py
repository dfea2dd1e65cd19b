"""Message mode in process over real sockets on 127.0.0.1: what only real connections show."""

from __future__ import annotations

import asyncio
import socket

from balancer.config.model import BackendConfig, HealthConfig, ServiceConfig
from balancer.core.pool import BackendPool
from balancer.core.stats import LatencyHistogram
from balancer.proxy.message.service import MessageService
from tests.message_doubles import LineTagger, split_line_replies, tag
from tests.support import free_port


async def test_a_backend_that_is_the_balancer_itself_is_found_by_its_first_connection() -> None:
    """One request to a backend that was the balancer's own listener used to become 16,391
    in flight. The address is the listener's own on purpose: the run-time check must catch
    what no address comparison was asked to."""
    loop = asyncio.get_running_loop()
    tagger = await loop.create_server(LineTagger, "127.0.0.1", 0)
    tagger_port = tagger.sockets[0].getsockname()[1]
    port = free_port()
    cfg = ServiceConfig(
        name="loop",
        listen_host="127.0.0.1",
        listen_port=port,
        backends=(BackendConfig("127.0.0.1", port), BackendConfig("127.0.0.1", tagger_port)),
        health=HealthConfig(enabled=False),
    )
    pool = BackendPool(cfg)
    itself = pool.backends[0]
    service = MessageService(cfg, pool, histogram=LatencyHistogram())
    await service.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"1\n2\n3\n4\n")
            await writer.drain()
            async with asyncio.timeout(20):
                data = b""
                while data.count(b"\n") < 4:
                    chunk = await reader.read(65536)
                    assert chunk, f"closed after {data!r}"
                    data += chunk
                    assert itself.in_flight <= 4, "requests multiply through the loop"
        finally:
            writer.close()
        assert split_line_replies(data) == [tag(b"%d" % i) for i in range(1, 5)]
        assert itself.looped
        assert itself.state == "down"
        assert service.loops >= 1
        assert itself.in_flight == 0
        assert pool.fallback() is None, "never used again, not even as a last resort"
    finally:
        service.stop_accepting()
        service.close_backends()
        tagger.close()


async def test_a_backend_that_never_accepts_costs_its_request_nothing_but_connect_timeout() -> None:
    """A connect that hangs (the backend's accept queue is full: its SYNs are dropped) fails
    after `connect_timeout`; the backend is ejected and its request answered by the other."""
    loop = asyncio.get_running_loop()
    tagger = await loop.create_server(LineTagger, "127.0.0.1", 0)
    tagger_port = tagger.sockets[0].getsockname()[1]
    never = socket.socket()
    never.bind(("127.0.0.1", 0))
    never.listen(0)
    filler = socket.create_connection(never.getsockname())  # the accept queue's only place
    cfg = ServiceConfig(
        name="hang",
        listen_host="127.0.0.1",
        listen_port=0,
        backends=(
            BackendConfig("127.0.0.1", never.getsockname()[1]),
            BackendConfig("127.0.0.1", tagger_port),
        ),
        connect_timeout=0.3,
        health=HealthConfig(enabled=False),
    )
    pool = BackendPool(cfg)
    hung, live = pool.backends
    service = MessageService(cfg, pool, histogram=LatencyHistogram())
    _, port = await service.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"1\n")  # round robin: the first request goes to the hung backend
            async with asyncio.timeout(20):
                assert await reader.readline() == tag(b"1") + b"\n"
        finally:
            writer.close()
        assert hung.connect_failures == 1
        assert hung.state == "down"
        assert "connect timeout after 0.3s" in hung.last_reason
        assert live.requests == 1
        assert service.retries == 1
    finally:
        service.stop_accepting()
        service.close_backends()
        tagger.close()
        filler.close()
        never.close()
