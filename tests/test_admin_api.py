"""The runtime API on the admin listener: real balancer and sample services on loopback."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from balancer.admin import check_admin_security, quantile_of_counts
from balancer.config import AdminConfig, ConfigError
from tests.support import (
    PYTHON,
    BalancerProc,
    LineClient,
    Proc,
    Services,
    backend_rows,
    reply_for,
    start_balancer,
    wait_until,
    write_toml,
)

# -- pure parts -------------------------------------------------------------------------------


def test_quantile_of_bucket_counts_interpolates_inside_the_bucket() -> None:
    bounds = (0.001, 0.002, 0.004)
    assert quantile_of_counts(bounds, [0, 0, 0, 0], 0.99) == 0.0
    # 100 values in (1 ms, 2 ms]: p50 halfway through that bucket
    assert quantile_of_counts(bounds, [0, 100, 0, 0], 0.5) == pytest.approx(0.0015)
    # 99 fast values and one slow one: p99 stays in the first bucket, p100 in the third
    assert quantile_of_counts(bounds, [99, 0, 1, 0], 0.99) == pytest.approx(0.001)
    assert quantile_of_counts(bounds, [99, 0, 1, 0], 1.0) == pytest.approx(0.004)
    # beyond the last bound: the last bound
    assert quantile_of_counts(bounds, [0, 0, 0, 5], 0.99) == 0.004


def test_non_loopback_admin_needs_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BALANCER_ADMIN_TOKEN", raising=False)
    check_admin_security(AdminConfig(host="127.0.0.1"))
    check_admin_security(AdminConfig(host="localhost"))
    check_admin_security(AdminConfig(host="::1"))
    check_admin_security(AdminConfig(host="0.0.0.0", enabled=False))
    check_admin_security(AdminConfig(host="0.0.0.0", token="s3cret"))
    with pytest.raises(ConfigError, match="needs a token"):
        check_admin_security(AdminConfig(host="0.0.0.0"))
    monkeypatch.setenv("BALANCER_ADMIN_TOKEN", "from-env")
    check_admin_security(AdminConfig(host="192.0.2.1"))


# -- helpers ----------------------------------------------------------------------------------


def call(
    bal: BalancerProc,
    method: str,
    path: str,
    body: object = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(
        f"http://127.0.0.1:{bal.admin_port}{path}",
        data=data,
        method=method,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def backends(bal: BalancerProc) -> dict[str, dict[str, Any]]:
    return backend_rows(bal.status())


def metric(bal: BalancerProc, name: str, address: str) -> float:
    for line in bal.metrics().splitlines():
        if line.startswith(f"{name}{{") and f'backend="{address}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} for {address}")


@pytest.fixture
def pair(tmp_path: Path, services: Services) -> Iterator[tuple[BalancerProc, str, str]]:
    services.start_many(2)
    cfg = write_toml(tmp_path / "b.toml", services.ports)
    bal = start_balancer(cfg)
    yield bal, f"127.0.0.1:{services[0].port}", f"127.0.0.1:{services[1].port}"
    bal.stop()


def spread(bal: BalancerProc, n: int) -> dict[str, int]:
    before = {a: b["requests"] for a, b in backends(bal).items()}
    c = LineClient(bal.port)
    for i in range(n):
        assert c.request(str(i)) == reply_for(i)
    c.close()
    return {a: b["requests"] - before.get(a, 0) for a, b in backends(bal).items()}


e2e = pytest.mark.e2e


# -- state and weight -------------------------------------------------------------------------


@e2e
def test_drain_stops_new_traffic_and_up_returns_it(pair: tuple[BalancerProc, str, str]) -> None:
    bal, a, b = pair
    status, doc = call(bal, "PUT", f"/api/services/numbers/backends/{a}", {"state": "drain"})
    assert status == 200
    assert doc["admin_state"] == "drain"
    assert backends(bal)[a]["admin_state"] == "drain"
    assert spread(bal, 20) == {a: 0, b: 20}

    status, doc = call(bal, "PUT", f"/api/services/numbers/backends/{a}", {"state": "maint"})
    assert (status, backends(bal)[a]["admin_state"]) == (200, "maint")

    status, doc = call(bal, "PUT", f"/api/services/numbers/backends/{a}", {"state": "up"})
    assert (status, doc["admin_state"]) == (200, "ready")
    assert spread(bal, 20) == {a: 10, b: 10}


@e2e
def test_weight_change_shows_in_status_and_metrics(pair: tuple[BalancerProc, str, str]) -> None:
    bal, a, _ = pair
    status, doc = call(bal, "PUT", f"/api/services/numbers/backends/{a}", {"weight": 5})
    assert (status, doc["weight"]) == (200, 5)
    assert backends(bal)[a]["weight"] == 5
    assert metric(bal, "balancer_backend_weight", a) == 5.0
    _, listed = call(bal, "GET", "/api/services")
    assert {x["address"]: x["weight"] for x in listed["services"]["numbers"]["backends"]}[a] == 5


@e2e
def test_bad_requests_get_json_errors_and_change_nothing(
    pair: tuple[BalancerProc, str, str],
) -> None:
    bal, a, _ = pair
    path = f"/api/services/numbers/backends/{a}"
    cases: list[tuple[str, str, object, bytes | None, int, str]] = [
        ("PUT", "/api/services/nope/backends/127.0.0.1:1", {"state": "drain"}, None, 404, "nope"),
        ("PUT", "/api/services/numbers/backends/127.0.0.1:1", {"state": "drain"}, None, 404, ""),
        ("PUT", path, None, b"{not json", 400, "not valid JSON"),
        ("PUT", path, ["drain"], None, 400, "JSON object"),
        ("PUT", path, {"state": "sleeping"}, None, 400, "sleeping"),
        ("PUT", path, {"state": "drain", "weight": -1}, None, 400, "weight"),
        ("PUT", path, {"state": "drain", "weight": "2"}, None, 400, "weight"),
        ("PUT", path, {"state": "drain", "colour": "red"}, None, 400, "colour"),
        ("PUT", path, {}, None, 400, "nothing to change"),
        ("POST", "/api/services/numbers/backends", {"weight": 1}, None, 400, "address"),
        ("POST", "/api/services/numbers/backends", {"address": "nohost"}, None, 400, "address"),
        ("POST", "/api/services/numbers/backends", {"address": a}, None, 409, "already"),
        ("DELETE", "/api/services/numbers/backends/127.0.0.1:1", None, None, 404, "127.0.0.1:1"),
    ]
    for method, where, body, raw, want, words in cases:
        status, doc = call(bal, method, where, body, raw=raw)
        assert status == want, (method, where, body, doc)
        assert words in doc["error"], doc
    after = backends(bal)
    assert len(after) == 2
    assert after[a]["admin_state"] == "ready"
    assert after[a]["weight"] == 1


# -- adding and removing ----------------------------------------------------------------------


@e2e
def test_added_backend_takes_traffic_and_removed_one_leaves(
    pair: tuple[BalancerProc, str, str], services: Services
) -> None:
    bal, a, b = pair
    services.start()
    c_addr = f"127.0.0.1:{services[-1].port}"
    status, doc = call(
        bal, "POST", "/api/services/numbers/backends", {"address": c_addr, "weight": 1}
    )
    assert status == 201
    assert doc["address"] == c_addr
    wait_until(lambda: backends(bal)[c_addr]["state"] == "up", what="new backend up")
    assert spread(bal, 30) == {a: 10, b: 10, c_addr: 10}

    status, doc = call(bal, "DELETE", f"/api/services/numbers/backends/{a}")
    assert status == 202
    assert doc["removing"] is True
    wait_until(lambda: a not in backends(bal), what="backend removed")
    assert f'backend="{a}"' not in bal.metrics()
    assert spread(bal, 20) == {b: 10, c_addr: 10}


# -- reload, description ----------------------------------------------------------------------


@e2e
def test_reload_of_an_invalid_config_is_refused(
    pair: tuple[BalancerProc, str, str], tmp_path: Path
) -> None:
    bal, a, _ = pair
    (tmp_path / "b.toml").write_text("[services.numbers]\nlisten = 12\n")
    status, doc = call(bal, "POST", "/api/reload")
    assert status == 400, doc
    assert "b.toml" in doc["error"]
    assert backends(bal)[a]["state"] == "up"


@e2e
def test_openapi_describes_every_route(pair: tuple[BalancerProc, str, str]) -> None:
    bal, _, _ = pair
    status, doc = call(bal, "GET", "/api/openapi.json")
    assert status == 200
    assert doc["openapi"].startswith("3.")
    paths = doc["paths"]
    assert set(paths["/api/services/{service}/backends/{address}"]) == {"put", "delete"}
    assert "post" in paths["/api/services/{service}/backends"]
    assert "post" in paths["/api/reload"]
    assert "get" in paths["/api/history"]


@e2e
def test_history_feeds_the_charts(pair: tuple[BalancerProc, str, str]) -> None:
    """The charts' data source: one-second samples with the traffic actually sent."""
    bal, _, _ = pair
    url = f"http://127.0.0.1:{bal.admin_port}/api/history"

    def samples() -> list[dict[str, Any]]:
        with urllib.request.urlopen(url, timeout=5) as resp:
            doc: list[dict[str, Any]] = json.loads(resp.read())["samples"]
            return doc

    wait_until(lambda: len(samples()) >= 1, what="a first sample")
    client = LineClient(bal.port)
    for i in range(200):
        assert client.request(str(i)) == reply_for(i)
    client.close()

    def served() -> int:
        return sum(int(s["services"]["numbers"]["requests"]) for s in samples())

    # the one-second samples add up to the requests sent
    wait_until(lambda: served() == 200, what="the traffic to show in the history")
    busy = [s["services"]["numbers"] for s in samples()]
    assert all(x["p99_ms"] > 0 and x["rps"] > 0 for x in busy if x["requests"])


# -- security ---------------------------------------------------------------------------------


@e2e
def test_token_guards_writes(tmp_path: Path, services: Services) -> None:
    services.start()
    a = f"127.0.0.1:{services[0].port}"
    cfg = write_toml(tmp_path / "b.toml", [services[0].port])
    cfg.write_text(cfg.read_text() + '[admin]\ntoken = "s3cret"\n')
    bal = start_balancer(cfg)
    try:
        path = f"/api/services/numbers/backends/{a}"
        change = {"state": "drain"}
        assert call(bal, "PUT", path, change)[0] == 401
        wrong = {"Authorization": "Bearer nope"}
        assert call(bal, "PUT", path, change, headers=wrong)[0] == 401
        assert call(bal, "DELETE", path, headers=wrong)[0] == 401
        assert backends(bal)[a]["admin_state"] == "ready"
        good = {"Authorization": "Bearer s3cret"}
        cross_site = {**good, "Origin": "http://evil.example"}
        status, doc = call(bal, "PUT", path, change, headers=cross_site)
        assert status == 403, doc
        assert backends(bal)[a]["admin_state"] == "ready"
        assert call(bal, "PUT", path, change, headers=good)[0] == 200
        assert backends(bal)[a]["admin_state"] == "drain"
        # reads stay open
        assert call(bal, "GET", "/api/services")[0] == 200
    finally:
        bal.stop()


@e2e
def test_balancer_refuses_a_public_admin_listener_without_token(
    tmp_path: Path, services: Services
) -> None:
    services.start()
    cfg = write_toml(tmp_path / "b.toml", [services[0].port])
    proc = Proc(
        [PYTHON, "-m", "balancer", "serve", str(cfg), "--admin", "0.0.0.0:0"],
        env={"BALANCER_ADMIN_TOKEN": ""},
    )
    assert proc.wait(timeout=30) == 2
    assert "needs a token" in proc.output()
    assert "balancer ready" not in proc.output()


@e2e
def test_reload_applies_a_changed_config(
    pair: tuple[BalancerProc, str, str], services: Services, tmp_path: Path
) -> None:
    bal, a, b = pair
    services.start()
    c_addr = f"127.0.0.1:{services[-1].port}"
    write_toml(tmp_path / "b.toml", services.ports)
    status, doc = call(bal, "POST", "/api/reload")
    assert status == 200, doc
    assert c_addr in {x["address"] for x in doc["services"]["numbers"]["backends"]}
    wait_until(lambda: backends(bal)[c_addr]["state"] == "up", what="reloaded backend up")
    assert spread(bal, 30) == {a: 10, b: 10, c_addr: 10}
