"""Balancing algorithms end to end: real balancer, real sample services, loopback sockets.

Load-aware policies must steer requests away from a slow backend, consistent
hashing must pin each request line to one backend (and move only the lines of
a backend that goes away), weights must hold exactly, a weight of 0 must
drain, and a weight changed at run time must apply at once.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from zlib import crc32

import pytest

from balancer.config.model import AdminConfig, BackendConfig, Config, HealthConfig, ServiceConfig
from balancer.config.policies import DEFAULT_TABLE_SIZE
from balancer.core.policies.consistent_hash import build_table
from balancer.runtime.server import Server
from balancer.tools.service import protocol_factory
from tests.support import (
    BalancerProc,
    Balancers,
    LineClient,
    ServiceProc,
    Services,
    backend_requests,
    backend_rows,
    load_summary,
    reply_for,
    start_balancer,
    start_load,
    start_service,
    wait_until,
)

pytestmark = pytest.mark.e2e

SLOW_DELAY = "0.02"
LOAD_CLIENTS = 16
LOAD_PIPELINE = 4
LOAD_PER_CLIENT = 150
FAST_HEALTH = {"interval": 0.2, "timeout": 1, "rise": 1, "fall": 1}


def write_config(
    path: Path,
    backends: Sequence[int | tuple[int, int]],
    health: dict[str, Any] | None = None,
    **service: Any,
) -> Path:
    """A one-service config `numbers` on 127.0.0.1:0; a backend is a port or (port, weight)."""
    entries = []
    for b in backends:
        port, weight = b if isinstance(b, tuple) else (b, 1)
        entries.append(f'{{ address = "127.0.0.1:{port}", weight = {weight} }}')
    lines = ["[services.numbers]", 'listen = "127.0.0.1:0"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in service.items()]
    lines.append("backends = [" + ", ".join(entries) + "]")
    lines.append("[services.numbers.health]")
    lines += [f"{key} = {json.dumps(value)}" for key, value in (health or FAST_HEALTH).items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def address(service: ServiceProc) -> str:
    return f"127.0.0.1:{service.port}"


def run_load(bal: BalancerProc) -> dict[str, Any]:
    """The load client, bounded by count: LOAD_CLIENTS connections x LOAD_PER_CLIENT requests."""
    client = start_load(
        bal.port,
        "--client_count",
        str(LOAD_CLIENTS),
        "--pipeline",
        str(LOAD_PIPELINE),
        "--requests_per_client",
        str(LOAD_PER_CLIENT),
        admin_port=bal.admin_port,
    )
    return load_summary(client, timeout=90)


@pytest.fixture(scope="module")
def slow_and_fast() -> Iterator[list[ServiceProc]]:
    """Four sample services; the second one answers every request 20 ms late."""
    procs = [start_service()]
    try:
        procs.append(start_service("--delay", SLOW_DELAY))
        procs.extend(start_service() for _ in range(2))
        yield procs
    finally:
        for p in procs:
            p.stop()


@pytest.mark.parametrize("algorithm", ["least_connections", "power_of_two", "peak_ewma"])
def test_load_aware_policies_send_the_slow_backend_fewer_requests(
    tmp_path: Path,
    slow_and_fast: list[ServiceProc],
    balancers: Balancers,
    algorithm: str,
) -> None:
    cfg = write_config(tmp_path / "b.toml", [s.port for s in slow_and_fast], algorithm=algorithm)
    bal = balancers.start(cfg)
    doc = run_load(bal)
    total = LOAD_CLIENTS * LOAD_PER_CLIENT
    assert doc["requests"] == total
    assert doc["ok"] == total, doc["errors"]
    counts = backend_requests(bal.status())
    assert sum(counts.values()) == total
    slow = counts.pop(address(slow_and_fast[1]))
    fast_mean = sum(counts.values()) / len(counts)
    assert 0 < slow < fast_mean / 2, (algorithm, slow, counts)


def test_round_robin_gives_the_slow_backend_its_full_share(
    tmp_path: Path, slow_and_fast: list[ServiceProc], balancers: Balancers
) -> None:
    """The contrast to the load-aware policies: a blind rotation does not see the delay."""
    cfg = write_config(tmp_path / "b.toml", [s.port for s in slow_and_fast])
    bal = balancers.start(cfg)
    doc = run_load(bal)
    total = LOAD_CLIENTS * LOAD_PER_CLIENT
    assert doc["ok"] == total, doc["errors"]
    counts = backend_requests(bal.status())
    assert sorted(counts.values()) == [total // 4] * 4


def test_weighted_round_robin_splits_lockstep_requests_exactly_three_to_one(
    tmp_path: Path, slow_and_fast: list[ServiceProc], balancers: Balancers
) -> None:
    heavy, light = slow_and_fast[0], slow_and_fast[2]
    cfg = write_config(
        tmp_path / "b.toml", [(heavy.port, 3), (light.port, 1)], algorithm="weighted_round_robin"
    )
    bal = balancers.start(cfg)
    c = LineClient(bal.port)
    for i in range(400):
        assert c.request(str(i)) == reply_for(i)
    c.close()
    assert backend_requests(bal.status()) == {address(heavy): 300, address(light): 100}


@pytest.mark.parametrize(
    "algorithm", ["round_robin", "weighted_round_robin", "least_connections", "power_of_two"]
)
def test_weight_zero_in_the_config_drains_a_backend(
    tmp_path: Path,
    slow_and_fast: list[ServiceProc],
    balancers: Balancers,
    algorithm: str,
) -> None:
    fast = [slow_and_fast[0], slow_and_fast[2], slow_and_fast[3]]
    drained = fast[1]
    cfg = write_config(
        tmp_path / "b.toml",
        [fast[0].port, (drained.port, 0), fast[2].port],
        algorithm=algorithm,
    )
    bal = balancers.start(cfg)
    status = backend_rows(bal.status())
    assert status[address(drained)]["state"] == "up"
    assert status[address(drained)]["weight"] == 0
    clients = [LineClient(bal.port) for _ in range(4)]
    for c in clients:
        c.send(*(str(i) for i in range(50)))
    for c in clients:
        assert [c.read_line() for _ in range(50)] == [reply_for(i) for i in range(50)]
        c.close()
    counts = backend_requests(bal.status())
    assert counts[address(drained)] == 0
    assert counts[address(fast[0])] > 0
    assert counts[address(fast[2])] > 0
    assert sum(counts.values()) == 200


def put_backend(bal: BalancerProc, backend: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{bal.admin_port}/api/services/numbers/backends/{backend}",
        data=json.dumps(body).encode(),
        method="PUT",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        doc: dict[str, Any] = json.loads(resp.read())
        return doc


def test_weight_changed_through_the_admin_api_applies_to_the_next_request(
    tmp_path: Path, slow_and_fast: list[ServiceProc], balancers: Balancers
) -> None:
    a, b = slow_and_fast[0], slow_and_fast[2]
    cfg = write_config(tmp_path / "b.toml", [a.port, b.port], algorithm="weighted_round_robin")
    bal = balancers.start(cfg)
    c = LineClient(bal.port)

    def lockstep(n: int) -> dict[str, int]:
        before = backend_requests(bal.status())
        for i in range(n):
            assert c.request(str(i)) == reply_for(i)
        after = backend_requests(bal.status())
        return {k: after[k] - before[k] for k in after}

    assert lockstep(200) == {address(a): 100, address(b): 100}
    assert put_backend(bal, address(b), {"weight": 3})["weight"] == 3
    assert lockstep(200) == {address(a): 50, address(b): 150}
    assert put_backend(bal, address(b), {"weight": 0})["weight"] == 0
    assert lockstep(100) == {address(a): 100, address(b): 0}
    c.close()


# -- consistent hashing on the request line ------------------------------------------------

ACCESS_RE = re.compile(r" (\S+):(\d+) -> (\S+) '([^']*)' \S+ ok$")
HASH_LINES = [str(1000 + 7919 * i) for i in range(50)]


def send_from_new_connections(port: int, lines: Sequence[str], rounds: int) -> set[int]:
    """Each round sends every line once, from its own connection; returns the client ports."""
    client_ports = set()
    for r in range(rounds):
        c = LineClient(port)
        client_ports.add(c.sock.getsockname()[1])
        ordered = list(lines) if r % 2 == 0 else list(reversed(lines))
        c.send(*ordered)
        assert [c.read_line() for _ in ordered] == [reply_for(line) for line in ordered]
        c.close()
    return client_ports


def backends_by_line(
    log: list[tuple[int, str, str]], client_ports: set[int]
) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = {}
    for port, backend, line in log:
        if port in client_ports:
            seen.setdefault(line, set()).add(backend)
    return seen


def test_consistent_hash_on_the_message_pins_each_line_and_moves_only_a_lost_backends_lines(
    tmp_path: Path, services: Services
) -> None:
    four_services = services.start_many(4)
    cfg = write_config(
        tmp_path / "b.toml",
        services.ports,
        algorithm="consistent_hash",
        hash_key="message",
    )
    log_path = tmp_path / "access.log"
    bal = start_balancer(cfg, "--access-log", stdout_to=log_path)
    try:
        before_ports = send_from_new_connections(bal.port, HASH_LINES, rounds=3)
        victim = four_services[2]
        victim.stop(signal.SIGKILL)
        wait_until(
            lambda: backend_rows(bal.status())[address(victim)]["state"] == "down",
            what="the killed backend to be marked down",
        )
        after_ports = send_from_new_connections(bal.port, HASH_LINES, rounds=3)
    finally:
        assert bal.stop() == 0
    log = []
    for text in log_path.read_text(encoding="utf-8").splitlines():
        m = ACCESS_RE.search(text)
        assert m, text
        log.append((int(m.group(2)), m.group(3), m.group(4)))
    assert len(log) == 2 * 3 * len(HASH_LINES)

    before = backends_by_line(log, before_ports)
    after = backends_by_line(log, after_ports)
    assert set(before) == set(after) == set(HASH_LINES)
    # Each line went to one backend only, whichever connection sent it.
    assert all(len(b) == 1 for b in before.values()), before
    assert all(len(b) == 1 for b in after.values()), after
    first = {line: next(iter(b)) for line, b in before.items()}
    second = {line: next(iter(b)) for line, b in after.items()}
    assert set(first.values()) == {address(s) for s in four_services}

    # Lines of the lost backend moved; others stayed, except the few table slots
    # Maglev itself hands over when a member leaves (computed from the same addresses).
    addresses = sorted(address(s) for s in four_services)
    survivors = [a for a in addresses if a != address(victim)]
    old_table = build_table(addresses, [1.0] * 4, DEFAULT_TABLE_SIZE)
    new_table = build_table(survivors, [1.0] * 3, DEFAULT_TABLE_SIZE)
    lost = [line for line in HASH_LINES if first[line] == address(victim)]
    assert lost
    for line in HASH_LINES:
        slot = crc32(line.encode()) % DEFAULT_TABLE_SIZE
        assert first[line] == addresses[old_table[slot]]
        assert second[line] == survivors[new_table[slot]]
        if first[line] == address(victim):
            assert second[line] != address(victim)


# -- runtime weight change, in process -------------------------------------------------------


async def test_set_backend_weight_takes_effect_on_the_next_pick() -> None:
    loop = asyncio.get_running_loop()
    backends = [await loop.create_server(protocol_factory(), "127.0.0.1", 0) for _ in range(2)]
    ports = [int(s.sockets[0].getsockname()[1]) for s in backends]
    service = ServiceConfig(
        name="numbers",
        listen_host="127.0.0.1",
        listen_port=0,
        backends=tuple(BackendConfig("127.0.0.1", p) for p in ports),
        algorithm="weighted_round_robin",
        health=HealthConfig(enabled=False),
    )
    server = Server(Config(services=(service,), admin=AdminConfig(enabled=False)))
    await server.start()
    try:
        host, port = server.services["numbers"].bound
        pool = server.services["numbers"].pool
        a, b = pool.backends
        reader, writer = await asyncio.open_connection(host, port)

        async def lockstep(n: int) -> tuple[int, int]:
            start = (a.requests, b.requests)
            for i in range(n):
                writer.write(f"{i}\n".encode())
                assert (await reader.readline()).decode().rstrip("\n") == reply_for(i)
            return a.requests - start[0], b.requests - start[1]

        assert await lockstep(100) == (50, 50)
        server.set_backend("numbers", a.address, weight=4)
        assert await lockstep(100) == (80, 20)
        server.set_backend("numbers", a.address, weight=0)
        assert await lockstep(20) == (0, 20)
        server.set_backend("numbers", a.address, weight=1)
        server.set_backend("numbers", b.address, state="drain")
        assert await lockstep(20) == (20, 0)
        writer.close()
        await writer.wait_closed()
    finally:
        await server.shutdown()
        for s in backends:
            s.close()
            await s.wait_closed()
