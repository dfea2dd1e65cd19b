"""The test certificates do what other tests take them for: handshakes in memory between
OpenSSL peers (the ssl module on memory BIOs, no socket) trust, refuse and authenticate as
each certificate is meant to."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

import pytest

from tests.tls_support import (
    Pair,
    Pki,
    default_pki,
    make_cert,
    make_self_signed,
    openssl,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return default_pki(tmp_path_factory)


def server_context(pair: Pair, client_ca: Path | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pair.cert_path, pair.key_path)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(client_ca)
    return context


def client_context(ca: Path, pair: Pair | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(ca)
    if pair is not None:
        context.load_cert_chain(pair.cert_path, pair.key_path)
    return context


def handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, hostname: str
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """Both ends after a complete handshake (and one byte sent, which TLS 1.3 needs for the
    server to have judged the client's certificate); the first error of either raised."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = [False, False]
    for _ in range(10):
        for i, end in enumerate((c, s)):
            if not done[i]:
                try:
                    end.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done):
            c.write(b"x")
            s_in.write(c_out.read())
            assert s.read(1) == b"x"
            return c, s
    raise AssertionError("the handshake did not end")


@pytest.mark.parametrize("name", ["a.example", "x.b.example", "localhost", "127.0.0.1"])
def test_the_server_certificate_is_trusted_for_its_names(pki: Pki, name: str) -> None:
    handshake(server_context(pki.server), client_context(pki.ca.cert_path), name)


@pytest.mark.parametrize("name", ["c.example", "b.example", "x.y.b.example"])
def test_the_server_certificate_is_refused_for_other_names(pki: Pki, name: str) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake(server_context(pki.server), client_context(pki.ca.cert_path), name)


def test_the_other_and_rsa_certificates(pki: Pki) -> None:
    handshake(server_context(pki.other), client_context(pki.ca.cert_path), "c.example")
    c, _ = handshake(server_context(pki.rsa), client_context(pki.ca.cert_path), "rsa.example")
    described = openssl("pkey", "-in", pki.rsa.key_path, "-noout", "-text")
    assert "(2048 bit" in described
    assert "modulus:" in described
    assert c.version() == "TLSv1.3"


def test_the_client_certificate_authenticates_as_client_1(pki: Pki) -> None:
    server = server_context(pki.server, client_ca=pki.ca.cert_path)
    _, s = handshake(server, client_context(pki.ca.cert_path, pki.client), "a.example")
    peer = s.getpeercert()
    assert peer is not None
    assert ((("commonName", "client-1"),),) == peer["subject"]


def test_a_server_certificate_cannot_authenticate_a_client(pki: Pki) -> None:
    server = server_context(pki.server, client_ca=pki.ca.cert_path)
    with pytest.raises(ssl.SSLError, match="unsuitable certificate purpose"):
        handshake(server, client_context(pki.ca.cert_path, pki.other), "a.example")


def test_the_expired_certificate_is_refused_as_expired(pki: Pki) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
        handshake(server_context(pki.expired), client_context(pki.ca.cert_path), "expired.example")


def test_a_self_signed_certificate_is_its_own_trust(tmp_path: Path, pki: Pki) -> None:
    pair = make_self_signed(tmp_path, ["self.example"], key="rsa")
    handshake(server_context(pair), client_context(pair.cert_path), "self.example")
    with pytest.raises(ssl.SSLCertVerificationError, match=r"self[- ]signed"):
        handshake(server_context(pair), client_context(pki.ca.cert_path), "self.example")


def test_keys_are_private_files_in_the_temporary_directory(pki: Pki, tmp_path: Path) -> None:
    pair = make_cert(pki.ca, tmp_path, ["k.example"], days=1, cn="Key Test")
    for key in (pki.ca.key_path, pki.server.key_path, pki.client.key_path, pair.key_path):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert pair.key_path.parent == tmp_path
    assert "CN=Key Test" in openssl(
        "x509", "-in", pair.cert_path, "-noout", "-subject", "-nameopt", "RFC2253"
    )


def test_two_certificates_for_the_same_name_do_not_overwrite_each_other(
    pki: Pki, tmp_path: Path
) -> None:
    first = make_cert(pki.ca, tmp_path, ["same.example"])
    second = make_cert(pki.ca, tmp_path, ["same.example"])
    assert first.cert_path != second.cert_path
    assert first.cert_path.read_text() != second.cert_path.read_text()


def test_default_pki_is_made_once_per_session(
    pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> None:
    assert default_pki(tmp_path_factory) is pki
