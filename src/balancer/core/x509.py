"""The little of an X.509 certificate the balancer reports, read from PEM.

How it works: `certificates(pem)` returns the DER bytes of each CERTIFICATE
block of a PEM text (keys and other blocks are passed over), and
`read_certificate(der)` walks the DER (tag, length, value, nested) as far as
the fields it reports: the validity, the subject and issuer names, and the
DNS names of the subjectAltName extension. It checks every length against
what holds it and raises ValueError, with what was wrong, on anything else:
it reads a certificate, it does not verify it (no signature, no chain).

Names are written in the style of RFC 4514: the attributes last to first (the
relative names, and the values within a multi-valued one), relative names
joined by ",", values of one joined by "+", each `TYPE=value` with TYPE a
short name (CN, O, OU, C, L, ST, street, DC, UID, serialNumber, emailAddress).
`,+"\\<>;`, a leading "#" or space and a trailing space are escaped with a
backslash, control characters as `\\XX`; other characters are kept as they are.
An attribute of another type is written with its dotted OID, and its value,
like one of a string type not known here, as `#` and the hex of its DER (RFC
4514 says so). This is `openssl x509 -nameopt RFC2253` for names in ASCII.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import UTC, datetime

_SEQUENCE = 0x30
_SET = 0x31
_OID = 0x06
_INTEGER = 0x02
_OCTET_STRING = 0x04
_BOOLEAN = 0x01
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18
_VERSION = 0xA0
_EXTENSIONS = 0xA3
_DNS_NAME = 0x82
_SUBJECT_ALT_NAME = bytes([0x55, 0x1D, 0x11])  # 2.5.29.17

_ATTRIBUTE_NAMES = {
    "2.5.4.3": "CN",
    "2.5.4.5": "serialNumber",
    "2.5.4.6": "C",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.9": "street",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "0.9.2342.19200300.100.1.1": "UID",
    "0.9.2342.19200300.100.1.25": "DC",
    "1.2.840.113549.1.9.1": "emailAddress",
}
_STRING_CODECS = {
    0x0C: "utf-8",  # UTF8String
    0x12: "ascii",  # NumericString
    0x13: "ascii",  # PrintableString
    0x14: "latin-1",  # TeletexString, as everyone reads it
    0x16: "ascii",  # IA5String
    0x1A: "ascii",  # VisibleString
    0x1C: "utf-32-be",  # UniversalString
    0x1E: "utf-16-be",  # BMPString
}
_PEM = re.compile(r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.DOTALL)
_UTC_FORM = re.compile(rb"[0-9]{12}Z")
_GENERALIZED_FORM = re.compile(rb"[0-9]{14}Z")
_ESCAPED = frozenset(',+"\\<>;')


@dataclass(frozen=True)
class CertificateInfo:
    """What the balancer tells of a certificate: its validity, its names, its issuer."""

    not_before: datetime
    """The start of the validity, in UTC."""
    not_after: datetime
    """The end of the validity, in UTC."""
    subject: str
    dns_names: tuple[str, ...]
    """The DNS names of the subjectAltName extension, in order."""
    issuer: str


def certificates(pem: str) -> list[bytes]:
    """The DER of each CERTIFICATE block of `pem`, in order."""
    found = []
    for number, match in enumerate(_PEM.finditer(pem), 1):
        body = "".join(match.group(1).split())
        try:
            found.append(base64.b64decode(body, validate=True))
        except binascii.Error as exc:
            raise ValueError(f"certificate {number} of the PEM text is not base64: {exc}") from None
    if pem.count("-----BEGIN CERTIFICATE-----") != len(found):
        raise ValueError("a CERTIFICATE block of the PEM text has no END line")
    return found


def read_certificate(der: bytes) -> CertificateInfo:
    """The validity, subject, issuer and DNS names of the DER certificate `der`."""
    tag, start, end = _tlv(der, 0, len(der), "the certificate")
    if tag != _SEQUENCE or end != len(der):
        raise ValueError("the certificate is not one DER SEQUENCE")
    at, tbs_end = _expect(der, start, end, _SEQUENCE, "tbsCertificate")
    if _peek(der, at, tbs_end) == _VERSION:
        at = _skip(der, at, tbs_end, "version")
    at = _skip(der, at, tbs_end, "serialNumber", _INTEGER)
    at = _skip(der, at, tbs_end, "signature algorithm", _SEQUENCE)
    issuer, at = _name(der, at, tbs_end, "issuer")
    v_at, v_end = _expect(der, at, tbs_end, _SEQUENCE, "validity")
    at = v_end
    not_before, v_at = _time(der, v_at, v_end, "notBefore")
    not_after, v_at = _time(der, v_at, v_end, "notAfter")
    if v_at != v_end:
        raise ValueError("bytes after notAfter in the validity")
    subject, at = _name(der, at, tbs_end, "subject")
    at = _skip(der, at, tbs_end, "subjectPublicKeyInfo", _SEQUENCE)
    dns_names: tuple[str, ...] = ()
    while at < tbs_end:
        tag, start, stop = _tlv(der, at, tbs_end, "an optional field")
        if tag == _EXTENSIONS:
            dns_names = _extensions(der, start, stop)
        at = stop
    return CertificateInfo(not_before, not_after, subject, dns_names, issuer)


# -- DER


def _tlv(data: bytes, at: int, end: int, what: str) -> tuple[int, int, int]:
    """(tag, start of the value, end of the value) of the element at `at`, inside `end`."""
    if end - at < 2:
        raise ValueError(f"{what}: DER element cut short")
    tag = data[at]
    if tag & 0x1F == 0x1F:
        raise ValueError(f"{what}: a multi-byte DER tag")
    first = data[at + 1]
    at += 2
    if first < 0x80:
        size = first
    elif first == 0x80:
        raise ValueError(f"{what}: an indefinite length, not DER")
    else:
        width = first & 0x7F
        if width > 4 or end - at < width:
            raise ValueError(f"{what}: a DER length of {width} bytes")
        size = int.from_bytes(data[at : at + width], "big")
        at += width
    if size > end - at:
        raise ValueError(f"{what}: {size} bytes announced, {end - at} there")
    return tag, at, at + size


def _expect(data: bytes, at: int, end: int, tag: int, what: str) -> tuple[int, int]:
    found, start, stop = _tlv(data, at, end, what)
    if found != tag:
        raise ValueError(f"{what}: DER tag {found:#04x} where {tag:#04x} was expected")
    return start, stop


def _skip(data: bytes, at: int, end: int, what: str, tag: int | None = None) -> int:
    found, _, stop = _tlv(data, at, end, what)
    if tag is not None and found != tag:
        raise ValueError(f"{what}: DER tag {found:#04x} where {tag:#04x} was expected")
    return stop


def _peek(data: bytes, at: int, end: int) -> int | None:
    return data[at] if at < end else None


def _oid(value: bytes) -> str:
    if not value or value[-1] & 0x80:
        raise ValueError("an object identifier cut short")
    arcs: list[int] = []
    arc = 0
    for byte in value:
        arc = (arc << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(arc)
            arc = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(n) for n in [first, arcs[0] - 40 * first, *arcs[1:]])


# -- names


def _name(data: bytes, at: int, end: int, what: str) -> tuple[str, int]:
    """The RFC 4514 text of the Name at `at`, and where it ends."""
    start, stop = _expect(data, at, end, _SEQUENCE, what)
    relative: list[str] = []
    while start < stop:
        s_at, s_end = _expect(data, start, stop, _SET, f"a relative name of the {what}")
        start = s_end
        values: list[str] = []
        while s_at < s_end:
            a_at, a_end = _expect(data, s_at, s_end, _SEQUENCE, f"an attribute of the {what}")
            s_at = a_end
            o_at, o_end = _expect(data, a_at, a_end, _OID, f"an attribute type of the {what}")
            tag, v_at, v_end = _tlv(data, o_end, a_end, f"an attribute value of the {what}")
            if v_end != a_end:
                raise ValueError(f"bytes after an attribute value of the {what}")
            oid = _oid(data[o_at:o_end])
            name = _ATTRIBUTE_NAMES.get(oid)
            codec = _STRING_CODECS.get(tag) if name is not None else None
            if codec is None:
                values.append(f"{name or oid}=#{data[o_end:v_end].hex().upper()}")
            else:
                values.append(f"{name}={_text(data[v_at:v_end], codec)}")
        relative.append("+".join(reversed(values)))
    return ",".join(reversed(relative)), stop


def _text(raw: bytes, codec: str) -> str:
    try:
        return _escape(raw.decode(codec))
    except UnicodeDecodeError:
        raise ValueError(f"a name value that is not {codec}") from None


def _escape(text: str) -> str:
    out = []
    for i, char in enumerate(text):
        if char in _ESCAPED or (char in "# " and i == 0) or (char == " " and i == len(text) - 1):
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\{ord(char):02X}")
        else:
            out.append(char)
    return "".join(out)


# -- validity and extensions


def _time(data: bytes, at: int, end: int, what: str) -> tuple[datetime, int]:
    tag, start, stop = _tlv(data, at, end, what)
    raw = data[start:stop]
    if tag == _UTC_TIME and _UTC_FORM.fullmatch(raw):
        year = int(raw[:2])
        digits = (str(year + (1900 if year >= 50 else 2000)).encode() + raw[2:]).decode()
    elif tag == _GENERALIZED_TIME and _GENERALIZED_FORM.fullmatch(raw):
        digits = raw.decode()
    else:
        raise ValueError(f"{what}: not a UTCTime or GeneralizedTime of the DER form")
    month, day, hour, minute, second = (int(digits[i : i + 2]) for i in range(4, 14, 2))
    try:
        return datetime(int(digits[:4]), month, day, hour, minute, second, tzinfo=UTC), stop
    except ValueError as exc:
        raise ValueError(f"{what}: {raw.decode()} is not a date: {exc}") from None


def _extensions(data: bytes, at: int, end: int) -> tuple[str, ...]:
    """The subjectAltName DNS names of the [3] extensions field."""
    start, stop = _expect(data, at, end, _SEQUENCE, "extensions")
    if stop != end:
        raise ValueError("bytes after the extensions")
    names: tuple[str, ...] = ()
    while start < stop:
        e_at, e_end = _expect(data, start, stop, _SEQUENCE, "an extension")
        start = e_end
        o_at, o_end = _expect(data, e_at, e_end, _OID, "an extension id")
        at = o_end
        if _peek(data, at, e_end) == _BOOLEAN:
            at = _skip(data, at, e_end, "an extension's critical flag")
        v_at, v_end = _expect(data, at, e_end, _OCTET_STRING, "an extension value")
        if v_end != e_end:
            raise ValueError("bytes after an extension value")
        if data[o_at:o_end] == _SUBJECT_ALT_NAME:
            names = _dns_names(data, v_at, v_end)
    return names


def _dns_names(data: bytes, at: int, end: int) -> tuple[str, ...]:
    start, stop = _expect(data, at, end, _SEQUENCE, "subjectAltName")
    if stop != end:
        raise ValueError("bytes after the subjectAltName names")
    names = []
    while start < stop:
        tag, n_at, n_end = _tlv(data, start, stop, "a subjectAltName name")
        start = n_end
        if tag == _DNS_NAME:
            try:
                names.append(data[n_at:n_end].decode("ascii"))
            except UnicodeDecodeError:
                raise ValueError("a subjectAltName DNS name that is not ASCII") from None
    return tuple(names)
