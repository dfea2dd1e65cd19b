"""etcd discovery end to end: balancer processes following a real 3-member etcd cluster on
loopback, backends registering themselves with leases (`balancer service --register`),
members killed, the whole cluster down and back, runtime API writes through one instance
obeyed by another."""

from __future__ import annotations

import json
import signal
import socket
import socketserver
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from tests.etcd_cluster import EtcdCluster, etcd_cluster
from tests.support import (
    BalancerProc,
    Balancers,
    LineClient,
    ServiceProc,
    Services,
    backend_requests,
    backend_rows,
    load_summary,
    load_without_errors,
    reply_for,
    start_load,
    wait_until,
)
from tests.test_admin_openapi import problems, response_schema

__all__ = ["etcd_cluster"]  # the fixture, imported for this module's tests

pytestmark = pytest.mark.e2e
PREFIX = "/balancer"


def config(tmp_path: Path, cluster: EtcdCluster, name: str = "lb", **extra: str) -> Path:
    """A balancer's file: service numbers from etcd (`backends = []` unless `extra` lists
    some: the file's, used until etcd first answers), with the `extra` keys."""
    extra.setdefault("backends", "[]")
    endpoints = ", ".join(json.dumps(e) for e in cluster.endpoints)
    lines = [
        "drain_timeout = 5",
        "[discovery]",
        'kind = "etcd"',
        f"endpoints = [{endpoints}]",
        f'prefix = "{PREFIX}"',
        "interval = 0.5",
        "timeout = 1",
        "[services.numbers]",
        'listen = "127.0.0.1:0"',
        'discover = "etcd"',
        *(f"{key} = {value}" for key, value in extra.items()),
        "[services.numbers.health]",
        "interval = 0.2",
        "timeout = 1",
        "rise = 1",
        "fall = 1",
    ]
    path = tmp_path / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def key(port: int, kind: str = "backends") -> str:
    return f"{PREFIX}/numbers/{kind}/127.0.0.1:{port}"


def register(cluster: EtcdCluster, ttl: int = 2) -> list[str]:
    return ["--register", f"etcd://{','.join(cluster.addresses)}{PREFIX}/numbers",
            "--register-ttl", str(ttl)]  # fmt: skip


def listed(cluster: EtcdCluster, *backends: ServiceProc) -> None:
    """Put each backend's key in etcd, as it registering itself would."""
    for backend in backends:
        cluster.put(key(backend.port), "{}")


def up_ports(bal: BalancerProc, worker: int | None = None) -> set[int]:
    """The ports of the backends up (in one worker's view)."""
    doc = bal.status() if worker is None else worker_status(bal, worker)
    return {
        int(address.rsplit(":", 1)[1])
        for address, row in backend_rows(doc).items()
        if row["state"] == "up"
    }


def ups(bal: BalancerProc, wanted: set[int], worker: int | None = None) -> Callable[[], bool]:
    """Whether exactly the backends on `wanted` ports are up (in one worker's view)."""
    return lambda: up_ports(bal, worker) == wanted


def ports(bal: BalancerProc) -> set[int]:
    return {int(a.rsplit(":", 1)[1]) for a in backend_rows(bal.status())}


def discovery(bal: BalancerProc) -> dict[str, Any]:
    doc: dict[str, Any] = bal.status()["services"]["numbers"]["discovery"]
    return doc


def admin(bal: BalancerProc, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{bal.admin_port}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"} if body is not None else {},
        method=method,
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def metric(bal: BalancerProc, name: str) -> float | None:
    for line in bal.metrics().splitlines():
        if line.startswith(name + "{") and 'service="numbers"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture(autouse=True)
def clean(etcd_cluster: EtcdCluster) -> Any:
    """Each test starts with every member running and no key under the prefix."""
    etcd_cluster.start_all()
    for k in etcd_cluster.get_prefix(PREFIX + "/"):
        etcd_cluster.delete(k)
    yield
    etcd_cluster.start_all()


def test_backends_join_and_leave_through_leases_under_load(
    tmp_path: Path, etcd_cluster: EtcdCluster, services: Services, balancers: Balancers
) -> None:
    a, b = services.start_many(2, *register(etcd_cluster))
    wait_until(lambda: len(etcd_cluster.get_prefix(PREFIX + "/")) == 2, what="a, b registered")
    bal = balancers.start(config(tmp_path, etcd_cluster))
    wait_until(lambda: up_ports(bal) == {a.port, b.port}, what="a and b up")
    assert discovery(bal)["ok"]
    with load_without_errors(bal.port, 12):
        c = services.start(*register(etcd_cluster))
        wait_until(
            lambda: backend_requests(bal.status()).get(f"127.0.0.1:{c.port}", 0) > 20,
            what="c, registered, to get traffic",
        )
        a.popen.send_signal(signal.SIGTERM)  # its lease revoked: it leaves at once
        wait_until(lambda: ports(bal) == {b.port, c.port}, what="a to leave")
        a.popen.wait(timeout=10)


def test_a_backend_whose_lease_expires_leaves(
    tmp_path: Path, etcd_cluster: EtcdCluster, services: Services, balancers: Balancers
) -> None:
    a, b = services.start_many(2, *register(etcd_cluster, ttl=1))
    bal = balancers.start(config(tmp_path, etcd_cluster))
    wait_until(lambda: up_ports(bal) == {a.port, b.port}, what="a and b up")
    b.popen.kill()  # no revoke: the lease runs out
    wait_until(lambda: ports(bal) == {a.port}, timeout=30, what="b's lease to expire")
    assert key(b.port) not in etcd_cluster.get_prefix(PREFIX + "/")


def test_one_member_killed_nothing_noticed(
    tmp_path: Path, etcd_cluster: EtcdCluster, services: Services, balancers: Balancers
) -> None:
    a, b, c = services.start_many(3)
    listed(etcd_cluster, a, b)
    bal = balancers.start(config(tmp_path, etcd_cluster))
    wait_until(lambda: up_ports(bal) == {a.port, b.port}, what="a and b up")
    with load_without_errors(bal.port, 8):
        current = discovery(bal)["endpoint"]
        etcd_cluster.kill(etcd_cluster.endpoints.index(current))  # the one it watches
        etcd_cluster.put(key(c.port), '{"weight": 2}')
        wait_until(lambda: up_ports(bal) == {a.port, b.port, c.port}, what="c from the others")
        assert discovery(bal)["endpoint"] != current
        assert discovery(bal)["ok"]


def test_etcd_gone_keeps_the_last_set_then_catches_up(
    tmp_path: Path, etcd_cluster: EtcdCluster, services: Services, balancers: Balancers
) -> None:
    a, b, c = services.start_many(3)
    listed(etcd_cluster, a, b)
    bal = balancers.start(config(tmp_path, etcd_cluster))
    wait_until(lambda: up_ports(bal) == {a.port, b.port}, what="a and b up")
    assert metric(bal, "balancer_discovery_up") == 1.0
    with load_without_errors(bal.port, 14):
        etcd_cluster.stop_all()
        wait_until(lambda: not discovery(bal)["ok"], what="etcd to be seen gone")
        assert metric(bal, "balancer_discovery_up") == 0.0
        assert discovery(bal)["last_error"]
        wait_until(lambda: discovery(bal)["failures"] >= 3, what="etcd tried again")
        assert bal.output().count("etcd does not answer") == 1  # one warning per outage
        before = sum(backend_requests(bal.status()).values())
        wait_until(
            lambda: sum(backend_requests(bal.status()).values()) > before + 100,
            what="traffic while etcd is down",
        )
        assert up_ports(bal) == {a.port, b.port}
        age = metric(bal, "balancer_discovery_view_age_seconds")
        assert age is not None
        wait_until(
            lambda: (metric(bal, "balancer_discovery_view_age_seconds") or 0) > age,
            what="the view to age",
        )
        status, body = admin(bal, "PUT", f"/api/services/numbers/backends/127.0.0.1:{a.port}",
                             {"state": "drain"})  # fmt: skip
        assert status == 503, body
        assert "etcd did not take the change" in body["error"]
        assert backend_rows(bal.status())[f"127.0.0.1:{a.port}"]["admin_state"] == "ready"
        etcd_cluster.start_all()
        wait_until(lambda: discovery(bal)["ok"], what="etcd back")
        assert "etcd answers again" in bal.output()
        assert metric(bal, "balancer_discovery_up") == 1.0
        etcd_cluster.put(key(c.port), "{}")
        etcd_cluster.delete(key(a.port))
        wait_until(lambda: ports(bal) == {b.port, c.port}, what="changes after the return")


def test_runtime_api_writes_on_one_instance_reach_another_and_its_workers(
    tmp_path: Path, etcd_cluster: EtcdCluster, services: Services, balancers: Balancers
) -> None:
    a, b, c = services.start_many(3)
    listed(etcd_cluster, a, b)
    one = balancers.start(config(tmp_path, etcd_cluster, "one"))
    two = balancers.start(config(tmp_path, etcd_cluster, "two"), "--workers", "2")
    for bal in (one, two):
        wait_until(ups(bal, {a.port, b.port}), what="a and b up")
    path = f"/api/services/numbers/backends/127.0.0.1:{a.port}"
    status, body = admin(one, "PUT", path, {"state": "drain", "weight": 7})
    assert status == 200, body
    assert (body["admin_state"], body["weight"]) == ("drain", 7)  # applied here on return

    def drained_on_two() -> bool:
        rows = [backend_rows(worker_status(two, i))[f"127.0.0.1:{a.port}"] for i in (0, 1)]
        return all(row["admin_state"] == "drain" and row["weight"] == 7 for row in rows)

    wait_until(drained_on_two, what="the drain on the other instance")
    stored = json.loads(etcd_cluster.get_prefix(key(a.port, "admin"))[key(a.port, "admin")])
    assert stored == {"state": "drain", "weight": 7}
    status, body = admin(one, "PUT", path, {"state": "up"})  # the weight stays
    assert status == 200, body
    wait_until(
        lambda: backend_rows(two.status())[f"127.0.0.1:{a.port}"]["admin_state"] == "ready",
        what="back up on the other instance",
    )
    assert backend_rows(two.status())[f"127.0.0.1:{a.port}"]["weight"] == 7
    status, body = admin(
        two, "POST", "/api/services/numbers/backends", {"address": f"127.0.0.1:{c.port}"}
    )
    assert status == 201, body
    wait_until(lambda: up_ports(one) == {a.port, b.port, c.port}, what="c added on one")
    for index in (0, 1):  # written once, through one worker; applied by both
        wait_until(ups(two, {a.port, b.port, c.port}, index), what=f"c in worker {index}")
    status, body = admin(one, "DELETE", path)
    assert status == 202, body
    wait_until(lambda: ports(one) == ports(two) == {b.port, c.port}, what="a removed")
    assert set(etcd_cluster.get_prefix(PREFIX + "/")) == {key(b.port), key(c.port)}
    status, body = admin(two, "POST", "/api/services/numbers/backends",
                         {"address": f"127.0.0.1:{c.port}"})  # fmt: skip
    assert status == 409, body


def test_keys_that_do_not_fit_are_skipped_and_shown(
    tmp_path: Path, etcd_cluster: EtcdCluster, services: Services, balancers: Balancers
) -> None:
    (a,) = services.start_many(1)
    etcd_cluster.put(key(a.port), '{"weight": 3}')
    etcd_cluster.put(f"{PREFIX}/numbers/backends/not-an-address", "{}")
    etcd_cluster.put(key(a.port + 1), "weight=2")
    bal = balancers.start(config(tmp_path, etcd_cluster))
    wait_until(lambda: up_ports(bal) == {a.port}, what="a up")
    doc = discovery(bal)
    assert len(doc["problems"]) == 2, doc
    assert backend_rows(bal.status())[f"127.0.0.1:{a.port}"]["weight"] == 3
    assert any("not a JSON object" in p for p in doc["problems"])
    assert bal.wait_for("etcd key skipped", timeout=10)
    assert problems(bal.status(), response_schema("/status", "get", 200)) == []


class NamedLines(socketserver.ThreadingTCPServer):
    """A line backend that answers every line with its own port (health checks echoed)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), NamedHandler)
        self.port = int(self.server_address[1])
        threading.Thread(target=self.serve_forever, daemon=True).start()


class NamedHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        port = cast(NamedLines, self.server).port
        for line in self.rfile:
            text = line.strip()
            self.wfile.write(text + b"\n" if text == b"!HEALTH_CHECK" else b"%d\n" % port)


def mapping(port: int, keys: list[str], connections: int = 40) -> dict[str, str]:
    """Which backend answers each key, sent over `connections` connections."""
    found: dict[str, str] = {}
    share = len(keys) // connections
    for i in range(connections):
        chunk = keys[i * share : (i + 1) * share]
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall("".join(k + "\n" for k in chunk).encode())
            stream = sock.makefile("rb")
            for k in chunk:
                found[k] = stream.readline().decode().strip()
    return found


def test_the_same_keys_go_to_the_same_backends_on_three_instances_and_four_workers(
    tmp_path: Path, etcd_cluster: EtcdCluster, balancers: Balancers
) -> None:
    backends = [NamedLines() for _ in range(5)]
    try:
        for b in backends:
            etcd_cluster.put(key(b.port), "{}")
        extra = {"algorithm": '"consistent_hash"', "hash_key": '"message"'}
        one = balancers.start(config(tmp_path, etcd_cluster, "one", **extra))
        two = balancers.start(config(tmp_path, etcd_cluster, "two", **extra))
        four = balancers.start(
            config(tmp_path, etcd_cluster, "four", **extra),
            "--workers", "4", "--worker-sockets", "reuseport",
        )  # fmt: skip
        wanted = {b.port for b in backends}
        for bal in (one, two, four):
            wait_until(ups(bal, wanted), what="every backend up")
        for index in range(4):
            wait_until(ups(four, wanted, index), what=f"every backend up in worker {index}")
        digests = {
            bal.status()["services"]["numbers"]["hash_table"]["digest"] for bal in (one, two)
        } | {
            worker_status(four, i)["services"]["numbers"]["hash_table"]["digest"] for i in range(4)
        }
        assert len(digests) == 1, digests
        keys = [str(n) for n in range(10_000)]
        first = mapping(one.port, keys)
        assert set(first.values()) == {str(p) for p in wanted}  # every backend has keys
        assert mapping(two.port, keys) == first
        assert mapping(four.port, keys) == first
        served = [
            sum(w["requests"].values()) for w in admin(four, "GET", "/api/workers")[1]["workers"]
        ]
        assert sum(served) == len(keys)
        assert all(n > 0 for n in served), served  # every worker mapped some keys
    finally:
        for b in backends:
            b.shutdown()
            b.server_close()


def worker_status(bal: BalancerProc, index: int) -> dict[str, Any]:
    status, doc = admin(bal, "GET", f"/status?worker={index}")
    assert status == 200, doc
    return cast(dict[str, Any], doc)


def test_health_checks_stay_local_to_each_instance(
    tmp_path: Path, etcd_cluster: EtcdCluster, services: Services, balancers: Balancers
) -> None:
    a, b = services.start_many(2)
    listed(etcd_cluster, a, b)
    bal = balancers.start(config(tmp_path, etcd_cluster))
    wait_until(ups(bal, {a.port, b.port}), what="a and b up")
    b.stop()  # etcd still lists it: this instance's checks take it out
    wait_until(ups(bal, {a.port}), what="b down")
    assert ports(bal) == {a.port, b.port}
    assert key(b.port) in etcd_cluster.get_prefix(PREFIX + "/")
    client = start_load(bal.port, "--duration", "2", "--rate", "100", "--client_count", "2")
    doc = load_summary(client, timeout=30)
    assert doc["ok"] == doc["requests"] > 0


def test_a_reload_keeps_etcd_s_view_and_takes_new_members(
    tmp_path: Path, etcd_cluster: EtcdCluster, services: Services, balancers: Balancers
) -> None:
    seed, a, b, c = services.start_many(4)
    listed(etcd_cluster, a, b)
    path = config(tmp_path, etcd_cluster, backends=f'["127.0.0.1:{seed.port}"]')
    text = path.read_text()
    bal = balancers.start(path)
    wait_until(lambda: ports(bal) == {a.port, b.port}, what="etcd's set, not the file's")
    leaving = f"backend 127.0.0.1:{seed.port} of service numbers leaves"
    assert bal.output().count(leaving) == 1
    members = etcd_cluster.endpoints
    path.write_text(text.replace(", ".join(json.dumps(e) for e in members),
                                 ", ".join(json.dumps(e) for e in reversed(members))))  # fmt: skip
    bal.signal(signal.SIGHUP)
    bal.wait_for("reload done")
    wait_until(lambda: discovery(bal)["endpoint"] == members[-1], what="the new first member")
    etcd_cluster.put(key(c.port), "{}")
    wait_until(lambda: ports(bal) == {a.port, b.port, c.port}, what="c, watched anew")
    assert bal.output().count(leaving) == 1  # the file's seed was not listed again


def test_etcd_down_at_start_the_file_s_backends_serve_until_it_answers(
    tmp_path: Path, etcd_cluster: EtcdCluster, services: Services, balancers: Balancers
) -> None:
    seed, a = services.start_many(2)
    etcd_cluster.put(key(a.port), "{}")
    etcd_cluster.stop_all()
    path = config(tmp_path, etcd_cluster, backends=f'["127.0.0.1:{seed.port}"]')
    bal = balancers.start(path)  # ready without etcd
    wait_until(lambda: up_ports(bal) == {seed.port}, what="the seed up")
    assert not discovery(bal)["ok"]
    assert discovery(bal)["last_success"] is None
    assert metric(bal, "balancer_discovery_up") == 0.0
    assert metric(bal, "balancer_discovery_view_age_seconds") is None  # no view yet
    last = LineClient(bal.port)
    assert last.request("5") == reply_for(5)
    last.close()
    etcd_cluster.start_all()
    wait_until(lambda: ports(bal) == {a.port}, what="etcd's view once it answers")
    assert discovery(bal)["ok"]
