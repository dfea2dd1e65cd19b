"""The PROXY protocol reader and writer: versions 1 and 2, every cut of a header, every way
a header can be refused, and what is written reads back the same."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.core import proxyproto
from balancer.core.proxyproto import (
    V1_MAX,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    build_v1,
    build_v2,
    build_v2_local,
    crc32c,
    parse,
    ssl_tlv,
)

SETTINGS = settings(max_examples=300, deadline=None)
V4_LINE = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"
V6_LINE = b"PROXY TCP6 2001:db8::1 2001:db8:0:0::2 56324 443\r\n"


def refused(data: bytes, reason: str = "malformed", **kwargs: int) -> ProxyHeaderError:
    with pytest.raises(ProxyHeaderError) as info:
        parse(data, **kwargs)
    assert info.value.reason == reason, info.value
    return info.value


def v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", command, family, len(body)) + body


def header(data: bytes, **kwargs: int) -> ProxyHeader:
    result = parse(data, **kwargs)
    assert isinstance(result, ProxyHeader), result
    return result


# -- version 1


def test_v1_tcp4_line_gives_addresses_and_its_length_only() -> None:
    h = header(V4_LINE + b"GET / HTTP/1.1\r\n")
    assert h == ProxyHeader(1, False, ("192.0.2.1", 56324), ("198.51.100.2", 443), (), len(V4_LINE))


def test_v1_tcp6_addresses_are_normalised() -> None:
    h = header(V6_LINE)
    assert (h.source, h.destination) == (("2001:db8::1", 56324), ("2001:db8::2", 443))
    assert h.length == len(V6_LINE)


@pytest.mark.parametrize("line", [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n"])
def test_v1_unknown_is_local_whatever_follows(line: bytes) -> None:
    assert header(line + b"rest") == ProxyHeader(1, True, None, None, (), len(line))


@pytest.mark.parametrize("line", [V4_LINE, V6_LINE, b"PROXY UNKNOWN\r\n"])
def test_v1_every_cut_asks_for_more_never_past_the_line(line: bytes) -> None:
    for n in range(len(line)):
        needed = parse(line[:n])
        assert isinstance(needed, int)
        assert n < needed <= len(line), (n, needed)
    assert header(line).length == len(line)


@pytest.mark.parametrize("port", [b"0", b"1", b"65535"])
def test_v1_port_bounds(port: bytes) -> None:
    h = header(b"PROXY TCP4 1.2.3.4 5.6.7.8 " + port + b" " + port + b"\r\n")
    assert h.source == ("1.2.3.4", int(port))


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",  # two spaces
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",  # a trailing space
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",  # a field missing
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",  # one too many
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",  # leading zero
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n",
        b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 ::1 ::2 1 2\r\n",  # IPv6 under TCP4
        b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",  # IPv4 under TCP6
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",  # a zone
        b"PROXY TCP6 ::g ::1 1 2\r\n",
        b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # bare LF
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n",  # bare CR
        b"PROXY UNKNOWN\rx\r\n",
        b"PROXY UNKNOWN\nx\r\n",
        b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4\r\n",
        b"PROXY \r\n",
        b"proxy UNKNOWN\r\n",
    ],
)
def test_v1_malformed_lines(line: bytes) -> None:
    refused(line)


@pytest.mark.parametrize(
    "start",
    [b"G", b"GET / HTTP/1.1\r\n", b"\x16\x03\x01", b"PROXY\t", b"PROXZ", b"PROXY X", b"\r\n\r\x00"],
)
def test_bytes_that_cannot_start_a_header_are_refused_at_once(start: bytes) -> None:
    refused(start)


@pytest.mark.parametrize("start", [b"PROXY TCP4 1.2.3.x", b"PROXY TCP6 ::1%"])
def test_v1_a_character_of_no_address_is_refused_before_the_crlf(start: bytes) -> None:
    refused(start)


def test_v1_line_of_107_bytes_is_read_and_a_longer_one_is_too_large() -> None:
    assert V1_MAX == 107
    longest = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
    assert len(longest) == 107
    assert header(longest).length == 107
    assert parse(longest[:106]) == 107
    refused(longest[:-2] + b"x\r\n", "too_large")
    refused(longest[:-2] + b"xx", "too_large")  # known without the CRLF


def test_v1_nothing_yet_asks_for_the_shortest_line() -> None:
    assert parse(b"") == len(b"PROXY UNKNOWN\r\n")


def test_build_v1_reads_back() -> None:
    assert build_v1(("192.0.2.1", 56324), ("198.51.100.2", 443)) == V4_LINE
    line = build_v1(("2001:db8::1", 1), ("::1", 2))
    assert line == b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n"


def test_build_v1_maps_ipv4_when_families_differ() -> None:
    h = header(build_v1(("192.0.2.1", 1), ("::1", 2)))
    assert h.source is not None
    assert ipaddress.IPv6Address(h.source[0]).ipv4_mapped == ipaddress.IPv4Address("192.0.2.1")


@pytest.mark.parametrize("build", [build_v1, build_v2])
def test_builders_refuse_a_port_out_of_range(build: object) -> None:
    assert callable(build)
    with pytest.raises(ValueError, match="65536"):
        build(("1.2.3.4", 65536), ("1.2.3.4", 1))
    with pytest.raises(ValueError, match="-1"):
        build(("1.2.3.4", 1), ("1.2.3.4", -1))


# -- version 2


def test_v2_tcp4_with_tlvs() -> None:
    tlvs = ((proxyproto.AUTHORITY, b"a.example"), (proxyproto.ALPN, b"h2"), (0xE0, b"\x01"))
    data = build_v2(("192.0.2.1", 56324), ("198.51.100.2", 443), tlvs)
    assert data[12:14] == b"\x21\x11"
    h = header(data + b"after")
    assert h == ProxyHeader(2, False, ("192.0.2.1", 56324), ("198.51.100.2", 443), tlvs, len(data))
    assert (h.authority, h.alpn, h.unique_id) == ("a.example", "h2", None)


def test_v2_tcp6_and_unique_id() -> None:
    data = build_v2(("2001:db8::1", 1), ("2001:db8::2", 2), [(proxyproto.UNIQUE_ID, b"\x00id")])
    assert data[13] == 0x21
    h = header(data)
    assert (h.source, h.destination, h.unique_id) == (
        ("2001:db8::1", 1),
        ("2001:db8::2", 2),
        b"\0id",
    )
    assert (h.authority, h.alpn) == (None, None)


def test_v2_mixed_families_are_written_as_ipv6_with_mapped_ipv4() -> None:
    h = header(build_v2(("192.0.2.1", 1), ("2001:db8::2", 2)))
    assert h.source is not None
    assert ipaddress.IPv6Address(h.source[0]).ipv4_mapped == ipaddress.IPv4Address("192.0.2.1")


def test_v2_every_cut_asks_for_more_never_past_the_header() -> None:
    data = build_v2(("192.0.2.1", 1), ("192.0.2.2", 2), [(proxyproto.NOOP, b"xyz")])
    for n in range(1, len(data)):
        needed = parse(data[:n])
        assert isinstance(needed, int)
        assert needed == (16 if n < 16 else len(data)), (n, needed)


def test_v2_local_has_no_addresses() -> None:
    data = build_v2_local()
    assert data == V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert header(data) == ProxyHeader(2, True, None, None, (), 16)


def test_v2_local_still_consumes_an_address_block_and_tlvs() -> None:
    body = bytes(range(12)) + b"\x04\x00\x01z"
    h = header(v2(0x20, 0x11, body) + b"after")
    assert (h.local, h.source, h.destination, h.tlvs, h.length) == (
        True, None, None, ((proxyproto.NOOP, b"z"),), 16 + len(body)
    )  # fmt: skip


def test_v2_unspec_family_with_proxy_command_is_local() -> None:
    h = header(v2(0x21, 0x00, b""))
    assert (h.local, h.source) == (True, None)


def test_v2_unix_stream_gives_no_addresses_and_is_not_local() -> None:
    h = header(v2(0x21, 0x31, b"/tmp/a".ljust(108, b"\0") + b"/tmp/b".ljust(108, b"\0")))
    assert (h.local, h.source, h.destination, h.length) == (False, None, None, 16 + 216)
    refused(v2(0x21, 0x31, b"\0" * 215))


@pytest.mark.parametrize(("family", "block"), [(0x12, 12), (0x22, 36), (0x32, 216)])
def test_v2_udp_is_unsupported_but_local_ignores_it(family: int, block: int) -> None:
    refused(v2(0x21, family, b"\0" * block)[:16], "unsupported")
    assert header(v2(0x20, family, b"\0" * block)).local


@pytest.mark.parametrize("byte", [0x22, 0x2F, 0x10, 0x11, 0x31, 0x00, 0x01])
def test_v2_other_versions_or_commands_are_malformed_from_their_byte(byte: int) -> None:
    refused(V2_SIGNATURE + bytes([byte]))


@pytest.mark.parametrize("byte", [0x01, 0x13, 0x10, 0x41, 0x02, 0xFF])
def test_v2_other_families_are_malformed_from_their_byte(byte: int) -> None:
    refused(V2_SIGNATURE + bytes([0x21, byte]))


def test_v2_length_over_the_limit_is_too_large_before_the_body() -> None:
    fixed = V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 2049)
    refused(fixed, "too_large")
    assert parse(fixed, max_v2=2049) == 16 + 2049
    refused(V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 101), "too_large", max_v2=100)


@pytest.mark.parametrize(("family", "block"), [(0x11, 12), (0x21, 36), (0x31, 216)])
def test_v2_length_below_the_address_block_is_malformed(family: int, block: int) -> None:
    refused(v2(0x21, family, b"\0" * (block - 1))[:16])
    assert isinstance(parse(v2(0x21, family, b"\0" * block)), ProxyHeader)


@pytest.mark.parametrize(
    ("tail", "cut"),
    [
        (b"\x04", True),
        (b"\x04\x00", True),
        (b"\x04\x00\x02z", False),
        (b"\x04\x00\x00\x05", True),
        (b"\x04\x00\x01z\x01", True),
        (b"\x04\x00\x01z\x01\x00\x05abcd", False),
    ],
)
def test_v2_tlvs_must_fill_the_header_exactly(tail: bytes, cut: bool) -> None:
    error = refused(v2(0x21, 0x11, bytes(12) + tail))
    assert ("cut in its type or length" in str(error)) == cut


def test_v2_checksum_verifies_and_any_changed_byte_is_refused() -> None:
    data = build_v2(("192.0.2.1", 1), ("192.0.2.2", 2), [(0xE0, b"x")], checksum=True)
    h = header(data)
    assert h.tlvs[-1][0] == proxyproto.CRC32C
    crc_type = len(data) - 7  # changed, it is no checksum any more
    for at in [*range(16, crc_type), *range(crc_type + 1, len(data))]:
        changed = data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]
        with pytest.raises(ProxyHeaderError) as info:
            parse(changed)
        assert info.value.reason == "malformed"


def test_v2_checksum_of_another_size_is_malformed() -> None:
    refused(v2(0x21, 0x11, bytes(12) + b"\x03\x00\x03abc"))
    # five bytes whose first four are the right checksum of the header
    zeroed = v2(0x21, 0x11, bytes(12) + b"\x03\x00\x05" + bytes(5))
    data = zeroed[:-5] + crc32c(zeroed).to_bytes(4, "big") + b"\x00"
    assert "of 5 bytes" in str(refused(data))


def test_crc32c_known_values() -> None:
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA


def test_ssl_tlv_of_a_verified_client_certificate() -> None:
    kind, value = ssl_tlv(True, "TLSv1.3", "client-1", "TLS_AES_128_GCM_SHA256")
    assert kind == proxyproto.SSL == 0x20
    assert value[:5] == b"\x03\x00\x00\x00\x00"  # PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN, verify 0
    assert value[5:] == (
        b"\x21\x00\x07TLSv1.3" + b"\x22\x00\x08client-1" + b"\x23\x00\x16TLS_AES_128_GCM_SHA256"
    )


def test_ssl_tlv_without_a_client_certificate() -> None:
    assert ssl_tlv(False, None, None, None) == (0x20, b"\x01\x00\x00\x00\x01")
    assert ssl_tlv(False, "TLSv1.2", None, None)[1] == b"\x01\x00\x00\x00\x01\x21\x00\x07TLSv1.2"


def test_ssl_tlv_travels_in_a_v2_header() -> None:
    tlv = ssl_tlv(True, "TLSv1.3", None, None)
    assert header(build_v2(("::1", 1), ("::1", 2), [tlv])).tlv(proxyproto.SSL) == tlv[1]


def test_builders_refuse_what_cannot_be_written() -> None:
    with pytest.raises(ValueError, match="65535"):
        build_v2(("1.2.3.4", 1), ("1.2.3.4", 2), [(0xE0, bytes(0xFFF0)), (0xE1, bytes(0x100))])
    with pytest.raises(ValueError, match="TLV type 256"):
        build_v2(("1.2.3.4", 1), ("1.2.3.4", 2), [(256, b"")])


# -- properties

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 0xFFFF)
tlv_lists = st.lists(
    st.tuples(
        st.integers(0, 0xFF).filter(lambda t: t != proxyproto.CRC32C), st.binary(max_size=40)
    ),
    max_size=5,
)


@SETTINGS
@given(st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)), ports, ports)
def test_property_v1_reads_back_what_was_written(
    hosts: tuple[str, str], sport: int, dport: int
) -> None:
    line = build_v1((hosts[0], sport), (hosts[1], dport))
    assert header(line + b"x") == ProxyHeader(
        1, False, (hosts[0], sport), (hosts[1], dport), (), len(line)
    )


@SETTINGS
@given(
    st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)),
    ports,
    ports,
    tlv_lists,
    st.booleans(),
    st.integers(0, 10_000),
)
def test_property_v2_reads_back_what_was_written_at_any_cut(
    hosts: tuple[str, str],
    sport: int,
    dport: int,
    tlvs: list[tuple[int, bytes]],
    checksum: bool,
    cut: int,
) -> None:
    data = build_v2((hosts[0], sport), (hosts[1], dport), tlvs, checksum=checksum)
    h = header(data + b"rest", max_v2=0xFFFF)
    assert (h.source, h.destination, h.length) == ((hosts[0], sport), (hosts[1], dport), len(data))
    assert list(h.tlvs[: len(tlvs)]) == tlvs
    n = cut % len(data)
    needed = parse(data[:n], max_v2=0xFFFF)
    assert isinstance(needed, int)
    assert n < needed <= len(data)


@SETTINGS
@given(st.one_of(st.binary(max_size=200), st.binary(max_size=200).map(lambda b: V2_SIGNATURE + b)))
def test_property_any_bytes_give_a_header_a_need_or_a_header_error(data: bytes) -> None:
    try:
        result = parse(data)
    except ProxyHeaderError as exc:
        reason = exc.reason
        assert reason in ("malformed", "too_large", "unsupported")
        return
    if isinstance(result, int):
        assert result > len(data)
    else:
        assert 0 < result.length <= len(data)


@SETTINGS
@given(st.sampled_from([V4_LINE, V6_LINE]), st.integers(0, 60), st.integers(0, 255))
def test_property_a_changed_v1_byte_never_escapes_the_error(
    line: bytes, at: int, value: int
) -> None:
    at %= len(line)
    data = line[:at] + bytes([value]) + line[at + 1 :]
    try:
        result = parse(data)
    except ProxyHeaderError:
        return
    assert isinstance(result, int) or result.length <= len(data)
