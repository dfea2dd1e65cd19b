"""What every mode shares of TLS and the PROXY protocol (`Edge`), on both sides.

On the client side a service with `accept_proxy`, `tls` or `sni_routes` listens
through a front door (`balancer.proxy.front`), whose settings (`Front`) are made
again whenever the service's config or certificates change. On the backend side
each new backend connection starts with what `origination` says: the PROXY header
of `send_proxy` (with the client's address, and in v2 the server name, ALPN protocol
and TLS details of a connection terminated here), then the `backend_tls` handshake.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from balancer.config.model import ServiceConfig
from balancer.core import proxyproto
from balancer.proxy.base import EdgeStatus, Listener
from balancer.proxy.front import Arrival, Front, FrontStats, Router, client_subject
from balancer.proxy.tls import BackendTls, ServerTls, sni_of
from balancer.proxy.upstream import Origination

SecuredFactory = Callable[[Arrival | None], asyncio.BaseProtocol]
"""A mode's client protocol, for a connection read first (an `Arrival`) or not."""


class Edge:
    """A service's TLS and PROXY settings; mixed into every mode's service."""

    config: ServiceConfig
    server_tls: ServerTls | None = None
    backend_tls: BackendTls | None = None

    def init_edge(self) -> None:
        self.front_stats = FrontStats()
        self.front = Front.of(self.config, None, None)
        self.origination_timeout = self.config.connect_timeout

    def set_tls(self, server: ServerTls | None, backend: BackendTls | None) -> None:
        """The certificates and backend TLS of the prepared config (start-up, reload):
        new connections use them, established ones keep theirs."""
        self.server_tls = server
        old = self.backend_tls
        same = (
            backend is not None
            and old is not None
            and (backend.config, backend.files) == (old.config, old.files)
        )
        if not same:
            self.backend_tls = backend  # the same settings and files keep their sessions
        self.refront()

    def refront(self) -> None:
        self.front = Front.of(self.config, self.server_tls, self.sni_router())
        self.origination_timeout = self.config.connect_timeout

    def sni_router(self) -> Router | None:
        """Where SNI routing sends a server name (tcp mode only)."""
        return None

    async def open_listener(
        self,
        listener: Listener,
        loop: asyncio.AbstractEventLoop,
        factory: SecuredFactory,
    ) -> tuple[str, int]:
        cfg = self.config
        if not cfg.front:
            return await listener.open(
                loop, lambda: factory(None), cfg.listen_host, cfg.listen_port
            )
        return await listener.open_front(
            loop, factory, cfg.listen_host, cfg.listen_port, lambda: self.front, self.front_stats
        )

    def origination(self, arrival: Arrival | None, transport: Any) -> Origination | None:
        """What a new backend connection for the client on `transport` starts with."""
        version = self.config.send_proxy
        tls = self.backend_tls
        if not version and tls is None:
            return None
        header = b""
        if version:
            header = proxy_header(version, arrival, transport)
        return Origination(header, tls, self.origination_timeout)

    def edge_status(self) -> EdgeStatus:
        stats = self.front_stats
        server = self.server_tls
        backend = self.backend_tls
        return {
            "terminating": server is not None,
            "certificates": [
                {
                    "path": c.path,
                    "server_names": list(c.server_names),
                    "subject": c.subject,
                    "not_after": c.not_after,
                    "days_left": round(c.days_left(), 2),
                }
                for c in (server.certs if server is not None else [])
            ],
            "loaded_at": server.loaded_at if server is not None else 0.0,
            "handshakes": stats.handshakes,
            "proxied": stats.proxied,
            "errors": dict(stats.errors),
            "routed": dict(stats.routed),
            "backend_handshakes": backend.handshakes if backend is not None else 0,
            "backend_resumed": backend.resumed if backend is not None else 0,
        }


def describe(svc: ServiceConfig) -> str:
    """The start-up log's words for a service's TLS and PROXY settings ("" without any)."""
    parts = []
    if svc.accept_proxy:
        parts.append("PROXY header required")
    if svc.tls is not None:
        n = len(svc.tls.certs)
        clients = (
            ""
            if svc.tls.verify_client == "none"
            else f", client certificates {svc.tls.verify_client}"
        )
        parts.append(f"TLS terminated ({n} certificate{'s' if n > 1 else ''}{clients})")
    if svc.sni_routes:
        parts.append(f"{len(svc.sni_routes)} SNI route(s)")
    if svc.send_proxy:
        parts.append(f"PROXY {svc.send_proxy} to backends")
    if svc.backend_tls is not None:
        parts.append("TLS to backends")
    return "; ".join(parts)


def _address(value: Any) -> tuple[str, int] | None:
    if isinstance(value, tuple) and len(value) >= 2:
        return str(value[0]), int(value[1])
    return None


def proxy_header(version: str, arrival: Arrival | None, transport: Any) -> bytes:
    """The PROXY header naming the client of `transport` and the address it reached."""
    if arrival is not None:
        source: tuple[str, int] | None = arrival.client
        header = arrival.header
        destination = header.destination if header is not None and not header.local else None
    else:
        source = _address(transport.get_extra_info("peername"))
        destination = None
    if destination is None:
        destination = _address(transport.get_extra_info("sockname"))
    if source is None or destination is None:
        return proxyproto.build_v2_local() if version == "v2" else b"PROXY UNKNOWN\r\n"
    if version == "v2":
        return proxyproto.build_v2(source, destination, tlvs(arrival, transport))
    if (":" in source[0]) != (":" in destination[0]):
        return b"PROXY UNKNOWN\r\n"  # v1 cannot name two families
    return proxyproto.build_v1(source, destination)


def tlvs(arrival: Arrival | None, transport: Any) -> list[tuple[int, bytes]]:
    """The v2 TLVs of a connection: its server name, its ALPN protocol and TLS details."""
    out: list[tuple[int, bytes]] = []
    if arrival is None:
        return out
    sslobj = transport.get_extra_info("ssl_object") if arrival.terminated else None
    server_name = arrival.server_name or (sni_of(sslobj) if sslobj is not None else None)
    if server_name:
        out.append((proxyproto.AUTHORITY, server_name.encode("ascii")))
    if sslobj is None:
        return out
    alpn = sslobj.selected_alpn_protocol()
    if alpn:
        out.append((proxyproto.ALPN, alpn.encode("ascii")))
    subject = client_subject(sslobj)
    cn = next((p[3:] for p in subject.split(",") if p.startswith("CN=")), None)
    cipher = sslobj.cipher()
    out.append(
        proxyproto.ssl_tlv(
            verified=bool(subject),
            version=sslobj.version(),
            cn=cn,
            cipher=cipher[0] if cipher else None,
        )
    )
    return out
