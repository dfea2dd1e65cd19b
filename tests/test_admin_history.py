"""The admin endpoint's per-second history: what the charts and the table read."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from balancer.admin.documents import services_document
from balancer.admin.history import TrafficHistory
from balancer.config.model import BackendConfig, HealthConfig, ServiceConfig
from balancer.core.pool import BackendPool
from balancer.core.stats import LatencyHistogram


def fake_server(backends: int) -> Any:
    cfg = ServiceConfig(
        name="numbers",
        listen_host="127.0.0.1",
        listen_port=8080,
        backends=tuple(BackendConfig("127.0.0.1", 10000 + i) for i in range(backends)),
        health=HealthConfig(enabled=False),
    )
    pool = BackendPool(cfg)
    proxy = SimpleNamespace(
        not_available=0,
        client_connections=0,
        retries=0,
        refused=0,
        account=lambda: None,
        mode_status=lambda: None,
    )
    runtime = SimpleNamespace(
        config=cfg, pool=pool, proxy=proxy, histogram=LatencyHistogram(), listen="127.0.0.1:8080"
    )
    return SimpleNamespace(services={"numbers": runtime}, discovery=None)


def test_each_second_gives_the_services_rates_and_the_latest_backend_rates() -> None:
    server = fake_server(3)
    history = TrafficHistory()
    assert history.sample(server, 100.0, 1000.0) is None, "the first call is the baseline"
    a, b, c = server.services["numbers"].pool.backends
    a.requests, b.requests, b.failures = 30, 10, 10
    entry = history.sample(server, 101.0, 1001.0)
    assert entry is not None
    assert entry["services"]["numbers"]["rps"] == 40.0
    assert entry["services"]["numbers"]["error_rate"] == 0.2
    doc = services_document(server, history)
    rows = {
        r["address"]: (r["rps"], r["error_rate"]) for r in doc["services"]["numbers"]["backends"]
    }
    assert rows == {a.address: (30.0, 0.0), b.address: (10.0, 0.5), c.address: (0.0, 0.0)}
    assert doc["services"]["numbers"]["rps"] == 40.0
    assert doc["sampled_at"] == 1001.0


def test_the_history_holds_no_backend_rows_however_many_backends() -> None:
    """With 100,000 backends, 300 samples of a row per backend made /api/history megabytes
    per second and the process hundreds of megabytes larger."""
    server = fake_server(2000)
    history = TrafficHistory(seconds=5)
    for second in range(10):
        for backend in server.services["numbers"].pool.backends:
            backend.requests += 1
        history.sample(server, 100.0 + second, 1000.0 + second)
    assert len(history.samples) == 5
    assert all(
        set(s["services"]["numbers"]) == {"requests", "errors", "rps", "error_rate", "p99_ms"}
        for s in history.samples
    )
    assert history.samples[-1]["services"]["numbers"]["requests"] == 2000
    assert len(history.backends["numbers"]) == 2000, "the latest second's rates, once"
