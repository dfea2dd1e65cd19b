"""The dashboard in headless Chromium (Playwright), against a real balancer and services."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.admin_support import running_with_admin, with_admin
from tests.http_support import serve_some, threaded_backend
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
from tests.tls_support import default_pki

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [pytest.mark.e2e, pytest.mark.peers]


def sync_api() -> Any:
    """Playwright's sync API; a missing browser or package fails the test, saying what to
    install (a skip would hide that the dashboard went untested)."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"the dashboard tests need {CHROMIUM}: apt-get install chromium")
    try:
        from playwright import sync_api as api
    except ImportError:
        pytest.fail(
            "the dashboard tests need Playwright: .venv/bin/pip install playwright "
            "(it is in the dev extras: pip install -e '.[dev]')"
        )
    return api


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    api = sync_api()
    with api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class Tab:
    """A fresh page, the errors it logged and every request it made."""

    page: Any
    errors: list[str] = field(default_factory=list)
    requests: list[Any] = field(default_factory=list)

    def console(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(message.text)


@pytest.fixture
def tab(browser: Any) -> Iterator[Tab]:
    context = browser.new_context()
    tab = Tab(context.new_page())
    tab.page.set_default_timeout(15_000)
    tab.page.on("console", tab.console)
    tab.page.on("pageerror", lambda e: tab.errors.append(str(e)))
    tab.page.on("request", lambda r: tab.requests.append(r))
    try:
        yield tab
    finally:
        context.close()


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
    setup: tuple[BalancerProc, list[ServiceProc]], tab: Tab
) -> None:
    bal, services = setup
    page = tab.page
    a, b = (f"127.0.0.1:{s.port}" for s in services)
    client = LineClient(bal.port)
    for i in range(40):
        assert client.request(str(i)) == reply_for(i)
    client.close()

    expect = sync_api().expect
    page.goto(f"http://127.0.0.1:{bal.admin_port}/")
    row_a = page.locator(f'tr[data-backend="{a}"]')
    row_b = page.locator(f'tr[data-backend="{b}"]')
    expect(row_a.locator("td.state")).to_have_text("up")
    expect(row_b.locator("td.state")).to_have_text("up")
    expect(row_a.locator("td.requests")).to_have_text("20")
    expect(page.locator('section[data-service="numbers"] h2')).to_have_text("numbers")
    expect(row_a.locator("td.reason")).to_have_text("")

    # a killed backend turns down within the check interval (plus polling), and says why
    services[0].stop()
    expect(row_a.locator("td.state")).to_have_text("down")
    expect(row_a.locator("td.reason")).to_contain_text("refused")
    wait_until(lambda: "refused" in backend_rows(bal.status())[a]["reason"], what="reason")
    expect(row_b.locator("td.state")).to_have_text("up")
    expect(row_b.locator("td.reason")).to_have_text("")

    # the drain button changes the admin state, and /status agrees
    row_b.locator('button[data-action="drain"]').click()
    expect(row_b.locator("td.admin")).to_have_text("drain")
    assert admin_state(bal, b) == "drain"
    expect(row_b.locator('button[data-action="drain"]')).to_be_disabled()

    row_b.locator('button[data-action="up"]').click()
    expect(row_b.locator("td.admin")).to_have_text("ready")
    wait_until(lambda: admin_state(bal, b) == "ready", what="backend returned")
    # the page's security policy blocks nothing the page itself needs
    assert tab.errors == []


def test_dashboard_reads_and_writes_with_the_token_from_its_fragment(
    tmp_path: Path, services: Services, tab: Tab
) -> None:
    page = tab.page
    a = f"127.0.0.1:{services.start().port}"
    b = f"127.0.0.1:{services.start().port}"
    cfg = with_admin(write_toml(tmp_path / "b.toml", services.ports), read_access="token")
    token = "env-t0ken-for-the-dashboard"
    expect = sync_api().expect
    with running_with_admin(cfg, env={"BALANCER_ADMIN_TOKEN": token}) as bal:
        base = f"http://127.0.0.1:{bal.admin_port}/"
        # without the token: the page says what it needs instead of showing nothing
        page.goto(base)
        expect(page.locator("#message")).to_contain_text("#token=")
        expect(page.locator(f'tr[data-backend="{a}"]')).to_have_count(0)

        page.goto(base + "#token=" + token)
        row_b = page.locator(f'tr[data-backend="{b}"]')
        expect(row_b.locator("td.state")).to_have_text("up")
        expect(page.locator("#message")).to_be_hidden()
        assert page.evaluate("location.hash") == ""  # the token left the address bar

        row_b.locator('button[data-action="drain"]').click()
        expect(row_b.locator("td.admin")).to_have_text("drain")
        status = page.request.get(
            base + "status", headers={"Authorization": f"Bearer {token}"}
        ).json()
        assert backend_rows(status)[b]["admin_state"] == "drain"

    api_requests = [r for r in tab.requests if "/api/" in r.url]
    assert api_requests
    assert all(token not in r.url for r in tab.requests)
    sent = [r for r in api_requests if r.headers.get("authorization") == f"Bearer {token}"]
    assert any(r.method == "PUT" for r in sent)
    assert any("/api/services" in r.url and r.method == "GET" for r in sent)
    # the refused reads are expected console errors (401); nothing else went wrong
    assert all("401" in e for e in tab.errors), tab.errors


def test_dashboard_shows_the_responses_and_errors_of_an_http_service(
    tmp_path: Path, balancers: Balancers, tab: Tab
) -> None:
    with threaded_backend() as backend:
        cfg = write_toml(tmp_path / "b.toml", [backend], mode="http", health={"enabled": False})
        bal = balancers.start(cfg)
        serve_some(bal.port)
        expect = sync_api().expect
        tab.page.goto(f"http://127.0.0.1:{bal.admin_port}/")
        http = tab.page.locator('section[data-service="numbers"] table.http')
        expect(http).to_be_visible()
        expect(http.locator('td[data-http="requests"]')).to_have_text("3")
        expect(http.locator('td[data-http="responses"]')).to_have_text("2xx 2 · 4xx 2")
        expect(http.locator('td[data-http="generated"]')).to_have_text("400 ×1")
        expect(http.locator('td[data-http="client_errors"]')).to_have_text("1")
        expect(http.locator('td[data-http="upstream"]')).to_contain_text("1 new · 2 reused")
    assert tab.errors == []


def test_dashboard_shows_a_tls_services_certificates_and_refused_connections(
    tmp_path: Path, balancers: Balancers, tab: Tab, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pki = default_pki(tmp_path_factory)
    with threaded_backend() as backend:
        cfg = write_toml(tmp_path / "b.toml", [backend], mode="http", health={"enabled": False})
        cert, key = pki.server.cert_path, pki.server.key_path
        with cfg.open("a") as f:
            f.write(f'[services.numbers.tls]\ncert = "{cert}"\nkey = "{key}"\n')
        bal = balancers.start(cfg)
        with socket.create_connection(("127.0.0.1", bal.port), timeout=30) as plain:
            plain.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")  # plain text to a TLS port
            assert plain.recv(100).startswith(b"HTTP/1.1 400 ")
        expect = sync_api().expect
        tab.page.goto(f"http://127.0.0.1:{bal.admin_port}/")
        tls = tab.page.locator('section[data-service="numbers"] table.tls')
        expect(tls).to_be_visible()
        expect(tls.locator('td[data-tls="certificates"]')).to_have_text(
            re.compile(r"a\.example (29|30)d")
        )
        expect(tls.locator('td[data-tls="errors"]')).to_have_text("not_tls ×1")
        expect(tab.page.locator("table.http")).to_be_visible()
    assert tab.errors == []


def test_dashboard_shows_no_http_table_for_a_message_service(
    setup: tuple[BalancerProc, list[ServiceProc]], tab: Tab
) -> None:
    bal, _ = setup
    expect = sync_api().expect
    tab.page.goto(f"http://127.0.0.1:{bal.admin_port}/")
    expect(tab.page.locator('section[data-service="numbers"] h2')).to_have_text("numbers")
    expect(tab.page.locator('section[data-service="numbers"] table.http')).to_be_hidden()
