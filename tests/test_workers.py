"""Worker processes (`balancer serve --workers N`): the pure merges and relay, then real
processes on 127.0.0.1 (a supervisor, two workers, sample services)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from balancer.admin.merged_metrics import merge_metrics
from balancer.runtime.merging import merge_history, merge_status, relay_plan
from balancer.runtime.supervisor import MAX_RESTART_DELAY, restart_delay
from balancer.runtime.workers import WorkerSpec
from tests.support import (
    PYTHON,
    BalancerProc,
    Balancers,
    LineClient,
    Services,
    backend_rows,
    free_ports,
    reply_for,
    wait_until,
    write_toml,
)
from tests.test_admin_openapi import problems, response_schema

# -- pure: merges, relay, backoff ----------------------------------------------------------


def _backend(address: str, **fields: Any) -> dict[str, Any]:
    return {"address": address, "state": "up", "weight": 1, "requests": 0, **fields}


def _status(client_connections: int, *backends: dict[str, Any]) -> dict[str, Any]:
    svc = {"client_connections": client_connections, "refused": 0, "backends": list(backends)}
    return {"config_revision": "r", "services": {"numbers": svc}}


def test_status_documents_sum_counters_and_keep_worker_0_s_states() -> None:
    w0 = _status(2, _backend("a:1", requests=5, state="down", weight=3))
    w1 = _status(3, _backend("a:1", requests=7, state="up", weight=3))
    merged = merge_status({1: w1, 0: w0})
    svc = merged["services"]["numbers"]
    assert svc["client_connections"] == 5
    assert svc["backends"] == [_backend("a:1", requests=12, state="down", weight=3)]


def test_history_sums_the_same_second_and_recomputes_the_error_rate() -> None:
    def doc(requests: int, errors: int, p99: float) -> dict[str, Any]:
        svc = {"requests": requests, "errors": errors, "rps": float(requests), "p99_ms": p99}
        return {"samples": [{"t": 100.2, "services": {"numbers": {**svc, "error_rate": 0.0}}}]}

    merged = merge_history({0: doc(90, 0, 1.0), 1: doc(10, 10, 4.0)})
    svc = merged["samples"][0]["services"]["numbers"]
    assert (svc["requests"], svc["errors"], svc["rps"]) == (100, 10, 100.0)
    assert svc["error_rate"] == round(10 / 110, 4)
    assert svc["p99_ms"] == 4.0


METRICS = """# HELP balancer_requests Requests.
# TYPE balancer_requests counter
balancer_requests_total{{service="numbers",backend="a:1"}} {n}
# HELP balancer_backend_up 1 when up.
# TYPE balancer_backend_up gauge
balancer_backend_up{{service="numbers",backend="a:1"}} {up}
# HELP balancer_request_duration_seconds Latency.
# TYPE balancer_request_duration_seconds histogram
balancer_request_duration_seconds_bucket{{service="numbers",le="0.1"}} {n}
balancer_request_duration_seconds_bucket{{service="numbers",le="+Inf"}} {n}
balancer_request_duration_seconds_count{{service="numbers"}} {n}
balancer_request_duration_seconds_sum{{service="numbers"}} 0.5
"""


def test_metrics_are_summed_with_each_worker_s_samples_labelled() -> None:
    text = merge_metrics({0: METRICS.format(n=3, up=1), 1: METRICS.format(n=4, up=0)})
    lines = text.splitlines()
    assert 'balancer_requests_total{service="numbers",backend="a:1"} 7.0' in lines
    assert 'balancer_requests_total{service="numbers",backend="a:1",worker="1"} 4.0' in lines
    assert 'balancer_backend_up{service="numbers",backend="a:1"} 1.0' in lines
    assert 'balancer_request_duration_seconds_bucket{service="numbers",le="+Inf"} 7.0' in lines
    assert 'balancer_request_duration_seconds_sum{service="numbers"} 1.0' in lines
    assert text.count("# TYPE balancer_requests counter") == 1


def _view(state: str, eject_left: float = 0.0, reason: str = "") -> dict[str, Any]:
    return {"state": state, "eject_left": eject_left, "reason": reason, "last_check": 1.0}


def test_the_relay_gives_every_worker_worker_0_s_state() -> None:
    states = {
        0: {"numbers": {"a:1": _view("down", reason="refused"), "b:2": _view("up")}},
        1: {"numbers": {"a:1": _view("up"), "b:2": _view("up")}},
        2: {"numbers": {"a:1": _view("down"), "b:2": _view("up")}},
    }
    plan = relay_plan(states)
    assert list(plan) == [1]
    assert plan[1]["numbers"]["a:1"]["state"] == "down"
    assert "refused" in plan[1]["numbers"]["a:1"]["reason"]
    assert relay_plan({1: states[1], 2: states[2]}) == {}  # worker 0 restarting: nothing


def test_an_ejection_seen_by_any_worker_reaches_every_other_one() -> None:
    states = {
        0: {"numbers": {"a:1": _view("up")}},
        1: {"numbers": {"a:1": _view("down", eject_left=30.0, reason="3 failures")}},
        2: {"numbers": {"a:1": _view("down", eject_left=29.5)}},
    }
    plan = relay_plan(states)
    assert list(plan) == [0]  # worker 2 has it within the tolerance already
    assert plan[0]["numbers"]["a:1"] == {"state": "down", "reason": "3 failures", "eject_left": 30}


def test_restarts_back_off_up_to_a_limit() -> None:
    delays = [restart_delay(n) for n in range(12)]
    assert delays[0] == delays[1] < delays[2] < delays[3]
    assert delays[-1] == MAX_RESTART_DELAY


def test_a_worker_spec_survives_the_environment() -> None:
    spec = WorkerSpec(1, 2, {"numbers": 5}, 6, checks=False)
    assert WorkerSpec.from_env({"BALANCER_WORKER": spec.to_env()}) == spec
    assert WorkerSpec.from_env({}) is None


# -- real processes ----------------------------------------------------------------------


@pytest.mark.parametrize("count", ["0", "65", "x"])
def test_workers_out_of_range_is_a_clear_error(tmp_path: Path, count: str) -> None:
    config = write_toml(tmp_path / "b.toml", [1])
    done = subprocess.run(
        [PYTHON, "-m", "balancer", "serve", str(config), "--workers", count],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "--workers" in done.stderr


def _get(bal: BalancerProc, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{bal.admin_port}{path}", timeout=5) as r:
        return json.loads(r.read())


def _send(bal: BalancerProc, method: str, path: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{bal.admin_port}{path}",
        data=json.dumps(body).encode(),
        method=method,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def _workers(bal: BalancerProc) -> list[dict[str, Any]]:
    workers: list[dict[str, Any]] = _get(bal, "/api/workers")["workers"]
    return workers


def _worker_rows(bal: BalancerProc, index: int) -> dict[str, dict[str, Any]]:
    return backend_rows(_get(bal, f"/status?worker={index}"))


def _start(
    tmp_path: Path, services: Services, balancers: Balancers, *extra: str, backends: int = 2
) -> BalancerProc:
    ports = [s.port for s in services.start_many(backends)]
    config = write_toml(tmp_path / "b.toml", ports)
    return balancers.start(config, "--workers", "2", *extra)


def test_two_workers_serve_one_load_and_show_as_one_balancer(
    tmp_path: Path, services: Services, balancers: Balancers
) -> None:
    bal = _start(tmp_path, services, balancers, "--worker-sockets", "reuseport")
    clients = [LineClient(bal.port) for _ in range(40)]
    for i, client in enumerate(clients):
        assert client.request(str(i)) == reply_for(i)
    per_worker = [sum(w["requests"].values()) for w in _workers(bal)]
    assert sum(per_worker) == 40
    assert all(n > 0 for n in per_worker), per_worker
    total = sum(b["requests"] for b in backend_rows(bal.status()).values())
    assert total == 40
    metrics = bal.metrics().splitlines()
    summed = [line for line in metrics if line.startswith("balancer_requests_total{")]
    assert sum(float(x.rsplit(" ", 1)[1]) for x in summed if "worker=" not in x) == 40
    for index, n in enumerate(per_worker):
        mine = [x for x in summed if f'worker="{index}"' in x]
        assert sum(float(x.rsplit(" ", 1)[1]) for x in mine) == n


def test_a_killed_worker_is_restarted_and_the_other_s_connections_live_on(
    tmp_path: Path, services: Services, balancers: Balancers
) -> None:
    bal = _start(tmp_path, services, balancers, "--worker-sockets", "reuseport")
    clients = [LineClient(bal.port) for _ in range(20)]
    for client in clients:
        assert client.request("1") == reply_for(1)
    before = _workers(bal)
    on_1 = before[1]["client_connections"]["numbers"]
    os.kill(before[0]["pid"], signal.SIGKILL)
    wait_until(lambda: not _workers(bal)[0]["ready"] or _workers(bal)[0]["restarts"] == 1)
    alive = 0
    for client in clients:
        try:
            alive += client.request("2") == reply_for(2)
        except OSError:
            pass
    assert alive == on_1
    wait_until(lambda: _workers(bal)[0]["ready"], what="worker 0 restarted")
    after = _workers(bal)
    assert after[0]["restarts"] == 1
    assert after[0]["pid"] != before[0]["pid"]
    assert after[1]["pid"] == before[1]["pid"]
    assert LineClient(bal.port).request("3") == reply_for(3)
    assert "restarting it in" in bal.output()


def test_runtime_api_writes_and_sighup_reach_every_worker(
    tmp_path: Path, services: Services, balancers: Balancers
) -> None:
    bal = _start(tmp_path, services, balancers)
    first = f"127.0.0.1:{services.ports[0]}"
    doc = _send(bal, "PUT", f"/api/services/numbers/backends/{first}", {"state": "drain"})
    assert doc["admin_state"] == "drain"
    for index in (0, 1):
        assert _worker_rows(bal, index)[first]["admin_state"] == "drain"
    third = services.start()
    write_toml(tmp_path / "b.toml", services.ports)
    bal.signal(signal.SIGHUP)

    def everywhere() -> bool:
        return all(f"127.0.0.1:{third.port}" in _worker_rows(bal, i) for i in (0, 1))

    wait_until(everywhere, what="the reload in both workers")


def test_a_backend_going_down_is_down_in_every_worker_within_intervals(
    tmp_path: Path, services: Services, balancers: Balancers
) -> None:
    bal = _start(tmp_path, services, balancers)
    victim = services.pop(0)
    address = f"127.0.0.1:{victim.port}"
    victim.stop()
    started = time.monotonic()

    def down_everywhere() -> bool:
        return all(_worker_rows(bal, i)[address]["state"] == "down" for i in (0, 1))

    wait_until(down_everywhere, timeout=10, what="the backend down in both workers")
    assert time.monotonic() - started < 10
    assert "worker 0:" in _worker_rows(bal, 1)[address]["reason"]
    assert backend_rows(bal.status())[address]["state"] == "down"


def test_sigterm_drains_every_worker_and_exits_0(
    tmp_path: Path, services: Services, balancers: Balancers
) -> None:
    bal = _start(tmp_path, services, balancers)
    pids = [w["pid"] for w in _workers(bal)]
    client = LineClient(bal.port)
    assert client.request("1") == reply_for(1)
    balancers.remove(bal)
    assert bal.stop() == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert "balancer stopped" in bal.output()


def test_a_hand_over_is_refused_with_several_workers(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "b.toml", [1])
    sock = str(tmp_path / "h.sock")
    done = subprocess.run(
        [PYTHON, "-m", "balancer", "serve", str(config), "--workers", "2", "--takeover", sock],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "not with --workers" in done.stderr


def test_the_checks_move_to_another_worker_when_the_checking_one_dies(
    tmp_path: Path, services: Services, balancers: Balancers
) -> None:
    bal = _start(tmp_path, services, balancers)
    assert [w["checks"] for w in _workers(bal)] == [True, False]
    os.kill(_workers(bal)[0]["pid"], signal.SIGKILL)
    wait_until(lambda: _workers(bal)[1]["checks"], what="worker 1 elected to check")
    wait_until(lambda: _workers(bal)[0]["ready"], what="worker 0 restarted")
    assert [w["checks"] for w in _workers(bal)] == [False, True]  # it stays with worker 1
    victim = services.pop(0)
    address = f"127.0.0.1:{victim.port}"
    victim.stop()

    def down_everywhere() -> bool:
        return all(_worker_rows(bal, i)[address]["state"] == "down" for i in (0, 1))

    wait_until(down_everywhere, timeout=10, what="the backend down in both workers")
    assert "worker 1:" in _worker_rows(bal, 0)[address]["reason"]
    assert backend_rows(bal.status())[address]["state"] == "down"  # the checker's view
    assert "worker 1 checks the backends from now on" in bal.output()
    assert problems(_get(bal, "/api/workers"), response_schema("/api/workers", "get", 200)) == []


def _two_services(path: Path, backend: int, ports: dict[str, int]) -> None:
    path.write_text(
        "".join(
            f'[services.{name}]\nlisten = "127.0.0.1:{port}"\nbackends = ["127.0.0.1:{backend}"]\n'
            for name, port in ports.items()
        )
    )


@pytest.mark.parametrize("sockets", ["shared", "reuseport"])
def test_a_reload_adds_and_removes_listeners_in_every_worker(
    tmp_path: Path, services: Services, balancers: Balancers, sockets: str
) -> None:
    backend = services.start().port
    one, two, three = free_ports(3)
    path = tmp_path / "b.toml"
    _two_services(path, backend, {"one": one, "two": two})
    bal = balancers.start(path, "--workers", "2", "--worker-sockets", sockets)
    _two_services(path, backend, {"one": one, "three": three})
    bal.signal(signal.SIGHUP)
    wait_until(
        lambda: all("three" in _get(bal, f"/status?worker={i}")["services"] for i in (0, 1)),
        what="service three in both workers",
    )
    clients = [LineClient(three) for _ in range(40)]
    for i, client in enumerate(clients):
        assert client.request(str(i)) == reply_for(i)
    served = [w["requests"].get("three", 0) for w in _workers(bal)]
    assert sum(served) == 40
    if sockets == "reuseport":
        assert all(n > 0 for n in served), served  # each worker has its own socket of it
    for client in clients:
        client.close()

    def two_refused() -> bool:  # not bound any more: refused, not left to hang
        try:
            socket.create_connection(("127.0.0.1", two), timeout=1).close()
        except ConnectionRefusedError:
            return True
        return False

    wait_until(two_refused, what="service two's port closed")
    os.kill(_workers(bal)[1]["pid"], signal.SIGKILL)  # a restart gets the new listeners
    wait_until(lambda: _workers(bal)[1]["restarts"] == 1 and _workers(bal)[1]["ready"])
    assert set(_get(bal, "/status?worker=1")["services"]) == {"one", "three"}
    last = LineClient(one)
    assert last.request("7") == reply_for(7)
    last.close()


def test_a_reload_whose_new_listener_cannot_be_bound_changes_no_worker(
    tmp_path: Path, services: Services, balancers: Balancers
) -> None:
    backend = services.start().port
    one, taken = free_ports(2)
    path = tmp_path / "b.toml"
    _two_services(path, backend, {"one": one})
    bal = balancers.start(path, "--workers", "2")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        _two_services(path, backend, {"one": one, "two": taken})
        bal.signal(signal.SIGHUP)
        bal.wait_for("reload: not made, no worker changes")
        for index in (0, 1):
            assert set(_get(bal, f"/status?worker={index}")["services"]) == {"one"}
        request = urllib.request.Request(
            f"http://127.0.0.1:{bal.admin_port}/api/reload", data=b"{}", method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=10)
        assert info.value.code == 409
        assert "a new listener cannot be bound" in info.value.read().decode()
        info.value.close()
    last = LineClient(one)
    assert last.request("3") == reply_for(3)
    last.close()


def test_the_file_s_workers_key_starts_workers_and_the_flag_overrides_it(
    tmp_path: Path, services: Services, balancers: Balancers
) -> None:
    backend = services.start().port
    path = write_toml(tmp_path / "b.toml", [backend])
    path.write_text("workers = 2\n" + path.read_text())
    bal = balancers.start(path)
    assert [w["index"] for w in _workers(bal)] == [0, 1]
    single = balancers.start(path, "--workers", "1")
    assert "2 worker processes" not in single.output()
    with pytest.raises(urllib.error.HTTPError) as info:  # one process: no /api/workers
        _get(single, "/api/workers")
    assert info.value.code == 404
    info.value.close()
    client = LineClient(single.port)
    assert client.request("4") == reply_for(4)
    client.close()
