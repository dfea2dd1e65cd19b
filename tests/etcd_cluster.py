"""A real etcd cluster on loopback for tests: `size` members of Debian's etcd (3.4), each on
its own client and peer port on 127.0.0.1, with its own data dir and log file under a
temporary directory.

`EtcdCluster(tmp_path)` returns once every member answers `GET /health` with
`{"health": "true"}` (a leader is elected). Members can be killed (SIGKILL) and started
again on the same data dir and ports (`--initial-cluster-state existing`); `close()` kills
every member. The sync helpers (`put`, `get_prefix`, `delete`, `grant`, `revoke`, ...) talk
to the v3 JSON gateway with urllib, through the first running member that answers (or the
one named by `member=`); keys and values are base64 in that API.

The `etcd_cluster` fixture (module scope) yields a started 3-member cluster, closed at the
end of the module; a test module imports it: `from tests.etcd_cluster import etcd_cluster`.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests.peers import HOST, need
from tests.support import free_ports

READY_TIMEOUT = 20.0
"""Seconds the members may take to answer healthy after a start."""
REQUEST_TIMEOUT = 3.0
"""Seconds one gateway request may take."""
BIND_ATTEMPTS = 3
"""Times a new cluster is started on fresh ports when a port was taken meanwhile."""


class EtcdError(Exception):
    """A member failed to start, or no member answered a request."""


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def prefix_end(prefix: str) -> str:
    """The range end covering every key starting with `prefix` (its last byte plus one)."""
    raw = prefix.encode()
    return base64.b64encode(raw[:-1] + bytes([raw[-1] + 1])).decode()


class Member:
    """One etcd process: its name, ports, data dir, log file and (when running) process."""

    def __init__(
        self,
        root: Path,
        index: int,
        client_port: int,
        peer_port: int,
        host: str = HOST,
        netns: str | None = None,
    ) -> None:
        self.index = index
        self.host = host
        """The address it listens on (for clients and peers)."""
        self.netns = netns
        """The network namespace it runs in (None: the test's own)."""
        self.name = f"m{index}"
        self.client_port = client_port
        self.peer_port = peer_port
        self.data_dir = root / f"{self.name}.data"
        self.log_path = root / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self, binary: str, initial_cluster: str, token: str, state: str) -> None:
        self._log = open(self.log_path, "ab")
        inside = ["ip", "netns", "exec", self.netns] if self.netns else []
        self.proc = subprocess.Popen(
            [
                *inside,
                binary,
                "--name", self.name,
                "--data-dir", str(self.data_dir),
                "--listen-client-urls", self.endpoint,
                "--advertise-client-urls", self.endpoint,
                "--listen-peer-urls", self.peer_url,
                "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", initial_cluster,
                "--initial-cluster-state", state,
                "--initial-cluster-token", token,
                "--heartbeat-interval", "50",
                "--election-timeout", "500",
                "--logger", "zap",
                "--log-outputs", "stderr",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def serving_peers(self) -> bool:
        """True once the member answers on its peer port (it has started raft)."""
        try:
            with urllib.request.urlopen(f"{self.peer_url}/members", timeout=0.5):
                return True
        except (OSError, ValueError):
            return False

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1.0) as resp:
                doc = json.loads(resp.read())
        except (OSError, ValueError):
            return False
        return isinstance(doc, dict) and doc.get("health") == "true"

    def log_tail(self, count: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "  (no log)"
        return "\n".join(f"  {line}" for line in lines[-count:])

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<etcd {self.name} client {self.client_port} peer {self.peer_port} {state}>"


class EtcdCluster:
    """`size` etcd members on loopback, started (all healthy) when constructed."""

    def __init__(
        self,
        tmp_path: Path,
        size: int = 3,
        hosts: list[str] | None = None,
        netns: list[str | None] | None = None,
    ) -> None:
        """`hosts[i]`: member i's address (default 127.0.0.1); `netns[i]`: the network
        namespace it runs in (default none: the test's own)."""
        self.binary = need("etcd")
        self.root = tmp_path
        self.size = size
        self.hosts = hosts or [HOST] * size
        self.netns = netns or [None] * size
        self.token = ""
        self.members: list[Member] = []
        try:
            self._form()
        except BaseException:
            self.close()
            raise

    # -- processes -------------------------------------------------------------------------

    def _form(self) -> None:
        """A new cluster on fresh ports; started again on other ports if one was taken."""
        for attempt in range(1, BIND_ATTEMPTS + 1):
            ports = free_ports(2 * self.size)
            self.token = f"balancer-test-{uuid.uuid4().hex[:12]}"
            self.members = [
                Member(
                    self.root / f"try{attempt}",
                    i,
                    ports[2 * i],
                    ports[2 * i + 1],
                    self.hosts[i],
                    self.netns[i],
                )
                for i in range(self.size)
            ]
            (self.root / f"try{attempt}").mkdir(parents=True, exist_ok=True)
            try:
                for member in self.members:
                    self._spawn(member, "new")
                    self._wait_serving_peers(member)
                self._wait_healthy(self.members)
                return
            except EtcdError:
                if attempt == BIND_ATTEMPTS or not self._port_taken():
                    raise
                self.close()

    def _port_taken(self) -> bool:
        return any(
            "address already in use" in m.log_tail(50) for m in self.members if not m.running
        )

    @property
    def _initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def _spawn(self, member: Member, state: str) -> None:
        member.spawn(self.binary, self._initial_cluster, self.token, state)

    def _wait_serving_peers(self, member: Member) -> None:
        """Wait until `member` serves its peers. A new member asks the others whether it is
        already part of a cluster and waits a second on each that listens but does not
        answer yet; started one after the other, each finds the earlier ones answering."""
        deadline = time.monotonic() + READY_TIMEOUT
        while not member.serving_peers():
            if not member.running:
                raise EtcdError(f"etcd {member.name} exited:\n{member.log_tail()}")
            if time.monotonic() > deadline:
                raise EtcdError(f"etcd {member.name} did not serve its peers:\n{member.log_tail()}")
            time.sleep(0.02)

    def _wait_healthy(self, members: list[Member]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        waiting = list(members)
        while waiting:
            for member in waiting:
                if not member.running:
                    raise EtcdError(f"etcd {member.name} exited:\n{member.log_tail()}")
            waiting = [m for m in waiting if not m.healthy()]
            if not waiting:
                return
            if time.monotonic() > deadline:
                names = ", ".join(m.name for m in waiting)
                raise EtcdError(
                    f"etcd {names} not healthy within {READY_TIMEOUT:g}s:\n{waiting[0].log_tail()}"
                )
            time.sleep(0.05)

    @property
    def endpoints(self) -> list[str]:
        """Every member's client URL (`http://127.0.0.1:P`), running or not."""
        return [m.endpoint for m in self.members]

    @property
    def addresses(self) -> list[str]:
        """Every member's client address as `127.0.0.1:P` (for an `etcd://` URL)."""
        return [f"{m.host}:{m.client_port}" for m in self.members]

    def url(self, path: str) -> str:
        """An `etcd://` URL naming every member, then `path` (`/balancer/web`)."""
        return f"etcd://{','.join(self.addresses)}{path}"

    def kill(self, i: int) -> None:
        """SIGKILL member `i` and wait for it to exit; then, while the others hold a quorum,
        until they answer healthy (a leader killed, a write right after would wait for
        etcd's request timeout: the proposal went to the dead leader)."""
        self.members[i].kill()
        rest = [m for m in self.members if m.running]
        if len(rest) > len(self.members) // 2:
            self._wait_healthy(rest)

    def stop_all(self) -> None:
        for member in self.members:
            member.kill()

    def start(self, i: int) -> None:
        """Start member `i` again on its data dir; return once it answers healthy."""
        member = self.members[i]
        if not member.running:
            self._spawn(member, "existing")
        self._wait_healthy([member])

    def start_all(self) -> None:
        """Start every stopped member on its data dir; return once all answer healthy
        (they are spawned together: a member alone has no quorum)."""
        for member in self.members:
            if not member.running:
                self._spawn(member, "existing")
        self._wait_healthy(self.members)

    def close(self) -> None:
        """Kill every member (idempotent)."""
        for member in self.members:
            try:
                member.kill()
            except (OSError, subprocess.TimeoutExpired):
                pass

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        up = sum(m.running for m in self.members)
        return f"<EtcdCluster {up}/{len(self.members)} running: {self.members}>"

    # -- the v3 JSON gateway ---------------------------------------------------------------

    def call(self, path: str, body: dict[str, Any], member: int | None = None) -> dict[str, Any]:
        """POST `body` to `path` (`/v3/kv/put`) on member `member`, or on the first running
        member that answers; the decoded reply."""
        order = [self.members[member]] if member is not None else self.members
        errors: list[str] = []
        for m in order:
            if not m.running:
                errors.append(f"{m.name}: not running")
                continue
            request = urllib.request.Request(
                m.endpoint + path,
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            try:
                with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as resp:
                    doc: dict[str, Any] = json.loads(resp.read())
                    return doc
            except urllib.error.HTTPError as exc:
                errors.append(f"{m.name}: HTTP {exc.code} {exc.read()[:200]!r}")
            except (OSError, ValueError) as exc:
                errors.append(f"{m.name}: {exc}")
        raise EtcdError(f"{path} failed: {'; '.join(errors)}")

    def leader(self) -> int:
        """The index of the member that leads (as the first running member sees it)."""
        status = self.call("/v3/maintenance/status", {})
        ids = {
            int(self.call("/v3/maintenance/status", {}, i)["header"]["member_id"]): i
            for i, m in enumerate(self.members)
            if m.running
        }
        return ids[int(status["leader"])]

    def put(self, key: str, value: str, lease: int = 0, member: int | None = None) -> None:
        body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = str(lease)
        self.call("/v3/kv/put", body, member)

    def kvs(self, prefix: str, member: int | None = None) -> list[dict[str, Any]]:
        """The raw key-value records under `prefix` (key and value decoded, `lease` an int)."""
        doc = self.call(
            "/v3/kv/range", {"key": b64(prefix), "range_end": prefix_end(prefix)}, member
        )
        return [
            {
                **kv,
                "key": unb64(kv["key"]),
                "value": unb64(kv.get("value", "")),
                "lease": int(kv.get("lease", 0)),
            }
            for kv in doc.get("kvs", [])
        ]

    def get_prefix(self, prefix: str, member: int | None = None) -> dict[str, str]:
        """Every key under `prefix` with its value."""
        return {kv["key"]: kv["value"] for kv in self.kvs(prefix, member)}

    def lease_of(self, key: str) -> int:
        """The lease `key` was put with (0: none); KeyError if the key is absent."""
        for kv in self.kvs(key):
            if kv["key"] == key:
                return int(kv["lease"])
        raise KeyError(key)

    def delete(self, key: str, member: int | None = None) -> None:
        self.call("/v3/kv/deleterange", {"key": b64(key)}, member)

    def grant(self, ttl: int, member: int | None = None) -> int:
        """A new lease of `ttl` seconds; its id."""
        return int(self.call("/v3/lease/grant", {"TTL": str(ttl)}, member)["ID"])

    def revoke(self, lease: int, member: int | None = None) -> None:
        self.call("/v3/lease/revoke", {"ID": str(lease)}, member)


@pytest.fixture(scope="module")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """A healthy 3-member cluster shared by a test module; killed at its end."""
    with EtcdCluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster
