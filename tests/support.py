"""Real processes on loopback for end-to-end tests: start, wait for readiness, stop."""

from __future__ import annotations

import json
import os
import queue
import re
import signal as _signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from balancer.config.errors import ConfigError
from balancer.config.load import load_config
from balancer.config.model import DEFAULT_LISTEN
from balancer.tools.demo import ADMIN_RE, INSTANCE_RE, SERVICE_RE

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
READY_TIMEOUT = 20.0


class Proc:
    """A child process whose output lines are collected by a thread, for waiting on."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        cwd: Path | str | None = None,
        stdout_to: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = list(args)
        full_env = dict(os.environ)
        full_env["PYTHONUNBUFFERED"] = "1"
        if env:
            full_env.update(env)
        self._stdout_file = open(stdout_to, "wb") if stdout_to is not None else None
        self.popen = subprocess.Popen(
            self.args,
            cwd=cwd,
            stdout=self._stdout_file if self._stdout_file is not None else subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=full_env,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._readers: list[threading.Thread] = []
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is None:
                continue
            t = threading.Thread(target=self._pump, args=(stream,), daemon=True)
            t.start()
            self._readers.append(t)

    def _pump(self, stream: Any) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_for(
        self, pattern: str | re.Pattern[str], timeout: float = READY_TIMEOUT
    ) -> re.Match[str]:
        """Wait until an output line matches; return the match (checks lines seen so far first)."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        seen = 0
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines[seen:]:
                m = regex.search(line)
                if m:
                    return m
            seen = len(self.lines)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"{self.args[:4]}: no line matching {regex.pattern!r} within {timeout}s; "
                    f"output so far:\n" + "\n".join(self.lines[-40:])
                )
            try:
                item = self._queue.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if item is None and self.popen.poll() is not None:
                # process ended; final scan then fail
                for line in self.lines[seen:]:
                    m = regex.search(line)
                    if m:
                        return m
                raise AssertionError(
                    f"{self.args[:4]} exited with {self.popen.returncode} before printing "
                    f"{regex.pattern!r}:\n" + "\n".join(self.lines[-40:])
                )

    def output(self) -> str:
        return "\n".join(self.lines)

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def stop(self, sig: int = _signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            try:
                os.kill(self.popen.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)
        self._close_streams()
        return self.popen.returncode

    def _close_streams(self) -> None:
        for t in self._readers:
            t.join(timeout=5)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()
        if self._stdout_file is not None:
            self._stdout_file.close()

    def wait(self, timeout: float = 30.0) -> int:
        code = self.popen.wait(timeout=timeout)
        self._close_streams()
        return code


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


class ServiceProc(Proc):
    port: int


def start_service(*extra: str, port: int = 0, cwd: Path | str | None = None) -> ServiceProc:
    proc = ServiceProc([PYTHON, "-m", "balancer.tools.service", "-p", str(port), *extra], cwd=cwd)
    try:
        m = proc.wait_for(INSTANCE_RE)
    except BaseException:
        proc.stop()
        raise
    proc.port = int(m.group(2))
    return proc


class BalancerProc(Proc):
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
        proc.wait_for("balancer ready")
    except BaseException:
        proc.stop()
        raise
    proc.ports = {m.group(1): int(m.group(3)) for m in map(SERVICE_RE.search, proc.lines) if m}
    proc.admin_port = None
    for line in proc.lines:
        am = ADMIN_RE.search(line)
        if am:
            proc.admin_port = int(am.group(2))
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
) -> Proc:
    """The load client (`balancer client --json --quiet`) against 127.0.0.1:PORT, running.

    With `admin_port` it reads the spread over the backends from that admin endpoint.
    """
    admin = f"127.0.0.1:{admin_port}" if admin_port is not None else "off"
    load = ["-m", "balancer", "client", "--json", "--quiet", "--balancerIp", "127.0.0.1"]
    return Proc([PYTHON, *load, "--balancerPort", str(port), "--admin", admin, *args], cwd=cwd)


def load_summary(proc: Proc, timeout: float, *, exit_code: int | None = 0) -> dict[str, Any]:
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


def wait_for_load(
    bal: BalancerProc, client: Proc, served: int, timeout: float, service: str = "numbers"
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


@contextmanager
def running(*procs: Proc) -> Iterator[None]:
    try:
        yield
    finally:
        for p in procs:
            p.stop()


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
