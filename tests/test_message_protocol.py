"""Protocol tier: the message-mode proxy fed raw bytes through fake transports, no sockets."""

from __future__ import annotations

import asyncio

import pytest

from balancer.config import BackendConfig, OutlierConfig, ServiceConfig
from balancer.pool import BackendPool
from balancer.proxy import message
from balancer.proxy.message import NOT_AVAILABLE, QUEUE_FULL, QUEUE_TIMEOUT, STOPPING
from tests.message_doubles import client, make_service, settle, turn


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


async def test_raw_client_is_detected_after_a_quiet_period(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(message, "RAW_QUIET_PERIOD", 0.0)  # the timer fires on the next turns
    service, opened = make_service(1, client_framing="auto")
    s, t = client(service)
    s.data_received(b"12")
    await turn()
    assert opened[9000] == []  # nothing sent before the quiet period
    await settle()
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
    assert repr(pool) == "<BackendPool t: 2 backends: 1 up, 1 down | 0 in flight>"
    assert repr(pool.backends[0]) == (
        "<Backend h:1 down/ready w=1 in_flight=0 requests=0 failures=0>"
    )


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


# -- retries -----------------------------------------------------------------------------


async def test_a_retry_never_goes_back_to_the_backend_that_failed_it() -> None:
    """The failed backend stays eligible (one failure does not eject it here), and it is the
    only one: the request is not sent to it again, the client is told no backend is left."""
    service, opened = make_service(1, outlier=OutlierConfig(consecutive_failures=5))
    s, t = client(service)
    s.data_received(b"1\n")
    await turn()
    opened[9000][0][1].abort()
    await settle()
    assert service.pool.backends[0].state == "up"
    assert [tb.data() for _c, tb in opened[9000]] == [b"1\n"]
    assert t.data() == NOT_AVAILABLE + b"\n"


async def test_each_retry_excludes_every_backend_that_already_failed_the_request() -> None:
    """consistent_hash maps one client to the same backend each time: without the list of
    backends tried, the second retry would go back to the first one."""
    service, opened = make_service(
        3,
        algorithm="consistent_hash",
        retries=2,
        outlier=OutlierConfig(consecutive_failures=5),
    )
    s, t = client(service)
    s.data_received(b"1\n")
    await turn()
    order: list[int] = []
    for _ in range(2):
        port = next(p for p, conns in opened.items() if conns and not conns[-1][1].closed)
        order.append(port)
        opened[port][-1][1].abort()
        await settle()
    last = next(p for p, conns in opened.items() if conns and not conns[-1][1].closed)
    assert last not in order
    assert sorted([*order, last]) == [9000, 9001, 9002]
    assert all(len(conns) == 1 for conns in opened.values()), "each backend asked once"
    opened[last][0][0].data_received(b"one\n")
    await turn()
    assert t.data() == b"one\n"


async def test_the_retry_budget_stops_retries_beyond_its_share() -> None:
    service, opened = make_service(2, retry_budget_percent=0, retry_budget_min=0)
    s, t = client(service)
    s.data_received(b"1\n")
    await turn()
    opened[9000][0][1].abort()
    await settle()
    assert t.data() == NOT_AVAILABLE + b"\n"
    assert opened[9001] == []
    assert service.retries_over_budget == 1
    assert service.retries == 0


async def test_the_retry_budget_allows_its_floor_per_second() -> None:
    service, opened = make_service(2, retry_budget_percent=0, retry_budget_min=1)
    s, _t = client(service)
    s.data_received(b"".join(b"%d\n" % i for i in range(30)))
    await turn()
    opened[9000][0][1].abort()  # 15 requests to re-send; the floor allows 10 in the window
    await settle()
    assert service.retries == 10
    assert service.retries_over_budget == 5


async def test_a_kept_alive_connection_closed_by_the_backend_re_sends_to_the_same_backend() -> None:
    service, opened = make_service(1)
    s, t = client(service)
    s.data_received(b"1\n")
    await turn()
    conn, _tb = opened[9000][0]
    conn.data_received(b"one\n")
    s.data_received(b"2\n")
    await turn()
    conn.eof_received()  # the backend let the idle-looking connection go
    conn.connection_lost(None)
    await settle()
    backend = service.pool.backends[0]
    assert backend.state == "up"
    assert backend.failures == 0
    assert len(opened[9000]) == 2
    new, t_new = opened[9000][1]
    assert t_new.data() == b"2\n"
    new.data_received(b"two\n")
    await turn()
    assert t.data() == b"one\ntwo\n"


# -- timeouts --------------------------------------------------------------------------------


async def test_the_response_timeout_sweep_fails_a_backend_that_holds_a_request_too_long() -> None:
    service, opened = make_service(2, response_timeout=5.0)
    s, t = client(service)
    s.data_received(b"1\n")
    await turn()
    conn, t0 = opened[9000][0]
    service._sweep()
    assert not t0.aborted, "not late yet"
    conn.pending[0].sent -= 6.0
    service._sweep()
    await settle()
    assert t0.aborted
    assert service.pool.backends[0].state == "down"
    c1, t1 = opened[9001][0]
    assert t1.data() == b"1\n"
    c1.data_received(b"one\n")
    await turn()
    assert t.data() == b"one\n"


async def test_idle_clients_are_closed_after_client_timeout_and_busy_ones_are_not() -> None:
    service, _opened = make_service(1, client_timeout=10.0)
    idle, t_idle = client(service, ("127.0.0.1", 1))
    busy, t_busy = client(service, ("127.0.0.1", 2))
    busy.data_received(b"1\n")
    await turn()
    service._sweep()
    assert not t_idle.closed
    idle.last_active -= 11.0
    busy.last_active -= 11.0
    service._sweep()
    assert t_idle.closed
    assert not t_busy.closed, "a request is pending"
    assert service.idle_closed == 1


async def test_client_timeout_zero_never_closes_idle_clients() -> None:
    service, _opened = make_service(1, client_timeout=0.0)
    idle, t_idle = client(service)
    idle.last_active -= 1e6
    service._sweep()
    assert not t_idle.closed


# -- the queue ---------------------------------------------------------------------------------


async def test_requests_beyond_max_backend_requests_queue_and_a_full_queue_answers_busy() -> None:
    service, opened = make_service(1, max_backend_requests=1, queue_size=1)
    s, t = client(service)
    s.data_received(b"1\n2\n3\n")
    await turn()
    conn, tb = opened[9000][0]
    assert tb.data() == b"1\n"
    assert len(service.queue) == 1
    conn.data_received(b"one\n")
    await turn()
    assert tb.data() == b"1\n2\n", "the queued request goes once there is room"
    conn.data_received(b"two\n")
    await turn()
    assert t.data() == b"one\ntwo\n" + QUEUE_FULL + b"\n"
    assert service.queue_full == 1


async def test_a_request_waiting_longer_than_queue_timeout_is_answered() -> None:
    service, opened = make_service(1, max_backend_requests=1, queue_timeout=2.0)
    s, t = client(service)
    s.data_received(b"1\n2\n")
    await turn()
    service._sweep()
    assert len(service.queue) == 1
    service.queue[0].queued_at -= 3.0
    service._sweep()
    await turn()
    opened[9000][0][0].data_received(b"one\n")
    await turn()
    assert t.data() == b"one\n" + QUEUE_TIMEOUT + b"\n"
    assert opened[9000][0][1].data() == b"1\n"
    assert service.queue_timeouts == 1


async def test_when_the_only_backend_fails_its_queue_is_answered_at_once_not_at_queue_timeout() -> (
    None
):
    service, opened = make_service(1, max_backend_requests=1, queue_timeout=60.0)
    s, t = client(service)
    s.data_received(b"1\n2\n")
    await turn()
    assert len(service.queue) == 1
    opened[9000][0][1].abort()
    await settle()
    assert t.data() == NOT_AVAILABLE + b"\n" + NOT_AVAILABLE + b"\n"
    assert not service.queue
    assert service.queue_timeouts == 0


async def test_a_backend_that_comes_up_takes_queued_requests_at_the_next_sweep() -> None:
    service, opened = make_service(2, max_backend_requests=1, queue_timeout=60.0)
    b0, b1 = service.pool.backends
    service.pool.mark_down(b1, "test")
    s, t = client(service)
    s.data_received(b"1\n2\n")
    await turn()
    assert len(service.queue) == 1
    assert service.pool.mark_up(b1, "test")
    service._sweep()
    await turn()
    assert not service.queue
    conn, tb = opened[9001][0]
    assert tb.data() == b"2\n"
    conn.data_received(b"two\n")
    opened[9000][0][0].data_received(b"one\n")
    await turn()
    assert t.data() == b"one\ntwo\n"
    assert [b0.in_flight, b1.in_flight] == [0, 0]


# -- writes ------------------------------------------------------------------------------------


async def test_several_clients_requests_share_one_backend_connection_and_one_write() -> None:
    service, opened = make_service(1, backend_connections=4)
    sessions = [client(service, ("127.0.0.1", 100 + i)) for i in range(3)]
    for i, (s, _t) in enumerate(sessions):
        s.data_received(b"%d\n" % i)
    await turn()
    assert len(opened[9000]) == 1
    conn, tb = opened[9000][0]
    assert tb.written == [b"0\n1\n2\n"]
    conn.data_received(b"zero\none\ntwo\n")
    await turn()
    assert [t.written for _s, t in sessions] == [[b"zero\n"], [b"one\n"], [b"two\n"]]


async def test_replies_from_one_turn_go_to_a_client_in_one_write() -> None:
    service, opened = make_service(2)
    s, t = client(service)
    s.data_received(b"1\n2\n3\n4\n")
    await turn()
    opened[9001][0][0].data_received(b"two\nfour\n")
    opened[9000][0][0].data_received(b"one\nthree\n")
    await turn()
    assert t.written == [b"one\ntwo\nthree\nfour\n"]


# -- drain --------------------------------------------------------------------------------------


async def test_drain_returns_at_its_timeout_when_a_backend_never_answers() -> None:
    service, opened = make_service(1)
    s, t = client(service)
    s.data_received(b"1\n")
    await turn()
    await asyncio.wait_for(service.drain(0.05), 10)
    await settle()
    assert t.data() == STOPPING + b"\n"
    assert t.closed
    assert opened[9000][0][1].closed
    assert service.drain_cut == 1
    assert service.pool.backends[0].failures == 0, "a stop is not the backend's failure"


async def test_drain_closes_idle_clients_spread_over_the_close_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(message, "monotonic", lambda: clock[0])
    service, _opened = make_service(1)
    service.drain_close_window = 1.0
    transports = [client(service, ("127.0.0.1", 100 + i))[1] for i in range(10)]

    def closed() -> int:
        return sum(t.closed for t in transports)

    async def until(n: int) -> None:
        # the drain loop looks at the clock every 10 ms of real time; poll for its result
        async with asyncio.timeout(10):
            while closed() < n:  # noqa: ASYNC110
                await asyncio.sleep(0.005)

    drain = asyncio.ensure_future(service.drain(30.0))
    await turn()
    assert closed() == 0
    clock[0] += 0.5
    await until(5)
    assert closed() == 5, "half the window: half the idle clients"
    clock[0] += 0.5
    await until(10)
    await asyncio.wait_for(drain, 10)


async def test_at_the_drain_deadline_ready_replies_are_written_before_the_close() -> None:
    """A reply that came in the same loop turn as the deadline is written, not dropped."""
    service, _opened = make_service(1)
    s, t = client(service)
    s.data_received(b"1\n")
    await turn()
    s.complete(s.pending[0], b"one")  # answered; its write waits for the end of the turn
    await asyncio.wait_for(service.drain(0.0), 10)
    await settle()
    assert t.data() == b"one\n"
    assert t.closed
