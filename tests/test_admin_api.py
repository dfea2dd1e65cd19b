"""The runtime API on the admin listener: real balancer and sample services on loopback."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from balancer.admin.history import quantile_of_counts
from balancer.admin.security import check_admin_security
from balancer.config.errors import ConfigError
from balancer.config.model import MAX_WEIGHT, AdminConfig
from balancer.tools.procs import ChildProcess as Proc
from tests.admin_support import (
    READ_ROUTES,
    bearer,
    call,
    request,
    running_with_admin,
    with_admin,
)
from tests.support import (
    PYTHON,
    BalancerProc,
    LineClient,
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


BACKEND = "/api/services/{service}/backends/{address}"
BACKENDS = "/api/services/{service}/backends"


def expect_error(
    bal: BalancerProc,
    method: str,
    path: str,
    template: str,
    want: int,
    words: str,
    body: object = None,
    **options: Any,
) -> str:
    """One bad request: its status, a short JSON error naming `words`, documented in OpenAPI."""
    status, headers, doc = request(bal.admin_port, method, path, body, **options)
    where = (method, path, body if options.get("raw") is None else "<raw>")
    assert status == want, (*where, doc)
    assert headers.get_content_type() == "application/json", where
    assert isinstance(doc, dict), where
    assert set(doc) == {"error"}, where
    error: str = doc["error"]
    assert words in error, (*where, error)
    assert len(error) <= 500, where
    assert want in documented(bal, template, method), f"{method} {template}: {want} undocumented"
    return error


def documented(bal: BalancerProc, template: str, method: str) -> set[int]:
    """The statuses the served OpenAPI description lists for `method` on `template`."""
    status, doc = call(bal, "GET", "/api/openapi.json")
    assert status == 200
    operation = doc["paths"].get(template, {}).get(method.lower(), {})
    return {int(code) for code in operation.get("responses", {})}


@e2e
def test_bad_requests_get_json_errors_and_change_nothing(
    pair: tuple[BalancerProc, str, str],
) -> None:
    bal, a, _ = pair
    path = f"/api/services/numbers/backends/{a}"
    add = "/api/services/numbers/backends"
    cases: list[tuple[str, str, str, object, bytes | None, int, str]] = [
        (
            "PUT",
            "/api/services/nope/backends/127.0.0.1:1",
            BACKEND,
            {"state": "drain"},
            None,
            404,
            "nope",
        ),
        (
            "PUT",
            "/api/services/numbers/backends/127.0.0.1:1",
            BACKEND,
            {"state": "drain"},
            None,
            404,
            "",
        ),
        ("PUT", path, BACKEND, None, b"{not json", 400, "not valid JSON"),
        ("PUT", path, BACKEND, ["drain"], None, 400, "JSON object"),
        ("PUT", path, BACKEND, {"state": "sleeping"}, None, 400, "sleeping"),
        ("PUT", path, BACKEND, {"state": ["drain"]}, None, 400, "state"),
        ("PUT", path, BACKEND, {"state": "drain", "weight": -1}, None, 400, "weight"),
        ("PUT", path, BACKEND, {"state": "drain", "weight": "2"}, None, 400, "weight"),
        ("PUT", path, BACKEND, {"state": "drain", "weight": 2.5}, None, 400, "weight"),
        ("PUT", path, BACKEND, {"state": "drain", "colour": "red"}, None, 400, "colour"),
        ("PUT", path, BACKEND, {}, None, 400, "nothing to change"),
        ("POST", add, BACKENDS, {"weight": 1}, None, 400, "address"),
        ("POST", add, BACKENDS, {"address": "nohost"}, None, 400, "address"),
        ("POST", add, BACKENDS, {"address": a}, None, 409, "already"),
        (
            "DELETE",
            "/api/services/numbers/backends/127.0.0.1:1",
            BACKEND,
            None,
            None,
            404,
            "127.0.0.1:1",
        ),
    ]
    for method, where, template, body, raw, want, words in cases:
        expect_error(bal, method, where, template, want, words, body, raw=raw)
    after = backends(bal)
    assert len(after) == 2
    assert after[a]["admin_state"] == "ready"
    assert after[a]["weight"] == 1


@e2e
def test_hostile_input_gets_a_short_4xx_and_the_balancer_serves_on(
    pair: tuple[BalancerProc, str, str],
) -> None:
    bal, a, b = pair
    path = f"/api/services/numbers/backends/{a}"
    add = "/api/services/numbers/backends"
    drain = json.dumps({"state": "drain"}).encode()
    huge = int("9" * 400)
    # weights beyond MAX_WEIGHT (a 400-digit one used to reach the data path and /metrics)
    for weight in (huge, MAX_WEIGHT + 1, -(10**30)):
        error = expect_error(bal, "PUT", path, BACKEND, 400, "weight", {"weight": weight})
        assert f"to {MAX_WEIGHT}" in error
        expect_error(
            bal, "POST", add, BACKENDS, 400, "weight", {"address": "x:1", "weight": weight}
        )
    # bodies that are not plain UTF-8 JSON
    for content_type in ("application/json; charset=bogus", "application/json; charset=latin-1"):
        expect_error(
            bal, "PUT", path, BACKEND, 415, "charset", raw=drain, content_type=content_type
        )
    for encoding in ("bogus", "gzip", "br"):
        expect_error(
            bal,
            "PUT",
            path,
            BACKEND,
            415,
            "Content-Encoding",
            raw=drain,
            headers={"Content-Encoding": encoding},
        )
    # what a form on another site's page could send
    for form in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        new = json.dumps({"address": "127.0.0.1:1"}).encode()
        expect_error(
            bal, "POST", add, BACKENDS, 415, "application/json", raw=new, content_type=form
        )
        expect_error(
            bal,
            "POST",
            "/api/reload",
            "/api/reload",
            415,
            "application/json",
            raw=b"",
            content_type=form,
        )
    expect_error(bal, "PUT", path, BACKEND, 400, "UTF-8", raw=b'{"state": "\xff"}')
    expect_error(bal, "PUT", path, BACKEND, 400, "nested too deeply", raw=b"[" * 30_000)
    many = json.dumps({f"k{i}": 1 for i in range(5000)}).encode()
    error = expect_error(bal, "PUT", path, BACKEND, 400, "and 4995 more", raw=many)
    assert len(error) < 200
    # bodies beyond the limit: refused before they are read, with a short answer
    for raw in (json.dumps({f"k{i}": 1 for i in range(60_000)}).encode(), b" " * 200_000):
        expect_error(bal, "PUT", path, BACKEND, 413, "larger than", raw=raw)
    expect_error(
        bal, "PUT", path, BACKEND, 403, "cross-site", raw=drain, headers={"Origin": "http://[::1"}
    )
    expect_error(bal, "GET", "/api/history?since=nan", "/api/history", 400, "since")
    expect_error(bal, "GET", "/api/history?since=1e999", "/api/history", 400, "since")
    # unknown paths and methods answer JSON too
    status, headers, doc = request(bal.admin_port, "PATCH", path, {"state": "drain"})
    assert (status, headers["Allow"] is not None, "error" in doc) == (405, True, True)
    status, _, doc = request(bal.admin_port, "GET", "/api/nothing-here")
    assert (status, "error" in doc) == (404, True)

    # nothing changed, nothing broke: requests are served, /metrics answers, no traceback
    after = backends(bal)
    assert {x: (y["admin_state"], y["weight"]) for x, y in after.items()} == {
        a: ("ready", 1),
        b: ("ready", 1),
    }
    assert spread(bal, 20) == {a: 10, b: 10}
    assert 'balancer_backend_weight{backend="' in bal.metrics()
    # the largest weight there is works
    status, doc = call(bal, "PUT", path, {"weight": MAX_WEIGHT})
    assert (status, doc["weight"]) == (200, MAX_WEIGHT)
    assert metric(bal, "balancer_backend_weight", a) == MAX_WEIGHT
    assert c_in_log(bal, "Traceback") == 0, bal.output()


def c_in_log(bal: BalancerProc, text: str) -> int:
    return sum(text in line for line in bal.lines)


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

    def codes(path: str, method: str) -> set[str]:
        return set(paths[path][method]["responses"])

    for route in READ_ROUTES:
        assert {"200", "400", "401", "403", "421"} <= codes(route, "get"), route
    writes = [
        ("/api/services/{service}/backends", "post"),
        ("/api/services/{service}/backends/{address}", "put"),
        ("/api/services/{service}/backends/{address}", "delete"),
        ("/api/reload", "post"),
    ]
    for route, method in writes:
        assert {"400", "401", "403", "415", "421"} <= codes(route, method), (route, method)
    assert {"201", "409", "413"} <= codes("/api/services/{service}/backends", "post")
    assert {"200", "413"} <= codes("/api/services/{service}/backends/{address}", "put")
    assert {"202", "409"} <= codes("/api/services/{service}/backends/{address}", "delete")
    backend = doc["components"]["schemas"]["Backend"]["properties"]
    assert "reason" in backend
    assert backend["weight"]["maximum"] == MAX_WEIGHT


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
    newest = samples()[-1]["t"]
    status, doc = call(bal, "GET", f"/api/history?since={newest}")
    assert status == 200
    assert all(s["t"] > newest for s in doc["samples"])


# -- removing the last backend, adding the balancer itself ------------------------------------


@e2e
def test_a_services_last_backend_cannot_be_removed(pair: tuple[BalancerProc, str, str]) -> None:
    bal, a, b = pair
    assert call(bal, "DELETE", f"/api/services/numbers/backends/{a}")[0] == 202
    # a is still draining: b is the last one staying
    for _ in range(2):
        status, doc = call(bal, "DELETE", f"/api/services/numbers/backends/{b}")
        assert status == 409, doc
        assert "last" in doc["error"]
        assert "add another backend first" in doc["error"]
    wait_until(lambda: a not in backends(bal), what="the first backend removed")
    assert list(backends(bal)) == [b]
    assert spread(bal, 10) == {b: 10}


@e2e
def test_a_backend_that_is_the_balancer_itself_is_refused(
    pair: tuple[BalancerProc, str, str],
) -> None:
    bal, a, b = pair
    for address in (
        f"127.0.0.1:{bal.port}",
        f"localhost:{bal.port}",
        f"127.0.0.1:{bal.admin_port}",
    ):
        status, doc = call(bal, "POST", "/api/services/numbers/backends", {"address": address})
        assert status == 400, (address, doc)
        assert "this balancer itself" in doc["error"], doc
    assert list(backends(bal)) == [a, b]
    assert spread(bal, 10) == {a: 5, b: 5}


# -- security ---------------------------------------------------------------------------------

NO_TOKEN: dict[str, str] = {}
WRONG = bearer("nope")


@e2e
def test_token_guards_every_write_route(tmp_path: Path, services: Services) -> None:
    a, b, c = (f"127.0.0.1:{s.port}" for s in services.start_many(3))
    cfg = write_toml(tmp_path / "b.toml", services.ports[:2])
    with_admin(cfg, token="s3cret", read_token="r3ad")
    with running_with_admin(cfg) as bal:
        # the file a reload would apply: a's weight 3, c instead of b
        write_toml(tmp_path / "b.toml", [services[0].port, services[2].port])
        with_admin(cfg, token="s3cret", read_token="r3ad")
        cfg.write_text(cfg.read_text().replace(f'"{a}"', f'{{ address = "{a}", weight = 3 }}'))
        writes: list[tuple[str, str, object, int]] = [
            ("PUT", f"/api/services/numbers/backends/{a}", {"state": "drain"}, 200),
            ("POST", "/api/services/numbers/backends", {"address": c}, 201),
            ("DELETE", f"/api/services/numbers/backends/{b}", None, 202),
            ("POST", "/api/reload", None, 200),
        ]
        refused = [
            (NO_TOKEN, 401),
            (WRONG, 401),
            (bearer("r3ad"), 403),  # the read token
            ({**bearer("s3cret"), "Origin": "http://evil.example"}, 403),
        ]
        for method, path, body, _ in writes:
            for headers, want in refused:
                status, doc = call(bal, method, path, body, headers=headers)
                assert status == want, (method, path, headers, doc)
                assert "error" in doc
        rows = backends(bal)
        assert {x: (y["admin_state"], y["weight"]) for x, y in rows.items()} == {
            a: ("ready", 1),
            b: ("ready", 1),
        }
        # reads stay open on a loopback listener (read_access = "auto")
        for route in READ_ROUTES:
            assert request(bal.admin_port, "GET", route)[0] == 200, route
        for method, path, body, want in writes:
            status, doc = call(bal, method, path, body, headers=bearer("s3cret"))
            assert status == want, (method, path, doc)
        wait_until(lambda: b not in backends(bal), what="the removed backend gone")
        rows = backends(bal)
        assert {x: (y["admin_state"], y["weight"]) for x, y in rows.items()} == {
            a: ("drain", 3),
            c: ("ready", 1),
        }


@e2e
def test_reads_need_a_token_with_read_access_token(tmp_path: Path, services: Services) -> None:
    """The write token from BALANCER_ADMIN_TOKEN, a read token from the file."""
    a = f"127.0.0.1:{services.start().port}"
    cfg = with_admin(write_toml(tmp_path / "b.toml", services.ports), read_access="token")
    cfg.write_text(cfg.read_text() + 'read_token = "r3ad"\n')
    with running_with_admin(cfg, env={"BALANCER_ADMIN_TOKEN": "from-env"}) as bal:
        for route in READ_ROUTES:
            for headers in (NO_TOKEN, WRONG, bearer("s3cret")):
                status, got, doc = request(bal.admin_port, "GET", route, headers=headers)
                assert status == 401, (route, headers, doc)
                assert got["WWW-Authenticate"] == "Bearer"
                assert "token" in doc["error"]
            for token in ("r3ad", "from-env"):
                status, _, doc = request(bal.admin_port, "GET", route, headers=bearer(token))
                assert status == 200, (route, token, doc)
        # the page itself and the API description need no token: the dashboard asks for it
        for route in ("/", "/static/dashboard.js", "/api/openapi.json"):
            assert request(bal.admin_port, "GET", route)[0] == 200, route
        path = f"/api/services/numbers/backends/{a}"
        assert call(bal, "PUT", path, {"state": "drain"})[0] == 401
        assert call(bal, "PUT", path, {"state": "drain"}, headers=bearer("r3ad"))[0] == 403
        status, doc = call(bal, "PUT", path, {"state": "drain"}, headers=bearer("from-env"))
        assert (status, doc["admin_state"]) == (200, "drain")


@e2e
def test_a_rebinding_host_is_refused_and_every_answer_forbids_framing(
    tmp_path: Path, services: Services
) -> None:
    a = f"127.0.0.1:{services.start().port}"
    cfg = with_admin(write_toml(tmp_path / "b.toml", services.ports), allowed_hosts=["lb.test"])
    with running_with_admin(cfg) as bal:
        port = bal.admin_port
        evil = {
            "Host": f"rebind.evil.example:{port}",
            "Origin": f"http://rebind.evil.example:{port}",
        }
        path = f"/api/services/numbers/backends/{a}"
        attempts: list[tuple[str, str, object]] = [
            ("PUT", path, {"state": "drain"}),
            ("POST", "/api/services/numbers/backends", {"address": "127.0.0.1:1"}),
            ("DELETE", path, None),
            ("POST", "/api/reload", None),
            *(("GET", route, None) for route in (*READ_ROUTES, "/", "/static/dashboard.js")),
        ]
        answers = []
        for method, where, body in attempts:
            status, got, doc = request(port, method, where, body, headers=evil)
            assert status == 421, (method, where, doc)
            assert "rebind.evil.example" in doc["error"]
            answers.append(got)
        rows = backends(bal)
        assert list(rows) == [a]
        assert (rows[a]["admin_state"], rows[a]["weight"]) == ("ready", 1)
        # the endpoint's own names pass, with their own Origin
        for name in ("lb.test", "localhost", "127.0.0.1", "[::1]"):
            own = {"Host": f"{name}:{port}", "Origin": f"http://{name}:{port}"}
            status, got, doc = request(port, "PUT", path, {"weight": 2}, headers=own)
            assert status == 200, (name, doc)
            answers.append(got)
        routes = (*READ_ROUTES, "/", "/static/dashboard.js", "/api/openapi.json", "/nope")
        answers.extend(request(port, "GET", route)[1] for route in routes)
        for got in answers:
            assert got["X-Frame-Options"] == "DENY"
            assert "frame-ancestors 'none'" in got["Content-Security-Policy"]
            assert got["X-Content-Type-Options"] == "nosniff"


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
