"""The PROXY protocol (HAProxy's spec, versions 1 and 2), read and written without I/O.

How it works: a proxy in front of the balancer (or the balancer in front of a
backend) opens the connection with a header naming the client's address, so
the side receiving it learns who really connected. `parse(data)` is given the
first bytes of a connection, as many as have arrived, and returns either

    a ProxyHeader   the header is complete; `length` bytes of `data` are the
                    header, anything after them is the client's own stream
    an int          the header is not complete: the total number of bytes that
                    must have arrived before parsing can go on (always more than
                    `len(data)`, never more than the header can be)

or raises `ProxyHeaderError`, whose `reason` is "malformed", "too_large" or
"unsupported". Nothing is guessed: bytes that cannot begin a version 1 line
(`PROXY `) or the version 2 signature are refused as soon as they arrive, one
byte is enough, so a client that sends no header is not waited for.

Version 1 is one line of at most 107 bytes ending in CRLF, with single spaces:
`PROXY TCP4 <src> <dst> <sport> <dport>`, the same with TCP6, or `PROXY UNKNOWN`
followed by anything (the connection is the proxy's own: `local`). Addresses
must be valid for their family and are returned normalised (`::1`, not
`0:0::1`); ports are decimal, 0 to 65535, without sign or leading zero.

Version 2 is binary: the 12-byte signature, a version/command byte (LOCAL or
PROXY), a family/transport byte, a big-endian length, then the address block
of the family and TLVs (type, 2-byte length, value) that must fill the rest
exactly. TCP over IPv4 and IPv6 give addresses; UNSPEC and the LOCAL command
give none (`local`); a unix stream socket gives none either but is not local;
UDP is "unsupported". A CRC32C TLV, when present, must match the header.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass

Address = tuple[str, int]

V1_PREFIX = b"PROXY "
V1_MAX = 107
"""Bytes of the longest version 1 line, CRLF included."""
V1_MIN = len(b"PROXY UNKNOWN\r\n")
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
"""The version 1 line of a connection whose addresses are not told."""
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16
"""Bytes of the version 2 header before its address block: signature, command, family, length."""
DEFAULT_MAX_V2 = 2048

ALPN = 0x01
AUTHORITY = 0x02
CRC32C = 0x03
NOOP = 0x04
UNIQUE_ID = 0x05
SSL = 0x20
SSL_VERSION = 0x21
SSL_CN = 0x22
SSL_CIPHER = 0x23
SSL_SIG_ALG = 0x24
SSL_KEY_ALG = 0x25
NETNS = 0x30

CLIENT_SSL = 0x01
CLIENT_CERT_CONN = 0x02
CLIENT_CERT_SESS = 0x04

_LOCAL = 0x20
_PROXY = 0x21
_TCP4 = 0x11
_TCP6 = 0x21
_UNIX = 0x31
_BLOCK = {0x00: 0, _TCP4: 12, _TCP6: 36, _UNIX: 216, 0x12: 12, 0x22: 36, 0x32: 216}
"""Bytes of the address block of each family/transport byte the spec defines."""
_UDP = frozenset({0x12, 0x22, 0x32})

_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_V1_CHARS = {
    b"TCP4 ": frozenset(b"0123456789. "),
    b"TCP6 ": frozenset(b"0123456789abcdefABCDEF:. "),
}
_V1_PROTOCOLS = (b"TCP4 ", b"TCP6 ", b"UNKNOWN")


class ProxyHeaderError(Exception):
    """A PROXY header refused; `reason` is "malformed", "too_large" or "unsupported"."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason} PROXY header: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A PROXY header read: who connected to the proxy, and to which of its addresses."""

    version: int
    local: bool
    """The connection is the proxy's own (a health check): no addresses are given."""
    source: Address | None
    destination: Address | None
    tlvs: tuple[tuple[int, bytes], ...] = ()
    """Every TLV of a version 2 header, in order, unknown types included."""
    length: int = 0
    """Bytes of the header: the client's own stream starts after them."""

    def tlv(self, kind: int) -> bytes | None:
        """The value of the first TLV of type `kind`, or None."""
        for t, value in self.tlvs:
            if t == kind:
                return value
        return None

    @property
    def authority(self) -> str | None:
        """The host name the client asked the proxy for (PP2_TYPE_AUTHORITY)."""
        return _ascii(self.tlv(AUTHORITY))

    @property
    def alpn(self) -> str | None:
        """The application protocol the proxy agreed with the client (PP2_TYPE_ALPN)."""
        return _ascii(self.tlv(ALPN))

    @property
    def unique_id(self) -> bytes | None:
        """The connection's identifier given by the proxy (PP2_TYPE_UNIQUE_ID)."""
        return self.tlv(UNIQUE_ID)


def _ascii(value: bytes | None) -> str | None:
    if value is None:
        return None
    return value.decode("ascii", "replace")


# -- reading


def parse(data: bytes, *, max_v2: int = DEFAULT_MAX_V2) -> ProxyHeader | int:
    """The header at the start of `data`, or the total bytes needed before it can be read."""
    if data[:1] == b"P" or not data:
        if not V1_PREFIX.startswith(data[:6]):
            raise ProxyHeaderError("malformed", "neither a version 1 nor a version 2 header")
        return _parse_v1(data)
    if not V2_SIGNATURE.startswith(data[:12]):
        raise ProxyHeaderError("malformed", "neither a version 1 nor a version 2 header")
    return _parse_v2(data, max_v2)


def _parse_v1(data: bytes) -> ProxyHeader | int:
    end = data.find(b"\r\n", 0, V1_MAX)
    line = data[: end if end >= 0 else V1_MAX]
    # a CR at the end of what arrived may be the start of the CRLF
    inner = line[:-1] if end < 0 and line.endswith(b"\r") else line
    if b"\r" in inner or b"\n" in inner:
        raise ProxyHeaderError("malformed", "CR or LF inside the line")
    rest = inner[6:]
    protocol = next((p for p in _V1_PROTOCOLS if rest.startswith(p) or p.startswith(rest)), None)
    if protocol is None:
        raise ProxyHeaderError("malformed", "unknown protocol in the version 1 line")
    chars = _V1_CHARS.get(protocol)
    if chars is not None and not chars.issuperset(rest[5:]):
        raise ProxyHeaderError("malformed", "a character not of an address or a port")
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError("too_large", f"no CRLF in the first {V1_MAX} bytes")
        return max(len(data) + 1, V1_MIN)
    length = end + 2
    if protocol == b"UNKNOWN":
        return ProxyHeader(1, True, None, None, (), length)
    parts = line.split(b" ")
    if len(parts) != 6:
        raise ProxyHeaderError("malformed", "a TCP line has 6 fields separated by single spaces")
    version = 4 if protocol == b"TCP4 " else 6
    source = _v1_address(parts[2], parts[4], version)
    destination = _v1_address(parts[3], parts[5], version)
    return ProxyHeader(1, False, source, destination, (), length)


def _v1_address(host: bytes, port: bytes, version: int) -> Address:
    if not _PORT.fullmatch(port) or int(port) > 0xFFFF:
        raise ProxyHeaderError("malformed", f"invalid port {port!r}")
    try:
        ip = ipaddress.ip_address(host.decode("ascii"))
    except ValueError:
        raise ProxyHeaderError("malformed", f"invalid address {host!r}") from None
    if ip.version != version:
        raise ProxyHeaderError("malformed", f"{host!r} is not an IPv{version} address")
    return (str(ip), int(port))


def _parse_v2(data: bytes, max_v2: int) -> ProxyHeader | int:
    if len(data) > 12 and data[12] not in (_LOCAL, _PROXY):
        raise ProxyHeaderError("malformed", f"version/command byte {data[12]:#04x}")
    if len(data) > 13 and data[13] not in _BLOCK:
        raise ProxyHeaderError("malformed", f"family/transport byte {data[13]:#04x}")
    if len(data) < V2_FIXED:
        return V2_FIXED
    command, family = data[12], data[13]
    size = int.from_bytes(data[14:16], "big")
    if size > max_v2:
        raise ProxyHeaderError(
            "too_large", f"{size} bytes of addresses and TLVs (at most {max_v2})"
        )
    block = _BLOCK[family]
    if size < block:
        raise ProxyHeaderError("malformed", f"{size} bytes cannot hold the addresses of the family")
    if family in _UDP and command == _PROXY:
        raise ProxyHeaderError("unsupported", "UDP is not proxied")
    total = V2_FIXED + size
    if len(data) < total:
        return total
    header = data[:total]
    tlvs = _tlvs(header, V2_FIXED + block)
    if command == _LOCAL or family == 0x00:
        return ProxyHeader(2, True, None, None, tlvs, total)
    if family == _UNIX:
        return ProxyHeader(2, False, None, None, tlvs, total)
    width = 4 if family == _TCP4 else 16
    at = V2_FIXED
    src = ipaddress.ip_address(header[at : at + width])
    dst = ipaddress.ip_address(header[at + width : at + 2 * width])
    ports = at + 2 * width
    sport = int.from_bytes(header[ports : ports + 2], "big")
    dport = int.from_bytes(header[ports + 2 : ports + 4], "big")
    return ProxyHeader(2, False, (str(src), sport), (str(dst), dport), tlvs, total)


def _tlvs(header: bytes, at: int) -> tuple[tuple[int, bytes], ...]:
    """The TLVs from `at` to the end of `header`, which they must fill; a CRC32C checked."""
    found: list[tuple[int, bytes]] = []
    end = len(header)
    while at < end:
        if end - at < 3:
            raise ProxyHeaderError("malformed", "a TLV cut in its type or length")
        kind = header[at]
        size = int.from_bytes(header[at + 1 : at + 3], "big")
        if at + 3 + size > end:
            raise ProxyHeaderError("malformed", f"TLV {kind:#04x} longer than the header")
        if kind == CRC32C:
            _check_crc(header, at + 3, size)
        found.append((kind, header[at + 3 : at + 3 + size]))
        at += 3 + size
    return tuple(found)


def _check_crc(header: bytes, at: int, size: int) -> None:
    if size != 4:
        raise ProxyHeaderError("malformed", f"a CRC32C TLV of {size} bytes")
    expected = int.from_bytes(header[at : at + 4], "big")
    if crc32c(header[:at] + b"\0\0\0\0" + header[at + 4 :]) != expected:
        raise ProxyHeaderError("malformed", "the CRC32C does not match the header")


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as the PROXY protocol's PP2_TYPE_CRC32C carries it."""
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# -- writing


def _ips(
    source: Address, destination: Address
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    """Both addresses of one family: IPv6, with IPv4 ones mapped, when they differ."""
    ips = [ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])]
    for port in (source[1], destination[1]):
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port} out of 0..65535")
    if ips[0].version != ips[1].version:
        ips = [ipaddress.IPv6Address(f"::ffff:{ip}") if ip.version == 4 else ip for ip in ips]
    # the zone of a link-local IPv6 address is not carried (nor valid in a version 1 line)
    return tuple(ipaddress.ip_address(ip.packed) for ip in ips)


def build_v1(source: Address, destination: Address) -> bytes:
    """The version 1 line telling `source` connected to `destination`."""
    src, dst = _ips(source, destination)
    protocol = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {protocol} {src} {dst} {source[1]} {destination[1]}\r\n".encode()


def build_v2(
    source: Address,
    destination: Address,
    tlvs: tuple[tuple[int, bytes], ...] | list[tuple[int, bytes]] = (),
    *,
    checksum: bool = False,
) -> bytes:
    """The version 2 header (PROXY command, TCP) telling `source` connected to `destination`,
    with `tlvs`; `checksum` adds a CRC32C TLV after them."""
    src, dst = _ips(source, destination)
    family = _TCP4 if src.version == 4 else _TCP6
    block = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    return _v2(_PROXY, family, block, tlvs, checksum)


def build_v2_local() -> bytes:
    """The version 2 header of a connection that is the proxy's own (LOCAL, no addresses)."""
    return _v2(_LOCAL, 0x00, b"", (), False)


def _v2(
    command: int,
    family: int,
    block: bytes,
    tlvs: tuple[tuple[int, bytes], ...] | list[tuple[int, bytes]],
    checksum: bool,
) -> bytes:
    body = block + b"".join(tlv(kind, value) for kind, value in tlvs)
    if checksum:
        body += tlv(CRC32C, b"\0\0\0\0")
    if len(body) > 0xFFFF:
        raise ValueError(f"{len(body)} bytes of addresses and TLVs (at most 65535)")
    header = V2_SIGNATURE + struct.pack("!BBH", command, family, len(body)) + body
    if checksum:
        header = header[:-4] + crc32c(header).to_bytes(4, "big")
    return header


def tlv(kind: int, value: bytes) -> bytes:
    """One TLV as written: type, big-endian length, value."""
    if not 0 <= kind <= 0xFF or len(value) > 0xFFFF:
        raise ValueError(f"TLV type {kind} with {len(value)} bytes cannot be written")
    return struct.pack("!BH", kind, len(value)) + value


def ssl_tlv(
    verified: bool, version: str | None, cn: str | None, cipher: str | None
) -> tuple[int, bytes]:
    """The PP2_TYPE_SSL TLV of a connection that came over TLS.

    `verified`: the client presented a certificate and it was verified (the verify
    field is then 0, else 1). A client certificate counts as presented on this
    connection (PP2_CLIENT_CERT_CONN) when it was verified or `cn`, its subject's
    common name, is given. `version` ("TLSv1.3"), `cn` and `cipher` are sub-TLVs
    when given."""
    client = CLIENT_SSL
    if verified or cn is not None:
        client |= CLIENT_CERT_CONN
    value = struct.pack("!BI", client, 0 if verified else 1)
    if version is not None:
        value += tlv(SSL_VERSION, version.encode("ascii"))
    if cn is not None:
        value += tlv(SSL_CN, cn.encode("utf-8"))
    if cipher is not None:
        value += tlv(SSL_CIPHER, cipher.encode("ascii"))
    return (SSL, value)
