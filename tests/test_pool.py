"""Outlier ejection and the fallback to an ejected backend, on the pure pool (no I/O)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from balancer.config.model import BackendConfig, OutlierConfig, ServiceConfig
from balancer.core.pool import Backend, BackendPool
from balancer.core.states import DOWN, DRAIN, MAINT, UP


def make_pool(n: int, **options: object) -> BackendPool:
    config = ServiceConfig(
        name="svc",
        listen_host="127.0.0.1",
        listen_port=0,
        backends=tuple(BackendConfig("127.0.0.1", 9000 + i) for i in range(n)),
        **options,  # type: ignore[arg-type]
    )
    return BackendPool(config)


def test_ejection_time_doubles_for_a_repeat_offender() -> None:
    pool = make_pool(4)
    a = pool.backends[0]
    assert pool.report_failure(a, "connect refused")
    assert a.state == DOWN
    first = pool.ejection_left(a)
    pool.mark_up(a, "checks pass")
    assert pool.report_failure(a, "connect refused")
    assert pool.ejection_left(a) > 1.5 * first


def test_a_failure_beyond_max_ejection_percent_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = make_pool(2)
    a, b = pool.backends
    assert pool.report_failure(a, "refused")
    with caplog.at_level(logging.WARNING, logger="balancer"):
        for _ in range(100):
            assert not pool.report_failure(b, "refused")
    assert b.state == UP, "ejecting it would exceed max_ejection_percent"
    assert len([r for r in caplog.records if "not ejected" in r.getMessage()]) == 1


def test_with_nothing_eligible_the_fallback_is_an_ejected_backend_whose_checks_pass() -> None:
    """One backend ejected but recovered, the other dead: send traffic to the first."""
    pool = make_pool(2)
    recovered, dead = pool.backends
    assert pool.report_failure(recovered, "refused")
    recovered.last_check_ok = True  # restarted: the checker's probes pass again
    pool.mark_down(dead, "3 failed check(s)")
    dead.last_check_ok = False
    assert pool.pick() is None
    assert pool.fallback() is recovered
    assert pool.fallback(exclude=[recovered]) is None


@pytest.mark.parametrize(
    "why", ["check failing", "drained", "maintenance", "weight 0", "down, never checked"]
)
def test_the_fallback_never_takes_a_backend_that_should_not_serve(why: str) -> None:
    pool = make_pool(1)
    b = pool.backends[0]
    assert pool.report_failure(b, "refused")
    b.last_check_ok = True
    if why == "check failing":
        b.last_check_ok = False
    elif why == "drained":
        b.admin_state = DRAIN
    elif why == "maintenance":
        b.admin_state = MAINT
    elif why == "weight 0":
        b.weight = 0
    else:
        b.last_check_ok = None
        b.ejected_until = 0.0  # down, but not by outlier ejection, and nothing known
    assert pool.fallback() is None


def test_a_backend_down_by_its_checks_whose_last_check_passed_is_a_fallback() -> None:
    """Its ejection is over (or it was never ejected) and it waits for `rise` good checks."""
    pool = make_pool(2)
    waiting, dead = pool.backends
    pool.mark_down(waiting, "3 failed check(s)")
    waiting.last_check_ok = True
    pool.mark_down(dead, "3 failed check(s)")
    dead.last_check_ok = False
    assert pool.fallback() is waiting


def test_the_fallback_prefers_the_backend_whose_ejection_ends_first() -> None:
    pool = make_pool(3, outlier=OutlierConfig(max_ejection_percent=100.0))
    a, b, c = pool.backends
    for backend in (a, b, c):
        assert pool.report_failure(backend, "refused")
    b.ejected_until -= 1.0
    assert pool.fallback() is b


def test_ejection_needs_consecutive_failures_in_a_row() -> None:
    pool = make_pool(4, outlier=OutlierConfig(consecutive_failures=3))
    a = pool.backends[0]
    assert not pool.report_failure(a, "reset")
    assert not pool.report_failure(a, "reset")
    pool.report_success(a)  # a reply in between: the run is broken
    assert not pool.report_failure(a, "reset")
    assert not pool.report_failure(a, "reset")
    assert a.state == UP
    assert pool.report_failure(a, "reset")
    assert a.state == DOWN


def test_ejection_time_doubles_up_to_max_ejection_time_and_no_further() -> None:
    pool = make_pool(4, outlier=OutlierConfig(base_ejection_time=1.0, max_ejection_time=3.0))
    a = pool.backends[0]
    times = []
    for _ in range(5):
        assert pool.report_failure(a, "reset")
        times.append(round(pool.ejection_left(a)))
        pool.mark_up(a, "checks pass")
    assert times == [1, 2, 3, 3, 3]


def test_no_more_than_max_ejection_percent_of_the_backends_are_ejected() -> None:
    pool = make_pool(10, outlier=OutlierConfig(max_ejection_percent=30.0))
    results = [pool.report_failure(b, "reset") for b in pool.backends]
    assert results == [True] * 3 + [False] * 7
    assert [b.state for b in pool.backends].count(DOWN) == 3


def test_a_looped_backend_stays_down_whatever_marks_it_up() -> None:
    pool = make_pool(2)
    a = pool.backends[0]
    pool.mark_loop(a, "accepted our own probe")
    assert not pool.mark_up(a, "2 good check(s): reply ok")
    assert a.state == DOWN
    assert a.looped
    assert pool.pick() is pool.backends[1]
    assert pool.fallback() is None


def test_backends_are_found_by_address_after_removes_and_adds() -> None:
    pool = make_pool(3)
    a, b, c = pool.backends
    pool.remove(b)
    assert pool.get(b.address) is None
    again = pool.add(b.config)
    assert again is not b
    assert pool.get(b.address) is again
    assert pool.get(a.address) is a
    assert pool.get(c.address) is c


# -- transitions: what the log, the hooks, /status and the policy see ------------------------


def test_mark_up_tells_the_log_the_hooks_and_the_policy_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = make_pool(2)
    a, b = pool.backends
    seen: list[tuple[object, str, str]] = []
    pool.on_transition.append(lambda backend, state, reason: seen.append((backend, state, reason)))
    pool.mark_down(a, "3 failed check(s): refused")
    assert a.last_reason == "3 failed check(s): refused"
    assert pool.policy.targets == [b]
    down_at = a.last_change
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="balancer"):
        assert pool.mark_up(a, "2 good check(s)")
    assert [r.getMessage() for r in caplog.records] == [
        "backend 127.0.0.1:9000 of service svc is UP: 2 good check(s)"
    ]
    assert caplog.records[0].levelno == logging.INFO, "a recovery is good news"
    assert seen == [(a, DOWN, "3 failed check(s): refused"), (a, UP, "2 good check(s)")]
    assert (a.state, a.last_reason) == (UP, "2 good check(s)")
    assert a.last_change >= down_at
    assert a.up_since is not None
    assert pool.policy.targets == [a, b]
    assert pool.mark_up(a, "still fine"), "already up: True, and only the reason changes"
    assert a.last_reason == "still fine"
    assert len(seen) == 2


async def test_marks_refresh_the_policy_at_once_unless_deferred() -> None:
    pool = make_pool(3)
    pool.defer = asyncio.get_running_loop().call_soon  # as the health checker sets it
    a, b, c = pool.backends
    pool.mark_down(a, "refused")
    assert pool.policy.targets == [b, c], "not deferred: at once, even inside a loop"
    pool.mark_up(a, "checks pass")
    assert pool.policy.targets == [a, b, c]
    pool.mark_down(a, "refused", defer=True)
    pool.mark_down(b, "refused", defer=True)
    assert pool.policy.targets == [a, b, c], "deferred: at the end of this turn"
    await asyncio.sleep(0)
    assert pool.policy.targets == [c]
    pool.mark_up(a, "checks pass", defer=True)
    await asyncio.sleep(0)
    assert pool.policy.targets == [a, c], "a second deferred refresh is scheduled too"


def test_a_loop_is_logged_as_an_error_naming_the_backend_and_shown_as_the_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = make_pool(2)
    a = pool.backends[0]
    with caplog.at_level(logging.WARNING, logger="balancer"):
        pool.mark_loop(a, "it accepted our own probe")
        pool.mark_loop(a, "it accepted our own probe")
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        "backend 127.0.0.1:9000 of service svc is this balancer itself "
        "(it accepted our own probe); it will not be used"
    ], "said once"
    assert a.last_reason == "connection loop: it accepted our own probe"


def test_an_added_backend_comes_last_with_the_services_slow_start_and_framing() -> None:
    pool = make_pool(2, slow_start=5.0, backend_framing="raw")
    new = pool.add(BackendConfig("127.0.0.1", 9100))
    assert pool.backends[-1] is new
    assert (new.index, new.slow_start, new.framing) == (2, 5.0, "raw")
    assert new in pool.policy.targets


def test_set_backends_makes_the_new_list_the_pools_in_order_and_finds_them_by_address() -> None:
    pool = make_pool(3, slow_start=2.0, backend_framing="raw")
    a, _b, c = pool.backends
    fresh = pool.new_backend(BackendConfig("127.0.0.1", 9100, weight=3))
    assert fresh not in pool.backends
    assert (fresh.slow_start, fresh.framing, fresh.weight) == (2.0, "raw", 3)
    pool.set_backends([c, fresh, a])
    assert pool.backends == [c, fresh, a]
    assert [x.index for x in pool.backends] == [0, 1, 2]
    assert pool.get(fresh.address) is fresh
    assert pool.get("127.0.0.1:9001") is None
    assert set(pool.policy.targets) == {c, fresh, a}


def test_the_pools_repr_counts_up_down_and_in_flight() -> None:
    pool = make_pool(3)
    a, b, _c = pool.backends
    pool.mark_down(a, "refused")
    b.in_flight = 4
    assert repr(pool) == "<BackendPool svc: 3 backends: 2 up, 1 down | 4 in flight>"


def test_a_new_backend_starts_up_ready_and_with_nothing_counted() -> None:
    b = Backend(BackendConfig("127.0.0.1", 9000, weight=3))
    assert (b.index, b.slow_start, b.framing) == (0, 0.0, "line")
    assert b.address_bytes == b"127.0.0.1:9000"
    assert (b.state, b.admin_state, b.weight, b.looped) == (UP, "ready", 3, False)
    counted = (b.in_flight, b.requests, b.failures, b.active_connections, b.total_connections)
    assert counted == (0, 0, 0, 0, 0)
    assert (b.bytes_in, b.bytes_out, b.connect_failures, b.ejections) == (0, 0, 0, 0)
    assert (b.last_reason, b.ejected_until, b.last_check_ok) == ("", 0.0, None)
    assert b.last_change <= time.monotonic()
    assert Backend(BackendConfig("h", 1), framing="auto").framing == "", "to be detected"
    assert Backend(BackendConfig("h", 1), 4, 2.5, "raw").framing == "raw"


def test_the_pools_backends_keep_their_config_order_as_their_index() -> None:
    pool = make_pool(3, slow_start=1.5)
    assert [(b.index, b.port, b.slow_start) for b in pool.backends] == [
        (0, 9000, 1.5),
        (1, 9001, 1.5),
        (2, 9002, 1.5),
    ]


def test_the_pool_passes_the_key_and_the_exclusions_to_the_policy() -> None:
    pool = make_pool(8, algorithm="consistent_hash")
    keys = [b"k%d" % i for i in range(50)]
    homes = {key: pool.pick(key) for key in keys}
    assert len(set(homes.values())) > 1, "keys spread over backends"
    for key, home in homes.items():
        assert home is not None
        assert pool.pick(key) is home, "the same key, the same backend"
        assert pool.pick(key, [home]) not in (home, None)


def test_a_stale_pool_refreshes_before_it_says_nothing_is_eligible() -> None:
    pool = make_pool(2, algorithm="consistent_hash")
    a, b = pool.backends
    pool.mark_down(a, "refused")
    pool.mark_down(b, "refused")
    a.state = UP  # as a deferred mark_up leaves it until the end of the turn
    pool._stale = True
    assert pool.pick(b"key", [b]) is a
    pool.mark_down(a, "refused")
    b.state = UP
    pool._stale = True
    assert pool.fallback([a]) is b


def test_mark_down_tells_the_log_and_the_hooks_once_and_keeps_the_latest_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = make_pool(2)
    a = pool.backends[0]
    seen: list[tuple[object, str, str]] = []
    pool.on_transition.append(lambda backend, state, reason: seen.append((backend, state, reason)))
    before = a.last_change
    with caplog.at_level(logging.WARNING, logger="balancer"):
        pool.mark_down(a, "connect refused")
        pool.mark_down(a, "still refused")
    assert [r.getMessage() for r in caplog.records] == [
        "backend 127.0.0.1:9000 of service svc is DOWN: connect refused"
    ]
    assert seen == [(a, DOWN, "connect refused")]
    assert a.last_reason == "still refused"
    assert a.last_change >= before
    assert a.up_since is None


def test_without_outlier_detection_a_live_failure_marks_the_backend_down_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = make_pool(4, outlier=OutlierConfig(enabled=False))
    a = pool.backends[0]
    assert pool.report_failure(a, "reset by peer")
    assert (a.state, a.last_reason, a.ejected_until) == (DOWN, "reset by peer", 0.0)
    assert not pool.report_failure(a, "reset by peer"), "already down: nothing new"


def test_the_ejection_cap_counts_only_backends_that_are_ejected_now() -> None:
    pool = make_pool(4, outlier=OutlierConfig(max_ejection_percent=25.0))
    a, b, c, _d = pool.backends
    pool.mark_down(c, "3 failed check(s)")  # down by its checks, not ejected
    assert pool.report_failure(a, "reset"), "c is down but not ejected: a may go"
    assert not pool.report_failure(b, "reset"), "a is ejected: 25 % of 4 is one"
    a.ejected_until = time.monotonic() - 1  # its ejection is over (still down)
    assert pool.report_failure(b, "reset")


def test_the_ejection_cap_is_said_once_per_base_ejection_time(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    pool = make_pool(2, outlier=OutlierConfig(base_ejection_time=2.0))
    a, b = pool.backends
    assert pool.report_failure(a, "refused")
    a.ejected_until = clock[0] + 60.0  # still ejected throughout
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="balancer"):
        assert not pool.report_failure(b, "refused")
        clock[0] += 1.99
        assert not pool.report_failure(b, "refused")
        clock[0] += 0.01
        assert not pool.report_failure(b, "refused")
    messages = [r.getMessage() for r in caplog.records]
    assert (
        messages
        == [
            "backend 127.0.0.1:9001 of service svc not ejected (refused): 1 of 2 backends "
            "already ejected, max_ejection_percent 50"
        ]
        * 2
    )


def test_a_backend_whose_framing_is_unknown_is_no_fallback() -> None:
    pool = make_pool(2, backend_framing="auto")
    a, b = pool.backends
    assert a.framing == "", "health checks on with a probe: detected by the first check"
    for backend in (a, b):
        pool.mark_down(backend, "3 failed check(s)")
        backend.last_check_ok = True
    b.framing = "line"
    assert pool.fallback() is b


def test_the_fallback_takes_the_first_of_equal_ejections() -> None:
    pool = make_pool(3, outlier=OutlierConfig(max_ejection_percent=100.0))
    for backend in pool.backends:
        assert pool.report_failure(backend, "refused")
    a, b, c = pool.backends
    b.ejected_until = c.ejected_until = a.ejected_until - 1.0
    assert pool.fallback() is b


def test_a_long_good_spell_forgives_earlier_ejections(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    outlier = OutlierConfig(base_ejection_time=1.0, max_ejection_time=4.0)
    pool = make_pool(4, outlier=outlier)
    a = pool.backends[0]
    for _ in range(3):
        assert pool.report_failure(a, "reset")
        pool.mark_up(a, "checks pass")
    assert a.ejections == 3
    clock[0] = a.ejected_until + 10 * 4.0  # ten maximum ejections later: not yet
    assert pool.report_failure(a, "reset")
    assert (a.ejections, pool.ejection_left(a)) == (4, 4.0)
    pool.mark_up(a, "checks pass")
    clock[0] = a.ejected_until + 10 * 4.0 + 0.5
    assert pool.report_failure(a, "reset")
    assert (a.ejections, pool.ejection_left(a)) == (1, 1.0), "forgiven: a first offence again"


def test_a_stale_pool_picks_by_key_among_what_came_up() -> None:
    pool = make_pool(6, algorithm="consistent_hash")
    for backend in pool.backends:
        pool.mark_down(backend, "refused")
    for backend in pool.backends:
        backend.state = UP  # deferred mark_ups: the policy has not been told yet
    keys = [b"k%d" % i for i in range(20)]
    picks = []
    for key in keys:
        pool._stale = True
        picks.append(pool.pick(key))
    assert picks == [pool.policy.pick(key, ()) for key in keys]
    home = picks[0]
    assert home is not None
    for backend in pool.backends:
        pool.mark_down(backend, "refused")
        backend.state = UP
    pool._stale = True
    assert pool.pick(keys[0], [home]) not in (home, None)
