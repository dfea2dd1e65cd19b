"""Protocol tier: the message-mode proxy fed raw bytes through fake transports, no sockets."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from balancer.config import BackendConfig, HealthConfig, ServiceConfig
from balancer.metrics import LatencyHistogram
from balancer.pool import Backend, BackendPool
from balancer.proxy.message import (
    BackendChannel,
    BackendConnection,
    ClientSession,
    MessageService,
)


class FakeTransport(asyncio.Transport):
    def __init__(self, peer: tuple[str, int] = ("127.0.0.1", 5555)) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed = False
        self.aborted = False
        self.paused = False
        self.peer = peer
        self.protocol: asyncio.BaseProtocol | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self.peer
        return default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "write after close"
        self.written.append(bytes(data))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if isinstance(self.protocol, asyncio.Protocol):
                asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.aborted = True
        if not self.closed:
            self.closed = True
            if isinstance(self.protocol, asyncio.Protocol):
                asyncio.get_running_loop().call_soon(
                    self.protocol.connection_lost, ConnectionResetError("aborted")
                )

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def data(self) -> bytes:
        return b"".join(self.written)


def make_service(n_backends: int = 2, **kw: Any) -> tuple[MessageService, dict[int, list[Any]]]:
    kw.setdefault("backend_connections", 1)
    cfg = ServiceConfig(
        name="t",
        listen_host="127.0.0.1",
        listen_port=0,
        backends=tuple(BackendConfig("127.0.0.1", 9000 + i) for i in range(n_backends)),
        health=HealthConfig(enabled=False),
        **kw,
    )
    pool = BackendPool(cfg)
    service = MessageService(cfg, pool, histogram=LatencyHistogram())
    opened: dict[int, list[Any]] = {b.port: [] for b in pool}

    def fake_open(self: BackendChannel) -> BackendConnection:
        conn = BackendConnection(self)
        self.connections.append(conn)
        t = FakeTransport()
        t.protocol = conn
        conn.connection_made(t)
        opened[self.backend.port].append((conn, t))
        return conn

    BackendChannel._open = fake_open  # type: ignore[method-assign]
    return service, opened


@pytest.fixture(autouse=True)
def _restore_open() -> Any:
    original = BackendChannel._open
    yield
    BackendChannel._open = original  # type: ignore[method-assign]


async def turn() -> None:
    """Let the loop run the end-of-turn flush."""
    await asyncio.sleep(0)


def client(service: MessageService) -> tuple[ClientSession, FakeTransport]:
    s = ClientSession(service)
    t = FakeTransport()
    t.protocol = s
    s.connection_made(t)
    return s, t


async def test_replies_are_written_in_request_order_even_when_backends_answer_out_of_order() -> (
    None
):
    service, opened = make_service(2)
    s, t = client(service)
    s.data_received(b"1\n2\n3\n4\n")
    await turn()
    (c0, t0), (c1, t1) = opened[9000][0], opened[9001][0]
    assert t0.data() == b"1\n3\n"
    assert t1.data() == b"2\n4\n"
    c1.data_received(b"two\nfour\n")
    await turn()
    assert t.data() == b""  # waiting for request 1
    c0.data_received(b"one\n")
    await turn()
    assert t.data() == b"one\ntwo\n"
    c0.data_received(b"three\n")
    await turn()
    assert t.data() == b"one\ntwo\nthree\nfour\n"
    backends = list(service.pool)
    assert [b.requests for b in backends] == [2, 2]
    assert [b.in_flight for b in backends] == [0, 0]


async def test_a_failing_backend_s_requests_are_re_sent_elsewhere_and_it_is_marked_down() -> None:
    service, opened = make_service(2)
    s, t = client(service)
    s.data_received(b"1\n2\n3\n")
    await turn()
    (_c0, t0), (c1, t1) = opened[9000][0], opened[9001][0]
    t0.abort()
    await turn()
    await turn()
    b0, _b1 = service.pool.backends
    assert b0.state == "down"
    assert b0.failures == 2
    # requests 1 and 3 now ride on the other backend, after request 2
    assert t1.data() == b"2\n1\n3\n"
    c1.data_received(b"two\none\nthree\n")
    await turn()
    assert t.data() == b"one\ntwo\nthree\n"
    assert service.retries == 2


async def test_retries_are_bounded_then_server_not_available() -> None:
    service, opened = make_service(3, retries=1)
    s, t = client(service)
    s.data_received(b"1\n")
    await turn()
    _c0, t0 = opened[9000][0]
    t0.abort()
    await turn()
    await turn()
    second = [conns[0] for port, conns in opened.items() if port != 9000 and conns]
    assert len(second) == 1
    _c1, t1 = second[0]
    assert t1.data() == b"1\n"
    t1.abort()
    await turn()
    await turn()
    # one retry allowed: the third backend is never asked
    assert sum(len(conns) for conns in opened.values()) == 2
    assert t.data() == b"Server not available\n"


async def test_no_backend_up_answers_and_keeps_the_connection() -> None:
    service, _ = make_service(1)
    service.pool.mark_down(service.pool.backends[0], "test")
    s, t = client(service)
    s.data_received(b"1\n2\n")
    await turn()
    assert t.data() == b"Server not available\nServer not available\n"
    assert not t.closed


async def test_with_no_backend_up_an_ejected_one_still_serves() -> None:
    """Outlier ejection outlasts a quick restart; if the others are down meanwhile, the
    ejected backend (no failing check against it) answers rather than nobody."""
    service, opened = make_service(2)
    ejected, checked_down = service.pool.backends
    assert service.pool.report_failure(ejected, "reset")
    service.pool.mark_down(checked_down, "3 failed check(s)")
    s, t = client(service)
    s.data_received(b"1\n")
    await turn()
    conn, backend_transport = opened[ejected.port][0]
    assert backend_transport.data() == b"1\n"
    conn.data_received(b"one\n")
    await turn()
    assert t.data() == b"one\n"
    assert service.not_available == 0
    assert ejected.state == "down", "serving as a fallback does not readmit it"


async def test_line_too_long_answers_earlier_requests_first_then_closes() -> None:
    service, opened = make_service(1, max_line=10)
    s, t = client(service)
    s.data_received(b"1\n" + b"9" * 20)
    await turn()
    assert t.data() == b""
    c0, _ = opened[9000][0]
    c0.data_received(b"one\n")
    await turn()
    assert t.data() == b"one\nError: line too long\n"
    assert t.closed


async def test_raw_client_is_detected_after_a_quiet_period() -> None:
    service, opened = make_service(1)
    s, t = client(service)
    s.data_received(b"12")
    await turn()
    await asyncio.sleep(0.15)
    c0, t0 = opened[9000][0]
    assert t0.data() == b"12\n"
    c0.data_received(b"twelve\n")
    await turn()
    assert t.data() == b"twelve"  # unterminated, as the raw client expects
    s.data_received(b"13")
    await turn()
    assert t0.data() == b"12\n13\n"


async def test_client_eof_gets_its_replies_then_close() -> None:
    service, opened = make_service(1)
    s, t = client(service)
    s.data_received(b"1\n")
    await turn()
    assert s.eof_received() is True
    await turn()
    assert not t.closed
    opened[9000][0][0].data_received(b"one\n")
    await turn()
    assert t.data() == b"one\n"
    assert t.closed


async def test_backend_sending_more_replies_than_requests_is_failed() -> None:
    service, opened = make_service(2)
    s, _t = client(service)
    s.data_received(b"1\n")
    await turn()
    c0, t0 = opened[9000][0]
    c0.data_received(b"one\nbogus\n")
    await turn()
    assert t0.aborted
    await asyncio.sleep(0)
    assert service.pool.backends[0].state == "down"


def test_backend_repr_and_pool_repr_explain_state() -> None:
    cfg = ServiceConfig(
        name="t",
        listen_host="127.0.0.1",
        listen_port=0,
        backends=(BackendConfig("h", 1), BackendConfig("h", 2)),
    )
    pool = BackendPool(cfg)
    pool.mark_down(pool.backends[0], "test")
    assert "2 backends: 1 up, 1 down" in repr(pool)
    assert isinstance(pool.backends[0], Backend)


async def test_busy_backend_gets_more_connections_up_to_the_limit() -> None:
    service, opened = make_service(1, backend_connections=3)
    s, _t = client(service)
    s.data_received(b"".join(b"%d\n" % i for i in range(40)))
    await turn()
    conns = opened[9000]
    assert len(conns) == 3
    assert sum(len(c.pending) for c, _ in conns) == 40
    assert min(len(c.pending) for c, _ in conns) >= 8


async def test_drain_answers_accepted_requests_then_closes_and_takes_no_more() -> None:
    service, opened = make_service(1)
    busy, t_busy = client(service)
    _idle, t_idle = client(service)
    busy.data_received(b"1\n2\n")
    await turn()
    drain = asyncio.ensure_future(service.drain(5.0))
    await turn()
    busy.data_received(b"3\n")  # arrives after the stop: not accepted
    await turn()
    conn, t_backend = opened[9000][0]
    assert t_backend.data() == b"1\n2\n"
    assert t_busy.paused
    conn.data_received(b"one\ntwo\n")
    await asyncio.wait_for(drain, 5)
    assert t_busy.data() == b"one\ntwo\n"
    assert t_busy.closed
    assert t_idle.closed
    assert t_idle.data() == b""
