"""The ClientHello reader on real hellos made by OpenSSL (through the ssl module), cut at every
byte and carried in several records, and on hand-made hellos that break each rule."""

from __future__ import annotations

import ssl
import struct
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.core.clienthello import (
    ClientHello,
    ClientHelloError,
    NotTls,
    parse,
)

SETTINGS = settings(max_examples=300, deadline=None)
TLS12, TLS13 = 0x0303, 0x0304


@cache
def openssl_hello(
    server_name: str | None, alpn: tuple[str, ...] = (), tls12_only: bool = False
) -> bytes:
    """The first flight of an OpenSSL client: its ClientHello records."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if server_name is None:
        context.check_hostname = False
    if alpn:
        context.set_alpn_protocols(list(alpn))
    if tls12_only:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    client = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), False, server_name)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def record(fragment: bytes, content_type: int = 22, version: int = 0x0301) -> bytes:
    return struct.pack("!BHH", content_type, version, len(fragment)) + fragment


def reframe(hello: bytes, sizes: list[int]) -> bytes:
    """The handshake message of the records `hello`, carried in records of `sizes` bytes
    (the last size repeated to the end)."""
    message = hello[5:]
    assert len(message) == int.from_bytes(hello[3:5], "big"), "one record expected"
    out, at, i = b"", 0, 0
    while at < len(message):
        size = sizes[min(i, len(sizes) - 1)]
        out += record(message[at : at + size])
        at, i = at + size, i + 1
    return out


def extension(kind: int, body: bytes) -> bytes:
    return struct.pack("!HH", kind, len(body)) + body


def sni(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(struct.pack("!BH", name_type, len(n)) + n for n in names)
    return extension(0, struct.pack("!H", len(entries)) + entries)


def alpn_ext(*names: bytes) -> bytes:
    entries = b"".join(bytes([len(n)]) + n for n in names)
    return extension(16, struct.pack("!H", len(entries)) + entries)


def hand_hello(
    extensions: bytes | None = b"",
    *,
    session: bytes = b"",
    suites: bytes = b"\x13\x01",
    compression: bytes = b"\x00",
    after: bytes = b"",
) -> bytes:
    """A ClientHello in one record, written field by field."""
    body = struct.pack("!H", TLS12) + bytes(32) + bytes([len(session)]) + session
    body += struct.pack("!H", len(suites)) + suites + bytes([len(compression)]) + compression
    if extensions is not None:
        body += struct.pack("!H", len(extensions)) + extensions
    body += after
    return record(b"\x01" + len(body).to_bytes(3, "big") + body)


def hello(data: bytes, **kwargs: int) -> ClientHello:
    result = parse(data, **kwargs)
    assert isinstance(result, ClientHello), result
    return result


def refused(data: bytes, reason: str = "malformed", **kwargs: int) -> None:
    with pytest.raises(ClientHelloError) as info:
        parse(data, **kwargs)
    assert info.value.reason == reason, info.value


REAL = [
    ("a.example", ("h2", "http/1.1"), False),
    ("a.example", (), False),
    (None, ("http/1.1",), False),
    (None, (), False),
    ("a.example", ("h2", "http/1.1"), True),
    (None, (), True),
]


# -- real hellos


@pytest.mark.parametrize(("name", "alpn", "tls12_only"), REAL)
def test_openssl_hello_is_read(name: str | None, alpn: tuple[str, ...], tls12_only: bool) -> None:
    data = openssl_hello(name, alpn, tls12_only)
    h = hello(data + b"\x17\x03\x03")
    assert (h.server_name, h.alpn, h.length) == (name, alpn, len(data))
    assert h.versions == ((TLS12,) if tls12_only else (TLS13, TLS12))


def test_server_name_is_lower_case_without_the_trailing_dot() -> None:
    assert hello(openssl_hello("WWW.A.Example.")).server_name == "www.a.example"


@pytest.mark.parametrize(("name", "alpn", "tls12_only"), REAL)
def test_every_cut_of_a_real_hello_asks_for_more_and_never_less(
    name: str | None, alpn: tuple[str, ...], tls12_only: bool
) -> None:
    for data in (openssl_hello(name, alpn, tls12_only), reframe(openssl_hello(name), [50])):
        before = 0
        for n in range(len(data)):
            needed = parse(data[:n])
            assert isinstance(needed, int)
            assert n < needed <= len(data), (n, needed)
            assert needed >= before
            before = needed


@pytest.mark.parametrize("sizes", [[1], [3], [4, 1], [100], [5, 200, 7], [511]])
def test_a_hello_over_several_records_reads_the_same(sizes: list[int]) -> None:
    data = reframe(openssl_hello("a.example", ("h2",)), sizes)
    h = hello(data + b"\x14\x03\x03\x00\x01\x01")
    assert (h.server_name, h.alpn, h.versions) == ("a.example", ("h2",), (TLS13, TLS12))
    assert h.length == len(data)


def test_the_need_counts_the_rest_of_a_message_known_to_span_records() -> None:
    data = reframe(openssl_hello("a.example"), [10])
    message = len(openssl_hello("a.example")) - 5
    assert parse(data[:15]) == 15 + 5 + (message - 10)


@pytest.mark.parametrize("content_type", [20, 21, 23, 24])
def test_a_record_of_another_type_inside_the_hello_is_malformed(content_type: int) -> None:
    data = reframe(openssl_hello("a.example"), [100])
    refused(data[:105] + bytes([content_type]))
    refused(data[:105] + b"\x16\x02")


def test_limit_bounds_what_is_waited_for() -> None:
    data = openssl_hello("a.example")
    assert hello(data, limit=len(data)).length == len(data)
    refused(data[:5], "too_large", limit=len(data) - 1)
    many = reframe(data, [100])
    assert parse(many[:105], limit=len(many)) == 105 + 5 + len(data) - 5 - 100
    refused(many[:105], "too_large", limit=105 + len(data) - 100 - 1)


# -- not TLS


@pytest.mark.parametrize(
    "data",
    [
        b"G",
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"\x80\x2e\x01\x03\x01\x00\x15",  # an SSLv2 ClientHello
        b"\x16\x02",
        b"\x16\x04\x00",
        b"\x15\x03\x03\x00\x02\x02\x28",  # an alert
        b"\x17\x03\x03",
    ],
)
def test_what_is_not_a_handshake_record_is_not_tls(data: bytes) -> None:
    with pytest.raises(NotTls):
        parse(data)


@pytest.mark.parametrize("data", [b"", b"\x16", b"\x16\x03", b"\x16\x03\x01\x00"])
def test_the_start_of_a_record_asks_for_its_header(data: bytes) -> None:
    assert parse(data) == 9  # a record header and a handshake header at least


# -- hand-made hellos


def test_a_hand_made_hello_is_read() -> None:
    ext = sni(b"a.example") + alpn_ext(b"h2", b"\x0a\xff") + extension(43, b"\x04\x03\x04\x03\x03")
    h = hello(hand_hello(ext))
    assert (h.server_name, h.alpn, h.versions) == ("a.example", ("h2", "\n\xff"), (TLS13, TLS12))


def test_a_hello_without_extensions_gives_its_legacy_version() -> None:
    h = hello(hand_hello(None))
    assert (h.server_name, h.alpn, h.versions) == (None, (), (TLS12,))


def test_a_server_name_of_another_type_only_is_no_server_name() -> None:
    assert hello(hand_hello(sni(b"x", name_type=7))).server_name is None
    assert hello(hand_hello(sni(b"a.example"))).server_name == "a.example"


@pytest.mark.parametrize(
    "name",
    [
        b"",
        b".",
        b"a..example",
        b".a.example",
        b"a example",
        b"a/example",
        b"a:443",
        b"caf\xc3\xa9.example",
        b"a\x00.example",
        b"x" * 64 + b".example",
        (b"a" * 60 + b".") * 4 + b"abcdefghij",  # 254 bytes
    ],
)
def test_a_server_name_that_is_not_a_host_name_is_malformed(name: bytes) -> None:
    refused(hand_hello(sni(name)))


def test_the_longest_host_name_is_read() -> None:
    name = (b"a" * 62 + b".") * 4 + b"b"  # 253 bytes
    assert hello(hand_hello(sni(name.upper() + b"."))).server_name == name.decode()
    assert hello(hand_hello(sni(b"x" * 63 + b".example"))).server_name == "x" * 63 + ".example"


@pytest.mark.parametrize(
    "data",
    [
        hand_hello(sni(b"a.example", b"b.example")),  # two host names
        hand_hello(sni(b"a.example") + sni(b"a.example")),  # the extension twice
        hand_hello(extension(0, b"\x00\x06\x00\x00\x02ab")),  # a list longer than its extension
        hand_hello(extension(0, b"\x00\x05\x00\x00\x02abc" + b"x")),  # bytes after the list
        hand_hello(extension(0, b"\x00\x04\x00\x00\x05ab")),  # a name longer than the list
        hand_hello(extension(16, b"\x00\x00")),  # an empty ALPN list
        hand_hello(alpn_ext(b"h2", b"")),  # an empty protocol name
        hand_hello(extension(16, b"\x00\x03\x05h2")),
        hand_hello(extension(16, b"\x00\x03\x02h2x")),  # bytes after the ALPN list
        hand_hello(extension(43, b"\x03\x03\x04\x03")),  # an odd length
        hand_hello(extension(43, b"\x00")),
        hand_hello(extension(43, b"\x02\x03\x04\x00")),
        hand_hello(extension(43, b"")),
        hand_hello(b"\x00\x2b\x00\x05\x02\x03"),  # an extension longer than the list
        hand_hello(b"\x00"),  # half an extension type
        hand_hello(b"", after=b"\x00"),  # bytes after the extensions
        hand_hello(None, after=b"\x00"),  # one byte of an extensions length
        hand_hello(suites=b""),
        hand_hello(suites=b"\x13\x01\x13"),
        hand_hello(compression=b""),
        hand_hello(session=bytes(33)),
    ],
)
def test_hand_made_hellos_that_break_a_rule_are_malformed(data: bytes) -> None:
    refused(data)


def test_each_hand_made_field_is_read_at_its_bounds() -> None:
    assert hello(hand_hello(b"", session=bytes(32))).versions == (TLS12,)
    assert hello(hand_hello(b"", suites=bytes(2 * 100))).length > 0


@pytest.mark.parametrize(
    "data",
    [
        record(b"\x02\x00\x00\x04abcd"),  # a ServerHello
        record(b"\x02"),  # known from its first byte
        record(b"\x01\x00\x00\x00"),  # an empty ClientHello
        record(b"\x01\x00\x00\x01\x03\x03"),  # bytes after the message in its record
        record(b"\x01\x00\x00\x02\x03\x03"),  # a ClientHello of its version only
        hand_hello(b"")[:3] + b"\x00\x00",  # a record of no bytes
        hand_hello(b"")[:3] + b"\x40\x01",  # a record over 2^14 bytes
    ],
)
def test_records_and_handshake_framing_that_break_a_rule_are_malformed(data: bytes) -> None:
    refused(data)


def test_bytes_after_the_hello_in_its_record_are_malformed() -> None:
    data = hand_hello(None)
    assert hello(data).versions == (TLS12,)
    fragment = data[5:] + b"\x00\x00"  # would read as an empty extensions list
    refused(record(fragment))


def test_a_message_announced_past_the_limit_is_too_large_once_its_length_is_read() -> None:
    start = record(b"\x01\x00\x40\x00")  # 16384 bytes announced
    refused(start, "too_large")
    assert parse(start, limit=1 << 20) == len(start) + 5 + 16384


# -- properties


@SETTINGS
@given(st.lists(st.integers(1, 600), min_size=1, max_size=8), st.sampled_from(REAL))
def test_property_any_framing_reads_the_same(
    sizes: list[int], case: tuple[str | None, tuple[str, ...], bool]
) -> None:
    data = reframe(openssl_hello(*case), sizes)
    h = hello(data)
    assert (h.server_name, h.alpn, h.length) == (case[0], case[1], len(data))


def never_escapes(data: bytes, limit: int) -> None:
    try:
        result = parse(data, limit=limit)
    except (NotTls, ClientHelloError):
        return
    if isinstance(result, int):
        assert len(data) < result <= limit
    else:
        assert 0 < result.length <= min(len(data), limit)


@SETTINGS
@given(
    st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(lambda b: b"\x16\x03" + b)),
    st.integers(1, 1 << 15),
)
def test_property_any_bytes_give_a_hello_a_need_or_a_tls_error(data: bytes, limit: int) -> None:
    never_escapes(data, limit)


@SETTINGS
@given(
    st.sampled_from(REAL),
    st.lists(st.tuples(st.integers(0, 1 << 12), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(0, 1 << 12),
    st.sampled_from([16 * 1024, 600, 300]),
)
def test_property_a_changed_real_hello_gives_a_hello_a_need_or_a_tls_error(
    case: tuple[str | None, tuple[str, ...], bool],
    changes: list[tuple[int, int]],
    cut: int,
    limit: int,
) -> None:
    data = bytearray(reframe(openssl_hello(*case), [200]))
    for at, value in changes:
        data[at % len(data)] = value
    never_escapes(bytes(data[: cut % (len(data) + 1)]), limit)
    never_escapes(bytes(data), limit)
