"""Consistent choice without coordination: every balancer instance that sees the same
backends builds the same Maglev table (no salted `hash()`, no process state), and shows
the table's digest and the config's revision in /status and /metrics so divergence is
visible."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest_asyncio
from aiohttp import ClientSession

from balancer.admin.documents import services_revision
from balancer.app import build_server
from balancer.config.load import load_config
from balancer.config.model import (
    AdminConfig,
    BackendConfig,
    Config,
    HealthConfig,
    ServiceConfig,
)
from balancer.core.policies.consistent_hash import ConsistentHash
from balancer.runtime.server import Server
from tests.support import free_ports
from tests.test_admin_openapi import problems, response_schema


@dataclass(eq=False)
class FakeTarget:
    address: str
    in_flight: int = 0
    effective_weight: float = 1.0


ADDRESSES = [f"10.1.{i // 200}.{i % 200 + 1}:9000" for i in range(40)]
KEYS = [f"client-{i}".encode() for i in range(10_000)]


def built(addresses: Sequence[str], table_size: int = 65537) -> ConsistentHash:
    policy = ConsistentHash(table_size)
    policy.update([FakeTarget(a) for a in addresses])
    return policy


def picks(policy: ConsistentHash, keys: Sequence[bytes] = KEYS) -> list[str]:
    out = []
    for key in keys:
        target = policy.pick(key)
        assert target is not None
        out.append(target.address)
    return out


def test_the_same_backends_in_any_order_give_the_same_table_and_picks() -> None:
    shuffled = ADDRESSES[:]
    random.Random(3).shuffle(shuffled)
    one = built(ADDRESSES)
    other = built(shuffled)
    assert one.digest == other.digest
    assert len(one.digest) == 16
    assert int(one.digest, 16) >= 0
    assert picks(one) == picks(other)
    # an instance that saw the backends arrive one by one ends with the same table too
    growing = ConsistentHash()
    for n in range(1, len(shuffled) + 1):
        growing.update([FakeTarget(a) for a in shuffled[:n]])
    assert growing.rebuilds == len(shuffled)
    assert growing.digest == one.digest
    assert picks(growing) == picks(one)


def test_the_digest_changes_when_a_backend_leaves_and_returns_when_it_comes_back() -> None:
    policy = built(ADDRESSES)
    before, rebuilds = policy.digest, policy.rebuilds
    policy.update([FakeTarget(a) for a in ADDRESSES[1:]])
    assert policy.digest != before
    assert policy.rebuilds == rebuilds + 1
    assert policy.members == len(ADDRESSES) - 1
    assert policy.digest == built(ADDRESSES[1:]).digest
    policy.update([FakeTarget(a) for a in reversed(ADDRESSES)])
    assert policy.digest == before
    # the same set again is no rebuild, and the digest is the one of the same table
    policy.update([FakeTarget(a) for a in ADDRESSES])
    assert policy.rebuilds == rebuilds + 2
    assert policy.digest == before
    # a weight counts: another weight, another table
    weighted = ConsistentHash()
    weighted.update([FakeTarget(a, 0, 2.0 if a == ADDRESSES[0] else 1.0) for a in ADDRESSES])
    assert weighted.digest != before


def test_an_empty_table_has_a_digest_too() -> None:
    policy = ConsistentHash()
    assert policy.digest == hashlib.blake2b(b"", digest_size=8).hexdigest()
    assert policy.members == 0


CHILD = """
import hashlib, json, sys
from balancer.admin.documents import services_revision
from balancer.config.load import load_config
from tests.test_consistent_choice import ADDRESSES, KEYS, built, picks
policy = built(ADDRESSES[::-1])
print(json.dumps({
    "digest": policy.digest,
    "picks": hashlib.sha256("\\n".join(picks(policy)).encode()).hexdigest(),
    "revision": services_revision(load_config(sys.argv[1]).services),
    "hash": hash("salted"),
}))
"""


def config_file(tmp_path: Path, name: str, ports: Sequence[int]) -> Path:
    path = tmp_path / name
    lines = [
        "[services.keys]",
        'listen = "127.0.0.1:7999"',
        'algorithm = "consistent_hash"',
        "hash_balance_factor = 1.25",
        f"backends = {json.dumps([f'127.0.0.1:{p}' for p in ports])}",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_another_hash_seed_computes_the_same_digest_picks_and_revision(tmp_path: Path) -> None:
    """Processes whose `hash()` differs (PYTHONHASHSEED) agree on everything."""
    cfg = config_file(tmp_path, "a.toml", (8001, 8002, 8003))
    root = Path(__file__).resolve().parent.parent
    answers = []
    for seed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(cfg)],
            capture_output=True,
            text=True,
            env=env,
            cwd=root,
            timeout=60,
            check=True,
        )
        answers.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert answers[0]["hash"] != answers[1]["hash"]  # the seeds did change hash()
    here = built(ADDRESSES)
    for answer in answers:
        assert answer["digest"] == here.digest
        assert answer["picks"] == hashlib.sha256("\n".join(picks(here)).encode()).hexdigest()
        assert answer["revision"] == services_revision(load_config(str(cfg)).services)


def revision_of(path: Path) -> str:
    return services_revision(load_config(str(path)).services)


def test_the_config_revision_follows_the_services_not_the_path_or_the_admin_listener(
    tmp_path: Path,
) -> None:
    one = revision_of(config_file(tmp_path, "a.toml", (8001, 8002)))
    (tmp_path / "elsewhere").mkdir()
    moved = config_file(tmp_path, "elsewhere/b.toml", (8001, 8002))
    assert revision_of(moved) == one
    moved.write_text(moved.read_text() + '[admin]\nlisten = "127.0.0.1:9999"\n')
    assert revision_of(moved) == one
    assert revision_of(config_file(tmp_path, "c.toml", (8001, 8003))) != one
    assert len(one) == 16


# -- a running balancer ------------------------------------------------------------------------


@dataclass
class Running:
    server: Server
    http: ClientSession
    base: str
    config: Config
    addresses: list[str]

    async def get(self, path: str, method: str = "GET", body: object = None) -> Any:
        async with self.http.request(method, self.base + path, json=body) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, await resp.text()


@pytest_asyncio.fixture
async def running() -> AsyncIterator[Running]:
    listen, other, *ports = free_ports(5)
    hashed = ServiceConfig(
        name="keys",
        listen_host="127.0.0.1",
        listen_port=listen,
        backends=tuple(BackendConfig("127.0.0.1", p) for p in ports),
        algorithm="consistent_hash",
        policy_options={"table_size": 4099},
        health=HealthConfig(enabled=False),
    )
    plain = ServiceConfig(
        name="plain",
        listen_host="127.0.0.1",
        listen_port=other,
        backends=(BackendConfig("127.0.0.1", ports[0]),),
        health=HealthConfig(enabled=False),
    )
    config = Config(services=(hashed, plain), admin=AdminConfig(host="127.0.0.1", port=0))
    server = build_server(config, lambda: config)
    await server.start()
    try:
        assert server.admin_address is not None
        async with ClientSession() as http:
            base = f"http://127.0.0.1:{server.admin_address[1]}"
            yield Running(server, http, base, config, [f"127.0.0.1:{p}" for p in ports])
    finally:
        await server.shutdown()


def metric_lines(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name + "{")]


async def test_status_and_metrics_show_the_table_digest_and_the_config_revision(
    running: Running,
) -> None:
    revision = services_revision(running.config.services)
    expected = built(running.addresses, 4099).digest

    status, doc = await running.get("/status")
    assert (status, problems(doc, response_schema("/status", "get", 200))) == (200, [])
    assert doc["config_revision"] == revision
    table = doc["services"]["keys"]["hash_table"]
    assert table == {"digest": expected, "size": 4099, "backends": 3, "rebuilds": table["rebuilds"]}
    assert table["rebuilds"] >= 1
    assert "hash_table" not in doc["services"]["plain"]
    status, doc = await running.get("/api/services")
    assert (status, problems(doc, response_schema("/api/services", "get", 200))) == (200, [])
    assert doc["config_revision"] == revision
    assert doc["services"]["keys"]["hash_table"]["digest"] == expected

    status, text = await running.get("/metrics")
    assert status == 200
    assert metric_lines(text, "balancer_config_info") == [
        f'balancer_config_info{{revision="{revision}"}} 1.0'
    ]
    assert metric_lines(text, "balancer_hash_table_info") == [
        f'balancer_hash_table_info{{digest="{expected}",service="keys"}} 1.0'
    ]
    assert metric_lines(text, "balancer_hash_table_rebuilds_total") == [
        f'balancer_hash_table_rebuilds_total{{service="keys"}} {float(table["rebuilds"])}'
    ]

    # a drained backend leaves the table: another digest, the one of the two left
    first = running.addresses[0]
    path = f"/api/services/keys/backends/{first}"
    status, _ = await running.get(path, "PUT", {"state": "drain"})
    assert status == 200
    status, doc = await running.get("/status")
    after = doc["services"]["keys"]["hash_table"]
    assert after["digest"] == built(running.addresses[1:], 4099).digest != expected
    assert (after["backends"], after["rebuilds"]) == (2, table["rebuilds"] + 1)
    assert doc["config_revision"] == revision  # a runtime change is not a config change
    status, text = await running.get("/metrics")
    assert f'digest="{after["digest"]}"' in metric_lines(text, "balancer_hash_table_info")[0]
