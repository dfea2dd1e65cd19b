"""Protocol tier: the message-mode proxy fed raw bytes through fake transports, no sockets."""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_left
from typing import Any

import pytest

from balancer import wire
from balancer.config.model import BackendConfig, OutlierConfig, ServiceConfig
from balancer.core import retry
from balancer.core.policies.peak_ewma import PeakEwma
from balancer.core.pool import Backend, BackendPool
from balancer.proxy.message import request
from balancer.proxy.message import session as session_module
from balancer.wire import NOT_AVAILABLE, QUEUE_FULL, QUEUE_TIMEOUT, STOPPING
from tests.message_doubles import client, make_service, set_clock, settle, turn


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
    assert service.too_long == 1


async def test_raw_client_is_detected_after_a_quiet_period(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        session_module, "RAW_QUIET_PERIOD", 0.0
    )  # the timer fires on the next turns
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


async def test_the_retry_budget_allows_its_percentage_of_recent_requests() -> None:
    service, opened = make_service(2, retry_budget_percent=20, retry_budget_min=0)
    s, _t = client(service)
    s.data_received(b"".join(b"%d\n" % i for i in range(30)))
    await turn()
    opened[9000][0][1].abort()  # 15 to re-send; 20 % of the 30 requests received is 6
    await settle()
    assert service.retries == 6
    assert service.retries_over_budget == 9


def test_the_retry_budget_window_slides_one_second_at_a_time() -> None:
    window = retry.RETRY_WINDOW
    budget = retry.RetryBudget(100.0)
    budget.received += 5
    budget.advance(100.5)
    budget.advance(100.9)  # counted once, however often it advances
    assert budget.requests_total() == 5
    budget.advance(101.0)
    budget.received += 3
    budget.retries[-1] += 2
    budget.advance(101.5)
    assert budget.requests[-2:] == [5, 3], "each second has its own bucket"
    assert budget.retries[-2:] == [0, 2]
    budget.advance(100.0 + window - 0.01)
    assert (budget.requests_total(), budget.retries_total()) == (8, 2), "still in the window"
    budget.advance(100.0 + window)
    assert (budget.requests_total(), budget.retries_total()) == (3, 2), "the first second left"
    budget.advance(101.0 + window)
    assert (budget.requests_total(), budget.retries_total()) == (0, 0)
    budget.retries[-1] += 1
    budget.advance(1000.0)  # a jump longer than the window empties it
    assert budget.retries == budget.requests == [0] * window
    budget.received += 1
    budget.advance(999.0)  # a clock that steps back moves nothing
    assert budget.requests == [0] * (window - 1) + [1]


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


async def test_a_burst_spreads_over_connections_while_another_can_take_it() -> None:
    service, opened = make_service(1, backend_connections=4)
    a, _ta = client(service, ("127.0.0.1", 100))
    b, _tb = client(service, ("127.0.0.1", 101))
    a.data_received(b"".join(b"a%d\n" % i for i in range(10)))
    b.data_received(b"".join(b"b%d\n" % i for i in range(10)))
    await turn()
    lines = [b"a%d\n" % i for i in range(10)] + [b"b%d\n" % i for i in range(10)]
    writes = [t.written for _c, t in opened[9000]]
    assert writes == [[b"".join(lines[:8])], [b"".join(lines[8:16])], [b"".join(lines[16:])]]


async def test_a_turns_requests_to_busy_connections_go_out_in_one_write() -> None:
    """Every connection already carries 8 requests and no other may open: the requests of
    a turn join the write queued to one of them (up to 64) instead of one write each."""
    service, opened = make_service(1, backend_connections=2)
    s, _t = client(service)
    s.data_received(b"".join(b"%d\n" % i for i in range(16)))
    await turn()
    assert [len(c.pending) for c, _ in opened[9000]] == [8, 8]
    s.data_received(b"".join(b"x%d\n" % i for i in range(70)))
    await turn()
    (_c1, t1), (_c2, t2) = opened[9000]
    assert t1.written[1:] == [b"".join(b"x%d\n" % i for i in range(64))]
    assert t2.written[1:] == [b"".join(b"x%d\n" % i for i in range(64, 70))]


async def test_a_lockstep_reply_is_written_at_once() -> None:
    service, opened = make_service(1)
    s, t = client(service)
    s.data_received(b"1\n")
    await turn()
    conn, _tb = opened[9000][0]
    conn.data_received(b"one\n")
    assert t.written == [b"one\n"]  # before the end of the loop turn


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
    set_clock(monkeypatch, lambda: clock[0])
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


# -- the sweep, the queue and shortages: counts and edges an operator sees ------------------


async def test_a_backend_that_holds_a_request_longer_than_response_timeout_is_failed() -> None:
    service, opened = make_service(2, response_timeout=2.0)
    s, _t = client(service)
    s.data_received(b"1\n")
    await turn()
    b0 = service.pool.backends[0]
    channel = service.channels[b0]
    conn, tb = opened[9000][0]
    sent = conn.pending[0].sent
    channel.expire(sent + 2.0, 2.0)
    assert not tb.closed, "exactly the timeout: not yet"
    channel.expire(sent + 2.001, 2.0)
    await settle()
    assert tb.closed
    assert b0.state == "down"
    assert b0.last_reason.startswith("no reply within 2s")
    assert opened[9001][0][1].data() == b"1\n", "re-sent to the other backend"


async def test_every_queue_timeout_and_idle_close_is_counted() -> None:
    service, opened = make_service(1, max_backend_requests=1, queue_timeout=2.0, client_timeout=0.5)
    s, t = client(service)
    s.data_received(b"1\n2\n3\n")
    await turn()
    assert len(service.queue) == 2
    for req in service.queue:
        req.queued_at -= 3.0
    idle = [client(service, ("127.0.0.1", 100 + i)) for i in range(2)]
    for session, _t in idle:
        session.last_active -= 0.6
    service._sweep()
    await turn()
    assert service.queue_timeouts == 2
    assert service.idle_closed == 2, "a client_timeout under a second closes idle clients too"
    assert all(t_idle.closed for _s, t_idle in idle)
    assert not t.closed, "a request is pending"
    opened[9000][0][0].data_received(b"one\n")
    await turn()
    assert t.data() == b"one\n" + QUEUE_TIMEOUT + b"\n" + QUEUE_TIMEOUT + b"\n"


async def test_every_full_queue_answer_is_counted() -> None:
    service, _opened = make_service(1, max_backend_requests=1, queue_size=1)
    s, _t = client(service)
    s.data_received(b"1\n2\n3\n4\n")
    await turn()
    assert service.queue_full == 2


async def test_a_queue_left_without_backends_is_answered_and_counted_in_full() -> None:
    service, opened = make_service(1, max_backend_requests=1, queue_timeout=60.0, retries=0)
    s, t = client(service)
    s.data_received(b"1\n2\n3\n")
    await turn()
    assert len(service.queue) == 2
    opened[9000][0][1].abort()
    await settle()
    assert t.data() == (NOT_AVAILABLE + b"\n") * 3
    assert service.not_available == 3


async def test_a_queued_request_of_a_client_that_left_is_skipped_and_the_next_one_sent() -> None:
    service, opened = make_service(1, max_backend_requests=1, queue_timeout=60.0)
    first, _t_first = client(service, ("127.0.0.1", 1))
    gone, t_gone = client(service, ("127.0.0.1", 2))
    stays, t_stays = client(service, ("127.0.0.1", 3))
    first.data_received(b"1\n")
    gone.data_received(b"2\n")
    stays.data_received(b"3\n")
    await turn()
    assert len(service.queue) == 2
    t_gone.close()
    await settle()
    conn, tb = opened[9000][0]
    conn.data_received(b"one\n")
    await settle()
    assert tb.data() == b"1\n3\n", "the departed client's request is never sent"
    conn.data_received(b"three\n")
    await settle()
    assert t_stays.data() == b"three\n"


async def test_a_request_sent_from_the_queue_is_still_timed() -> None:
    service, opened = make_service(1, max_backend_requests=1, response_timeout=2.0)
    s, _t = client(service)
    s.data_received(b"1\n2\n")
    await turn()
    conn, tb = opened[9000][0]
    conn.data_received(b"one\n")
    await turn()
    assert tb.data() == b"1\n2\n"
    queued = conn.pending[0]
    assert queued.sent >= queued.queued_at
    service.channels[service.pool.backends[0]].expire(queued.sent + 2.5, 2.0)
    await settle()
    assert tb.closed, "the request that waited in the queue timed out at the backend"


async def test_a_shortage_re_sends_a_few_times_then_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service, _opened = make_service(2)
    gone, t_gone = client(service, ("127.0.0.1", 1))
    s, t = client(service, ("127.0.0.1", 2))
    gone.data_received(b"0\n")
    s.data_received(b"1\n")
    await turn()
    b0, b1 = service.pool.backends
    req_gone, req = gone.pending[0], s.pending[0]
    t_gone.close()
    await settle()
    assert req_gone.session.gone
    before = (b0.failures, b1.failures, service.retries)
    for shortage in range(1, request.MAX_SHORTAGE_RETRIES + 1):
        service.retry_short([req_gone, req], b0)
        assert req.shortages == shortage
        assert req.reply is None, "re-sent, not answered"
    assert req_gone.shortages == 0, "a departed client's request is dropped"
    assert req.sent > 0
    service.retry_short([req], b0)
    await settle()
    assert t.data().endswith(NOT_AVAILABLE + b"\n")
    assert service.not_available == 1
    assert (b0.failures, b1.failures, service.retries) == before, "a shortage is ours"


async def test_a_shortage_never_re_sends_to_the_backend_it_was_short_at_or_one_tried() -> None:
    service, opened = make_service(3)
    s, _t = client(service)
    s.data_received(b"1\n")
    await turn()
    b0, _b1, b2 = service.pool.backends
    req = s.pending[0]
    req.tried = [b2]
    service.retry_short([req], b0)
    await settle()
    assert opened[9001][-1][1].data().endswith(b"1\n")
    assert all(not conn_t.data().endswith(b"1\n") for _c, conn_t in opened[9002])


async def test_a_client_with_too_many_requests_unanswered_is_paused_until_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(session_module, "MAX_PENDING_PER_CLIENT", 3)
    service, opened = make_service(1)
    s, t = client(service)
    s.data_received(b"1\n2\n3\n")
    await turn()
    assert not t.paused, "at the limit: still reading"
    s.data_received(b"4\n")
    await turn()
    assert t.paused
    opened[9000][0][0].data_received(b"one\ntwo\nthree\nfour\n")
    await settle()
    assert not t.paused
    assert t.data() == b"one\ntwo\nthree\nfour\n"


async def test_a_raw_client_with_too_many_requests_unanswered_is_paused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(session_module, "MAX_PENDING_PER_CLIENT", 1)
    service, _opened = make_service(1, client_framing="raw")
    s, t = client(service)
    s.data_received(b"1")
    await turn()
    assert not t.paused
    s.data_received(b"2")
    await turn()
    assert t.paused


async def test_a_raw_message_of_max_line_bytes_is_sent_and_one_more_byte_refused() -> None:
    service, opened = make_service(1, client_framing="raw", max_line=10)
    s, _t = client(service)
    s.data_received(b"x" * 10)
    await turn()
    assert opened[9000][0][1].data() == b"x" * 10 + b"\n"
    s2, t2 = client(service, ("127.0.0.1", 2))
    s2.data_received(b"y" * 11)
    await settle()
    assert t2.data() == wire.LINE_TOO_LONG, "unterminated, as a raw client reads replies"
    assert t2.closed


async def test_a_raw_message_loses_only_its_trailing_line_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service, opened = make_service(1, client_framing="raw")
    s, _t = client(service)
    s.data_received(b"X12 \r\n")
    await turn()
    assert opened[9000][0][1].data() == b"X12 \n", "a trailing space is part of the message"


async def test_auto_detection_holds_max_line_bytes_and_no_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service, opened = make_service(1, client_framing="auto", max_line=10)
    s, t = client(service)
    s.data_received(b"x" * 10)
    await turn()
    assert not t.closed
    assert service.buffered == 10
    s.data_received(b"\n")
    await turn()
    assert opened[9000][0][1].data() == b"x" * 10 + b"\n"
    assert service.buffered == 0
    s2, t2 = client(service, ("127.0.0.1", 2))
    s2.data_received(b"y" * 6)
    s2.data_received(b"y" * 5)
    await settle()
    assert t2.data() == wire.LINE_TOO_LONG + b"\n"
    s3, _t3 = client(service, ("127.0.0.1", 3))
    s3.data_received(b"z" * 4)
    s3.data_received(b"z\n")  # the detection buffer starts empty again after a line
    s3.data_received(b"w" * 9)
    await turn()
    assert not _t3.closed


async def test_freed_bytes_count_only_what_was_released() -> None:
    service, _opened = make_service(1, max_line=5000)
    s, _t = client(service)
    s.data_received(b"x" * 300)
    s.data_received(b"x" * 200)
    assert (service.buffered, service.freed) == (500, 0)
    s.data_received(b"\n")
    assert (service.buffered, service.freed) == (0, 500)


async def test_the_buffer_cap_cuts_down_to_three_quarters_and_counts_and_logs_each_round(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [1000.0]
    set_clock(monkeypatch, lambda: clock[0])
    service, _opened = make_service(1, max_line=5000, max_buffered=1000)
    holders = [client(service, ("127.0.0.1", 10 + i)) for i in range(5)]
    with caplog.at_level(logging.WARNING, logger="balancer"):
        for session, _t in holders[:4]:
            session.data_received(b"x" * 200)
        assert service.buffered == 800
        holders[4][0].data_received(b"x" * 201)  # 1001 held: over the cap
        # cut to 750 or less: the largest holder (201), then one of 200, leaves 600
        assert service.buffered == 600
        assert service.buffer_cuts == 2
        assert holders[4][1].closed
        logged = [r.getMessage() for r in caplog.records]
        assert logged == [
            "service t: unfinished request lines reached max_buffered (1000 bytes); "
            "2 client connection(s) holding the most were cut (2 so far)"
        ]
        more = [client(service, ("127.0.0.1", 100 + i)) for i in range(2)]
        more[0][0].data_received(b"x" * 200)
        more[1][0].data_received(b"x" * 201)  # 1001 again: cut 2 more, within 10 s: no log
        assert service.buffer_cuts == 4
        assert len(caplog.records) == 1
        clock[0] += 10.0
        again = [client(service, ("127.0.0.1", 200 + i)) for i in range(2)]
        again[0][0].data_received(b"x" * 200)
        again[1][0].data_received(b"x" * 201)
        assert service.buffer_cuts == 6
        assert len(caplog.records) == 2, "ten seconds later it is said again"
        assert caplog.records[1].getMessage().endswith("were cut (6 so far)")


async def test_exactly_at_max_buffered_nothing_is_cut() -> None:
    service, _opened = make_service(1, max_line=5000, max_buffered=1000)
    a, t_a = client(service, ("127.0.0.1", 1))
    b, t_b = client(service, ("127.0.0.1", 2))
    a.data_received(b"x" * 500)
    b.data_received(b"x" * 500)
    assert service.buffered == 1000
    assert service.buffer_cuts == 0
    assert not t_a.closed
    assert not t_b.closed


# -- what a backend's failure is called, and what a reply feeds ----------------------------


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (b"one\ntwo\n", "more replies than requests"),
        (b"x" * (request.BACKEND_MAX_REPLY + 2), "reply line too long"),
        (None, "connection closed by backend"),
        (b"half a rep", "connection closed in the middle of a reply"),
    ],
)
async def test_a_backend_failure_is_named_in_its_reason(reply: bytes | None, reason: str) -> None:
    service, opened = make_service(2)
    s, _t = client(service)
    s.data_received(b"1\n")
    await turn()
    conn, _tb = opened[9000][0]
    if reply is not None:
        conn.data_received(reply)
    if reason.startswith("connection closed"):
        conn.eof_received()
        conn.connection_lost(None)
    await settle()
    b0 = service.pool.backends[0]
    assert b0.state == "down"
    assert b0.last_reason.startswith(reason), b0.last_reason
    assert opened[9001][0][1].data() == b"1\n", "re-sent to the other backend"


async def test_a_reset_is_named_with_its_error() -> None:
    service, opened = make_service(2)
    s, _t = client(service)
    s.data_received(b"1\n")
    await turn()
    opened[9000][0][1].abort()
    await settle()
    assert service.pool.backends[0].last_reason.startswith("connection lost: aborted")


async def test_data_from_a_raw_backend_that_was_asked_nothing_fails_it() -> None:
    service, opened = make_service(2, framings=["raw", "raw"], client_framing="raw")
    s, t = client(service)
    s.data_received(b"1")
    await turn()
    conn, _tb = opened[9000][0]
    conn.data_received(b"one")
    await turn()
    assert t.data() == b"one"
    s.data_received(b"2")
    await turn()
    conn2 = opened[9001][-1][0] if opened[9001] else opened[9000][-1][0]
    conn2.data_received(b"two")
    conn2.data_received(b"surprise")
    await settle()
    failed = [b for b in service.pool.backends if b.state == "down"]
    assert [b.last_reason.split(" (")[0] for b in failed] == ["unsolicited data from backend"]
    assert t.data() == b"onetwo", "the client saw only its own replies"


async def test_a_reply_feeds_the_policy_its_latency_and_clears_the_failure_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    set_clock(monkeypatch, lambda: clock[0])
    service, opened = make_service(1, algorithm="peak_ewma")
    b0 = service.pool.backends[0]
    b0.consecutive_failures = 1
    s, t = client(service)
    s.data_received(b"1\n")
    await turn()
    clock[0] += 0.25
    opened[9000][0][0].data_received(b"one\r\n")
    await turn()
    policy = service.pool.policy
    assert isinstance(policy, PeakEwma)
    assert policy.estimate(b0) == pytest.approx(0.25)
    assert b0.consecutive_failures == 0
    assert t.data() == b"one\n", "the CR of a CRLF reply is not passed on"
    assert service.histogram.counts[bisect_left(service.histogram.bounds, 0.25)] == 1
    assert service.histogram.total == pytest.approx(0.25)


async def test_the_access_log_gets_each_written_reply_with_its_backend() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.batches: list[tuple[object, list[tuple[bytes, bytes | None, str]], float]] = []

        def record_batch(self, session: object, reqs: list[Any], now: float) -> None:
            rows = [(r.payload, r.reply, r.backend.address if r.backend else "") for r in reqs]
            self.batches.append((session, rows, now))

    service, opened = make_service(2)
    recorder = Recorder()
    service.access_log = recorder  # type: ignore[assignment]
    s, t = client(service)
    s.data_received(b"1\n2\n")
    await turn()
    opened[9001][0][0].data_received(b"two\n")
    opened[9000][0][0].data_received(b"one\n")
    await turn()
    assert t.written == [b"one\ntwo\n"]
    assert len(recorder.batches) == 1
    session, rows, now = recorder.batches[0]
    assert session is s
    assert rows == [(b"1", b"one", "127.0.0.1:9000"), (b"2", b"two", "127.0.0.1:9001")]
    assert now > 0


async def test_a_paused_client_resumes_below_half_the_pending_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(session_module, "MAX_PENDING_PER_CLIENT", 4)
    service, opened = make_service(1)
    s, t = client(service)
    s.data_received(b"1\n2\n3\n4\n5\n")
    await turn()
    assert t.paused
    conn = opened[9000][0][0]
    conn.data_received(b"a\nb\nc\n")
    await settle()
    assert len(s.pending) == 2
    assert t.paused, "two left of a limit of four: not yet"
    conn.data_received(b"d\n")
    await settle()
    assert len(s.pending) == 1
    assert not t.paused


async def test_a_stop_leaves_nothing_counted_in_flight() -> None:
    service, _opened = make_service(1)
    s, _t = client(service)
    s.data_received(b"1\n2\n")
    await turn()
    await asyncio.wait_for(service.drain(0.0), 10)
    await settle()
    assert service.pool.backends[0].in_flight == 0


async def test_a_partly_released_buffer_frees_what_it_released() -> None:
    service, _opened = make_service(1, max_line=5000)
    s, _t = client(service)
    s.data_received(b"x" * 300)
    s.data_received(b"\n" + b"y" * 100)
    assert (service.buffered, service.freed) == (100, 200), "300 held, then 100"


async def test_timeouts_are_over_only_once_their_time_has_passed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    set_clock(monkeypatch, lambda: clock[0])
    service, _opened = make_service(
        1, max_backend_requests=1, queue_timeout=2.0, client_timeout=5.0
    )
    s, _t = client(service)
    s.data_received(b"1\n2\n")
    await turn()
    idle, t_idle = client(service, ("127.0.0.1", 9))
    idle.last_active = clock[0]
    clock[0] += 2.0
    service._sweep()
    assert service.queue_timeouts == 0, "exactly queue_timeout: not yet"
    clock[0] += 3.0
    service._sweep()
    assert service.queue_timeouts == 1
    assert not t_idle.closed, "exactly client_timeout: not yet"
    clock[0] += 0.01
    service._sweep()
    assert t_idle.closed


async def test_the_buffer_cap_stops_cutting_at_three_quarters_exactly() -> None:
    service, _opened = make_service(1, max_line=5000, max_buffered=1000)
    holders = [client(service, ("127.0.0.1", 10 + i)) for i in range(4)]
    for session, _t in holders[:3]:
        session.data_received(b"x" * 250)
    holders[3][0].data_received(b"x" * 251)
    assert service.buffered == 750
    assert service.buffer_cuts == 1


async def test_a_full_home_backend_sends_the_request_where_its_key_goes_next() -> None:
    service, opened = make_service(6, algorithm="consistent_hash", max_backend_requests=1)
    s, _t = client(service, ("127.0.0.7", 1))
    policy = service.pool.policy
    home = policy.pick(b"127.0.0.7", ())
    following = policy.pick(b"127.0.0.7", [home]) if home is not None else None
    assert isinstance(home, Backend)
    assert isinstance(following, Backend)
    s.data_received(b"1\n2\n")
    await turn()
    assert opened[home.port][0][1].data() == b"1\n"
    assert opened[following.port][0][1].data() == b"2\n"
    assert not service.queue


async def test_a_retry_counts_in_the_current_second_of_the_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    set_clock(monkeypatch, lambda: clock[0])
    service, _opened = make_service(2, retry_budget_percent=0, retry_budget_min=1)
    allowed = [service.retry_allowed() for _ in range(retry.RETRY_WINDOW + 1)]
    assert allowed == [True] * retry.RETRY_WINDOW + [False]
    clock[0] += retry.RETRY_WINDOW - 1
    assert not service.retry_allowed(), "every retry is still inside the window"
    clock[0] += 1
    assert service.retry_allowed(), "the second they were made has left the window"


async def test_a_failed_request_costs_its_backend_the_failure_penalty(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    set_clock(monkeypatch, lambda: clock[0])
    service, opened = make_service(
        2, algorithm="peak_ewma", outlier=OutlierConfig(consecutive_failures=3)
    )
    s, _t = client(service)
    s.data_received(b"1\n")
    await turn()
    (port,) = [p for p, conns in opened.items() if conns]
    failed = service.pool.get(f"127.0.0.1:{port}")
    assert failed is not None
    clock[0] += 0.1
    opened[port][0][1].abort()
    await settle()
    assert failed.state == "up", "one failure of three: not ejected"
    policy = service.pool.policy
    assert isinstance(policy, PeakEwma)
    assert policy.estimate(failed) == pytest.approx(policy.failure_penalty)


# -- counters and the paths of a retry -------------------------------------------------------


async def test_empty_lines_and_unavailable_requests_are_each_counted() -> None:
    service, _opened = make_service(1)
    service.pool.mark_down(service.pool.backends[0], "test")
    s, t = client(service)
    s.data_received(b"\n\n1\n2\n")
    await settle()
    assert t.data() == (wire.INVALID_MESSAGE + b"\n") * 2 + (NOT_AVAILABLE + b"\n") * 2
    assert (service.invalid, service.not_available) == (2, 2)


async def test_a_retry_waits_in_the_queue_when_every_other_backend_is_full() -> None:
    service, opened = make_service(2, max_backend_requests=1, queue_timeout=60.0)
    s, t = client(service)
    s.data_received(b"1\n2\n3\n")
    await turn()
    assert [r.payload for r in service.queue] == [b"3"]
    opened[9000][0][1].abort()
    await settle()
    assert [r.payload for r in service.queue] == [b"3", b"1"], "the retry waits its turn"
    assert service.retries == 1
    conn, tb = opened[9001][0]
    conn.data_received(b"two\n")
    await settle()
    conn.data_received(b"three\n")
    await settle()
    conn.data_received(b"one\n")
    await settle()
    assert tb.data() == b"2\n3\n1\n"
    assert t.data() == b"one\ntwo\nthree\n"
    assert not service.queue


async def test_a_retry_with_nothing_eligible_goes_to_a_backend_whose_checks_pass_again() -> None:
    service, opened = make_service(2)
    _b0, b1 = service.pool.backends
    service.pool.mark_down(b1, "3 failed check(s)")
    b1.last_check_ok = True  # back, but waiting for `rise` good checks
    s, t = client(service)
    s.data_received(b"1\n")
    await turn()
    opened[9000][0][1].abort()
    await settle()
    conn, tb = opened[9001][0]
    assert tb.data() == b"1\n"
    conn.data_received(b"one\n")
    await settle()
    assert t.data() == b"one\n"


async def test_a_removed_backend_hands_what_it_held_to_another_without_blame() -> None:
    service, opened = make_service(2)
    b0, _b1 = service.pool.backends
    s, t = client(service)
    s.data_received(b"1\n")
    await turn()
    service.remove_backend(b0)
    await settle()
    assert (b0.in_flight, b0.failures, b0.state) == (0, 0, "up")
    conn, tb = opened[9001][0]
    assert tb.data() == b"1\n"
    conn.data_received(b"one\n")
    await settle()
    assert t.data() == b"one\n"
    assert service.retries == 1
