"""Http mode as operators see it: the "http" object of `/status` and `/api/services`, and
the `balancer_http_*` families of `/metrics`.

A balancer runs in this process with an http service in front of an aiohttp echo backend;
the requests sent (kept alive, a 404 of the backend's, a malformed one we answer 400, and
one while the only backend is in maintenance, which we answer 503) must show as exactly
those counts in both documents, and the documents must match the OpenAPI schemas.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest_asyncio
from aiohttp import ClientSession
from prometheus_client.registry import CollectorRegistry

from balancer.admin.metrics import http_metrics
from balancer.app import build_server
from balancer.config.model import (
    AdminConfig,
    BackendConfig,
    Config,
    HealthConfig,
    RouteConfig,
    ServiceConfig,
)
from balancer.runtime.server import Server
from tests.http_support import (
    HOST,
    Echo,
    RawClient,
    close_clients,
    echo_backend,
    get,
    make_service,
    until,
)
from tests.support import free_ports
from tests.test_admin_openapi import problems, response_schema


@dataclass
class Running:
    server: Server
    admin: ClientSession
    base: str
    port: int
    """The http service's listen port."""
    echo: Echo

    async def json(self, path: str, method: str = "GET", body: object = None) -> Any:
        async with self.admin.request(method, self.base + path, json=body) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()

    async def metrics(self) -> dict[str, float]:
        """Every sample of a `balancer_http_*` family, by its name and labels."""
        async with self.admin.get(self.base + "/metrics") as resp:
            text = await resp.text()
        samples = {}
        for line in text.splitlines():
            found = re.fullmatch(r"(balancer_http_\S+) (\S+)", line)
            if found:
                samples[found[1]] = float(found[2])
        return samples

    def http(self) -> dict[str, Any]:
        return dict(self.server.services["web"].proxy.mode_status() or {})


@pytest_asyncio.fixture
async def running() -> AsyncIterator[Running]:
    async with echo_backend() as echo:
        (listen,) = free_ports(1)
        web = ServiceConfig(
            name="web",
            listen_host=HOST,
            listen_port=listen,
            backends=(BackendConfig(HOST, echo.port),),
            mode="http",
            health=HealthConfig(enabled=False),
        )
        config = Config(services=(web,), admin=AdminConfig(host=HOST, port=0))
        server = build_server(config, lambda: config)
        await server.start()
        try:
            assert server.admin_address is not None
            async with ClientSession() as admin:
                base = f"http://{HOST}:{server.admin_address[1]}"
                yield Running(server, admin, base, listen, echo)
        finally:
            await close_clients()
            await server.shutdown()


async def test_status_and_metrics_count_what_http_mode_served(running: Running) -> None:
    client = await RawClient.open(running.port)
    for path in ("/", "/a", "/b", "/status/404"):
        client.send(get(path))
        response = await client.response()
        assert response is not None
        assert response.status == (404 if path == "/status/404" else 200)
    # all four on one kept-alive upstream connection, idle again once the last is answered
    assert len(running.echo.peers) == 1
    await until(lambda: running.http()["idle_upstream_connections"] == 1, "connection idle")

    doc = await running.json("/status")
    assert problems(doc, response_schema("/status", "get", 200)) == []
    assert doc["services"]["web"]["mode"] == "http"
    assert doc["services"]["web"]["http"] == {
        "requests": 4,
        "responses": {"2xx": 3, "4xx": 1},
        "generated": {},
        "retries": {"backend": 0, "keepalive_race": 0, "over_budget": 0},
        "upstream_connections": {"new": 1, "reused": 3},
        "idle_upstream_connections": 1,
        "tunnels": 0,
        "client_errors": 0,
        "bad_responses": 0,
        "routes": [],
        "backend_responses": {running.echo.address: {"2xx": 3, "4xx": 1}},
    }

    # a malformed request (two lengths that disagree): a 400 of ours, the connection closed
    bad = await RawClient.open(running.port)
    bad.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab")
    response = await bad.response(b"POST")
    assert response is not None
    assert response.status == 400
    # the only backend in maintenance: a 503 of ours, nothing sent upstream
    address = running.echo.address
    await running.json(f"/api/services/web/backends/{address}", "PUT", {"state": "maint"})
    seen = len(running.echo.requests)
    client.send(get("/"))
    response = await client.response()
    assert response is not None
    assert response.status == 503
    assert len(running.echo.requests) == seen

    doc = await running.json("/api/services")
    assert problems(doc, response_schema("/api/services", "get", 200)) == []
    web = doc["services"]["web"]
    assert web["not_available"] == 1
    http = web["http"]
    assert http["requests"] == 5
    assert http["responses"] == {"2xx": 3, "4xx": 2, "5xx": 1}
    assert http["generated"] == {"400": 1, "503": 1}
    assert http["client_errors"] == 1
    assert http["upstream_connections"] == {"new": 1, "reused": 3}
    assert http["retries"] == {"backend": 0, "keepalive_race": 0, "over_budget": 0}
    assert (http["tunnels"], http["bad_responses"]) == (0, 0)
    # the backend answered the 2xx and the 404; the 400 and the 503 were ours
    assert http["backend_responses"] == {address: {"2xx": 3, "4xx": 1}}

    metrics = await running.metrics()
    idle = http["idle_upstream_connections"]
    per_backend = f'balancer_http_backend_responses_total{{backend="{address}",'

    assert metrics == {
        'balancer_http_responses_total{class="2xx",service="web"}': 3.0,
        'balancer_http_responses_total{class="4xx",service="web"}': 2.0,
        'balancer_http_responses_total{class="5xx",service="web"}': 1.0,
        'balancer_http_generated_total{service="web",status="400"}': 1.0,
        'balancer_http_generated_total{service="web",status="503"}': 1.0,
        'balancer_http_upstream_connections_total{kind="new",service="web"}': 1.0,
        'balancer_http_upstream_connections_total{kind="reused",service="web"}': 3.0,
        'balancer_http_retries_total{kind="backend",service="web"}': 0.0,
        'balancer_http_retries_total{kind="keepalive_race",service="web"}': 0.0,
        'balancer_http_idle_upstream_connections{service="web"}': float(idle),
        'balancer_http_tunnels{service="web"}': 0.0,
        f'{per_backend}class="2xx",service="web"}}': 3.0,
        f'{per_backend}class="4xx",service="web"}}': 1.0,
    }


def test_every_counter_lands_in_its_field_and_sample() -> None:
    """Distinct values in every counter: none is read from the wrong one."""
    routes = (
        RouteConfig("api", ("api.test", "*.api.test"), "/v1", ("GET",), (("X-Canary", "1"),)),
        RouteConfig("www"),
    )
    svc = make_service([f"{HOST}:1"], service={"name": "observed", "routes": routes})
    svc.requests, svc.retries_made, svc.race_retries, svc.retries_over_budget = 40, 3, 2, 1
    svc.dialed, svc.reused, svc.client_errors, svc.bad_responses = 5, 35, 6, 7
    svc.statuses = {"5xx": 9, "2xx": 31}
    svc.backend_statuses = {"10.0.0.2:80": {"5xx": 2}, "10.0.0.1:80": {"2xx": 30}}
    svc.generated = {504: 4, 502: 8}
    svc.tunnels = {object(), object()}  # type: ignore[arg-type]
    status = svc.mode_status()
    assert status == {
        "requests": 40,
        "responses": {"2xx": 31, "5xx": 9},
        "generated": {"502": 8, "504": 4},
        "retries": {"backend": 3, "keepalive_race": 2, "over_budget": 1},
        "upstream_connections": {"new": 5, "reused": 35},
        "idle_upstream_connections": 0,
        "tunnels": 2,
        "client_errors": 6,
        "bad_responses": 7,
        "routes": ["api.test,*.api.test /v1 GET X-Canary=1 -> api", "* -> www"],
        "backend_responses": {"10.0.0.2:80": {"5xx": 2}, "10.0.0.1:80": {"2xx": 30}},
    }
    registry = CollectorRegistry(auto_describe=False)

    class One:
        def collect(self) -> Any:
            return http_metrics({"web": status})

    registry.register(One())
    get_sample = registry.get_sample_value
    assert get_sample("balancer_http_retries_total", {"service": "web", "kind": "backend"}) == 3
    race = {"service": "web", "kind": "keepalive_race"}
    assert get_sample("balancer_http_retries_total", race) == 2
    assert get_sample("balancer_http_generated_total", {"service": "web", "status": "502"}) == 8
    assert get_sample("balancer_http_responses_total", {"service": "web", "class": "2xx"}) == 31
    new = {"service": "web", "kind": "new"}
    assert get_sample("balancer_http_upstream_connections_total", new) == 5
    assert get_sample("balancer_http_tunnels", {"service": "web"}) == 2
    assert get_sample("balancer_http_idle_upstream_connections", {"service": "web"}) == 0


async def test_message_and_tcp_mode_have_no_http_counters() -> None:
    from balancer.core.pool import BackendPool
    from balancer.core.stats import LatencyHistogram
    from balancer.proxy.registry import build_proxy

    for mode in ("message", "tcp"):
        config = ServiceConfig(
            name="x",
            listen_host=HOST,
            listen_port=0,
            backends=(BackendConfig(HOST, 1),),
            mode=mode,
            health=HealthConfig(enabled=False),
        )
        proxy = build_proxy(config, BackendPool(config), LatencyHistogram(), None)
        assert proxy.mode_status() is None
