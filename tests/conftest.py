from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping

import pytest
import uvloop

from tests.support import OPEN_CLIENTS, Balancers, Services


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The tcp relay's in-process tests run on both loops: its data path leans on how each
    loop calls a protocol (uvloop, which `balancer serve` uses, caches data_received).
    Other async tests run on asyncio's own loop, as they would without this hook."""
    if item.nodeid.startswith("tests/test_tcp.py"):
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture(autouse=True)
def _close_line_clients() -> Iterator[None]:
    yield
    while OPEN_CLIENTS:
        OPEN_CLIENTS.pop().close()


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
