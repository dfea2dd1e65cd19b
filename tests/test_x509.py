"""The certificate reader against what `openssl x509` says of the same certificates, and on
DER that is cut, changed or random."""

from __future__ import annotations

import base64
import contextlib
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.core.x509 import CertificateInfo, certificates, read_certificate
from tests.tls_support import KeyKind, Pki, default_pki, make_ca, make_cert, make_dated, openssl

SETTINGS = settings(max_examples=300, deadline=None)
RICH_SUBJECT = (
    "/DC=example/C=FR/ST=Ile de France/L=Paris/O=Example, Inc./OU=Ops\\+Dev/OU=a+OU=b"
    "/OU=\\#hash/UID=u1/emailAddress=x@a.example/serialNumber=42/street=1 Main St/CN= a.example "
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return default_pki(tmp_path_factory)


def said_by_openssl(cert: Path | bytes, tmp_path: Path) -> dict[str, str]:
    """notBefore, notAfter, subject, issuer and the SAN line as `openssl x509` prints them."""
    if isinstance(cert, bytes):
        path = tmp_path / "cert.der"
        path.write_bytes(cert)
        args: list[str | Path] = ["-inform", "DER", "-in", path]
    else:
        args = ["-in", cert]
    out = openssl(
        "x509", *args, "-noout", "-startdate", "-enddate", "-subject", "-issuer",
        "-nameopt", "RFC2253", "-ext", "subjectAltName",
    )  # fmt: skip
    fields: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep and key in ("notBefore", "notAfter", "subject", "issuer"):
            fields[key] = value
        elif line.strip().startswith(("DNS:", "IP Address:")):
            fields["san"] = line.strip()
    return fields


def openssl_time(text: str) -> datetime:
    return datetime.strptime(text, "%b %d %H:%M:%S %Y GMT").replace(tzinfo=UTC)


def info_of(path: Path) -> CertificateInfo:
    (der,) = certificates(path.read_text())
    return read_certificate(der)


def assert_as_openssl_says(info: CertificateInfo, said: dict[str, str]) -> None:
    assert info.not_before == openssl_time(said["notBefore"])
    assert info.not_after == openssl_time(said["notAfter"])
    assert info.subject == said["subject"]
    assert info.issuer == said["issuer"]
    dns = [n.removeprefix("DNS:") for n in said.get("san", "").split(", ") if n.startswith("DNS:")]
    assert list(info.dns_names) == dns


@pytest.mark.parametrize("which", ["ca", "server", "other", "rsa", "client", "expired"])
def test_the_pki_certificates_read_as_openssl_says(pki: Pki, which: str, tmp_path: Path) -> None:
    path = getattr(pki, which).cert_path
    info = info_of(path)
    assert_as_openssl_says(info, said_by_openssl(path, tmp_path))
    assert info.not_before.tzinfo is UTC


def test_a_leaf_names_its_sans_and_its_ca(pki: Pki) -> None:
    info = info_of(pki.server.cert_path)
    assert info.dns_names == ("a.example", "*.b.example", "localhost")
    assert (info.subject, info.issuer) == ("CN=a.example", "CN=Test CA")
    assert info_of(pki.client.cert_path).subject == "CN=client-1"
    assert info_of(pki.client.cert_path).dns_names == ()


def test_the_expired_certificate_ended_in_2020(pki: Pki) -> None:
    info = info_of(pki.expired.cert_path)
    assert (info.not_before, info.not_after) == (
        datetime(2020, 1, 1, tzinfo=UTC),
        datetime(2020, 2, 1, tzinfo=UTC),
    )


@pytest.mark.parametrize(
    ("not_before", "not_after"),
    [
        ("19700101000000Z", "20491231235959Z"),  # UTCTime both, a year before 2000
        ("20490101000000Z", "20500101000000Z"),  # GeneralizedTime from 2050
        ("19500101000000Z", "99991231235959Z"),
    ],
)
def test_utc_and_generalized_times(
    pki: Pki, tmp_path: Path, not_before: str, not_after: str
) -> None:
    pair = make_dated(pki.ca, tmp_path, ["t.example"], not_before=not_before, not_after=not_after)
    info = info_of(pair.cert_path)
    assert info.not_before == datetime.strptime(not_before, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC)
    assert info.not_after == datetime.strptime(not_after, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC)
    (der,) = certificates(pair.cert_path.read_text())
    for text in (not_before, not_after):  # the encoding RFC 5280 asks for, by year
        if text < "2050":
            assert b"\x17\x0d" + text[2:].encode() in der
        else:
            assert b"\x18\x0f" + text.encode() in der


def test_rsa_and_ec_leaves_of_a_new_ca(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "Other CA")
    kinds: tuple[KeyKind, ...] = ("ec", "rsa")
    for key in kinds:
        pair = make_cert(ca, tmp_path, [f"{key}.example", "x.example"], key=key)
        info = info_of(pair.cert_path)
        assert info.dns_names == (f"{key}.example", "x.example")
        assert info.issuer == "CN=Other CA"
        assert_as_openssl_says(info, said_by_openssl(pair.cert_path, tmp_path))


@pytest.fixture(scope="module")
def rich(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dir = tmp_path_factory.mktemp("rich")
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", dir / "rich.key", "-out", dir / "rich.crt", "-days", "5",
        "-subj", RICH_SUBJECT, "-multivalue-rdn",
    )  # fmt: skip
    return dir / "rich.crt"


def test_a_rich_subject_reads_as_openssl_says(rich: Path, tmp_path: Path) -> None:
    info = info_of(rich)
    assert_as_openssl_says(info, said_by_openssl(rich, tmp_path))
    assert info.subject == (
        "CN=\\ a.example\\ ,street=1 Main St,serialNumber=42,emailAddress=x@a.example,UID=u1,"
        "OU=\\#hash,OU=b+OU=a,OU=Ops\\+Dev,O=Example\\, Inc.,L=Paris,ST=Ile de France,C=FR,"
        "DC=example"
    )


def test_an_attribute_of_another_type_is_its_oid_and_hex(rich: Path, tmp_path: Path) -> None:
    (der,) = certificates(rich.read_text())
    cn = bytes.fromhex("0603550403")  # the subject's CN is the last one
    at = der.rindex(cn)
    changed = der[:at] + bytes.fromhex("06032a0304") + der[at + len(cn) :]  # 1.2.3.4
    info = read_certificate(changed)
    assert info.subject.startswith("1.2.3.4=#0C0B2061")
    assert info.subject == said_by_openssl(changed, tmp_path)["subject"]


def test_certificates_of_a_pem_chain_skip_other_blocks(pki: Pki, tmp_path: Path) -> None:
    text = (
        pki.server.key_path.read_text()
        + pki.server.cert_path.read_text()
        + "some words\n"
        + pki.ca.cert_path.read_text()
    )
    ders = certificates(text)
    expected = [
        openssl_der(pki.server.cert_path, tmp_path),
        openssl_der(pki.ca.cert_path, tmp_path),
    ]
    assert ders == expected
    assert certificates(pki.server.key_path.read_text()) == []
    assert certificates("") == []


def openssl_der(path: Path, tmp_path: Path) -> bytes:
    out = tmp_path / (path.name + ".der")
    openssl("x509", "-in", path, "-outform", "DER", "-out", out)
    return out.read_bytes()


def test_a_pem_block_that_is_not_base64_or_not_ended_is_refused(pki: Pki) -> None:
    text = pki.server.cert_path.read_text()
    with pytest.raises(ValueError, match="not base64"):
        certificates(text.replace("\n", "\n!", 2))
    with pytest.raises(ValueError, match="no END"):
        certificates(text.split("-----END")[0])
    with pytest.raises(ValueError, match="no END"):
        certificates(text + "-----BEGIN CERTIFICATE-----\nAAAA\n")


def test_every_cut_of_a_certificate_is_refused(pki: Pki) -> None:
    (der,) = certificates(pki.server.cert_path.read_text())
    for n in range(len(der)):
        with pytest.raises(ValueError, match=r"\S"):
            read_certificate(der[:n])
    with pytest.raises(ValueError, match="one DER SEQUENCE"):
        read_certificate(der + b"\x00")


@pytest.mark.parametrize(
    ("der", "message"),
    [
        (b"\x30\x80\x00\x00", "indefinite"),
        (b"\x3f\x01\x00", "multi-byte DER tag"),
        (b"\x30\x85\x00\x00\x00\x00\x01", "length of 5 bytes"),
        (b"\x30\x82\x00", "length of 2 bytes"),
        (b"\x30\x03\x02\x01\x00", "tbsCertificate"),
        (b"\x30", "cut short"),
    ],
)
def test_der_framing_errors_say_what_was_wrong(der: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_certificate(der)


def test_a_time_that_is_not_a_date_is_refused(pki: Pki) -> None:
    (der,) = certificates(pki.expired.cert_path.read_text())
    start = der.index(b"200101000000Z")  # the notBefore, a UTCTime
    with pytest.raises(ValueError, match="notBefore: 201301000000Z is not a date"):
        read_certificate(der[:start] + b"201301000000Z" + der[start + 13 :])
    with pytest.raises(ValueError, match="notBefore: not a UTCTime"):
        read_certificate(der[:start] + b"2001010000+0Z" + der[start + 13 :])


# -- hand-built DER


def der(tag: int, *parts: bytes) -> bytes:
    """One DER element; lengths over 127 in the long form."""
    body = b"".join(parts)
    n = len(body)
    size = bytes([n]) if n < 0x80 else bytes([0x82]) + n.to_bytes(2, "big")
    return bytes([tag]) + size + body


def cn_name(value: bytes, oid: bytes = b"\x55\x04\x03") -> bytes:
    return der(0x30, der(0x31, der(0x30, der(0x06, oid), der(0x0C, value))))


def built(
    *,
    validity: bytes = der(0x17, b"250101000000Z") + der(0x18, b"20500101000000Z"),
    subject: bytes = cn_name(b"s"),
    extensions: bytes | None = None,
) -> bytes:
    """A certificate with its fields as given: enough to be read, nothing to verify."""
    tbs = der(0xA0, der(0x02, b"\x02")) + der(0x02, b"\x01") + der(0x30)
    tbs += cn_name(b"i") + der(0x30, validity) + subject + der(0x30)
    if extensions is not None:
        tbs += der(0xA3, extensions)
    return der(0x30, der(0x30, tbs), der(0x30), der(0x03, b"\x00"))


def san(*names: bytes, critical: bool = False) -> bytes:
    flag = der(0x01, b"\xff") if critical else b""
    return der(0x30, der(0x06, b"\x55\x1d\x11"), flag, der(0x04, der(0x30, *names)))


def test_a_hand_built_certificate_reads() -> None:
    info = read_certificate(built(extensions=der(0x30, san(der(0x82, b"a.example")))))
    assert info == CertificateInfo(
        datetime(2025, 1, 1, tzinfo=UTC), datetime(2050, 1, 1, tzinfo=UTC), "CN=s",
        ("a.example",), "CN=i",
    )  # fmt: skip


def test_san_dns_names_only_of_the_san_extension() -> None:
    other = der(0x30, der(0x06, b"\x55\x1d\x12"), der(0x04, der(0x30, der(0x82, b"no"))))
    names = san(der(0x87, b"\x7f\x00\x00\x01"), der(0x82, b"b"), der(0x81, b"m@x"), critical=True)
    info = read_certificate(built(extensions=der(0x30, other, names)))
    assert info.dns_names == ("b",)


@pytest.mark.parametrize(
    ("certificate", "message"),
    [
        (built(validity=der(0x17, b"250101000000Z") * 3), "after notAfter"),
        (built(extensions=der(0x30, san()) + b"\x00"), "after the extensions"),
        (built(extensions=der(0x30, san(der(0x82, b"\xc3\xa9")))), "not ASCII"),
        (built(subject=cn_name(b"\xff")), "not utf-8"),
        (built(validity=der(0x17, b"250101000000") + der(0x17, b"250101000000Z")), "notBefore"),
        (built(validity=der(0x18, b"250101000000Z") * 2), "notBefore"),
        (built(subject=der(0x30, der(0x30))), "relative name"),
        (built(extensions=der(0x30, der(0x30, der(0x06, b"\x55\x1d\x11")))), "extension value"),
    ],
)
def test_hand_built_certificates_that_break_a_rule(certificate: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_certificate(certificate)


@pytest.mark.parametrize(
    ("oid", "dotted"),
    [(b"\x2a\x03\x04", "1.2.3.4"), (b"\x88\x37", "2.999"), (b"\x81\x00\x01", "2.48.1")],
)
def test_an_unknown_attribute_type_is_its_dotted_oid(oid: bytes, dotted: str) -> None:
    info = read_certificate(built(subject=cn_name(b"v", oid)))
    assert info.subject == f"{dotted}=#0C0176"


def test_a_cut_object_identifier_is_refused() -> None:
    with pytest.raises(ValueError, match="object identifier"):
        read_certificate(built(subject=cn_name(b"v", b"\x2a\x83")))


def test_values_are_escaped_as_rfc_4514_says() -> None:
    value = b'#a,b+c"d\\e<f>g;h\x01 '
    info = read_certificate(built(subject=cn_name(value)))
    assert info.subject == 'CN=\\#a\\,b\\+c\\"d\\\\e\\<f\\>g\\;h\\01\\ '


# -- properties


@SETTINGS
@given(st.binary(max_size=400))
def test_property_random_bytes_raise_value_error_only(data: bytes) -> None:
    for candidate in (data, b"\x30\x82" + len(data).to_bytes(2, "big") + data):
        with contextlib.suppress(ValueError):
            read_certificate(candidate)


@pytest.fixture(scope="module")
def server_der(pki: Pki) -> bytes:
    return certificates(pki.server.cert_path.read_text())[0]


@SETTINGS
@given(data=st.data())
def test_property_a_changed_certificate_reads_or_raises_value_error(
    server_der: bytes, data: st.DataObject
) -> None:
    der = bytearray(server_der)
    for _ in range(data.draw(st.integers(1, 4))):
        der[data.draw(st.integers(0, len(der) - 1))] = data.draw(st.integers(0, 255))
    try:
        info = read_certificate(bytes(der))
    except ValueError:
        return
    assert info.not_after.tzinfo is UTC


@SETTINGS
@given(st.text(max_size=200), st.binary(max_size=100))
def test_property_any_pem_text_gives_certificates_or_value_error(text: str, body: bytes) -> None:
    for pem in (
        text,
        f"-----BEGIN CERTIFICATE-----\n{base64.b64encode(body).decode()}\n"
        "-----END CERTIFICATE-----\n" + text,
    ):
        with contextlib.suppress(ValueError):
            certificates(pem)
