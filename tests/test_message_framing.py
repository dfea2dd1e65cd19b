"""Protocol tier: framing, isolation at the write point, memory, loops and local shortages."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Iterator
from typing import Any

import pytest

from balancer import wire
from balancer.config.model import OutlierConfig
from balancer.core.pool import Backend
from balancer.net import heap, loopguard, resources
from balancer.proxy.message import connection, request, session
from balancer.proxy.message import service as service_module
from balancer.proxy.message.channel import BackendChannel
from balancer.proxy.message.session import ClientSession
from balancer.wire import (
    INVALID_MESSAGE,
    LINE_BREAK,
    LINE_TOO_LONG,
    MESSAGE_TOO_LONG,
    NEWLINE_ON_RAW,
    NOT_AVAILABLE,
    TOO_MANY_CONNECTIONS,
)
from tests.message_doubles import (
    FakeBackendsService,
    FakeChannel,
    FakeTransport,
    TaggingBackends,
    answer_all,
    client,
    make_service,
    settle,
    tag,
    turn,
)


@pytest.fixture(autouse=True)
def _no_quiet_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    """`auto` detection is driven by calling the quiet-period callback, not by waiting."""
    monkeypatch.setattr(session, "RAW_QUIET_PERIOD", 3600.0)


def quiet(session: ClientSession) -> None:
    """The quiet period after an unterminated first chunk is over."""
    assert session._raw_timer is not None, "no quiet period was running"
    session._cancel_raw_timer()
    session._raw_detected()


def in_flight(service: FakeBackendsService) -> list[int]:
    return [b.in_flight for b in service.pool]


# -- a raw message never becomes several requests --------------------------------------------


async def test_raw_newline_attack_gives_the_attacker_an_error_and_no_one_a_wrong_reply() -> None:
    """`x`, a pause (raw), then `1\\n2\\n3` used to go out as three lines; the extra replies
    were matched to other clients' requests pipelined on the same backend connection."""
    service, opened = make_service(1, client_framing="auto")
    backends = TaggingBackends(opened)
    victim, tv = client(service, ("127.0.0.1", 1001))
    attacker, ta = client(service, ("127.0.0.1", 1002))
    victim.data_received(b"v1\nv2\n")
    attacker.data_received(b"x")
    quiet(attacker)
    await turn()
    backends.answer()
    await settle()
    assert ta.data() == tag(b"x")  # raw: unterminated
    victim.data_received(b"v3\nv4\n")
    attacker.data_received(b"1\n2\n3")
    victim.data_received(b"v5\n")
    await answer_all(backends)
    assert ta.data() == tag(b"x") + NEWLINE_ON_RAW
    assert ta.closed
    assert tv.data() == b"".join(tag(b"v%d" % i) + b"\n" for i in range(1, 6))
    assert backends.requests_seen == [b"v1", b"v2", b"x", b"v3", b"v4", b"v5"]
    assert service.pool.backends[0].state == "up"
    assert in_flight(service) == [0]


async def test_configured_raw_message_with_a_newline_is_refused_for_a_line_backend() -> None:
    service, opened = make_service(1, client_framing="raw")
    backends = TaggingBackends(opened)
    s, t = client(service)
    s.data_received(b"1\n2")
    await answer_all(backends)
    assert t.data() == LINE_BREAK
    assert not t.closed, "a refused message does not cost the connection"
    s.data_received(b"3")
    await answer_all(backends)
    assert t.data() == LINE_BREAK + tag(b"3")
    assert backends.requests_seen == [b"3"]


async def test_a_bare_cr_inside_a_line_is_answered_locally_and_never_sent() -> None:
    service, opened = make_service(1)
    backends = TaggingBackends(opened)
    s, t = client(service)
    s.data_received(b"1\r2\n3\r\n4\n")
    await answer_all(backends)
    assert t.data() == LINE_BREAK + b"\n" + tag(b"3") + b"\n" + tag(b"4") + b"\n"
    assert backends.requests_seen == [b"3", b"4"]
    assert opened[9000][0][1].data() == b"3\n4\n"


async def test_the_write_point_sends_only_single_lines_whatever_queued_them() -> None:
    """Defence in depth: requests that did not come through the client framer (a retry, a
    queue, a raw client) are checked where the bytes are written to a line backend."""
    service, opened = make_service(1)
    s, t = client(service)
    service.dispatch_batch(s, [b"a", b"b\nc", b"d\re", b"f"])
    await turn()
    _conn, tb = opened[9000][0]
    assert tb.written == [b"a\nf\n"]
    assert in_flight(service) == [2]
    opened[9000][0][0].data_received(b"A\nF\n")
    await turn()
    assert t.data() == b"A\n" + LINE_BREAK + b"\n" + LINE_BREAK + b"\nF\n"
    assert service.invalid == 2


@pytest.mark.parametrize("position", [0, 1, 2])
async def test_the_write_point_never_sends_an_empty_line(position: int) -> None:
    """An empty request handed straight to a line connection (first, between others, last)
    is answered locally: a backend that skips blank lines would shift every later reply."""
    service, opened = make_service(1)
    s, t = client(service)
    backend = service.pool.backends[0]
    channel = service.channel(backend)
    payloads = [b"a", b"b"]
    payloads.insert(position, b"")
    for payload in payloads:
        req = request.Request(s, payload)
        s.pending.append(req)
        backend.in_flight += 1
        conn = channel.send(req)
        assert conn is not None
        service.schedule_flush(conn)
    await turn()
    conn, tb = opened[9000][0]
    assert tb.written == [b"a\nb\n"]
    conn.data_received(b"A\nB\n")
    await turn()
    replies = [b"A", b"B"]
    replies.insert(position, INVALID_MESSAGE)
    assert t.data() == b"".join(r + b"\n" for r in replies)
    assert in_flight(service) == [0]


async def test_a_down_backend_used_as_the_last_resort_is_not_retried_either() -> None:
    service, opened = make_service(1, outlier=OutlierConfig(consecutive_failures=5))
    backend = service.pool.backends[0]
    backend.last_check_ok = True  # down, but its last check passed: the fallback
    service.pool.mark_down(backend, "test")
    s, t = client(service)
    s.data_received(b"1\n")
    await turn()
    opened[9000][0][1].abort()
    await settle()
    assert [tb.data() for _c, tb in opened[9000]] == [b"1\n"]
    assert t.data() == NOT_AVAILABLE + b"\n"


async def test_a_backend_answering_a_request_it_was_not_sent_yet_is_failed() -> None:
    """A reply may only answer a request already written: an extra line arriving while the
    next request is still queued must not be taken as that request's reply."""
    service, opened = make_service(2)
    s, t = client(service)
    s.data_received(b"1\n")
    await turn()
    c0, t0 = opened[9000][0]
    service.dispatch_batch(s, [b"2"])  # queued for 9001 by round robin ...
    service.dispatch_batch(s, [b"3"])  # ... and this one for 9000, not written yet
    c0.data_received(b"one\nbogus\n")
    await settle()
    assert t0.aborted
    assert b"bogus" not in t.data()
    assert t0.written == [b"1\n"]


# -- client framing -----------------------------------------------------------------------


async def test_line_framing_never_detects_raw_a_split_first_line_is_one_line() -> None:
    """`12`, then 100 ms later `34\\n5\\n`, used to come back `It's instance number 12` glued
    to `Server not available`. With client_framing = "line" (the default) nothing is detected."""
    service, opened = make_service(1)
    s, t = client(service)
    s.data_received(b"12")
    assert s._raw_timer is None
    await turn()
    s.data_received(b"34\n5\n")
    await turn()
    conn, tb = opened[9000][0]
    assert tb.data() == b"1234\n5\n"
    conn.data_received(b"r1234\nr5\n")
    await turn()
    assert t.data() == b"r1234\nr5\n"


async def test_auto_a_client_found_raw_that_then_sends_a_newline_is_answered_and_closed() -> None:
    service, opened = make_service(1, client_framing="auto")
    backends = TaggingBackends(opened)
    s, t = client(service)
    s.data_received(b"12")
    quiet(s)
    await answer_all(backends)
    s.data_received(b"34\n5\n")
    await answer_all(backends)
    assert t.data() == tag(b"12") + NEWLINE_ON_RAW
    assert t.closed
    assert backends.requests_seen == [b"12"]


async def test_auto_a_first_line_split_before_the_quiet_period_is_still_a_line() -> None:
    service, opened = make_service(1, client_framing="auto")
    backends = TaggingBackends(opened)
    s, t = client(service)
    s.data_received(b"12")
    s.data_received(b"3")
    s.data_received(b"4\n5\n")
    await answer_all(backends)
    assert t.data() == tag(b"1234") + b"\n" + tag(b"5") + b"\n"


async def test_raw_framing_takes_each_read_as_one_message_at_once() -> None:
    service, opened = make_service(1, client_framing="raw")
    backends = TaggingBackends(opened)
    s, t = client(service)
    s.data_received(b"12")
    assert s._raw_timer is None
    await answer_all(backends)
    s.data_received(b"13\r\n")
    await answer_all(backends)
    assert t.data() == tag(b"12") + tag(b"13")


# -- empty requests -----------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["line", "raw"])
async def test_empty_lines_are_answered_locally_for_every_backend_framing(framing: str) -> None:
    """An empty line used to go to raw backends as zero bytes; no reply came, the client
    waited response_timeout and each backend was ejected in turn."""
    service, opened = make_service(2, framings=[framing, framing])
    backends = TaggingBackends(opened, raw_ports={9000, 9001} if framing == "raw" else ())
    s, t = client(service)
    s.data_received(b"\n1\n\r\n2\n\n")
    await answer_all(backends)
    inv = INVALID_MESSAGE + b"\n"
    assert t.data() == inv + tag(b"1") + b"\n" + inv + tag(b"2") + b"\n" + inv
    assert sorted(backends.requests_seen) == [b"1", b"2"]
    assert all(b.state == "up" and b.failures == 0 for b in service.pool)
    assert in_flight(service) == [0, 0]


async def test_an_empty_raw_message_is_answered_locally() -> None:
    service, opened = make_service(1, client_framing="raw", framings=["raw"])
    backends = TaggingBackends(opened, raw_ports={9000})
    s, t = client(service)
    s.data_received(b"\r\n")
    await answer_all(backends)
    assert t.data() == INVALID_MESSAGE
    assert opened[9000] == []


async def test_eof_like_echo_to_dev_tcp_gets_invalid_message_then_close() -> None:
    service, opened = make_service(1, framings=["raw"])
    s, t = client(service)
    s.data_received(b"\n")
    s.eof_received()
    await settle()
    assert t.data() == INVALID_MESSAGE + b"\n"
    assert t.closed
    assert opened[9000] == []


# -- the last request before EOF ---------------------------------------------------------


async def test_an_unterminated_last_line_before_eof_is_answered() -> None:
    service, opened = make_service(1)
    backends = TaggingBackends(opened)
    s, t = client(service)
    s.data_received(b"1\n2")
    assert s.eof_received() is True
    await answer_all(backends)
    assert t.data() == tag(b"1") + b"\n" + tag(b"2") + b"\n"
    assert t.closed
    assert service.buffered == 0


async def test_a_lone_cr_before_eof_is_an_empty_last_request() -> None:
    service, opened = make_service(1)
    s, t = client(service)
    s.data_received(b"\r")
    s.eof_received()
    await settle()
    assert t.data() == INVALID_MESSAGE + b"\n"
    assert opened[9000] == []


# -- backend framing, per backend -----------------------------------------------------------


async def test_backend_framing_is_read_per_backend() -> None:
    service, opened = make_service(2, framings=["line", "raw"])
    backends = TaggingBackends(opened, raw_ports={9001})
    s, t = client(service)
    s.data_received(b"1\n2\n3\n4\n")
    await answer_all(backends)
    assert [tb.data() for _c, tb in opened[9000]] == [b"1\n3\n"]
    assert b"".join(tb.data() for _c, tb in opened[9001]) == b"24"
    assert t.data() == b"".join(tag(b"%d" % i) + b"\n" for i in range(1, 5))


async def test_unknown_backend_framing_is_line() -> None:
    service, opened = make_service(1, framings=[""])
    s, _t = client(service)
    s.data_received(b"1\n")
    await turn()
    assert opened[9000][0][1].data() == b"1\n"


async def test_a_backend_whose_framing_changes_stops_using_connections_of_the_old_one() -> None:
    service, opened = make_service(1, framings=[""])
    s, t = client(service)
    s.data_received(b"1\n")
    await turn()
    old, t_old = opened[9000][0]
    service.pool.backends[0].framing = "raw"  # the checks found out
    s.data_received(b"2\n")
    await turn()
    assert t_old.data() == b"1\n", "the old line connection takes nothing more"
    assert not t_old.closed, "it still holds a request"
    new, t_new = opened[9000][1]
    assert t_new.data() == b"2"
    new.data_received(b"two")
    old.data_received(b"one\n")
    await settle()
    assert t.data() == b"one\ntwo\n"
    assert t_old.closed, "closed once its last request was answered"
    assert not t_new.closed


async def test_raw_backends_refuse_messages_longer_than_the_original_service_reads() -> None:
    service, opened = make_service(1, framings=["raw"], max_line=4096)
    backends = TaggingBackends(opened, raw_ports={9000})
    s, t = client(service)
    ok = b"7" * wire.RAW_BACKEND_MAX_MESSAGE
    s.data_received(ok + b"\n" + b"8" * (wire.RAW_BACKEND_MAX_MESSAGE + 1) + b"\n")
    await answer_all(backends)
    assert t.data() == tag(ok) + b"\n" + MESSAGE_TOO_LONG + b"\n"
    assert backends.requests_seen == [ok]
    assert in_flight(service) == [0]


async def test_a_raw_connection_carries_one_client_s_requests_only() -> None:
    """A raw reply read in two parts must not reach another client: an idle raw connection
    is not handed to a different client."""
    service, opened = make_service(1, framings=["raw"])
    backends = TaggingBackends(opened, raw_ports={9000})
    a, ta = client(service, ("127.0.0.1", 1))
    b, tb = client(service, ("127.0.0.1", 2))
    a.data_received(b"a1\n")
    await answer_all(backends)
    a.data_received(b"a2\n")
    await answer_all(backends)
    b.data_received(b"b1\n")
    await answer_all(backends)
    (c_a, t_a), (_c_b, t_b) = opened[9000]
    assert t_a.data() == b"a1a2"
    assert t_b.data() == b"b1"
    assert t_a.closed
    c_a.data_received(b"late half of a reply")  # arrives after the close: nobody gets it
    await settle()
    assert ta.data() == tag(b"a1") + b"\n" + tag(b"a2") + b"\n"
    assert tb.data() == tag(b"b1") + b"\n"


async def test_a_raw_reply_holding_a_newline_is_not_passed_to_a_line_client() -> None:
    service, opened = make_service(1, framings=["raw"])
    s, t = client(service)
    s.data_received(b"1\n")
    await turn()
    opened[9000][0][0].data_received(b"two\nlines")
    await settle()
    assert t.data() == wire.BAD_REPLY + b"\n"


# -- memory: unfinished lines ------------------------------------------------------------------


async def test_max_buffered_cuts_the_clients_holding_the_most_and_spares_the_others() -> None:
    service, opened = make_service(1, max_line=5000, max_buffered=2000)
    backends = TaggingBackends(opened)
    big, t_big = client(service, ("127.0.0.1", 1))
    small, t_small = client(service, ("127.0.0.1", 2))
    whole, t_whole = client(service, ("127.0.0.1", 3))
    big.data_received(b"1\n" + b"9" * 1200)
    small.data_received(b"5" * 300)
    assert service.buffered == 1500
    whole.data_received(b"2\n")
    small.data_received(b"5" * 600)  # 2100 held now: over the cap
    await answer_all(backends)
    assert t_big.data() == tag(b"1") + b"\n" + LINE_TOO_LONG + b"\n"
    assert t_big.closed
    assert not t_small.closed
    assert t_whole.data() == tag(b"2") + b"\n"
    assert service.buffered == 900 == small.held
    assert service.buffer_cuts == 1
    small.data_received(b"\n")
    await answer_all(backends)
    assert t_small.data() == tag(b"5" * 900) + b"\n"
    assert service.buffered == 0


async def test_buffered_bytes_are_accounted_back_when_connections_close() -> None:
    service, _opened = make_service(1, client_framing="auto", max_line=5000)
    clients = [client(service, ("127.0.0.1", i)) for i in range(10)]
    for i, (s, _t) in enumerate(clients):
        s.data_received(b"x" * (100 + i))  # detecting: held as well
    assert service.buffered == sum(100 + i for i in range(10))
    for _s, t in clients:
        t.close()
    await settle()
    assert service.buffered == 0
    assert service.freed == sum(100 + i for i in range(10))


async def test_the_sweep_gives_freed_memory_back_after_a_large_release(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trims: list[float] = []

    def trim(now: float) -> bool:
        trims.append(now)
        return True

    monkeypatch.setattr(service_module, "TRIM_AFTER_FREED", 1000)
    monkeypatch.setattr(service_module, "TRIM_HEAP", trim)
    service, _opened = make_service(1, max_line=5000)
    s, t = client(service)
    s.data_received(b"x" * 600)
    service._sweep()
    assert trims == []
    t.close()
    await settle()
    service._sweep()
    assert trims == [], "600 bytes freed: under the threshold"
    s2, t2 = client(service)
    s2.data_received(b"y" * 600)
    t2.close()
    await settle()
    service._sweep()
    assert len(trims) == 1
    assert service.freed == 0


def test_heap_trimmer_runs_at_most_once_per_interval() -> None:
    trimmer = heap.HeapTrimmer()
    ran = trimmer(1000.0)
    assert trimmer(1000.0 + heap.TRIM_INTERVAL / 2) is False
    assert trimmer(1000.0 + heap.TRIM_INTERVAL) is ran  # glibc here: True
    assert trimmer.runs == (2 if ran else 0)


# -- the balancer connected to itself ----------------------------------------------------------


@pytest.fixture
def own_address() -> Iterator[list[loopguard.Registration]]:
    registrations: list[loopguard.Registration] = []
    yield registrations
    for registration in registrations:
        registration.release()


async def test_a_client_connection_from_our_own_backend_connection_is_a_loop(
    own_address: list[Any],
) -> None:
    """A backend that was the balancer itself used to turn one request into 16,391."""
    service, _opened = make_service(2)
    looped = service.pool.backends[0]
    own_address.append(
        loopguard.Registration(
            ("127.0.0.1", 40001), ("127.0.0.1", looped.port), (service.pool, looped)
        )
    )
    s, t = client(service, ("127.0.0.1", 40001), sockname=("127.0.0.1", looped.port))
    assert t.aborted
    assert s not in service.sessions
    assert looped.looped
    assert looped.state == "down"
    assert service.loops == 1
    assert service.pool.fallback() is None


async def test_a_loop_seen_only_by_the_first_byte_is_caught(own_address: list[Any]) -> None:
    service, opened = make_service(2)
    looped = service.pool.backends[1]
    # the connecting side has not registered yet when the listener accepts
    s, t = client(service, ("127.0.0.1", 40002), sockname=("127.0.0.1", looped.port))
    assert not t.aborted
    own_address.append(
        loopguard.Registration(
            ("127.0.0.1", 40002), ("127.0.0.1", looped.port), (service.pool, looped)
        )
    )
    s.data_received(b"1\n")
    await turn()
    assert t.aborted
    assert looped.looped
    assert all(tb.data() == b"" for conns in opened.values() for _c, tb in conns)


async def test_a_client_sharing_a_port_number_with_our_connection_elsewhere_is_no_loop(
    own_address: list[Any],
) -> None:
    """The kernel gives one ephemeral port to connections towards different places: a local
    client may come from the address one of our connections to a backend uses. It is served,
    and that backend stays in service."""
    service, opened = make_service(2)
    backend = service.pool.backends[0]
    own_address.append(
        loopguard.Registration(
            ("127.0.0.1", 40004), ("127.0.0.1", backend.port), (service.pool, backend)
        )
    )
    s, t = client(service, ("127.0.0.1", 40004), sockname=("127.0.0.1", 8080))
    s.data_received(b"1\n")
    await turn()
    assert not t.aborted
    assert not backend.looped
    assert backend.state == "up"
    assert service.loops == 0
    assert opened[9000][0][1].data() == b"1\n"


def _own_connection(service: FakeBackendsService, local_port: int) -> FakeTransport:
    """A backend connection of ours to 127.0.0.1:9000 from 127.0.0.1:`local_port`."""
    channel = service.channel(service.pool.backends[0])
    conn = connection.BackendConnection(channel)
    tr = FakeTransport(peer=("127.0.0.1", 9000), sockname=("127.0.0.1", local_port))
    tr.protocol = conn
    conn.connection_made(tr)
    return tr


async def test_backend_connections_are_registered_while_open() -> None:
    service, _opened = make_service(1)
    tr = _own_connection(service, 40003)
    assert loopguard.owner(("127.0.0.1", 40003)) == (service.pool, service.pool.backends[0])
    tr.close()
    await settle()
    assert loopguard.owner(("127.0.0.1", 40003)) is None


async def test_only_the_other_end_of_our_own_connection_is_a_loop() -> None:
    service, _opened = make_service(1)
    tr = _own_connection(service, 40005)
    _s, elsewhere = client(service, ("127.0.0.1", 40005), sockname=("127.0.0.1", 8080))
    assert not elsewhere.aborted
    assert not service.pool.backends[0].looped
    _s, itself = client(service, ("127.0.0.1", 40005), sockname=("127.0.0.1", 9000))
    assert itself.aborted
    assert service.pool.backends[0].looped
    tr.close()
    await settle()


# -- our own shortages are not the backends' failures -----------------------------------------


class _ShortLoop:
    """The running loop, except that connects fail as when the process is out of descriptors."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.connects = 0

    async def create_connection(self, *args: Any, **kw: Any) -> Any:
        self.connects += 1
        raise OSError(errno.EMFILE, "Too many open files")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


class _ShortOn(FakeBackendsService):
    """Backends on `short_ports` get real channels (whose connects fail); others fake ones."""

    short_ports: set[int]

    def channel(self, backend: Backend) -> BackendChannel:
        ch = self.channels.get(backend)
        if ch is None:
            kind = BackendChannel if backend.port in self.short_ports else FakeChannel
            ch = self.channels[backend] = kind(self, backend)
        return ch


def short_service(n: int, short_ports: set[int]) -> tuple[_ShortOn, Any, _ShortLoop]:
    service, opened = make_service(n)
    service.__class__ = _ShortOn
    assert isinstance(service, _ShortOn)
    service.short_ports = short_ports
    loop = _ShortLoop(service.loop)
    service.loop = loop  # type: ignore[assignment]
    return service, opened, loop


async def test_a_connect_failing_for_want_of_descriptors_is_not_the_backend_s_fault() -> None:
    service, opened, loop = short_service(2, {9000})
    backends = TaggingBackends(opened)
    before = resources.ALARM.counts["file_descriptors"]
    s, t = client(service)
    s.data_received(b"1\n")
    await answer_all(backends)
    assert loop.connects == 1
    assert t.data() == tag(b"1") + b"\n"  # re-sent to the other backend
    short = service.pool.backends[0]
    assert short.state == "up"
    assert (short.failures, short.connect_failures, short.consecutive_failures) == (0, 0, 0)
    assert resources.ALARM.counts["file_descriptors"] == before + 1
    assert service.retries == 0, "not counted as a retry for a backend fault"
    assert in_flight(service) == [0, 0]


async def test_a_local_shortage_with_nowhere_else_to_go_answers_server_not_available() -> None:
    service, _opened, _loop = short_service(1, {9000})
    s, t = client(service)
    s.data_received(b"1\n")
    await settle(6)
    assert t.data() == NOT_AVAILABLE + b"\n"
    assert not t.closed
    assert service.pool.backends[0].state == "up"
    assert in_flight(service) == [0]


async def test_client_connections_beyond_the_descriptor_budget_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    budget = resources.FdBudget(limit=100, reserve=98)
    monkeypatch.setattr(resources, "FDS", budget)
    service, _opened = make_service(1)
    _a, ta = client(service, ("127.0.0.1", 1))
    _b, tb = client(service, ("127.0.0.1", 2))
    _c, tc = client(service, ("127.0.0.1", 3))
    assert tc.data() == TOO_MANY_CONNECTIONS + b"\n"
    assert tc.closed
    assert not ta.closed
    assert not tb.closed
    assert service.refused == 1
    assert budget.clients == 2
    ta.close()
    await settle()
    assert budget.clients == 1
    _d, td = client(service, ("127.0.0.1", 4))
    assert not td.closed
    assert budget.clients == 2
