"""TLS termination in process: certificates by SNI, versions, ALPN, client certificates, the
connections closed before their mode and why, certificates swapped under live connections,
and every mode behind a TLS listener."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from balancer.config.errors import ConfigError
from balancer.config.load import load_config
from balancer.config.model import CertConfig, TlsConfig
from balancer.proxy.tls import load_service_tls
from tests.http_support import RawClient, echo_backend, get, until
from tests.support import Numbers
from tests.tls_support import Pki, default_pki, make_cert
from tests.tls_test_support import (
    HOST,
    client_context,
    closed_by_peer,
    peer_names,
    recorder,
    running,
    service_config,
    tls_open,
)

pytestmark = pytest.mark.usefixtures("http_clients")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return default_pki(tmp_path_factory)


def tls_of(pki: Pki, **options: object) -> TlsConfig:
    """`other` (c.example) the default, `server` for a.example and *.b.example."""
    certs = (
        CertConfig(str(pki.other.cert_path), str(pki.other.key_path)),
        CertConfig(
            str(pki.server.cert_path), str(pki.server.key_path), ("a.example", "*.b.example")
        ),
    )
    return TlsConfig(certs=certs, **options)  # type: ignore[arg-type]


async def echo_through(port: int, ctx: ssl.SSLContext, name: str | None) -> list[str]:
    reader, writer = await tls_open(port, ctx, name)
    try:
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        return peer_names(writer)
    finally:
        writer.close()


async def test_the_certificate_is_the_one_for_the_clients_server_name(pki: Pki) -> None:
    async with recorder() as backend:
        cfg = service_config("t", [f"{HOST}:{backend.port}"], tls=tls_of(pki))
        async with running(cfg) as [(svc, port)]:
            ctx = client_context(pki.ca)
            ctx.check_hostname = False
            assert "a.example" in await echo_through(port, ctx, "a.example")
            assert "*.b.example" in await echo_through(port, ctx, "x.b.example")
            # one level only, as for a certificate: the default serves deeper names
            assert await echo_through(port, ctx, "y.x.b.example") == ["c.example"]
            assert await echo_through(port, ctx, "unknown.example") == ["c.example"]
            assert await echo_through(port, ctx, None) == ["c.example"]
            assert svc.edge_status()["handshakes"] == 5
            assert svc.edge_status()["errors"] == {}


async def test_alpn_is_negotiated_and_an_old_version_refused_and_counted(pki: Pki) -> None:
    async with recorder() as backend:
        tls = tls_of(pki, alpn=("h2", "http/1.1"), min_version="1.3")
        cfg = service_config("t", [f"{HOST}:{backend.port}"], tls=tls)
        async with running(cfg) as [(svc, port)]:
            _reader, writer = await tls_open(
                port, client_context(pki.ca, alpn=["http/1.1"]), "a.example"
            )
            assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
            assert writer.get_extra_info("ssl_object").version() == "TLSv1.3"
            writer.close()
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await tls_open(port, client_context(pki.ca, version="1.2"), "a.example")
            await until(lambda: svc.edge_status()["errors"].get("tls_version") == 1)
            assert await echo_through(port, client_context(pki.ca), "a.example")


async def test_a_required_client_certificate_is_checked_and_its_absence_counted(pki: Pki) -> None:
    async with recorder() as backend:
        tls = tls_of(pki, client_ca=str(pki.ca.cert_path), verify_client="required")
        cfg = service_config("t", [f"{HOST}:{backend.port}"], tls=tls)
        async with running(cfg) as [(svc, port)]:
            # TLS 1.3: the refusal comes after the client's handshake has ended
            reader, writer = await tls_open(port, client_context(pki.ca), "a.example")
            writer.write(b"ping")
            assert await closed_by_peer(reader)
            await until(lambda: svc.edge_status()["errors"].get("client_cert_rejected") == 1)
            assert backend.connections == 0
            with_cert = client_context(pki.ca, pair=pki.client)
            assert "a.example" in await echo_through(port, with_cert, "a.example")
            # a certificate of another CA is refused the same way
            stranger = client_context(pki.ca, pair=pki.server)
            reader, writer = await tls_open(port, stranger, "a.example")
            writer.write(b"ping")
            assert await closed_by_peer(reader)


async def test_an_optional_client_certificate_may_be_absent(pki: Pki) -> None:
    async with recorder() as backend:
        tls = tls_of(pki, client_ca=str(pki.ca.cert_path), verify_client="optional")
        cfg = service_config("t", [f"{HOST}:{backend.port}"], tls=tls)
        async with running(cfg) as [(_, port)]:
            assert await echo_through(port, client_context(pki.ca), "a.example")
            assert await echo_through(port, client_context(pki.ca, pair=pki.client), "a.example")


async def test_plain_text_and_silent_clients_are_closed_by_reason_and_others_served(
    pki: Pki,
) -> None:
    async with recorder() as backend:
        tls = tls_of(pki, handshake_timeout=0.3)
        cfg = service_config("t", [f"{HOST}:{backend.port}"], tls=tls)
        async with running(cfg) as [(svc, port)]:
            plain_r, plain_w = await asyncio.open_connection(HOST, port)
            plain_w.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            silent_r, silent_w = await asyncio.open_connection(HOST, port)
            half_r, half_w = await asyncio.open_connection(HOST, port)
            half_w.write(b"\x16\x03\x01\x02\x00\x01")  # a record header announcing 512 bytes
            ctx = client_context(pki.ca)
            assert await echo_through(port, ctx, "a.example")  # served meanwhile
            for reader in (plain_r, silent_r, half_r):
                assert await closed_by_peer(reader)
            errors = svc.edge_status()["errors"]
            # tcp mode does not wait for the ClientHello: the handshake's timeout cuts both
            assert errors == {"not_tls": 1, "handshake_timeout": 2}
            assert backend.connections == 1
            for w in (plain_w, silent_w, half_w):
                w.close()


async def test_new_certificates_serve_new_connections_and_leave_live_ones_be(
    pki: Pki, tmp_path: Path
) -> None:
    async with recorder() as backend:
        cfg = service_config("t", [f"{HOST}:{backend.port}"], tls=tls_of(pki))
        async with running(cfg) as [(svc, port)]:
            ctx = client_context(pki.ca)
            reader, writer = await tls_open(port, ctx, "a.example")
            fresh = make_cert(pki.ca, tmp_path, ["a.example", "renewed.example"])
            renewed = TlsConfig(certs=(CertConfig(str(fresh.cert_path), str(fresh.key_path)),))
            new_cfg = service_config("t", [f"{HOST}:{backend.port}"], tls=renewed)
            svc.set_tls(*load_service_tls([new_cfg], "test")["t"])
            assert "renewed.example" in await echo_through(port, ctx, "a.example")
            writer.write(b"still here")  # the connection made before keeps its certificate
            assert await reader.readexactly(10) == b"still here"
            assert "renewed.example" not in peer_names(writer)
            writer.close()
            status = svc.edge_status()["certificates"]
            assert [c["path"] for c in status] == [str(fresh.cert_path)]
            assert 29 < status[0]["days_left"] <= 30


async def test_http_mode_behind_tls_says_https_and_passes_the_verified_subject_only(
    pki: Pki,
) -> None:
    async with echo_backend() as echo:
        tls = tls_of(pki, client_ca=str(pki.ca.cert_path), verify_client="optional")
        cfg = service_config("web", [echo.address], mode="http", tls=tls)
        async with running(cfg) as [(_, port)]:
            spoof = "X-Client-Cert-Subject: CN=admin\r\n"
            for pair, subject in ((pki.client, "CN=client-1"), (None, None)):
                reader, writer = await asyncio.open_connection(
                    HOST, port, ssl=client_context(pki.ca, pair=pair), server_hostname="a.example"
                )
                client = RawClient(reader, writer)
                client.send(get("/who", extra=spoof))
                response = await client.response()
                assert response is not None
                assert response.status == 200
                seen = {k.lower(): v for k, v in response.json()["headers"]}
                assert seen["x-forwarded-proto"] == "https"
                assert seen.get("x-client-cert-subject") == subject


async def test_message_mode_answers_lines_over_tls(pki: Pki) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Numbers, HOST, 0)
    backend = server.sockets[0].getsockname()[1]
    try:
        cfg = service_config("numbers", [f"{HOST}:{backend}"], mode="message", tls=tls_of(pki))
        async with running(cfg) as [(svc, port)]:
            reader, writer = await tls_open(port, client_context(pki.ca), "a.example")
            writer.write(b"1\n2\n")
            assert await reader.readline() == "It’s instance number 1\n".encode()
            assert await reader.readline() == "It’s instance number 2\n".encode()
            writer.close()
            assert svc.edge_status()["handshakes"] == 1
    finally:
        server.close()


async def test_a_plain_http_request_on_an_https_port_gets_a_400_saying_so(pki: Pki) -> None:
    async with echo_backend() as echo:
        cfg = service_config("web", [echo.address], mode="http", tls=tls_of(pki))
        async with running(cfg) as [(svc, port)]:
            client = await RawClient.open(port)
            client.send(get("/"))
            response = await client.response()
            assert response is not None
            assert response.status == 400
            assert b"HTTPS" in response.body
            assert echo.requests == []
            assert svc.edge_status()["errors"] == {"not_tls": 1}


def test_a_private_key_others_can_read_gets_a_warning(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = tmp_path / "open.key"
    key.write_bytes(pki.server.key_path.read_bytes())
    certs = (CertConfig(str(pki.server.cert_path), str(key)),)
    cfg = service_config("t", ["127.0.0.1:1"], tls=TlsConfig(certs=certs))
    for mode in (0o644, 0o640):  # readable by everyone, by its group
        key.chmod(mode)
        with caplog.at_level("WARNING", logger="balancer"):
            load_service_tls([cfg], "test")
        assert f"private key {key} is readable by other users" in caplog.text
        caplog.clear()
    key.chmod(0o600)
    with caplog.at_level("WARNING", logger="balancer"):
        load_service_tls([cfg], "test")
    assert "readable" not in caplog.text


def test_a_bad_certificate_file_is_named_with_its_key_and_nothing_is_built(
    pki: Pki, tmp_path: Path
) -> None:
    garbage = tmp_path / "bad.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    good = service_config("good", ["127.0.0.1:1"], tls=tls_of(pki))
    bad_certs = (CertConfig(str(garbage), str(pki.server.key_path)),)
    bad = service_config("bad", ["127.0.0.1:1"], tls=TlsConfig(certs=bad_certs))
    wrong_key = (CertConfig(str(pki.server.cert_path), str(pki.other.key_path)),)
    mismatch = service_config("mismatch", ["127.0.0.1:1"], tls=TlsConfig(certs=wrong_key))
    with pytest.raises(ConfigError) as info:
        load_service_tls([good, bad, mismatch], "balancer.toml")
    errors = info.value.errors
    assert [e.where for e in errors] == ["services.bad.tls", "services.mismatch.tls"]
    assert str(garbage) in errors[0].message
    assert "KEY_VALUES_MISMATCH" in errors[1].message
    assert all(e.source == "balancer.toml" for e in errors)


def test_the_readmes_tls_example_loads_and_its_certificates_are_built(
    pki: Pki, tmp_path: Path
) -> None:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = text.index("```toml\n", text.index("## TLS and the PROXY protocol")) + len("```toml\n")
    example = text[start : text.index("```", start)]
    files = {
        "internal-ca.pem": pki.ca.cert_path,
        "clients-ca.pem": pki.ca.cert_path,
        "www.pem": pki.other.cert_path,
        "www.key": pki.other.key_path,
        "api.pem": pki.server.cert_path,
        "api.key": pki.server.key_path,
    }
    for name, source in files.items():
        (tmp_path / name).write_bytes(source.read_bytes())
        (tmp_path / name).chmod(0o600)
    path = tmp_path / "readme.toml"
    path.write_text(example.replace("/etc/balancer/", ""))
    web = load_config(path).service("web")
    assert web.accept_proxy
    assert web.tls is not None
    assert web.tls.verify_client == "optional"
    server, backend = load_service_tls([web], str(path))["web"]
    assert server is not None
    assert backend is not None
    assert server.context_for("api.example.com") is not server.default
    assert [c.subject for c in server.certs] == ["CN=c.example", "CN=a.example"]


async def test_a_forged_subject_header_is_removed_without_client_verification(pki: Pki) -> None:
    async with echo_backend() as echo:
        cfg = service_config("web", [echo.address], mode="http", tls=tls_of(pki))
        async with running(cfg) as [(_, port)]:
            reader, writer = await asyncio.open_connection(
                HOST, port, ssl=client_context(pki.ca), server_hostname="a.example"
            )
            client = RawClient(reader, writer)
            client.send(get("/", extra="X-Client-Cert-Subject: CN=admin\r\n"))
            response = await client.response()
            assert response is not None
            seen = {k.lower() for k, _ in response.json()["headers"]}
            assert "x-client-cert-subject" not in seen
