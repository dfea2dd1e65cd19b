from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import OPEN_CLIENTS


@pytest.fixture(autouse=True)
def _close_line_clients() -> Iterator[None]:
    yield
    while OPEN_CLIENTS:
        OPEN_CLIENTS.pop().close()
