from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from balancer.config import BackendConfig, HealthConfig, ServiceConfig
from balancer.health import HealthChecker, HealthState, probe
from balancer.pool import BackendPool


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


async def _echo_server(reply: bytes | None) -> asyncio.Server:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readline()
        if reply is not None:
            w.write(reply)
            await w.drain()
        w.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_probe_checks_the_reply() -> None:
    good = await _echo_server(b"!HEALTH_CHECK\n")
    bad = await _echo_server(b"nope\n")
    silent = await _echo_server(None)
    cfg = HealthConfig(timeout=1.0)
    try:
        port = good.sockets[0].getsockname()[1]
        assert (await probe("127.0.0.1", port, cfg)).ok
        port = bad.sockets[0].getsockname()[1]
        r = await probe("127.0.0.1", port, cfg)
        assert not r.ok
        assert "unexpected reply 'nope'" in r.reason
        port = silent.sockets[0].getsockname()[1]
        r = await probe("127.0.0.1", port, cfg)
        assert not r.ok
        assert "closed" in r.reason
    finally:
        for s in (good, bad, silent):
            s.close()


async def test_probe_refused_and_timeout() -> None:
    # a listener that never answers: accept and hold
    held: list[asyncio.StreamWriter] = []

    async def hold(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    r = await probe("127.0.0.1", port, HealthConfig(timeout=0.2))
    assert not r.ok
    assert "no answer within 0.2s" in r.reason
    server.close()
    for w in held:
        w.close()
    await server.wait_closed()
    r = await probe("127.0.0.1", port, HealthConfig(timeout=0.5))
    assert not r.ok
    assert r.reason == "connection refused"


async def test_checker_marks_down_at_start_and_brings_back_up() -> None:
    # a port with nothing on it
    server = await _echo_server(b"!HEALTH_CHECK\n")
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    cfg = ServiceConfig(
        name="t",
        listen_host="127.0.0.1",
        listen_port=0,
        backends=(BackendConfig("127.0.0.1", port),),
        health=HealthConfig(interval=0.05, timeout=0.5, rise=2, fall=1, jitter=0.0),
    )
    pool = BackendPool(cfg)
    checker = HealthChecker(pool)
    await checker.initial_round()
    assert pool.backends[0].state == "down"
    assert "connection refused" in pool.backends[0].last_reason
    came_up = asyncio.Event()
    pool.on_transition.append(lambda b, new, reason: came_up.set() if new == "up" else None)
    checker.start()
    try:
        revived = await asyncio.start_server(
            lambda r, w: _answer(r, w), "127.0.0.1", port, reuse_address=True
        )
        async with asyncio.timeout(10):
            await came_up.wait()
        assert "2 good check(s)" in pool.backends[0].last_reason
        revived.close()
    finally:
        await checker.stop()


async def _answer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    line = await r.readline()
    w.write(line)
    await w.drain()
    w.close()
