"""The PROXY protocol both ways, TLS towards backends (and their health checks), and SNI
routing without terminating, in process on real sockets."""

from __future__ import annotations

import asyncio
import io
import ssl
import struct

import pytest

from balancer.config.model import (
    BackendTlsConfig,
    CertConfig,
    HealthConfig,
    SniRouteConfig,
    TlsConfig,
)
from balancer.core import proxyproto
from balancer.proxy.edge import proxy_header
from balancer.proxy.front import Arrival
from balancer.runtime.probe import probe
from tests.http_support import RawClient, echo_backend, get, until
from tests.tls_support import Pki, default_pki, make_self_signed
from tests.tls_test_support import (
    HOST,
    client_context,
    closed_by_peer,
    recorder,
    running,
    server_context,
    service_config,
    tls_open,
)

FAKE = ("203.0.113.7", 40123)
"""A client address no socket of the test has: seen only if the PROXY header was used."""


pytestmark = pytest.mark.usefixtures("http_clients")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return default_pki(tmp_path_factory)


def header_length(data: bytes) -> int:
    """How much of `data` is a PROXY header (0: not complete yet)."""
    parsed = proxyproto.parse(data)
    return 0 if isinstance(parsed, int) else parsed.length


async def exchange(port: int, first: bytes, body: bytes = b"ping") -> bytes:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(first + body)
        async with asyncio.timeout(30):
            return await reader.readexactly(len(body))
    finally:
        writer.close()


@pytest.mark.parametrize("send", ["v1", "v2"])
async def test_the_client_address_of_a_proxy_header_goes_on_to_the_backend(send: str) -> None:
    async with recorder(on_first=header_length) as backend:
        cfg = service_config("t", [f"{HOST}:{backend.port}"], accept_proxy=True, send_proxy=send)
        async with running(cfg) as [(svc, port)]:
            v2 = proxyproto.build_v2(FAKE, (HOST, port))
            v1 = proxyproto.build_v1(FAKE, (HOST, port))
            assert await exchange(port, v2) == b"ping"
            assert await exchange(port, v1, b"bytes after the header in the same segment")
            for first in backend.firsts:
                seen = proxyproto.parse(first)
                assert not isinstance(seen, int)
                assert seen.version == int(send[1])
                assert seen.source == FAKE
                assert seen.destination == (HOST, port)
            assert len(backend.firsts) == 2
            assert svc.edge_status()["proxied"] == 2


async def test_a_header_sent_a_byte_at_a_time_is_read_whole() -> None:
    async with recorder(on_first=header_length) as backend:
        cfg = service_config("t", [f"{HOST}:{backend.port}"], accept_proxy=True, send_proxy="v1")
        async with running(cfg) as [(_, port)]:
            reader, writer = await asyncio.open_connection(HOST, port)
            for byte in proxyproto.build_v2(FAKE, (HOST, port)):
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0)
            # one byte alone is relayed: the wait's low-water mark was put back to 1
            writer.write(b"!")
            assert await reader.readexactly(1) == b"!"
            writer.close()
            assert backend.firsts == [proxyproto.build_v1(FAKE, (HOST, port))]


async def test_a_local_header_keeps_the_sockets_address() -> None:
    async with recorder(on_first=header_length) as backend:
        cfg = service_config("t", [f"{HOST}:{backend.port}"], accept_proxy=True, send_proxy="v2")
        async with running(cfg) as [(_, port)]:
            assert await exchange(port, proxyproto.build_v2_local()) == b"ping"
            seen = proxyproto.parse(backend.firsts[0])
            assert not isinstance(seen, int)
            assert seen.source is not None
            assert seen.source[0] == HOST


@pytest.mark.parametrize(
    ("first", "reason"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "proxy_header_malformed"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n", "proxy_header_malformed"),
        (b"PROXY UNKNOWN" + b" x" * 60, "proxy_header_too_large"),
        (
            proxyproto.V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 60000),
            "proxy_header_too_large",
        ),
        (proxyproto.V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12), "proxy_header_unsupported"),
        (b"PROXY TCP4 1.2.3.4", "proxy_header_timeout"),
        (b"", "proxy_header_timeout"),
    ],
)
async def test_a_bad_or_missing_header_closes_that_connection_only(
    first: bytes, reason: str
) -> None:
    async with recorder(on_first=header_length) as backend:
        cfg = service_config(
            "t", [f"{HOST}:{backend.port}"], accept_proxy=True, send_proxy="v1", proxy_timeout=0.3
        )
        async with running(cfg) as [(svc, port)]:
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(first)
            good = proxyproto.build_v1(FAKE, (HOST, port))
            assert await exchange(port, good) == b"ping"  # another client is served meanwhile
            assert await closed_by_peer(reader)
            writer.close()
            assert svc.edge_status()["errors"] == {reason: 1}
            assert backend.firsts == [good]  # nothing of the bad one reached a backend


async def test_a_peer_outside_accept_proxy_from_is_refused() -> None:
    async with recorder() as backend:
        cfg = service_config(
            "t", [f"{HOST}:{backend.port}"], accept_proxy=True, accept_proxy_from=("10.0.0.0/8",)
        )
        async with running(cfg) as [(svc, port)]:
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(proxyproto.build_v1(FAKE, (HOST, port)) + b"ping")
            assert await closed_by_peer(reader)
            writer.close()
            assert svc.edge_status()["errors"] == {"proxy_untrusted": 1}
            assert backend.connections == 0


async def test_http_mode_forwards_the_proxy_headers_client_address() -> None:
    async with echo_backend() as echo:
        cfg = service_config("web", [echo.address], mode="http", accept_proxy=True)
        async with running(cfg) as [(_, port)]:
            reader, writer = await asyncio.open_connection(HOST, port)
            client = RawClient(reader, writer)
            client.send(proxyproto.build_v2(FAKE, ("192.0.2.1", 8443)) + get("/"))
            response = await client.response()
            assert response is not None
            assert response.status == 200
            seen = {k.lower(): v for k, v in response.json()["headers"]}
            assert seen["x-forwarded-for"] == FAKE[0]
            assert seen["x-forwarded-port"] == "8443"  # what the client reached, in front


async def test_a_v2_header_after_termination_names_the_server_and_protocol(pki: Pki) -> None:
    async with recorder(on_first=header_length) as backend:
        tls = TlsConfig(
            certs=(CertConfig(str(pki.server.cert_path), str(pki.server.key_path)),),
            alpn=("http/1.1",),
        )
        cfg = service_config("t", [f"{HOST}:{backend.port}"], tls=tls, send_proxy="v2")
        async with running(cfg) as [(_, port)]:
            reader, writer = await tls_open(
                port, client_context(pki.ca, alpn=["http/1.1"]), "a.example"
            )
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            writer.close()
            seen = proxyproto.parse(backend.firsts[0])
            assert not isinstance(seen, int)
            assert seen.authority == "a.example"
            assert seen.alpn == "http/1.1"
            ssl_tlv = seen.tlv(proxyproto.SSL)
            assert ssl_tlv is not None
            assert b"TLSv1.3" in ssl_tlv


def test_a_v1_header_cannot_mix_families_and_says_unknown() -> None:
    arrival = Arrival(("::1", 5))

    class Transport:
        def get_extra_info(self, name: str) -> object:
            return {"sockname": ("127.0.0.1", 80), "peername": ("::1", 5)}.get(name)

    assert proxy_header("v1", arrival, Transport()) == b"PROXY UNKNOWN\r\n"
    assert proxyproto.parse(proxy_header("v2", arrival, Transport())).source == ("::1", 5)  # type: ignore[union-attr]
    assert proxy_header("v1", None, Transport()) == b"PROXY UNKNOWN\r\n"


# -- TLS towards backends --------------------------------------------------------------------


async def test_backends_are_reached_over_tls_verified_and_sessions_resumed(pki: Pki) -> None:
    async with recorder(server_context(pki.server)) as backend:
        origin = BackendTlsConfig(ca=str(pki.ca.cert_path), server_name="a.example")
        cfg = service_config("t", [f"{HOST}:{backend.port}"], backend_tls=origin)
        async with running(cfg) as [(svc, port)]:
            for _ in range(3):
                assert await exchange(port, b"") == b"ping"
                await asyncio.sleep(0.1)  # the TLS 1.3 ticket is kept once it is there
            status = svc.edge_status()
            assert status["backend_handshakes"] == 3
            assert status["backend_resumed"] >= 1
            assert backend.tls_peers[-1] is True
            # counted as the backend saw it: the first handshake is never a resumed one
            assert status["backend_resumed"] == sum(backend.tls_peers)


async def test_a_backend_whose_certificate_fails_is_a_failure_and_the_next_one_serves(
    pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> None:
    stranger = make_self_signed(tmp_path_factory.mktemp("stranger"), ["a.example"])
    async with (
        recorder(server_context(stranger)) as bad,
        recorder(server_context(pki.server)) as good,
    ):
        origin = BackendTlsConfig(ca=str(pki.ca.cert_path), server_name="a.example")
        cfg = service_config("t", [f"{HOST}:{bad.port}", f"{HOST}:{good.port}"], backend_tls=origin)
        async with running(cfg) as [(svc, port)]:
            for _ in range(4):
                assert await exchange(port, b"") == b"ping"
            failing = next(b for b in svc.pool if b.port == bad.port)  # type: ignore[attr-defined]
            assert failing.connect_failures >= 1
            assert "TLS" in (failing.last_reason or "")
            assert good.connections == 4


async def test_health_checks_speak_tls_to_tls_backends(pki: Pki) -> None:
    from balancer.proxy.tls import client_context as make_client

    ctx = make_client(BackendTlsConfig(ca=str(pki.ca.cert_path)))
    health = HealthConfig(send=None, timeout=2.0)
    async with recorder(server_context(pki.server)) as tls_backend, recorder() as plain:
        ok = await probe(HOST, tls_backend.port, health, tls=(ctx, "a.example"))
        assert ok.ok, ok.reason
        wrong_name = await probe(HOST, tls_backend.port, health, tls=(ctx, "z.example"))
        assert not wrong_name.ok
        assert wrong_name.reason.startswith("TLS")
        line = HealthConfig(send="ping", expect="ping", timeout=2.0)
        echoed = await probe(HOST, tls_backend.port, line, framing="raw", tls=(ctx, "a.example"))
        assert echoed.ok, echoed.reason
        not_tls = await probe(HOST, plain.port, health, tls=(ctx, "a.example"))
        assert not not_tls.ok


# -- SNI routing -------------------------------------------------------------------------------


async def test_sni_routes_pick_the_service_and_relay_tls_untouched(
    pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> None:
    async with recorder(server_context(pki.server)) as a, recorder(server_context(pki.other)) as c:
        alpha = service_config("alpha", [f"{HOST}:{a.port}"])
        gamma = service_config("gamma", [f"{HOST}:{c.port}"])
        routes = (
            SniRouteConfig("alpha", ("a.example", "*.b.example")),
            SniRouteConfig("gamma", ("c.example",)),
        )
        router = service_config("router", [], sni_routes=routes, client_hello_timeout=0.3)
        async with running(alpha, gamma, router) as [_, _, (svc, port)]:
            ctx = client_context(pki.ca)
            for name, backend in (("a.example", a), ("x.b.example", a), ("c.example", c)):
                before = backend.connections
                reader, writer = await tls_open(port, ctx, name)  # verified end to end
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"
                writer.close()
                assert backend.connections == before + 1
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await tls_open(port, ctx, "nobody.example")
            plain_r, plain_w = await asyncio.open_connection(HOST, port)
            plain_w.write(b"GET / HTTP/1.0\r\n\r\n")
            silent_r, silent_w = await asyncio.open_connection(HOST, port)
            assert await closed_by_peer(plain_r)
            assert await closed_by_peer(silent_r)
            await until(lambda: len(svc.edge_status()["errors"]) == 3)
            status = svc.edge_status()
            assert status["errors"] == {"sni_no_route": 1, "not_tls": 1, "client_hello_timeout": 1}
            assert status["routed"] == {"alpha": 2, "gamma": 1}
            plain_w.close()
            silent_w.close()


async def test_an_unrouted_name_goes_to_the_routers_own_backends(pki: Pki) -> None:
    async with (
        recorder(server_context(pki.server)) as a,
        recorder(server_context(pki.other)) as own,
    ):
        alpha = service_config("alpha", [f"{HOST}:{a.port}"])
        router = service_config(
            "router", [f"{HOST}:{own.port}"], sni_routes=(SniRouteConfig("alpha", ("a.example",)),)
        )
        async with running(alpha, router) as [_, (_, port)]:
            reader, writer = await tls_open(port, client_context(pki.ca), "c.example")
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            writer.close()
            assert (own.connections, a.connections) == (1, 0)


def test_backend_ids_are_kept_apart() -> None:
    """One resuming context per backend: a session is never offered to another server."""
    from balancer.proxy.tls import BackendTls

    tls = BackendTls(BackendTlsConfig(verify=False), "t")
    first = tls.context_for("127.0.0.1:1")
    assert tls.context_for("127.0.0.1:1") is first
    assert tls.context_for("127.0.0.1:2") is not first


async def test_http_mode_keeps_an_upstream_connection_to_one_client_with_send_proxy() -> None:
    """A PROXY header names one client: its upstream connection is never lent to another."""
    seen: list[tuple[str, int]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(65536)
        header = proxyproto.parse(data)
        assert not isinstance(header, int)
        assert header.source is not None
        seen.append(header.source)
        data = data[header.length :]
        try:
            while True:
                while b"\r\n\r\n" not in data:
                    more = await reader.read(65536)
                    if not more:
                        return
                    data += more
                _, data = data.split(b"\r\n\r\n", 1)
                body = f"{header.source[0]} {len(seen)}".encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        finally:
            writer.close()

    server = await asyncio.start_server(serve, HOST, 0)
    backend = server.sockets[0].getsockname()[1]
    try:
        cfg = service_config(
            "web", [f"{HOST}:{backend}"], mode="http", accept_proxy=True, send_proxy="v2"
        )
        async with running(cfg) as [(_, port)]:
            clients = []
            for source in (("198.51.100.1", 1000), ("198.51.100.2", 2000)):
                reader, writer = await asyncio.open_connection(HOST, port)
                writer.write(proxyproto.build_v1(source, (HOST, port)))
                clients.append((source, RawClient(reader, writer)))
            for _ in range(3):
                for source, client in clients:
                    client.send(get("/"))
                    response = await client.response()
                    assert response is not None
                    assert response.body.split()[0] == source[0].encode()
            assert sorted(ip for ip, _ in seen) == ["198.51.100.1", "198.51.100.2"]
    finally:
        server.close()


async def test_message_mode_logs_and_hashes_the_proxy_headers_client() -> None:
    from balancer.core.pool import BackendPool
    from balancer.core.stats import LatencyHistogram
    from balancer.observe.accesslog import AccessLog
    from balancer.proxy.message.service import MessageService
    from tests.support import Numbers

    loop = asyncio.get_running_loop()
    server = await loop.create_server(Numbers, HOST, 0)
    backend = server.sockets[0].getsockname()[1]
    stream = io.BytesIO()
    cfg = service_config("numbers", [f"{HOST}:{backend}"], mode="message", accept_proxy=True)
    svc = MessageService(
        cfg, BackendPool(cfg), histogram=LatencyHistogram(), access_log=AccessLog("numbers", stream)
    )
    svc.set_tls(None, None)
    try:
        _, port = await svc.start()
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(proxyproto.build_v2(FAKE, (HOST, port)) + b"7\n")
        assert await reader.readline() == "It’s instance number 7\n".encode()
        session = next(iter(svc.sessions))
        assert session.peer_key == FAKE[0].encode()  # what hash_key = "source" hashes
        writer.close()
        assert svc.access_log is not None
        svc.access_log.flush()
        assert f"{FAKE[0]}:{FAKE[1]}".encode() in stream.getvalue()
    finally:
        await svc.drain(1.0)
        server.close()


async def test_tcp_mode_hashes_on_the_proxy_headers_client_address() -> None:
    """`hash_key = "source"` keys on the PROXY source: one source, one backend; many
    sources, both backends (the socket's own address, 127.0.0.1, would give one)."""
    async with recorder() as a, recorder() as b:
        cfg = service_config(
            "t",
            [f"{HOST}:{a.port}", f"{HOST}:{b.port}"],
            algorithm="consistent_hash",
            accept_proxy=True,
        )
        async with running(cfg) as [(_, port)]:

            def counts() -> tuple[int, int]:
                return a.connections, b.connections

            before = counts()
            for _ in range(5):
                assert await exchange(port, proxyproto.build_v1(FAKE, (HOST, port))) == b"ping"
            after = counts()
            assert sorted(x - y for x, y in zip(after, before, strict=True)) == [0, 5]
            for i in range(40):
                source = (f"198.51.100.{i + 1}", 1000 + i)
                assert await exchange(port, proxyproto.build_v1(source, (HOST, port))) == b"ping"
            assert a.connections > 0
            assert b.connections > 0
