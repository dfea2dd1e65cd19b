"""Real peers on loopback: redis-server, haproxy, nginx, started and waited for by connecting.

`Resp` is a small RESP2 client for talking to redis through the balancer.

Each starter is a context manager yielding a `Peer` (its process and port) and
stops the process on exit. A missing binary fails the calling test (never skips
it) with the Debian package to install; ./scripts/test installs them.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HOST = "127.0.0.1"
READY_TIMEOUT = 15.0


@dataclass
class Peer:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    host: str = HOST

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


PACKAGES = {
    "redis-server": "redis-server",
    "redis-benchmark": "redis-tools",
    "redis-cli": "redis-tools",
    "haproxy": "haproxy",
    "nginx": "nginx-light",
    "wrk": "wrk",
    "chromium": "chromium",
    "dnsmasq": "dnsmasq",
    "etcd": "etcd-server",
    "ip": "iproute2",
}
"""The Debian package of each peer binary (scripts/env.sh installs the same list)."""


def need(binary: str, dirs: Sequence[str] = ("/usr/sbin", "/usr/bin")) -> str:
    """The path of `binary`; if it is missing, fail the test naming the package to install."""
    path = shutil.which(binary) or next(
        (str(p) for p in (Path(d) / binary for d in dirs) if p.exists()), None
    )
    if path is None:
        package = PACKAGES.get(binary, binary)
        pytest.fail(
            f"{binary} is not installed: apt-get install {package} "
            "(./scripts/test installs the test peers)",
            pytrace=False,
        )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_connectable(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    """Return once `port` accepts a connection; fail if `proc` exits or it takes too long."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=1.0):
                return
        except OSError:
            pass
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening: {out}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on {HOST}:{port}")
        time.sleep(0.02)


@contextmanager
def running(name: str, args: Sequence[str], port: int) -> Iterator[Peer]:
    """`args` as a child process, yielded once `port` accepts; terminated (then killed) on exit."""
    proc = subprocess.Popen(
        list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    peer = Peer(name, proc, port)
    try:
        wait_connectable(port, proc, name)
        yield peer
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


@contextmanager
def redis_server(maxclients: int = 10000) -> Iterator[Peer]:
    """A throwaway redis-server (no persistence) on a free loopback port."""
    binary = need("redis-server")
    port = free_port()
    args = [
        binary,
        "--bind", HOST,
        "--port", str(port),
        "--save", "",
        "--appendonly", "no",
        "--protected-mode", "no",
        "--maxclients", str(maxclients),
        "--proto-max-bulk-len", "16mb",
        "--loglevel", "warning",
    ]  # fmt: skip
    with running("redis-server", args, port) as peer:
        yield peer


def haproxy_config(port: int, backends: Sequence[str], maxconn: int = 8000) -> str:
    servers = "\n".join(f"    server s{i} {addr}" for i, addr in enumerate(backends))
    return f"""\
global
    nbthread 1
    maxconn {maxconn}
defaults
    mode tcp
    timeout connect 2s
    timeout client 120s
    timeout server 120s
frontend front
    bind {HOST}:{port}
    default_backend back
backend back
    balance roundrobin
{servers}
"""


@contextmanager
def haproxy(backends: Sequence[str], maxconn: int = 8000) -> Iterator[Peer]:
    """HAProxy in tcp mode, one thread, round robin over `backends`."""
    binary = need("haproxy")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="balancer-haproxy-") as tmp:
        cfg = Path(tmp) / "haproxy.cfg"
        cfg.write_text(haproxy_config(port, backends, maxconn))
        with running("haproxy", [binary, "-db", "-f", str(cfg)], port) as peer:
            yield peer


def nginx_conf(tmp: Path, server: str, connections: int = 4096) -> str:
    """A one-worker, foreground nginx config keeping every file under `tmp`, with the
    `server { ... }` block(s) given."""
    return f"""\
worker_processes 1;
daemon off;
error_log {tmp}/error.log warn;
pid {tmp}/nginx.pid;
events {{ worker_connections {connections}; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
{server}
}}
"""


def nginx_config(tmp: Path, port: int) -> str:
    return nginx_conf(
        tmp,
        f"""\
    server {{
        listen {HOST}:{port};
        location / {{ root {tmp}/www; }}
    }}""",
    )


@contextmanager
def nginx(page: bytes = b"<html><body>hello from nginx</body></html>\n") -> Iterator[Peer]:
    """nginx serving `page` as /index.html on a free loopback port."""
    binary = need("nginx")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="balancer-nginx-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)  # workers may run as another user when started as root
        (root / "www").mkdir(mode=0o755)
        (root / "www" / "index.html").write_bytes(page)
        cfg = root / "nginx.conf"
        cfg.write_text(nginx_config(root, port))
        args = [binary, "-c", str(cfg), "-p", str(root), "-e", str(root / "error.log")]
        with running("nginx", args, port) as peer:
            yield peer


class RespError(Exception):
    pass


class Resp:
    """A tiny RESP2 client: enough for SET, GET, PING, INFO."""

    timeout = 30.0
    """Seconds a command may take before TimeoutError."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> Resp:
        reader, writer = await asyncio.open_connection(HOST, port, limit=4 * 1024 * 1024)
        return cls(reader, writer)

    @staticmethod
    def encode(*args: bytes) -> bytes:
        parts = [b"*%d\r\n" % len(args)]
        parts.extend(b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in args)
        return b"".join(parts)

    async def reply(self) -> Any:
        line = await self.reader.readuntil(b"\r\n")
        kind, body = line[:1], line[1:-2]
        if kind == b"+":
            return body.decode()
        if kind == b"-":
            raise RespError(body.decode())
        if kind == b":":
            return int(body)
        if kind == b"$":
            n = int(body)
            if n < 0:
                return None
            return (await self.reader.readexactly(n + 2))[:-2]
        if kind == b"*":
            return [await self.reply() for _ in range(int(body))]
        raise RespError(f"unexpected reply {line!r}")

    async def command(self, *args: bytes) -> Any:
        async with asyncio.timeout(self.timeout):
            self.writer.write(self.encode(*args))
            return await self.reply()

    async def server_port(self) -> int:
        info = await self.command(b"INFO", b"server")
        match = re.search(rb"tcp_port:(\d+)", info)
        assert match is not None
        return int(match.group(1))

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass
