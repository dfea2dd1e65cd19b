"""Message mode in process over real sockets on 127.0.0.1: what only real connections show."""

from __future__ import annotations

import asyncio

from balancer.config import BackendConfig, HealthConfig, ServiceConfig
from balancer.metrics import LatencyHistogram
from balancer.pool import BackendPool
from balancer.proxy.message import MessageService
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
