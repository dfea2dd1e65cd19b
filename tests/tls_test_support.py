"""In-process services with TLS or the PROXY protocol, and the peers their tests talk to."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from balancer.config.model import BackendConfig, HealthConfig, ServiceConfig
from balancer.core.pool import BackendPool
from balancer.core.stats import LatencyHistogram
from balancer.proxy.base import Proxy
from balancer.proxy.registry import build_proxy
from balancer.proxy.tls import load_service_tls
from tests.tls_support import Ca, Pair

HOST = "127.0.0.1"
STEP = 30.0


def service_config(
    name: str, backends: list[str], mode: str = "tcp", **options: Any
) -> ServiceConfig:
    return ServiceConfig(
        name=name,
        listen_host=HOST,
        listen_port=0,
        backends=tuple(BackendConfig(b.split(":")[0], int(b.split(":")[1])) for b in backends),
        mode=mode,
        health=HealthConfig(enabled=False),
        **options,
    )


@asynccontextmanager
async def running(*configs: ServiceConfig) -> AsyncIterator[list[tuple[Proxy, int]]]:
    """The services of `configs` listening (their TLS files read as at a start-up)."""
    started: list[tuple[Proxy, int]] = []
    loaded = load_service_tls(configs, "test")
    try:
        for cfg in configs:
            proxy = build_proxy(cfg, BackendPool(cfg), LatencyHistogram(), None)
            proxy.set_tls(*loaded[cfg.name])
            _, port = await proxy.start()
            started.append((proxy, port))
        yield started
    finally:
        for proxy, _ in started:
            await proxy.drain(1.0)


def client_context(
    ca: Ca, *, pair: Pair | None = None, alpn: list[str] | None = None, version: str = ""
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    if pair is not None:
        ctx.load_cert_chain(str(pair.cert_path), str(pair.key_path))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if version == "1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def server_context(pair: Pair) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pair.cert_path), str(pair.key_path))
    return ctx


async def tls_open(
    port: int, ctx: ssl.SSLContext, name: str | None, first: bytes = b""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TLS connection to us (after `first` plain bytes: a PROXY header, say)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    if first:
        writer.write(first)
        await writer.drain()
    async with asyncio.timeout(STEP):
        await writer.start_tls(ctx, server_hostname=name)
    return reader, writer


def peer_names(writer: asyncio.StreamWriter) -> list[str]:
    """The DNS names of the certificate the server presented."""
    cert = writer.get_extra_info("ssl_object").getpeercert()
    return [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]


@dataclass
class Recorder:
    """A backend that echoes what it receives and keeps the first bytes of each connection."""

    port: int = 0
    firsts: list[bytes] = field(default_factory=list)
    tls_peers: list[Any] = field(default_factory=list)
    connections: int = 0


@asynccontextmanager
async def recorder(
    ctx: ssl.SSLContext | None = None, on_first: Callable[[bytes], int] | None = None
) -> AsyncIterator[Recorder]:
    """An echo backend (TLS with `ctx`); `on_first(data)` says how many leading bytes are
    a header of the connection's (kept in `firsts`, not echoed)."""
    rec = Recorder()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        rec.connections += 1
        sslobj = writer.get_extra_info("ssl_object")
        if sslobj is not None:
            rec.tls_peers.append(sslobj.session_reused)
        try:
            data = await reader.read(65536)
            if on_first is not None and data:
                while True:
                    n = on_first(data)
                    if n:
                        break
                    more = await reader.read(65536)
                    if not more:
                        return
                    data += more
                rec.firsts.append(data[:n])
                data = data[n:] or await reader.read(65536)
            while data:
                writer.write(data)
                await writer.drain()
                data = await reader.read(65536)
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, HOST, 0, ssl=ctx)
    rec.port = server.sockets[0].getsockname()[1]
    try:
        yield rec
    finally:
        server.close()


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """The other end closed (or reset) the connection, sending nothing."""
    try:
        async with asyncio.timeout(STEP):
            data = await reader.read(65536)
    except (ConnectionError, ssl.SSLError):
        return True
    return data == b""
