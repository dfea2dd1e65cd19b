"""Network namespaces for tests: a host of its own, reached from the test's namespace over
a veth pair, that a test can cut off (`ip link set ... down`) and mend.

`Netns(index)` makes namespace `lbt<pid>n<index>` with a veth pair on a /30 of
10.211.0.0/16 that no interface uses yet: `outer` (the test's side) and `inner` (the
namespace's side, its loopback up). Only these addresses, made by the test, are ever
targets. `close()` deletes both (the pair goes with its namespace). Needs root and
iproute2; `netns_or_skip()` says why not where they are missing.
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import subprocess
from collections.abc import Iterator

import pytest

SUBNET = ipaddress.ip_network("10.211.0.0/16")


def _ip(*args: str, netns: str | None = None) -> str:
    inside = ["ip", "netns", "exec", netns] if netns else []
    result = subprocess.run(
        [*inside, "ip", *args], capture_output=True, text=True, timeout=10, check=False
    )
    if result.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def _free_pair() -> tuple[str, str]:
    """Two addresses of a /30 of SUBNET that no interface has."""
    used = _ip("-4", "-o", "addr", "show")
    for _ in range(100):
        block = random.randrange(SUBNET.num_addresses // 4)
        net = ipaddress.ip_network(f"{SUBNET[block * 4]}/30")
        outer, inner = str(net[1]), str(net[2])
        if f" {outer}/" not in used and f" {inner}/" not in used:
            return outer, inner
    raise OSError("no free /30 in 10.211.0.0/16")


class Netns:
    """One namespace with a veth pair to the test's namespace."""

    def __init__(self, index: int) -> None:
        tag = f"{os.getpid() % 100000}n{index}"
        self.name = f"lbt{tag}"
        self.veth = f"lbo{tag}"
        """The test's side of the pair (the one `cut` sets down)."""
        peer = f"lbi{tag}"
        self.outer, self.inner = _free_pair()
        _ip("netns", "add", self.name)
        try:
            _ip("link", "add", self.veth, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", self.name)
            _ip("addr", "add", f"{self.outer}/30", "dev", self.veth)
            _ip("link", "set", self.veth, "up")
            _ip("addr", "add", f"{self.inner}/30", "dev", peer, netns=self.name)
            _ip("link", "set", peer, "up", netns=self.name)
            _ip("link", "set", "lo", "up", netns=self.name)
        except BaseException:
            self.close()
            raise

    @property
    def prefix(self) -> list[str]:
        """The command line prefix that runs a program inside."""
        return ["ip", "netns", "exec", self.name]

    def cut(self) -> None:
        """The link goes down: packets either way are dropped, no connection is reset."""
        _ip("link", "set", self.veth, "down")

    def mend(self) -> None:
        _ip("link", "set", self.veth, "up")

    def close(self) -> None:
        for args in (("link", "del", self.veth), ("netns", "del", self.name)):
            try:
                _ip(*args)
            except OSError:
                pass


def netns_or_skip() -> None:
    """Skip (a failure under BALANCER_STRICT) where namespaces cannot be made."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed (scripts/env.sh ensure_peers installs it)")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")


@pytest.fixture
def namespaces() -> Iterator[list[Netns]]:
    """Namespaces the test makes with `namespaces.append(Netns(i))`; deleted at teardown."""
    netns_or_skip()
    made: list[Netns] = []
    yield made
    for ns in made:
        ns.close()
