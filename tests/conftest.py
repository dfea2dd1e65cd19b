"""Fixtures shared by the suite, and its strict mode.

Under `./scripts/test` (which exports BALANCER_STRICT=1) no test may skip: a skip, whether
from `pytest.skip`, a `skipif` mark or a module-level `importorskip`, is reported as a
failure with the skip's reason, so a missing peer or a stale condition cannot hide a test.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping

import pytest
import uvloop
from _pytest.reports import CollectReport, TestReport
from hypothesis import settings

from tests.http_support import close_clients
from tests.support import OPEN_CLIENTS, Balancers, Services

# `scripts/mutation` runs the fast tests with `--hypothesis-profile=mutation`: the same examples
# for every mutant, and no example database carried from one mutant's run to the next.
settings.register_profile("mutation", derandomize=True, database=None)


BOTH_LOOPS = ("tests/test_tcp.py", "tests/test_tls.py", "tests/test_proxy_protocol.py")
"""Test files whose async tests run on both loops (see `pytest_asyncio_loop_factories`)."""


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The tcp relay's and the front door's in-process tests run on both loops: their data
    paths lean on how each loop calls a protocol and hands sockets over (uvloop, which
    `balancer serve` uses, caches data_received).
    Other async tests run on asyncio's own loop, as they would without this hook."""
    if item.nodeid.startswith(
        ("tests/test_tcp.py", "tests/test_tls.py", "tests/test_proxy_protocol.py")
    ):
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


STRICT_VARIABLE = "BALANCER_STRICT"


def strict() -> bool:
    """True under ./scripts/test: a skip fails."""
    return os.environ.get(STRICT_VARIABLE, "") not in ("", "0")


def _skip_reason(report: TestReport | CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _fail_a_skip(report: TestReport | CollectReport) -> None:
    if strict() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = (
            f"skipped, and {STRICT_VARIABLE}=1 (./scripts/test) allows no skip: "
            f"{_skip_reason(report)}"
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, TestReport, TestReport]:
    report = yield
    _fail_a_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, CollectReport, CollectReport]:
    report = yield
    _fail_a_skip(report)
    return report


def pytest_report_header(config: pytest.Config) -> str | None:
    return f"strict: {STRICT_VARIABLE}=1, a skipped test fails" if strict() else None


@pytest.fixture(autouse=True)
def _close_line_clients() -> Iterator[None]:
    yield
    while OPEN_CLIENTS:
        OPEN_CLIENTS.pop().close()


@pytest.fixture
async def http_clients() -> AsyncIterator[None]:
    """Raw http clients a test opened (`tests.http_support.RawClient`) closed after it."""
    yield
    await close_clients()


@pytest.fixture
def services() -> Iterator[Services]:
    """Sample services the test starts with `services.start(...)`; stopped at teardown."""
    started = Services()
    yield started
    started.stop_all()


@pytest.fixture
def balancers(services: Services) -> Iterator[Balancers]:
    """Balancers the test starts with `balancers.start(config)`; stopped before the services."""
    started = Balancers()
    yield started
    started.stop_all()
