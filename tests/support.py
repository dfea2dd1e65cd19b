"""Real processes on loopback for end-to-end tests: start, wait for readiness, stop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import pytest

from balancer.config.errors import ConfigError
from balancer.config.load import load_config
from balancer.config.model import DEFAULT_LISTEN
from balancer.tools.procs import ChildProcess, ready_balancer_ports, ready_service_port

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def free_ports(count: int) -> list[int]:
    """`count` different loopback ports nothing listens on (each held until all are picked)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class ServiceProc(ChildProcess):
    port: int


def start_service(*extra: str, port: int = 0, cwd: Path | str | None = None) -> ServiceProc:
    proc = ServiceProc([PYTHON, "-m", "balancer.tools.service", "-p", str(port), *extra], cwd=cwd)
    try:
        proc.port = ready_service_port(proc)
    except BaseException:
        proc.stop()
        raise
    return proc


class BalancerProc(ChildProcess):
    ports: dict[str, int]
    admin_port: int | None

    def status(self) -> dict[str, Any]:
        assert self.admin_port is not None
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.admin_port}/status", timeout=5
        ) as resp:
            doc: dict[str, Any] = json.loads(resp.read())
            return doc

    def metrics(self) -> str:
        assert self.admin_port is not None
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.admin_port}/metrics", timeout=5
        ) as resp:
            text: str = resp.read().decode()
            return text

    @property
    def port(self) -> int:
        return next(iter(self.ports.values()))


def start_balancer(
    config: Path | str,
    *extra: str,
    admin: bool | str | None = True,
    cwd: Path | str | None = None,
    stdout_to: Path | None = None,
    env: dict[str, str] | None = None,
) -> BalancerProc:
    """Start `balancer serve CONFIG`; admin True: on a free port, False: off, str: that
    address, None: as the file says (no --admin flag)."""
    args = [PYTHON, "-m", "balancer", "serve", str(config), *extra]
    if isinstance(admin, str):
        args += ["--admin", admin]
    elif admin:
        args += ["--admin", "127.0.0.1:0"]
    elif admin is not None:
        args += ["--admin", "off"]
    return ready_balancer(args, cwd=cwd, stdout_to=stdout_to, env=env)


def ready_balancer(
    args: Sequence[str],
    *,
    cwd: Path | str | None = None,
    stdout_to: Path | None = None,
    env: dict[str, str] | None = None,
) -> BalancerProc:
    """A balancer started with `args`, once it said "balancer ready"; its ports read from
    what it printed (services by name, and the admin endpoint's if any)."""
    proc = BalancerProc(args, cwd=cwd, stdout_to=stdout_to, env=env)
    try:
        proc.ports, proc.admin_port = ready_balancer_ports(proc)
    except BaseException:
        proc.stop()
        raise
    return proc


class Services(list[ServiceProc]):
    """Sample services started for one test; the `services` fixture stops them."""

    def start(self, *extra: str, port: int = 0) -> ServiceProc:
        proc = start_service(*extra, port=port)
        self.append(proc)
        return proc

    def start_many(self, count: int, *extra: str) -> list[ServiceProc]:
        return [self.start(*extra) for _ in range(count)]

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self]

    def stop_all(self) -> None:
        while self:
            self.pop(0).stop()


class Balancers(list[BalancerProc]):
    """Balancers started for one test; the `balancers` fixture stops them."""

    def start(
        self,
        config: Path | str,
        *extra: str,
        admin: bool | str = True,
        cwd: Path | str | None = None,
        stdout_to: Path | None = None,
    ) -> BalancerProc:
        bal = start_balancer(config, *extra, admin=admin, cwd=cwd, stdout_to=stdout_to)
        self.append(bal)
        return bal

    def stop_all(self) -> None:
        while self:
            self.pop(0).stop()


def backend_rows(status: dict[str, Any], service: str = "numbers") -> dict[str, dict[str, Any]]:
    """A service's backends in a `/status` document, by address."""
    return {b["address"]: b for b in status["services"][service]["backends"]}


def backend_requests(status: dict[str, Any], service: str = "numbers") -> dict[str, int]:
    """Requests each backend of a service has served, by address, from a `/status` document."""
    return {a: int(b["requests"]) for a, b in backend_rows(status, service).items()}


def start_load(
    port: int, *args: str, admin_port: int | None = None, cwd: Path | str | None = None
) -> ChildProcess:
    """The load client (`balancer client --json --quiet`) against 127.0.0.1:PORT, running.

    With `admin_port` it reads the spread over the backends from that admin endpoint.
    """
    admin = f"127.0.0.1:{admin_port}" if admin_port is not None else "off"
    load = ["-m", "balancer", "client", "--json", "--quiet", "--balancerIp", "127.0.0.1"]
    return ChildProcess(
        [PYTHON, *load, "--balancerPort", str(port), "--admin", admin, *args], cwd=cwd
    )


def load_summary(
    proc: ChildProcess, timeout: float, *, exit_code: int | None = 0
) -> dict[str, Any]:
    """Wait for a load client to end; its JSON summary (the last stdout line that is an object).

    `exit_code` is the exit status required (the client exits 1 when any request failed);
    None accepts any.
    """
    code = proc.wait(timeout=timeout)
    if exit_code is not None:
        assert code == exit_code, f"load client exited with {code}:\n{proc.output()}"
    summaries = [line for line in proc.lines if line.startswith("{")]
    assert summaries, f"load client (exit {code}) printed no JSON summary:\n{proc.output()}"
    doc: dict[str, Any] = json.loads(summaries[-1])
    return doc


@contextlib.contextmanager
def load_without_errors(port: int, duration: float, rate: int = 200) -> Iterator[ChildProcess]:
    """The load client (4 clients, `rate` requests/s for `duration` s) against PORT while
    the block runs; after it, every request must have succeeded. A failing block stops
    the client and raises its own error."""
    client = start_load(
        port, "--duration", f"{duration:g}", "--rate", str(rate), "--client_count", "4"
    )
    try:
        yield client
    except BaseException:
        client.stop()
        raise
    doc = load_summary(client, timeout=duration + 60, exit_code=None)
    assert doc["errors"] == dict.fromkeys(doc["errors"], 0), doc["errors"]
    assert doc["ok"] == doc["requests"] > 0


def wait_for_load(
    bal: BalancerProc, client: ChildProcess, served: int, timeout: float, service: str = "numbers"
) -> None:
    """Wait until the service's backends have served `served` requests, the client still running."""

    def under_way() -> bool:
        assert client.popen.poll() is None, client.output()
        return sum(backend_requests(bal.status(), service).values()) >= served

    wait_until(under_way, timeout=timeout, what="load to be under way")


def write_toml(path: Path, backends: Sequence[int], **service: Any) -> Path:
    """A one-service config `numbers` on 127.0.0.1:0 with the given backend ports."""
    health = service.pop("health", {"interval": 0.2, "timeout": 1, "rise": 1, "fall": 1})
    lines = ["[services.numbers]", 'listen = "127.0.0.1:0"']
    for key, value in service.items():
        lines.append(f"{key} = {json.dumps(value)}")
    lines.append("backends = [" + ", ".join(f'"127.0.0.1:{p}"' for p in backends) + "]")
    lines.append("[services.numbers.health]")
    for key, value in health.items():
        lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


OPEN_CLIENTS: list[LineClient] = []


class LineClient:
    """A blocking line-protocol client for tests (closed at teardown by conftest)."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        OPEN_CLIENTS.append(self)

    def send(self, *lines: str) -> None:
        self.sock.sendall(b"".join(line.encode() + b"\n" for line in lines))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_line(self) -> str:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by peer")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def request(self, line: str) -> str:
        self.send(line)
        return self.read_line()

    def read_until_closed(self) -> bytes:
        data = self.buf
        self.buf = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    """Poll a condition (state reached through real I/O), failing after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.05)


def reply_for(n: int | str) -> str:
    return f"It\u2019s instance number {n}"


# -- config files -----------------------------------------------------------------------------


def write_config(tmp_path: Path, name: str, text: str) -> Path:
    """`text` written as `tmp_path/name` (the name's extension picks the format)."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path, default_listen: str = DEFAULT_LISTEN) -> ConfigError:
    """The ConfigError that loading `path` raises (the test fails if it loads)."""
    with pytest.raises(ConfigError) as info:
        load_config(path, default_listen=default_listen)
    return info.value


class Numbers(asyncio.Protocol):
    """A sample backend in the test's loop: answers its health check, and each line N with
    the sample service's reply."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            text = line.decode()
            reply = text if text == "!HEALTH_CHECK" else reply_for(text)
            self.transport.write(reply.encode() + b"\n")


async def ask(port: int, line: str) -> str:
    """One request line to 127.0.0.1:`port` on a new connection; its reply line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(line.encode() + b"\n")
        return (await reader.readline()).decode().rstrip("\n")
    finally:
        writer.close()
