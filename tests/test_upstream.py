"""What every proxy mode shares to reach backends and admit clients (balancer.proxy.upstream)."""

from __future__ import annotations

import errno

import pytest

from balancer.errors import BackendError, ConnectRefused, ConnectTimeout
from balancer.net import resources
from balancer.proxy.upstream import admit, connect_failure, has_room, local_shortage


@pytest.fixture
def budget(monkeypatch: pytest.MonkeyPatch) -> resources.FdBudget:
    fds = resources.FdBudget(limit=40, reserve=37)  # room for 3 client descriptors
    monkeypatch.setattr(resources, "FDS", fds)
    return fds


def test_admission_follows_the_connection_limit_without_a_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(resources, "FDS", None)
    assert admit(0, 0, 1) == (True, None), "0: no limit"
    assert admit(9, 10, 2) == (True, None)
    assert admit(10, 10, 1) == (False, None)


def test_admission_takes_every_descriptor_it_needs_or_none(budget: resources.FdBudget) -> None:
    assert admit(0, 0, 2) == (True, budget)
    assert budget.clients == 2
    admitted, held = admit(1, 0, 2)
    assert (admitted, held) == (False, None), "one descriptor left, two needed"
    assert budget.clients == 2, "the one taken is given back"
    assert admit(1, 0, 1) == (True, budget)
    assert budget.clients == 3
    assert admit(5, 5, 1) == (False, None), "over the limit: the budget is not asked"
    assert budget.clients == 3


def test_a_backend_has_room_under_its_limit_only() -> None:
    assert has_room(1000, 0)
    assert has_room(4, 5)
    assert not has_room(5, 5)


def test_a_failed_connect_is_a_backend_error_worded_for_the_log() -> None:
    timeout = connect_failure(TimeoutError(), 2.5)
    assert isinstance(timeout, ConnectTimeout)
    assert str(timeout) == "connect timeout after 2.5s"
    refused = connect_failure(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), 1)
    assert isinstance(refused, ConnectRefused)
    assert str(refused) == "connect failed: Connection refused"
    assert isinstance(connect_failure(OSError("no route"), 1), BackendError)


def test_our_own_shortages_are_told_from_the_backends_failures() -> None:
    before = resources.ALARM.counts["file_descriptors"]
    assert local_shortage(OSError(errno.EMFILE, "Too many open files"), "connecting to x")
    assert resources.ALARM.counts["file_descriptors"] == before + 1
    assert not local_shortage(ConnectionRefusedError(errno.ECONNREFUSED, "refused"), "x")
    assert not local_shortage(TimeoutError(), "x")
