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
