"""The dashboard in headless Chromium (Playwright), against a real balancer and services."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import (
    BalancerProc,
    Balancers,
    LineClient,
    ServiceProc,
    Services,
    backend_rows,
    reply_for,
    wait_until,
    write_toml,
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.peers,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"needs {CHROMIUM} (Debian chromium)"),
]

sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture
def setup(
    tmp_path: Path, services: Services, balancers: Balancers
) -> tuple[BalancerProc, list[ServiceProc]]:
    services.start_many(2)
    cfg = write_toml(
        tmp_path / "b.toml",
        services.ports,
        health={"interval": 0.2, "timeout": 0.5, "rise": 1, "fall": 1},
    )
    return balancers.start(cfg), services


def admin_state(bal: BalancerProc, address: str) -> str:
    return str(backend_rows(bal.status())[address]["admin_state"])


def test_dashboard_shows_backends_a_dead_one_and_drains_on_click(
    setup: tuple[BalancerProc, list[ServiceProc]],
) -> None:
    bal, services = setup
    a, b = (f"127.0.0.1:{s.port}" for s in services)
    client = LineClient(bal.port)
    for i in range(40):
        assert client.request(str(i)) == reply_for(i)
    client.close()

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(15_000)
            page.goto(f"http://127.0.0.1:{bal.admin_port}/")
            expect = sync_api.expect
            row_a = page.locator(f'tr[data-backend="{a}"]')
            row_b = page.locator(f'tr[data-backend="{b}"]')
            expect(row_a.locator("td.state")).to_have_text("up")
            expect(row_b.locator("td.state")).to_have_text("up")
            expect(row_a.locator("td.requests")).to_have_text("20")
            expect(page.locator('section[data-service="numbers"] h2')).to_have_text("numbers")

            # a killed backend turns down within the check interval (plus polling)
            services[0].stop()
            expect(row_a.locator("td.state")).to_have_text("down")
            expect(row_b.locator("td.state")).to_have_text("up")

            # the drain button changes the admin state, and /status agrees
            row_b.locator('button[data-action="drain"]').click()
            expect(row_b.locator("td.admin")).to_have_text("drain")
            assert admin_state(bal, b) == "drain"
            expect(row_b.locator('button[data-action="drain"]')).to_be_disabled()

            row_b.locator('button[data-action="up"]').click()
            expect(row_b.locator("td.admin")).to_have_text("ready")
            wait_until(lambda: admin_state(bal, b) == "ready", what="backend returned")
        finally:
            browser.close()
