from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import OPEN_CLIENTS, Balancers, Services


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
