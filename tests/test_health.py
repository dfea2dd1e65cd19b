"""Health checks: the rise/fall state machine, the schedule, what a result means (pure),
and the probe and the checker against real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import random
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest
import uvloop
from hypothesis import given
from hypothesis import strategies as st

from balancer.config.model import BackendConfig, HealthConfig, ServiceConfig
from balancer.core.health_state import CheckSchedule, HealthState, first_wait, next_wait
from balancer.core.pool import Backend, BackendPool
from balancer.core.states import DOWN, MAINT, READY, UP
from balancer.net import loopguard, resources
from balancer.runtime.health import HealthChecker
from balancer.runtime.probe import LATE, ProbeResult, probe

OK = ProbeResult(True, "reply ok")
REFUSED = ProbeResult(False, "connection refused")


def make_pool(
    n: int = 1,
    *,
    health: HealthConfig | None = None,
    hosts: list[tuple[str, int]] | None = None,
    **options: object,
) -> BackendPool:
    backends = hosts if hosts is not None else [("127.0.0.1", 9000 + i) for i in range(n)]
    config = ServiceConfig(
        name="svc",
        listen_host="127.0.0.1",
        listen_port=0,
        backends=tuple(BackendConfig(h, p) for h, p in backends),
        health=health or HealthConfig(rise=2, fall=3),
        **options,  # type: ignore[arg-type]
    )
    return BackendPool(config)


# -- the rise/fall state machine ------------------------------------------------------


def test_up_goes_down_after_fall_consecutive_failures() -> None:
    s = HealthState(rise=2, fall=3)
    assert s.record(False, True) is None
    assert s.record(False, True) is None
    assert s.record(True, True) is None  # streak broken
    assert s.record(False, True) is None
    assert s.record(False, True) is None
    assert s.record(False, True) == "down"


def test_down_comes_back_after_rise_consecutive_successes() -> None:
    s = HealthState(rise=2, fall=3)
    assert s.record(True, False) is None
    assert s.record(False, False) is None
    assert s.record(True, False) is None
    assert s.record(True, False) == "up"


@given(
    rise=st.integers(1, 5),
    fall=st.integers(1, 5),
    results=st.lists(st.booleans(), max_size=80),
)
def test_transitions_only_after_enough_consecutive_results(
    rise: int, fall: int, results: list[bool]
) -> None:
    s = HealthState(rise, fall)
    up = True
    streak_ok = streak_bad = 0
    for ok in results:
        streak_ok = streak_ok + 1 if ok else 0
        streak_bad = 0 if ok else streak_bad + 1
        t = s.record(ok, up)
        if t == "down":
            assert up
            assert streak_bad >= fall
            up = False
            s.reset()
            streak_ok = streak_bad = 0
        elif t == "up":
            assert not up
            assert streak_ok >= rise
            up = True
            s.reset()
            streak_ok = streak_bad = 0
        else:
            assert not (up and streak_bad >= fall)
            assert not (not up and streak_ok >= rise)


# -- the schedule (pure) --------------------------------------------------------------


def test_waits_are_spread_within_plus_minus_jitter_of_the_interval() -> None:
    rng = random.Random(7)
    waits = [next_wait(2.0, 0.1, rng) for _ in range(2000)]
    assert all(1.8 <= w <= 2.2 for w in waits)
    assert len(set(waits)) > 1900, "waits are spread, not all equal"
    # both sides of the interval, and close to both ends of the spread
    assert min(waits) < 1.82
    assert max(waits) > 2.18


def test_without_jitter_every_wait_is_the_interval() -> None:
    rng = random.Random(7)
    assert {next_wait(2.0, 0.0, rng) for _ in range(100)} == {2.0}


def test_first_checks_are_spread_over_a_whole_interval() -> None:
    rng = random.Random(3)
    firsts = [first_wait(10.0, rng) for _ in range(1000)]
    assert all(0.0 <= f <= 10.0 for f in firsts)
    # every tenth of the interval gets some of them: no burst at the start or the end
    assert {int(f) for f in firsts} == set(range(10))


def test_the_schedule_hands_out_keys_by_due_time_and_only_when_due() -> None:
    s: CheckSchedule[str] = CheckSchedule()
    s.add("c", 3.0)
    s.add("a", 1.0)
    s.add("b", 2.0)
    assert s.next_due() == 1.0
    assert s.pop_due(0.5) is None
    assert s.pop_due(2.5) == "a"
    assert s.pop_due(2.5) == "b"
    assert s.pop_due(2.5) is None
    assert s.pop_due(3.0) == "c"
    assert len(s) == 0
    assert s.next_due() is None


def test_a_key_is_in_the_schedule_once_moving_and_discarding_it_works() -> None:
    s: CheckSchedule[str] = CheckSchedule()
    s.add("a", 1.0)
    s.add("a", 5.0)  # moved
    s.add("b", 2.0)
    s.discard("b")
    assert len(s) == 1
    assert "b" not in s
    assert s.pop_due(4.0) is None
    assert s.pop_due(5.0) == "a"
    assert s.pop_due(100.0) is None


def test_the_schedule_sweeps_its_leftovers() -> None:
    s: CheckSchedule[int] = CheckSchedule()
    for i in range(10_000):
        s.add(i % 10, float(i))
    assert len(s) == 10
    assert len(s._heap) < 200
    assert sorted(k for k in iter(lambda: s.pop_due(1e9), None)) == list(range(10))


# -- what a result means (pure: no sockets, no loop) -----------------------------------


def test_rise_2_needs_two_good_checks_in_a_row() -> None:
    pool = make_pool(1, health=HealthConfig(rise=2, fall=1))
    checker = HealthChecker(pool)
    b = pool.backends[0]
    pool.mark_down(b, "initial check failed: connection refused")
    checker.apply(b, OK)
    assert b.state == DOWN, "one good check is not enough with rise = 2"
    checker.apply(b, REFUSED)
    checker.apply(b, OK)
    assert b.state == DOWN, "a failure in between starts the count again"
    checker.apply(b, OK)
    assert b.state == UP
    assert "2 good check(s)" in b.last_reason


def test_fall_3_needs_three_failed_checks_in_a_row() -> None:
    pool = make_pool(1, health=HealthConfig(rise=1, fall=3))
    checker = HealthChecker(pool)
    b = pool.backends[0]
    for _ in range(2):
        checker.apply(b, REFUSED)
    checker.apply(b, OK)
    for _ in range(2):
        checker.apply(b, REFUSED)
    assert b.state == UP
    checker.apply(b, REFUSED)
    assert b.state == DOWN
    assert b.last_reason == "3 failed check(s): connection refused"


def test_an_ejected_backend_is_not_readmitted_before_its_ejection_time_is_over() -> None:
    pool = make_pool(4, health=HealthConfig(rise=1, fall=1))
    checker = HealthChecker(pool)
    b = pool.backends[0]
    assert pool.report_failure(b, "connection reset")
    assert pool.ejection_left(b) > 0
    for _ in range(5):
        checker.apply(b, OK)
        assert b.state == DOWN, "readmitted while still ejected"
    assert "ejected for" in b.last_reason
    b.ejected_until = time.monotonic() - 0.001  # its time is over
    checker.apply(b, OK)
    assert b.state == UP


def test_a_looped_backend_is_never_readmitted_by_its_checks() -> None:
    pool = make_pool(2, health=HealthConfig(rise=1, fall=1))
    checker = HealthChecker(pool)
    b = pool.backends[0]
    pool.mark_loop(b, "a probe came back to our own listener")
    for _ in range(3):
        checker.apply(b, OK)
    assert b.state == DOWN
    assert not pool.mark_up(b, "by hand")
    assert b.state == DOWN
    assert b not in pool.policy.targets


def test_replacing_a_looped_backend_starts_fresh() -> None:
    pool = make_pool(2, health=HealthConfig(rise=1, fall=1))
    checker = HealthChecker(pool)
    old = pool.backends[0]
    pool.mark_loop(old, "a probe came back to our own listener")
    checker.unwatch(old)
    pool.remove(old)
    new = pool.add(old.config)
    new.state = DOWN
    assert not new.looped
    checker.apply(new, OK)
    assert new.state == UP
    assert pool.get(old.address) is new


def test_a_probe_that_ran_out_of_our_own_descriptors_changes_nothing() -> None:
    pool = make_pool(1, health=HealthConfig(rise=1, fall=1))
    checker = HealthChecker(pool)
    b = pool.backends[0]
    before = resources.ALARM.counts["file_descriptors"]
    emfile = OSError(errno.EMFILE, "Too many open files")
    for _ in range(5):
        checker.apply(b, ProbeResult(False, "Too many open files", shortage=emfile))
    assert b.state == UP
    assert b.last_check is None, "a check that could not run is no check"
    assert resources.ALARM.counts["file_descriptors"] == before + 5


def test_a_backend_that_stays_down_says_why_once_per_change_of_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = make_pool(1, hosts=[("no-such-host.invalid", 80)])
    checker = HealthChecker(pool)
    b = pool.backends[0]
    b.state = DOWN
    b.last_reason = "added; waiting for health checks"
    unresolved = ProbeResult(False, "cannot resolve 'no-such-host.invalid': Name not known")
    with caplog.at_level(logging.WARNING, logger="balancer"):
        for _ in range(5):
            checker.apply(b, unresolved)
        assert b.last_reason == f"check failed: {unresolved.reason}"
        for _ in range(5):
            checker.apply(b, REFUSED)
        assert b.last_reason == "check failed: connection refused"
    lines = [r.getMessage() for r in caplog.records if "no-such-host.invalid" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "cannot resolve" in lines[0]
    assert "connection refused" in lines[1]


def test_a_recovery_is_logged_as_good_news_and_a_failure_as_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = make_pool(1, health=HealthConfig(rise=1, fall=1))
    checker = HealthChecker(pool)
    b = pool.backends[0]
    with caplog.at_level(logging.INFO, logger="balancer"):
        checker.apply(b, REFUSED)
        checker.apply(b, OK)
    levels = {r.getMessage().split(": ")[0].split()[-1]: r.levelno for r in caplog.records}
    assert levels["DOWN"] == logging.WARNING
    assert levels["UP"] == logging.INFO


def test_auto_framing_is_learnt_from_a_good_check_and_forgotten_when_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = make_pool(1, health=HealthConfig(rise=1, fall=1), backend_framing="auto")
    checker = HealthChecker(pool)
    b = pool.backends[0]
    assert b.framing == ""
    with caplog.at_level(logging.INFO, logger="balancer"):
        checker.apply(b, ProbeResult(True, "reply ok (raw framing)", framing="raw"))
        checker.apply(b, ProbeResult(True, "reply ok"))
    assert b.framing == "raw"
    said = [r.getMessage() for r in caplog.records if "framing" in r.getMessage()]
    assert said == [f"backend {b.address} of service svc speaks raw framing (unterminated replies)"]
    checker.apply(b, REFUSED)
    assert b.state == DOWN
    assert b.framing == "", "a backend restarted as another kind must be detected again"
    assert pool.fallback() is None, "no fallback to a backend whose framing is not known"


@pytest.mark.parametrize(
    ("health", "framing"),
    [
        (HealthConfig(enabled=False), "line"),
        (HealthConfig(send=None, expect=None), "line"),
        (HealthConfig(), ""),
    ],
    ids=["checks off", "connect check", "probe"],
)
def test_auto_framing_needs_a_probe_to_detect_with(health: HealthConfig, framing: str) -> None:
    pool = make_pool(1, health=health, backend_framing="auto")
    assert pool.backends[0].framing == framing
    pool.mark_down(pool.backends[0], "connection reset")
    assert pool.backends[0].framing == framing


# -- the checker's loop, with a probe of our own ----------------------------------------


class FakeProbe:
    """Answers every check with `result`; counts the checks of each backend."""

    def __init__(self, result: ProbeResult = OK) -> None:
        self.result = result
        self.calls: dict[str, int] = {}
        self.in_flight = 0
        self.most_in_flight = 0
        self.gate: asyncio.Event | None = None
        self.framings: list[str] = []

    async def __call__(self, backend: Backend, framing: str) -> ProbeResult:
        self.calls[backend.address] = self.calls.get(backend.address, 0) + 1
        self.framings.append(framing)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            else:
                await asyncio.sleep(0)
            return self.result
        finally:
            self.in_flight -= 1


async def poll(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait (without blocking the loop) until `predicate` holds, failing after `timeout`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def test_a_backend_in_maintenance_is_not_checked_until_it_is_back() -> None:
    pool = make_pool(2, health=HealthConfig(interval=0.02, jitter=0.0, rise=1, fall=1))
    fake = FakeProbe()
    checker = HealthChecker(pool, probe=fake)
    busy, maint = pool.backends
    maint.admin_state = MAINT
    checker.start()
    try:
        await poll(lambda: fake.calls.get(busy.address, 0) >= 5, "checks of the other backend")
        assert fake.calls.get(maint.address, 0) == 0, "a probe reached a backend in maintenance"
        maint.admin_state = READY
        await poll(lambda: fake.calls.get(maint.address, 0) >= 2, "checks to resume")
    finally:
        await checker.stop()


async def test_a_reload_that_changes_health_settings_goes_on_checking_with_them() -> None:
    pool = make_pool(
        2, health=HealthConfig(interval=0.02, jitter=0.0, rise=1, fall=1), backend_framing="auto"
    )
    fake = FakeProbe()
    checker = HealthChecker(pool, probe=fake)
    checker.start()
    try:
        await poll(lambda: len(fake.framings) >= 4, "checks")
        assert set(fake.framings) == {""}, "auto: detect"
        pool.service = dataclasses.replace(
            pool.service, backend_framing="raw", health=HealthConfig(interval=0.02, rise=3)
        )
        checker.reconfigure()
        assert [b.framing for b in pool] == ["raw", "raw"]
        seen = len(fake.framings)
        await poll(lambda: len(fake.framings) >= seen + 4, "checks after the reload")
        assert set(fake.framings[seen + 2 :]) == {"raw"}
        assert all(checker.states[b].rise == 3 for b in pool)
        pool.service = dataclasses.replace(pool.service, health=HealthConfig(enabled=False))
        checker.reconfigure()
        assert len(checker.schedule) == 0, "nothing is due any more with health checks off"
        assert "0 watched, 0 probing" in repr(checker)
    finally:
        await checker.stop()


async def test_the_first_round_checks_at_most_concurrency_backends_at_once() -> None:
    pool = make_pool(40)
    fake = FakeProbe(REFUSED)
    fake.gate = asyncio.Event()
    checker = HealthChecker(pool, probe=fake)
    checker.concurrency = 7
    task = asyncio.create_task(checker.initial_round())
    await poll(lambda: fake.in_flight == 7, "the first probes")
    fake.gate.set()
    await task
    assert fake.most_in_flight == 7
    assert sum(fake.calls.values()) == 40
    assert all(b.state == DOWN for b in pool)


async def test_the_first_round_hands_the_policy_one_new_set_however_many_fail(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What made start-up quadratic: a policy update (a Maglev table) per failed backend."""
    pool = make_pool(300, algorithm="consistent_hash")
    updates = 0
    update = pool.policy.update

    def counting(targets: list[Backend]) -> None:
        nonlocal updates
        updates += 1
        update(targets)

    pool.policy.update = counting  # type: ignore[method-assign, assignment]
    checker = HealthChecker(pool, probe=FakeProbe(REFUSED))
    checker.concurrency = 10  # 30 waves, each ending in another turn of the loop
    with caplog.at_level(logging.WARNING, logger="balancer"):
        await checker.initial_round()
    assert updates == 1
    assert pool.pick(b"key") is None
    assert all(b.last_reason == "initial check failed: connection refused" for b in pool)
    # the log names the first failures one by one and sums up the rest
    assert len(caplog.records) <= 101
    assert "200 more backend(s) DOWN" in caplog.records[-1].getMessage()


async def test_transitions_of_one_loop_turn_make_one_refresh_and_never_a_stale_pick() -> None:
    pool = make_pool(5, health=HealthConfig(rise=1, fall=1))
    checker = HealthChecker(pool)
    updates = 0
    update = pool.policy.update

    def counting(targets: list[Backend]) -> None:
        nonlocal updates
        updates += 1
        update(targets)

    pool.policy.update = counting  # type: ignore[method-assign, assignment]
    for b in pool.backends[:4]:
        checker.apply(b, REFUSED)
    # before the deferred refresh has run, no pick returns a backend marked down,
    # through the pool or straight from the policy (as the message proxy picks)
    assert [pool.policy.pick() for _ in range(5)] == [pool.backends[4]] * 5
    assert [pool.pick() for _ in range(5)] == [pool.backends[4]] * 5
    assert updates == 0
    await asyncio.sleep(0)
    assert updates == 1
    assert pool.policy.targets == [pool.backends[4]]


async def test_a_backend_that_came_up_a_moment_ago_is_picked_before_the_refresh() -> None:
    pool = make_pool(2, health=HealthConfig(rise=1, fall=1))
    checker = HealthChecker(pool)
    a, b = pool.backends
    pool.mark_down(a, "connection refused")
    pool.mark_down(b, "connection refused")
    checker.apply(a, OK)
    assert pool.pick() is a, "not 'Server not available' for the rest of the loop turn"
    pool.mark_down(a, "connection refused")
    checker.apply(b, OK)
    assert pool.fallback() is b  # the message proxy's way: policy.pick(...) or fallback()


# -- the probe, on real sockets ---------------------------------------------------------


class LineServer:
    """A line backend: one reply line per request line; records every connection's bytes."""

    def __init__(self, reply: bytes | None = b"!HEALTH_CHECK\n") -> None:
        self.reply = reply
        self.received: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = b""
        try:
            while True:
                chunk = await r.read(4096)
                if not chunk:
                    break
                data += chunk
                if b"\n" in chunk and self.reply is not None:
                    w.write(self.reply)
                    await w.drain()
        finally:
            self.received.append(data)
            w.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class OriginalService:
    """The tutorial's original service: one recv(1024) is one message, the reply unterminated.

    Runs in a thread with blocking sockets, as the original does; records every message.
    Replies wait for `release` (set from the start unless a test clears it).
    """

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.messages: list[bytes] = []
        self.release = threading.Event()
        self.release.set()
        self.replied = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(1024)
                except OSError:
                    return
                if not data:
                    return
                self.messages.append(data)
                msg = data.decode()
                reply = msg if msg == "!HEALTH_CHECK" else "Invalid message"
                self.release.wait(10)
                try:
                    conn.sendall(reply.encode())
                except OSError:
                    return
                self.replied.set()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def original() -> Iterator[OriginalService]:
    service = OriginalService()
    yield service
    service.close()


async def test_probe_checks_the_reply() -> None:
    good = LineServer(b"!HEALTH_CHECK\n")
    bad = LineServer(b"nope\n")
    silent = LineServer(None)
    cfg = HealthConfig(timeout=1.0)
    try:
        assert (await probe("127.0.0.1", await good.start(), cfg)).ok
        r = await probe("127.0.0.1", await bad.start(), cfg)
        assert not r.ok
        assert "unexpected reply 'nope'" in r.reason
        port = await silent.start()
        silent.reply = None
        r = await probe("127.0.0.1", port, HealthConfig(timeout=0.2))
        assert not r.ok
        assert r.reason == "no answer within 0.2s"
    finally:
        for s in (good, bad, silent):
            await s.stop()


async def test_probe_of_a_closed_port_is_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = await probe("127.0.0.1", port, HealthConfig(timeout=0.5))
    assert not r.ok
    assert r.reason == "connection refused"


@pytest.mark.parametrize("host", ["no-such-host.invalid", "256.1.1.1"])
async def test_probe_of_a_name_that_does_not_resolve_says_so(host: str) -> None:
    r = await probe(host, 80, HealthConfig(timeout=2.0))
    assert not r.ok
    assert r.reason.startswith(f"cannot resolve {host!r}")  # ": why" or " within 2s"


async def test_auto_detects_a_line_backend_that_sees_one_complete_request() -> None:
    server = LineServer()
    port = await server.start()
    try:
        r = await probe("127.0.0.1", port, HealthConfig(timeout=0.4), framing="")
        assert r.ok, r.reason
        assert r.framing == "line"
        await poll(lambda: len(server.received) == 2, "both probe connections to end")
        # the unterminated first try is dropped unanswered; the second is one whole line
        assert sorted(server.received) == [b"!HEALTH_CHECK", b"!HEALTH_CHECK\n"]
    finally:
        await server.stop()


async def test_auto_detects_the_tutorials_original_service_as_raw(
    original: OriginalService,
) -> None:
    r = await probe("127.0.0.1", original.port, HealthConfig(timeout=1.0), framing="")
    assert r.ok, r.reason
    assert r.framing == "raw"
    assert original.messages == [b"!HEALTH_CHECK"], "one message, answered once"


async def test_a_line_check_of_a_raw_backend_says_the_reply_had_no_newline(
    original: OriginalService,
) -> None:
    r = await probe("127.0.0.1", original.port, HealthConfig(timeout=0.3), framing="line")
    assert not r.ok
    assert r.reason == "reply without a newline: 'Invalid me...' — does it speak raw framing?"


async def test_a_raw_check_of_the_original_service_passes(original: OriginalService) -> None:
    r = await probe("127.0.0.1", original.port, HealthConfig(timeout=1.0), framing="raw")
    assert r.ok, r.reason


async def test_each_probe_connection_is_known_to_loopguard_while_it_is_open() -> None:
    """A listener of ours that accepts a probe can tell it is talking to itself."""
    pool = make_pool(1)
    backend = pool.backends[0]
    seen: list[object] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        seen.append(loopguard.owner(w.get_extra_info("peername")))
        await r.readline()
        w.write(b"!HEALTH_CHECK\n")
        await w.drain()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        r = await probe("127.0.0.1", port, HealthConfig(timeout=1.0), owner=(pool, backend))
        assert r.ok
        assert seen == [(pool, backend)]
        assert loopguard.open_count() == 0, "unregistered once the probe is over"
    finally:
        server.close()
        await server.wait_closed()


def _block_loop_until(condition: Callable[[], bool]) -> None:
    """Keep the event loop busy (as a long callback would) until `condition` holds."""
    deadline = time.monotonic() + 10
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
@pytest.mark.parametrize("phase", ["reply", "connect"])
def test_a_busy_event_loop_never_fails_a_backend_that_answered(
    original: OriginalService, phase: str, loop_name: str
) -> None:
    """Our own scheduling delay is not the backend's fault (on both loops: uvloop runs
    due timers before it polls for I/O, asyncio after)."""
    cfg = HealthConfig(timeout=0.2)

    async def scenario() -> ProbeResult:
        loop = asyncio.get_running_loop()
        start = loop.time()
        task = asyncio.ensure_future(probe("127.0.0.1", original.port, cfg, framing="raw"))

        def past_deadline() -> bool:
            return loop.time() > start + cfg.timeout + 2 * LATE

        if phase == "reply":
            # busy once the probe is out, until the reply is in and the deadline is past,
            # in an I/O callback (as a long data_received would be): after it, uvloop runs
            # the due timer before it polls again
            original.release.clear()
            await poll(lambda: bool(original.messages), "the probe to arrive")
            r, w = socket.socketpair()

            def busy() -> None:
                loop.remove_reader(r.fileno())
                original.release.set()  # the reply comes while we are busy
                _block_loop_until(lambda: original.replied.is_set() and past_deadline())

            loop.add_reader(r.fileno(), busy)
            w.send(b"x")
            try:
                return await task
            finally:
                r.close()
                w.close()
        else:
            # busy from just after the connect was started until the deadline is past
            loop.call_soon(_block_loop_until, past_deadline)
        return await task

    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        r = runner.run(scenario())
    assert r.ok, r.reason
    if phase == "reply":
        assert original.messages == [b"!HEALTH_CHECK"], "the reply that came was read"


async def test_no_backend_goes_down_when_we_run_out_of_descriptors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With `ulimit -n` exhausted the probes cannot open a socket: our shortage, not theirs."""
    server = LineServer()
    port = await server.start()
    pool = make_pool(
        hosts=[("127.0.0.1", port)],
        health=HealthConfig(interval=0.02, jitter=0.0, timeout=1.0, rise=1, fall=1),
    )
    checker = HealthChecker(pool)
    before = resources.ALARM.counts["file_descriptors"]

    def no_descriptors(*args: object, **kwargs: object) -> socket.socket:
        raise OSError(errno.EMFILE, "Too many open files")

    checker.start()
    try:
        with monkeypatch.context() as m:
            m.setattr(socket, "socket", no_descriptors)
            await poll(
                lambda: resources.ALARM.counts["file_descriptors"] >= before + 3,
                "probes to meet the shortage",
            )
            assert pool.backends[0].state == UP
        assert pool.backends[0].last_check is None, "a check that could not run is no check"
    finally:
        await checker.stop()
        await server.stop()


# -- the checker on real sockets --------------------------------------------------------


async def test_checker_marks_down_at_start_and_brings_back_up() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pool = make_pool(
        hosts=[("127.0.0.1", port)],
        health=HealthConfig(interval=0.05, timeout=0.5, rise=2, fall=1, jitter=0.0),
    )
    checker = HealthChecker(pool)
    await checker.initial_round()
    assert pool.backends[0].state == "down"
    assert "connection refused" in pool.backends[0].last_reason
    came_up = asyncio.Event()
    pool.on_transition.append(lambda b, new, reason: came_up.set() if new == "up" else None)
    checker.start()
    revived = await asyncio.start_server(_answer, "127.0.0.1", port, reuse_address=True)
    try:
        async with asyncio.timeout(10):
            await came_up.wait()
        assert "2 good check(s)" in pool.backends[0].last_reason
    finally:
        revived.close()
        await checker.stop()


async def test_a_backend_added_at_run_time_that_never_comes_up_says_why() -> None:
    pool = make_pool(
        hosts=[("127.0.0.1", 9)],
        health=HealthConfig(interval=0.05, timeout=0.5, rise=1, fall=1, jitter=0.0),
    )
    checker = HealthChecker(pool)
    checker.start()
    try:
        added = pool.add(BackendConfig("no-such-host.invalid", 80))
        added.state = DOWN
        added.last_reason = "added; waiting for health checks"
        pool.refresh()
        checker.watch(added)
        await poll(lambda: added.last_reason != "added; waiting for health checks", "a check")
        assert added.last_reason.startswith("check failed: cannot resolve 'no-such-host.invalid'")
    finally:
        await checker.stop()


async def _answer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    line = await r.readline()
    w.write(line)
    await w.drain()
    w.close()


async def _within(seconds: float, aw: Awaitable[None]) -> None:
    async with asyncio.timeout(seconds):
        await aw


async def test_stop_is_prompt_at_every_step_of_a_check() -> None:
    writers: list[asyncio.StreamWriter] = []

    async def answer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        writers.append(w)
        await _answer(r, w)

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for steps in range(40):
            pool = make_pool(
                hosts=[("127.0.0.1", port)],
                health=HealthConfig(interval=0.0, timeout=1.0, jitter=0.0),
            )
            checker = HealthChecker(pool)
            checker.start()
            for _ in range(steps):
                await asyncio.sleep(0)
            await _within(2, checker.stop())
            assert loopguard.open_count() == 0
    finally:
        server.close()
        for w in writers:
            w.close()
        await asyncio.sleep(0)


async def test_the_first_round_is_cancelled_promptly() -> None:
    held: list[asyncio.StreamWriter] = []

    async def hold(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = make_pool(hosts=[("127.0.0.1", port)], health=HealthConfig(timeout=60.0))
    checker = HealthChecker(pool)
    task = asyncio.create_task(checker.initial_round())
    try:
        await poll(lambda: bool(held), "the probe to connect")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await _within(5, task)
        assert loopguard.open_count() == 0
    finally:
        for w in held:
            w.close()
        server.close()
