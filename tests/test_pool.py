"""Outlier ejection and the fallback to an ejected backend, on the pure pool (no I/O)."""

from __future__ import annotations

import logging

import pytest

from balancer.config import BackendConfig, OutlierConfig, ServiceConfig
from balancer.pool import DOWN, DRAIN, MAINT, UP, BackendPool


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
