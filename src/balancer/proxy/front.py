"""A listener that reads each connection before its mode gets it: PROXY header, TLS.

How it works: a service with `accept_proxy`, `tls` or `sni_routes` listens through a
`FrontDoor` instead of the loop's own server. It accepts the sockets itself and, for
each, within the service's timeouts (`balancer.proxy.preamble`):

1. with `accept_proxy`: refuses a peer outside `accept_proxy_from`, then reads and
   consumes the PROXY header (v1 or v2, required, never guessed). Its source address
   becomes the connection's client address; a v2 LOCAL header (the proxy's own health
   check) keeps the socket's.
2. with `tls` or `sni_routes`: peeks at the ClientHello, leaving it unread, for its
   server name: with `tls` it picks the certificate (`ServerTls.context_for`), with
   `sni_routes` the tcp service the connection goes to.
3. hands the socket to the loop (`connect_accepted_socket`), with the TLS context when
   this service terminates TLS: the mode's protocol then sees a plain transport, and its
   `arrival` says what was read.

A connection that fails any step is closed and counted by reason (`FrontStats`); the
listener and every other connection go on. A service without these settings listens
through the loop's own server and pays nothing for any of this.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from balancer.config.addresses import Network, parse_networks
from balancer.config.model import ServiceConfig
from balancer.core.proxyproto import ProxyHeader
from balancer.net import resources
from balancer.net.loops import bind_listener, enlist
from balancer.proxy.preamble import (
    PreambleError,
    first_bytes,
    peek_client_hello,
    read_proxy_header,
    refuse_plain_text,
)
from balancer.proxy.tls import ServerTls, sni_of

log = logging.getLogger("balancer")

ACCEPT_BATCH = 64
"""Connections accepted per readiness of the listening socket."""
ACCEPT_PAUSE = 1.0
"""Seconds accepting pauses when the process is out of descriptors (as asyncio's server)."""


class Arrival:
    """What was read of a client connection before its mode got it."""

    __slots__ = ("client", "header", "peer", "server_name", "terminated")

    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        """The socket's peer (the proxy in front, with accept_proxy)."""
        self.client = peer
        """The client's address: the PROXY header's source, else the socket's peer."""
        self.header: ProxyHeader | None = None
        self.server_name: str | None = None
        """The ClientHello's SNI name (lower case), when one was read."""
        self.terminated = False
        """TLS was terminated here: the transport is a TLS one."""


ArrivalFactory = Callable[[Arrival], asyncio.BaseProtocol]
Router = Callable[[str | None], ArrivalFactory | None]
"""The factory of the service a server name goes to (SNI routing); None: closed."""


@dataclass
class FrontStats:
    """What a front door counted (for `/status` and `/metrics`)."""

    handshakes: int = 0
    """TLS handshakes done."""
    proxied: int = 0
    """Connections whose PROXY header was read (LOCAL ones included)."""
    routed: dict[str, int] = field(default_factory=dict)
    """Connections handed to another service by SNI, by service."""
    errors: dict[str, int] = field(default_factory=dict)
    """Connections closed before their mode got them, by reason."""

    def count(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1


@dataclass
class Front:
    """A service's settings for its front door (swapped whole by a reload)."""

    accept_proxy: bool = False
    proxy_from: tuple[Network, ...] = ()
    proxy_timeout: float = 5.0
    tls: ServerTls | None = None
    client_hello_timeout: float = 5.0
    router: Router | None = None
    plain_reply: bytes = b""
    """What a plain-text client on a TLS port is sent before its connection is closed
    (http mode: a 400 saying the port speaks HTTPS)."""

    @classmethod
    def of(cls, svc: ServiceConfig, tls: ServerTls | None, router: Router | None) -> Front:
        return cls(
            accept_proxy=svc.accept_proxy,
            proxy_from=parse_networks(svc.accept_proxy_from),
            proxy_timeout=svc.proxy_timeout,
            tls=tls,
            client_hello_timeout=svc.client_hello_timeout,
            router=router if svc.sni_routes else None,
            plain_reply=PLAIN_HTTP_REPLY if svc.mode == "http" and tls is not None else b"",
        )


_PLAIN_TEXT = frozenset(
    {"HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG"}
)
"""OpenSSL's reasons for a first record that is not TLS at all."""


def _handshake_reason(exc: BaseException) -> str:
    """A bounded label for a failed handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "client_cert_rejected"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        if reason in _PLAIN_TEXT:  # bytes that are no TLS record came first
            return "not_tls"
        if "CERTIFICATE" in reason or "PEER_DID_NOT_RETURN" in reason:
            return "client_cert_rejected"
        if "VERSION" in reason or "PROTOCOL" in reason:
            return "tls_version"
        if "CIPHER" in reason:
            return "no_shared_cipher"
        return "handshake_failed"
    if isinstance(exc, (TimeoutError, ConnectionAbortedError)):
        return "handshake_timeout"
    return "reset"


def _allowed(peer: tuple[str, int], networks: tuple[Network, ...]) -> bool:
    if not networks:
        return True
    try:
        ip = ipaddress.ip_address(peer[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return any(ip in net or (mapped is not None and mapped in net) for net in networks)


_PLAIN_BODY = b"This port speaks HTTPS: use https:// to reach it.\n"
PLAIN_HTTP_REPLY = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_PLAIN_BODY), _PLAIN_BODY)
)


def _answer_plain(conn: socket.socket, reply: bytes) -> None:
    """Take what a plain-text client sent (so that the close is a FIN, not a reset) and
    send it `reply`, all without waiting."""
    try:
        for _ in range(16):
            if not conn.recv(65536):
                break
    except OSError:
        pass
    if reply:
        try:
            conn.send(reply)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class FrontDoor(asyncio.AbstractServer):
    """A listening socket (or several, for a name) whose connections are read first."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sockets: list[socket.socket],
        factory: ArrivalFactory,
        front: Callable[[], Front],
        stats: FrontStats,
    ) -> None:
        self._loop = loop
        self._sockets = sockets
        self._factory = factory
        self._front = front
        self.stats = stats
        self._serving = False
        self._pending: set[asyncio.Task[None]] = set()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        if self._serving or not self._sockets:
            return
        self._serving = True
        for sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _stop_reading(self) -> None:
        for sock in self._sockets:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())

    def close(self) -> None:
        """Stop accepting and close the listening sockets (connections being read go on,
        within their timeouts)."""
        if self._serving:
            self._stop_reading()
        self._serving = False
        for sock in self._sockets:
            sock.close()
        self._sockets = []

    async def wait_closed(self) -> None:
        """Nothing to wait for: the sockets are closed by `close`."""

    async def serve_forever(self) -> None:  # pragma: no cover - the runtime never calls it
        await self.start_serving()
        await asyncio.Event().wait()

    def _resume(self) -> None:
        if self._serving:
            for sock in self._sockets:
                self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, listening: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, peer = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    resources.ALARM.note(exc, "accepting a client connection")
                    self._stop_reading()
                    self._loop.call_later(ACCEPT_PAUSE, self._resume)
                elif exc.errno not in (errno.ECONNABORTED, errno.EPROTO):
                    log.warning("accept failed: %s", exc)
                return
            conn.setblocking(False)  # TCP_NODELAY: set by either loop on its transport
            task = self._loop.create_task(self._welcome(conn, (str(peer[0]), int(peer[1]))))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _welcome(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        front = self._front()
        arrival = Arrival(peer)
        stats = self.stats
        factory: ArrivalFactory | None = self._factory
        try:
            if front.accept_proxy:
                if not _allowed(peer, front.proxy_from):
                    raise PreambleError("proxy_untrusted")
                try:
                    async with asyncio.timeout(front.proxy_timeout):
                        header = await read_proxy_header(self._loop, conn)
                except TimeoutError:
                    raise PreambleError("proxy_header_timeout") from None
                stats.proxied += 1
                arrival.header = header
                if not header.local and header.source is not None:
                    arrival.client = header.source
            tls = front.tls
            if front.router is not None:
                try:
                    async with asyncio.timeout(front.client_hello_timeout):
                        hello = await peek_client_hello(self._loop, conn)
                except TimeoutError:
                    raise PreambleError("client_hello_timeout") from None
                arrival.server_name = hello.server_name
                factory = front.router(arrival.server_name)
                if factory is None:
                    raise PreambleError("sni_no_route")
            elif tls is not None:
                if front.plain_reply:  # http mode: a plain-text client gets told, so wait
                    try:
                        async with asyncio.timeout(tls.config.handshake_timeout):
                            await first_bytes(self._loop, conn)
                    except TimeoutError:
                        raise PreambleError("client_hello_timeout") from None
                refuse_plain_text(conn)  # what came already; the handshake reads the rest
        except PreambleError as exc:
            stats.count(exc.reason)
            if exc.reason == "not_tls":
                _answer_plain(conn, front.plain_reply)
            conn.close()
            return
        except asyncio.CancelledError:
            conn.close()
            raise
        assert factory is not None
        await self._hand_over(conn, arrival, factory, tls)

    async def _hand_over(
        self,
        conn: socket.socket,
        arrival: Arrival,
        factory: ArrivalFactory,
        tls: ServerTls | None,
    ) -> None:
        def protocol() -> asyncio.BaseProtocol:
            return factory(arrival)

        loop = self._loop
        try:
            if tls is None:
                await loop.connect_accepted_socket(protocol, conn)
                return
            arrival.terminated = True
            await loop.connect_accepted_socket(
                protocol,
                conn,
                ssl=tls.default,  # the certificate is chosen by the SNI callback
                ssl_handshake_timeout=tls.config.handshake_timeout,
            )
        except (OSError, ValueError) as exc:
            self.stats.count(_handshake_reason(exc))
            if conn.fileno() >= 0:
                conn.close()
            return
        self.stats.handshakes += 1


def tls_details(transport: Any) -> dict[str, object]:
    """What the access log shows of a TLS client connection ({} for a plain one)."""
    sslobj = transport.get_extra_info("ssl_object")
    if sslobj is None:
        return {}
    server_name = sni_of(sslobj)
    cipher = sslobj.cipher()
    details: dict[str, object] = {
        "tls_version": sslobj.version(),
        "tls_cipher": cipher[0] if cipher else "",
        "sni": server_name or "",
    }
    subject = client_subject(sslobj)
    if subject:
        details["client_subject"] = subject
    return details


_SHORT = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "emailAddress": "emailAddress",
}


def client_subject(sslobj: Any) -> str:
    """The subject of a verified client certificate, as `CN=a,O=b` ("" without one);
    characters that could break a header or a log line are escaped as `\\xx`."""
    cert = sslobj.getpeercert()
    if not cert:
        return ""
    parts = [
        f"{_SHORT.get(key, key)}={_escape(str(value))}"
        for rdn in cert.get("subject", ())
        for key, value in rdn
    ]
    return ",".join(parts)


def _escape(value: str) -> str:
    return "".join(
        ch if ch.isprintable() and ch not in ',\\"' and ord(ch) < 127 else f"\\{ord(ch):02x}"
        for ch in value
    )


async def open_front(
    loop: asyncio.AbstractEventLoop,
    factory: ArrivalFactory,
    host: str,
    port: int,
    front: Callable[[], Front],
    stats: FrontStats,
    backlog: int = 4096,
) -> FrontDoor:
    """A front door on (host, port), serving now or when its `ListenerBatch` serves."""
    door = FrontDoor(loop, bind_listener(host, port, backlog), factory, front, stats)
    if enlist(door):
        await door.start_serving()
    return door
