"""`balancer service --register etcd://.../PREFIX/SERVICE`: the URL and the key (pure), the
options' errors, and a real service registering in a real 3-member etcd cluster: the key
with its weight under a lease, kept alive, gone at once on SIGTERM and after the TTL on
SIGKILL, kept when a member dies, put again when the lease is lost or etcd comes back."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import time

import pytest

from balancer.tools import service
from balancer.tools.registrar import Registrar, backend_key, parse_register_url
from tests.etcd_cluster import EtcdCluster, etcd_cluster
from tests.support import ServiceProc, Services, free_port, reply_for, wait_until

__all__ = ["etcd_cluster"]  # the fixture, imported for the tests below

TTL = 2


# -- the URL and the key ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        (
            "etcd://127.0.0.1:2379/balancer/web",
            (("http://127.0.0.1:2379",), "/balancer", "web"),
        ),
        (
            "etcd://a:1,b.example:2,[::1]:3/x/y/z/numbers",
            (("http://a:1", "http://b.example:2", "http://[::1]:3"), "/x/y/z", "numbers"),
        ),
        ("ETCD://etcd/b/s_1.v-2", (("http://etcd:2379",), "/b", "s_1.v-2")),
        ("etcd://[::1]/balancer/web", (("http://[::1]:2379",), "/balancer", "web")),
    ],
)
def test_register_urls(url: str, parsed: tuple[tuple[str, ...], str, str]) -> None:
    assert parse_register_url(url) == parsed


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://127.0.0.1:2379/balancer/web", "the scheme is 'http'"),
        ("127.0.0.1:2379/balancer/web", "no etcd:// scheme"),
        ("etcd:///balancer/web", "no etcd member"),
        ("etcd://127.0.0.1:2379", "no /PREFIX/SERVICE path"),
        ("etcd://127.0.0.1:2379/", "no /PREFIX/SERVICE path"),
        ("etcd://127.0.0.1:2379/web", "no service"),
        ("etcd://127.0.0.1:2379/balancer/web/", "empty path segment"),
        ("etcd://127.0.0.1:2379//web", "empty path segment"),
        ("etcd://127.0.0.1:2379/balancer/w b", "may hold letters"),
        ("etcd://127.0.0.1:0/balancer/web", "port must be 1..65535"),
        ("etcd://127.0.0.1:65536/balancer/web", "port must be 1..65535"),
        ("etcd://127.0.0.1:x/balancer/web", "port must be 1..65535"),
        ("etcd://127.0.0.1:/balancer/web", "port must be 1..65535"),
        ("etcd://:2379/balancer/web", "host is empty"),
        ("etcd://a:1,,b:2/balancer/web", "empty etcd member"),
        ("etcd://::1:2379/balancer/web", "needs brackets"),
        ("etcd://[::1/balancer/web", "expected [IPv6]:PORT"),
        ("etcd://[nope]:1/balancer/web", "IPv6 address"),
        ("etcd://300.1.1.1:1/balancer/web", "IPv4"),
    ],
)
def test_bad_register_urls_say_what_is_wrong(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_register_url(url)


def test_backend_keys() -> None:
    assert backend_key("/balancer", "web", "127.0.0.1", 9090) == (
        "/balancer/web/backends/127.0.0.1:9090"
    )
    assert backend_key("/a/b/", "web", "::1", 80) == "/a/b/web/backends/[::1]:80"
    assert backend_key("/a", "web", "[::1]", 80) == "/a/web/backends/[::1]:80"
    assert backend_key("/a", "web", "web-1.internal", 80) == "/a/web/backends/web-1.internal:80"


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--register-ttl", "0"], "--register-ttl must be 1..60"),
        (["--register-ttl", "61"], "--register-ttl must be 1..60"),
        (["--weight", "0"], "--weight must be 1..1000"),
        (["--weight", "1001"], "--weight must be 1..1000"),
        (["--register", "etcd://h:1/web"], "--register: 'etcd://h:1/web': no service"),
        (["--register", "etcd://h:1/b/web", "--host", "0.0.0.0"], "--host 0.0.0.0 is no address"),
        (["--register", "etcd://h:1/b/web", "--advertise", "::"], "--advertise :: is no address"),
        (["--register", "etcd://h:1/b/web", "--advertise", "[::]"], "--advertise :: is no"),
        (["--register", "etcd://h:1/b/web", "--advertise", "a b"], "--advertise a b: the host"),
        (["--register", "etcd://h:1/b/web", "--advertise", "1.2.3"], "--advertise 1.2.3: "),
    ],
)
def test_bad_options_exit_2_with_the_reason(
    args: list[str], problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert service.main(["-p", "0", *args]) == 2
    assert problem in capsys.readouterr().err


async def test_unreachable_etcd_is_retried_with_one_warning_and_stops_cleanly() -> None:
    logged: list[str] = []
    nowhere = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    registrar = Registrar(nowhere, "/b/web/backends/127.0.0.1:1", "{}", 3, log=logged.append)
    await registrar.start()
    try:
        for _ in range(1000):  # 20 s at most
            if registrar.failures >= 3:
                break
            await asyncio.sleep(0.02)
    finally:
        await registrar.stop()
    assert registrar.failures >= 3
    assert len(logged) == 1, logged
    assert "no member answered" in logged[0]
    assert nowhere[0] in logged[0]
    assert nowhere[1] in logged[0]
    assert not registrar.registered
    assert "not registered" in repr(registrar)


# -- a real service, a real etcd cluster ---------------------------------------------------


def registered(cluster: EtcdCluster, key: str) -> bool:
    return key in cluster.get_prefix(key)


def start(
    services: Services, cluster: EtcdCluster, name: str, *extra: str
) -> tuple[ServiceProc, str]:
    """A service registering as `/balancer/NAME`, once its key is in etcd; (it, its key)."""
    proc = services.start("--register", cluster.url(f"/balancer/{name}"), *extra)
    key = backend_key("/balancer", name, "127.0.0.1", proc.port)
    wait_until(lambda: registered(cluster, key), timeout=10, what=f"{key} in etcd")
    return proc, key


def answer(port: int, request: bytes) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(request)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = conn.recv(1024)
            assert chunk, "the service closed the connection"
            reply += chunk
    return reply.decode().rstrip("\n")


def stays_registered(cluster: EtcdCluster, key: str, lease: int, seconds: float) -> None:
    """Check, again and again for `seconds`, that `key` is there with `lease`."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        assert cluster.lease_of(key) == lease
        time.sleep(0.1)


@pytest.mark.peers
@pytest.mark.e2e
def test_registered_with_its_weight_under_a_lease_and_sigterm_revokes_it(
    etcd_cluster: EtcdCluster, services: Services
) -> None:
    proc, key = start(services, etcd_cluster, "term", "--weight", "7")
    assert json.loads(etcd_cluster.get_prefix(key)[key]) == {"weight": 7}
    lease = etcd_cluster.lease_of(key)
    assert lease != 0
    ttl = etcd_cluster.call("/v3/lease/timetolive", {"ID": str(lease)})
    assert int(ttl["grantedTTL"]) == 5
    assert f"registered {key}" in proc.output()
    services.remove(proc)
    assert proc.stop(signal.SIGTERM) == 0
    # revoked before the process ended: gone at once, no waiting for the TTL
    assert etcd_cluster.get_prefix("/balancer/term/") == {}


@pytest.mark.peers
@pytest.mark.e2e
def test_an_advertised_ipv6_host_is_written_in_brackets(
    etcd_cluster: EtcdCluster, services: Services
) -> None:
    proc = services.start("--register", etcd_cluster.url("/balancer/v6"), "--advertise", "::1")
    key = f"/balancer/v6/backends/[::1]:{proc.port}"
    wait_until(lambda: registered(etcd_cluster, key), timeout=10, what=f"{key} in etcd")
    assert etcd_cluster.get_prefix("/balancer/v6/") == {key: '{"weight": 1}'}


@pytest.mark.peers
@pytest.mark.e2e
def test_sigkill_leaves_the_key_until_its_lease_expires(
    etcd_cluster: EtcdCluster, services: Services
) -> None:
    proc, key = start(services, etcd_cluster, "kill", "--register-ttl", str(TTL))
    services.remove(proc)
    proc.stop(signal.SIGKILL)
    wait_until(lambda: not registered(etcd_cluster, key), timeout=TTL + 5, what=f"{key} to expire")


@pytest.mark.peers
@pytest.mark.e2e
def test_the_lease_is_kept_alive_while_the_service_runs(
    etcd_cluster: EtcdCluster, services: Services
) -> None:
    proc, key = start(services, etcd_cluster, "alive", "--register-ttl", str(TTL))
    stays_registered(etcd_cluster, key, etcd_cluster.lease_of(key), 2 * TTL + 0.5)
    assert proc.popen.poll() is None


@pytest.mark.peers
@pytest.mark.e2e
def test_the_first_member_killed_it_stays_registered_through_the_others(
    etcd_cluster: EtcdCluster, services: Services
) -> None:
    _, key = start(services, etcd_cluster, "member", "--register-ttl", str(TTL))
    lease = etcd_cluster.lease_of(key)
    etcd_cluster.kill(0)  # the member it talks to first
    try:
        stays_registered(etcd_cluster, key, lease, 2 * TTL + 0.5)
    finally:
        etcd_cluster.start(0)
    assert etcd_cluster.get_prefix(key, member=0) == {key: '{"weight": 1}'}


@pytest.mark.peers
@pytest.mark.e2e
def test_a_lost_lease_is_replaced_and_the_key_put_again(
    etcd_cluster: EtcdCluster, services: Services
) -> None:
    proc, key = start(services, etcd_cluster, "lost", "--register-ttl", str(TTL))
    lease = etcd_cluster.lease_of(key)
    etcd_cluster.revoke(lease)  # as if etcd had been out of reach longer than the TTL
    wait_until(
        lambda: registered(etcd_cluster, key) and etcd_cluster.lease_of(key) != lease,
        timeout=TTL + 5,
        what=f"{key} under a new lease",
    )
    proc.wait_for("expired; again", timeout=5)


@pytest.mark.peers
@pytest.mark.e2e
def test_etcd_down_the_service_serves_and_registers_once_etcd_is_back(
    etcd_cluster: EtcdCluster, services: Services
) -> None:
    etcd_cluster.stop_all()
    try:
        proc = services.start("--register", etcd_cluster.url("/balancer/late"))
        proc.wait_for("no member answered", timeout=10)
        assert answer(proc.port, b"42\n") == reply_for(42)
    finally:
        etcd_cluster.start_all()
    key = backend_key("/balancer", "late", "127.0.0.1", proc.port)
    wait_until(lambda: registered(etcd_cluster, key), timeout=10, what=f"{key} in etcd")
    proc.wait_for("etcd answers again", timeout=5)
