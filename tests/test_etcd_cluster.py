"""The test etcd cluster (tests/etcd_cluster.py) is a real one: three members that agree on
every write, keep a quorum when one dies, and keep their data across a restart."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.etcd_cluster import EtcdCluster, EtcdError

pytestmark = [pytest.mark.peers, pytest.mark.e2e]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A cluster of its own for each test: these tests kill members."""
    with EtcdCluster(tmp_path) as started:
        yield started


def health(endpoint: str) -> Any:
    with urllib.request.urlopen(f"{endpoint}/health", timeout=5) as resp:
        return json.loads(resp.read())


def test_three_members_form_one_cluster(cluster: EtcdCluster) -> None:
    assert len(cluster.endpoints) == len(set(cluster.endpoints)) == 3
    for endpoint in cluster.endpoints:
        assert health(endpoint)["health"] == "true"
    members = cluster.call("/v3/cluster/member/list", {}, member=1)["members"]
    assert sorted(m["name"] for m in members) == ["m0", "m1", "m2"]

    cluster.put("/t/a", "one", member=0)
    assert cluster.get_prefix("/t/", member=2) == {"/t/a": "one"}
    cluster.delete("/t/a", member=1)
    assert cluster.get_prefix("/t/", member=0) == {}


def test_a_lease_holds_its_keys_until_revoked(cluster: EtcdCluster) -> None:
    lease = cluster.grant(30)
    cluster.put("/t/leased", "x", lease=lease)
    cluster.put("/t/plain", "y")
    assert cluster.lease_of("/t/leased") == lease
    assert cluster.lease_of("/t/plain") == 0
    cluster.revoke(lease, member=2)
    assert cluster.get_prefix("/t/", member=1) == {"/t/plain": "y"}


def test_the_leader_killed_the_others_keep_a_quorum(cluster: EtcdCluster) -> None:
    cluster.put("/t/before", "1")
    dead = cluster.leader()
    cluster.kill(dead)
    with pytest.raises(EtcdError, match="not running"):
        cluster.put("/t/x", "x", member=dead)
    left = [i for i in range(3) if i != dead]
    assert cluster.leader() in left
    cluster.put("/t/during", "2", member=left[0])
    assert cluster.get_prefix("/t/", member=left[1]) == {"/t/before": "1", "/t/during": "2"}
    # back on its data dir, it catches up with what it missed
    cluster.start(dead)
    assert cluster.get_prefix("/t/", member=dead) == {"/t/before": "1", "/t/during": "2"}


def test_all_killed_and_started_again_keep_the_data(cluster: EtcdCluster) -> None:
    cluster.put("/t/kept", "yes")
    ports = list(cluster.endpoints)
    cluster.stop_all()
    with pytest.raises(EtcdError):
        cluster.get_prefix("/t/")
    cluster.start_all()
    assert cluster.endpoints == ports
    for i in range(3):
        assert cluster.get_prefix("/t/", member=i) == {"/t/kept": "yes"}
    cluster.put("/t/after", "ok", member=2)
    assert cluster.get_prefix("/t/", member=0) == {"/t/kept": "yes", "/t/after": "ok"}
