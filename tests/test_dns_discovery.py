"""DNS discovery: the answer made a backend list (pure), and a balancer following a real
dnsmasq on a loopback port: backends added and removed by the DNS, the last set kept while
the DNS is gone."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.exception
import dns.resolver
import pytest

from balancer.config.discovery import DiscoverTarget, parse_discover, parse_nameserver
from balancer.config.model import MAX_WEIGHT, BackendConfig
from balancer.runtime.discovery import Record, answer_backends, resolve_target
from tests.support import (
    Balancers,
    Services,
    backend_requests,
    backend_rows,
    free_port,
    load_without_errors,
    wait_until,
)
from tests.test_admin_openapi import problems, response_schema

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
SRV = "_svc._tcp.test"
NAME = "web.test"


# -- the pure part ---------------------------------------------------------------------------


def test_records_become_backends_each_once_weights_clamped() -> None:
    records = [
        Record("b.test.", 2, 5),
        Record("A.test", 1, 0),
        Record("a.test.", 1, 3),
        Record("c.test", 3, 70000),
    ]
    assert answer_backends(records) == (
        BackendConfig("a.test", 1, 3),
        BackendConfig("b.test", 2, 5),
        BackendConfig("c.test", 3, MAX_WEIGHT),
    )
    assert answer_backends([]) == ()


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("a:web.test:8080", DiscoverTarget("a", "web.test", 8080)),
        ("srv:_svc._tcp.test", DiscoverTarget("srv", "_svc._tcp.test")),
        ("a:web.test:0", None),
        ("a:web.test", None),
        ("mx:web.test", None),
        ("srv:", None),
    ],
)
def test_discover_targets(text: str, target: DiscoverTarget | None) -> None:
    assert parse_discover(text) == target


def test_nameservers() -> None:
    assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_nameserver("::1") == ("::1", 53)
    assert parse_nameserver("[::1]:5300") == ("::1", 5300)
    assert parse_nameserver("dns.example") is None
    assert parse_nameserver("127.0.0.1:0") is None


class FamilyResolver:
    """A resolver whose A answer is `a` and whose AAAA query raises `aaaa`."""

    def __init__(self, a: list[str], aaaa: Exception) -> None:
        self.a, self.aaaa = a, aaaa

    async def resolve(self, qname: str, rdtype: str) -> Any:
        if rdtype == "AAAA":
            raise self.aaaa
        if not self.a:
            raise dns.resolver.NoAnswer()  # type: ignore[no-untyped-call]
        return [type("R", (), {"address": a})() for a in self.a]


async def test_one_address_family_failing_is_no_failure_while_the_other_answers() -> None:
    target = DiscoverTarget("a", "web.test", 80)
    refused = dns.resolver.NoNameservers()  # type: ignore[no-untyped-call]
    found = await resolve_target(FamilyResolver(["10.0.0.1"], refused), target)
    assert found == [Record("10.0.0.1", 80)]
    with pytest.raises(dns.exception.DNSException):
        await resolve_target(FamilyResolver([], refused), target)


# -- a real DNS server -----------------------------------------------------------------------


class Dnsmasq:
    """dnsmasq on 127.0.0.1:PORT serving the SRV records of `SRV` (restarted to change them)."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.hosts = tmp_path / "hosts"
        self.hosts.write_text("")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, backends: dict[int, int], addresses: tuple[str, ...] = ()) -> None:
        """Serve one SRV record per backend port, with its weight, and an A record of
        `NAME` per address; wait until it answers."""
        self.stop()
        self.hosts.write_text("".join(f"{a} {NAME}\n" for a in addresses))
        srv = [f"--srv-host={SRV},127.0.0.1,{port},0,{w}" for port, w in backends.items()]
        self.proc = subprocess.Popen(
            [
                DNSMASQ,
                "--no-daemon",
                f"--port={self.port}",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                f"--addn-hosts={self.hosts}",
                *srv,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = self.port
        resolver.lifetime = 0.5

        def answers() -> bool:
            assert self.proc is not None
            assert self.proc.poll() is None, "dnsmasq exited"
            try:
                got = {int(r.port) for r in resolver.resolve(SRV, "SRV")}
            except dns.exception.DNSException:
                return False
            if addresses:
                try:
                    found = {r.address for r in resolver.resolve(NAME, "A")}
                except dns.exception.DNSException:
                    return False
                return found == set(addresses) and got == set(backends)
            return got == set(backends)

        wait_until(answers, timeout=10, what="dnsmasq to answer")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[Dnsmasq]:
    if not Path(DNSMASQ).exists():
        pytest.skip("dnsmasq is not installed (scripts/env.sh ensure_peers installs it)")
    server = Dnsmasq(tmp_path)
    yield server
    server.stop()


def config(tmp_path: Path, dns_port: int) -> Path:
    path = tmp_path / "dns.toml"
    path.write_text(
        "drain_timeout = 5\n"
        "[discovery]\n"
        'kind = "dns"\n'
        "interval = 0.5\n"
        "timeout = 0.3\n"
        f'nameservers = ["127.0.0.1:{dns_port}"]\n'
        "[services.numbers]\n"
        'listen = "127.0.0.1:0"\n'
        'algorithm = "weighted_round_robin"\n'
        f'discover = "srv:{SRV}"\n'
        "backends = []\n"
        "[services.numbers.health]\n"
        "interval = 0.2\ntimeout = 1\nrise = 1\nfall = 1\n"
    )
    return path


def up_ports(status: dict[str, Any]) -> set[int]:
    return {
        int(address.rsplit(":", 1)[1])
        for address, row in backend_rows(status).items()
        if row["state"] == "up"
    }


def test_backends_follow_the_dns_and_survive_its_absence(
    tmp_path: Path, dnsmasq: Dnsmasq, services: Services, balancers: Balancers
) -> None:
    a, b, c = services.start_many(3)
    dnsmasq.start({a.port: 10, b.port: 20})
    bal = balancers.start(config(tmp_path, dnsmasq.port))
    wait_until(lambda: up_ports(bal.status()) == {a.port, b.port}, what="a and b up")
    state = bal.status()["services"]["numbers"]["discovery"]
    assert state["ok"]
    assert state["target"] == f"srv:{SRV}"
    assert {r["weight"] for r in state["records"]} == {10, 20}
    assert problems(bal.status(), response_schema("/status", "get", 200)) == []

    with load_without_errors(bal.port, 25):
        # c joins: it gets traffic once checked
        dnsmasq.start({a.port: 10, b.port: 20, c.port: 10})

        def c_serves() -> bool:
            return backend_requests(bal.status()).get(f"127.0.0.1:{c.port}", 0) > 20

        wait_until(c_serves, what="c to get traffic")
        # a leaves: drained, then gone, no request failed
        dnsmasq.start({b.port: 20, c.port: 10})
        wait_until(
            lambda: set(backend_rows(bal.status())) == {f"127.0.0.1:{p}" for p in (b.port, c.port)},
            what="a removed",
        )
        # the DNS gone: the set is kept, traffic goes on
        dnsmasq.stop()

        def failing() -> bool:
            doc = bal.status()["services"]["numbers"]["discovery"]
            return not doc["ok"] and doc["failures"] >= 2

        wait_until(failing, what="discovery to fail")
        before = sum(backend_requests(bal.status()).values())
        assert up_ports(bal.status()) == {b.port, c.port}
        wait_until(
            lambda: sum(backend_requests(bal.status()).values()) > before + 50,
            what="traffic while the DNS is down",
        )
        assert bal.status()["services"]["numbers"]["discovery"]["last_error"]
        # it comes back with a: it catches up
        dnsmasq.start({a.port: 10, b.port: 20, c.port: 10})
        wait_until(lambda: up_ports(bal.status()) == {a.port, b.port, c.port}, what="a back")
        assert bal.status()["services"]["numbers"]["discovery"]["ok"]


def test_a_records_each_address_a_backend_on_the_port(
    tmp_path: Path, dnsmasq: Dnsmasq, services: Services, balancers: Balancers
) -> None:
    port = free_port()
    one = services.start("--host", "127.0.0.2", port=port)
    services.start("--host", "127.0.0.3", port=port)
    dnsmasq.start({one.port: 1}, addresses=("127.0.0.2", "127.0.0.3"))
    path = config(tmp_path, dnsmasq.port)
    path.write_text(
        path.read_text().replace(f'discover = "srv:{SRV}"', f'discover = "a:{NAME}:{port}"')
    )
    bal = balancers.start(path)
    both = {f"127.0.0.2:{port}", f"127.0.0.3:{port}"}

    def up() -> set[str]:
        return {a for a, row in backend_rows(bal.status()).items() if row["state"] == "up"}

    wait_until(lambda: up() == both, what="both addresses up")
    assert all(
        r["weight"] == 1 for r in bal.status()["services"]["numbers"]["discovery"]["records"]
    )
    dnsmasq.start({one.port: 1}, addresses=("127.0.0.3",))
    wait_until(lambda: set(backend_rows(bal.status())) == {f"127.0.0.3:{port}"}, what="one left")
