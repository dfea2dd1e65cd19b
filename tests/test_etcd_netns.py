"""etcd discovery across a network that fails: a backend and an etcd member on hosts of
their own (network namespaces over veth pairs, made by the test), cut off with
`ip link set down` under load. A cut is silent (packets dropped, no reset), unlike a
killed process: only timeouts can see it."""

from __future__ import annotations

from pathlib import Path

import pytest

from balancer.tools.procs import ready_service_port
from tests.etcd_cluster import EtcdCluster, EtcdError
from tests.netns import Netns, namespaces
from tests.support import (
    PYTHON,
    BalancerProc,
    Balancers,
    ServiceProc,
    Services,
    backend_rows,
    load_without_errors,
    wait_until,
)
from tests.test_etcd_discovery import PREFIX, config, discovery

__all__ = ["namespaces"]  # the fixture, imported for this module's tests

pytestmark = [pytest.mark.e2e, pytest.mark.peers]


def up(bal: BalancerProc) -> set[str]:
    return {a for a, row in backend_rows(bal.status()).items() if row["state"] == "up"}


def listed(bal: BalancerProc) -> set[str]:
    return set(backend_rows(bal.status()))


def put_or_not(cluster: EtcdCluster, key: str) -> bool:
    try:
        cluster.put(key, "{}", member=1)
    except EtcdError:
        return False
    return True


def test_a_backend_cut_off_leaves_every_instance_and_comes_back(
    tmp_path: Path, namespaces: list[Netns], services: Services, balancers: Balancers
) -> None:
    ns = Netns(1)
    namespaces.append(ns)
    with EtcdCluster(tmp_path / "etcd", hosts=[ns.outer] * 3) as cluster:
        url = cluster.url(f"{PREFIX}/numbers")
        register = ["--register", url, "--register-ttl", "2"]
        far = ServiceProc(
            [*ns.prefix, PYTHON, "-m", "balancer.tools.service", "-p", "0", "--host", ns.inner,
             *register]
        )  # fmt: skip
        services.append(far)
        far.port = ready_service_port(far)
        near = services.start(*register)
        both = {f"{ns.inner}:{far.port}", f"127.0.0.1:{near.port}"}
        extra = {"response_timeout": "1", "retries": "2"}
        one = balancers.start(config(tmp_path, cluster, "one", **extra))
        two = balancers.start(config(tmp_path, cluster, "two", **extra))
        for bal in (one, two):
            wait_until(lambda bal=bal: up(bal) == both, what="both backends up")  # type: ignore[misc]
        with load_without_errors(one.port, 15, rate=100):
            ns.cut()  # its lease cannot be kept alive: it expires, the key goes
            wait_until(
                lambda: listed(one) == listed(two) == {f"127.0.0.1:{near.port}"},
                timeout=30,
                what="the cut-off backend to leave both instances",
            )
            ns.mend()  # the registrar grants a new lease and puts its key again
            wait_until(
                lambda: up(one) == up(two) == both, timeout=30, what="it to come back in both"
            )


def test_an_etcd_member_cut_off_from_its_quorum_is_left_for_another(
    tmp_path: Path, namespaces: list[Netns], services: Services, balancers: Balancers
) -> None:
    ns = Netns(2)
    namespaces.append(ns)
    hosts = [ns.inner, ns.outer, ns.outer]  # member 0 on a host of its own
    with EtcdCluster(tmp_path / "etcd", hosts=hosts, netns=[ns.name, None, None]) as cluster:
        a, b, c = services.start_many(3)
        cluster.put(f"{PREFIX}/numbers/backends/127.0.0.1:{a.port}", "{}", member=1)
        cluster.put(f"{PREFIX}/numbers/backends/127.0.0.1:{b.port}", "{}", member=1)
        bal = balancers.start(config(tmp_path, cluster))  # member 0 listed first
        wanted = {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"}
        wait_until(lambda: up(bal) == wanted, what="a and b up")
        assert discovery(bal)["endpoint"] == cluster.endpoints[0]
        with load_without_errors(bal.port, 10):
            ns.cut()  # member 0 has no quorum: it answers nothing, and says nothing
            # (if it led, the other two elect a leader first: a put may time out till then)
            wait_until(
                lambda: put_or_not(cluster, f"{PREFIX}/numbers/backends/127.0.0.1:{c.port}"),
                what="a put through the two members left",
            )
            wanted.add(f"127.0.0.1:{c.port}")
            wait_until(lambda: up(bal) == wanted, what="c, through another member")
            assert discovery(bal)["endpoint"] in cluster.endpoints[1:]
            assert discovery(bal)["ok"]
            ns.mend()
