"""What the HTTP/1.1 readers refuse, and the status each refusal gets: the ways one message
can be read as two (request smuggling, response splitting) and the limits of a head."""

from __future__ import annotations

import pytest

from balancer.core.http.wire import Body, End, HttpError, RequestReader, ResponseReader
from tests.http_wire_support import feed_requests, request

HOST = (b"Host", b"h.test")
CHUNKED = (b"Transfer-Encoding", b"chunked")


def post(*headers: tuple[bytes, bytes], body: bytes = b"", version: bytes = b"1.1") -> bytes:
    return request(b"POST", b"/", [HOST, *headers], body, version)


def refused(data: bytes | list[bytes], **limits: int) -> int:
    """The status of the HttpError that reading `data` raises."""
    with pytest.raises(HttpError) as caught:
        feed_requests([data] if isinstance(data, bytes) else data, **limits)
    return caught.value.status


REQUESTS = {
    "content-length with transfer-encoding": (
        post((b"Content-Length", b"5"), CHUNKED, body=b"0\r\n\r\n"),
        400,
    ),
    "transfer-encoding with content-length": (
        post(CHUNKED, (b"Content-Length", b"5"), body=b"0\r\n\r\n"),
        400,
    ),
    "two content-lengths, same value": (
        post((b"Content-Length", b"3"), (b"Content-Length", b"3"), body=b"abc"),
        400,
    ),
    "two content-lengths, different values": (
        post((b"Content-Length", b"3"), (b"Content-Length", b"30"), body=b"abc"),
        400,
    ),
    "content-length as a list": (post((b"Content-Length", b"3, 3"), body=b"abc"), 400),
    "content-length not a number": (post((b"Content-Length", b"3x"), body=b"abc"), 400),
    "content-length negative": (post((b"Content-Length", b"-3"), body=b"abc"), 400),
    "content-length with a sign": (post((b"Content-Length", b"+3"), body=b"abc"), 400),
    "content-length empty": (post((b"Content-Length", b""), body=b"abc"), 400),
    "content-length overflowing": (post((b"Content-Length", b"9" * 30)), 400),
    "gzip then chunked": (
        post((b"Transfer-Encoding", b"gzip, chunked"), body=b"0\r\n\r\n"),
        501,
    ),
    "transfer-encoding gzip": (post((b"Transfer-Encoding", b"gzip")), 501),
    "transfer-encoding identity": (post((b"Transfer-Encoding", b"identity")), 501),
    "chunked not final": (post((b"Transfer-Encoding", b"chunked, gzip")), 400),
    "chunked twice": (post(CHUNKED, CHUNKED, body=b"0\r\n\r\n"), 400),
    "transfer-encoding on HTTP/1.0": (post(CHUNKED, body=b"0\r\n\r\n", version=b"1.0"), 400),
    "two hosts": (request(headers=[HOST, (b"Host", b"other.test")]), 400),
    "no host on HTTP/1.1": (request(headers=[(b"X-A", b"1")]), 400),
    "obs-fold": (request(headers=[HOST, (b"X-A", b"one\r\n two")]), 400),
    "bare CR in a value": (request(headers=[HOST, (b"X-A", b"one\rtwo")]), 400),
    "bare CR ending a line": (request(headers=[HOST, (b"X-A", b"one\r")]), 400),
    "bare LF ending a header": (request(headers=[HOST, (b"X-A", b"one\nX-B: two")]), 400),
    "bare LF line ends": (b"GET / HTTP/1.1\nHost: h.test\n\n", 400),
    "control character in a name": (request(headers=[HOST, (b"X-\x01A", b"1")]), 400),
    "space in a name": (request(headers=[HOST, (b"X A", b"1")]), 400),
    "space before the colon": (request(headers=[HOST, (b"X-A ", b"1")]), 400),
    "empty name": (request(headers=[HOST, (b"", b"1")]), 400),
    "NUL in a value": (request(headers=[HOST, (b"X-A", b"a\x00b")]), 400),
    "chunk size overflowing": (post(CHUNKED, body=b"1" + b"0" * 16 + b"\r\n"), 400),
    "chunk size negative": (post(CHUNKED, body=b"-1\r\nx\r\n0\r\n\r\n"), 400),
    "chunk size junk": (post(CHUNKED, body=b"zz\r\n"), 400),
    "chunk size with 0x": (post(CHUNKED, body=b"0x3\r\nabc\r\n0\r\n\r\n"), 400),
    "chunk size then a space": (post(CHUNKED, body=b"3 \r\nabc\r\n0\r\n\r\n"), 400),
    "chunk longer than its size": (post(CHUNKED, body=b"3\r\nabcd\r\n0\r\n\r\n"), 400),
    "HTTP/0.9 request line": (b"GET /\r\n\r\n", 505),
    "HTTP/0.9 version": (request(version=b"0.9"), 505),
    "HTTP/2.0 version": (request(version=b"2.0"), 505),
    "HTTP/1.2 version": (request(version=b"1.2"), 400),
    "unknown method": (request(b"BREW"), 400),
    "target without a slash": (request(target=b"index.html"), 400),
}


@pytest.mark.parametrize(("data", "status"), REQUESTS.values(), ids=REQUESTS.keys())
def test_a_smuggling_request_is_refused(data: bytes, status: int) -> None:
    assert refused(data) == status


def test_a_refused_request_is_refused_however_it_is_cut() -> None:
    for name, (data, status) in REQUESTS.items():
        assert refused([data[i : i + 1] for i in range(len(data))]) == status, name


def test_connect_is_not_served() -> None:
    assert refused(request(b"CONNECT", b"h.test:443", [(b"Host", b"h.test:443")])) == 501


PAD = b"x" * 1000


def padded(count: int) -> bytes:
    return request(headers=[HOST, *[(b"X-Pad-%d" % i, PAD) for i in range(count)]])


def test_a_head_over_max_header_bytes_gets_431() -> None:
    assert refused(padded(20)) == 431
    assert len(feed_requests([padded(14)])) == 2  # 16 KiB by default


def test_a_head_over_max_header_bytes_in_small_pieces_gets_431() -> None:
    data = padded(20)
    assert refused([data[i : i + 7] for i in range(0, len(data), 7)]) == 431


def test_a_head_that_never_ends_gets_431_before_it_ends() -> None:
    reader = RequestReader(max_header_bytes=2048)
    start = b"GET / HTTP/1.1\r\nHost: h\r\nX-Long: "
    assert reader.feed(start) == []
    for _ in range((2048 - len(start)) // 100):
        assert reader.feed(b"y" * 100) == []
    with pytest.raises(HttpError) as caught:
        reader.feed(b"y" * 100)
    assert caught.value.status == 431


@pytest.mark.parametrize(
    "first",
    [
        post((b"Content-Length", b"5000"), body=b"b" * 5000),
        post(CHUNKED, body=b"1388\r\n" + b"b" * 5000 + b"\r\n0\r\n\r\n"),
    ],
    ids=["content-length", "chunked"],
)
def test_a_head_after_a_body_in_the_same_read_is_held_to_the_limit(first: bytes) -> None:
    assert refused(first + padded(20)) == 431
    assert refused([first + padded(20)[:9000], padded(20)[9000:]]) == 431


def test_more_than_max_headers_gets_431() -> None:
    many = request(headers=[HOST, *[(b"X-%d" % i, b"1") for i in range(10)]])
    assert refused(many, max_headers=10) == 431
    assert len(feed_requests([many], max_headers=11)) == 2


def test_more_than_max_headers_trailers_is_refused() -> None:
    trailers = b"".join(b"X-%d: 1\r\n" % i for i in range(11))
    assert refused(post(CHUNKED, body=b"0\r\n" + trailers + b"\r\n"), max_headers=10) == 400


def response(*headers: tuple[bytes, bytes], body: bytes = b"", version: bytes = b"1.1") -> bytes:
    lines = [b"HTTP/" + version + b" 200 OK", *[n + b": " + v for n, v in headers]]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


RESPONSES = {
    "content-length with transfer-encoding": response((b"Content-Length", b"3"), CHUNKED),
    "two content-lengths": response((b"Content-Length", b"3"), (b"Content-Length", b"4")),
    "content-length not a number": response((b"Content-Length", b"three")),
    "transfer-encoding gzip": response((b"Transfer-Encoding", b"gzip")),
    "chunked not final": response((b"Transfer-Encoding", b"chunked, gzip")),
    "transfer-encoding on HTTP/1.0": response(CHUNKED, version=b"1.0"),
    "obs-fold": response((b"X-A", b"one\r\n two")),
    "bare LF": response((b"X-A", b"one\nX-B: two")),
    "space in a name": response((b"X A", b"1")),
    "chunk size junk": response(CHUNKED, body=b"zz\r\n"),
    "chunk size overflowing": response(CHUNKED, body=b"f" * 17 + b"\r\n"),
    "HTTP/2.0": response(version=b"2.0"),
    "HTTP/0.9 status line": b"HTTP/0.9 200 OK\r\n\r\n",
    "no status line": b"hello\r\n\r\n",
    "header block too large": response(*[(b"X-%d" % i, PAD) for i in range(20)]),
    "too many headers": response(*[(b"X-%d" % i, b"1") for i in range(101)]),
}


@pytest.mark.parametrize("data", RESPONSES.values(), ids=RESPONSES.keys())
def test_a_bad_response_is_a_502(data: bytes) -> None:
    reader = ResponseReader()
    reader.expect(b"GET")
    with pytest.raises(HttpError) as caught:
        reader.feed(data)
    assert caught.value.status == 502


@pytest.mark.parametrize("reader", [RequestReader, ResponseReader])
def test_an_endless_trailer_or_chunk_extension_is_refused_within_the_header_limit(
    reader: type[RequestReader] | type[ResponseReader],
) -> None:
    first = (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        if reader is RequestReader
        else b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    for tail in (b"5\r\nhello\r\n0\r\nX-Trailer: ", b"5;ext="):
        parser = reader(max_header_bytes=1024)
        parser.feed(first + tail)
        fed, refused = 0, None
        while fed < 1_000_000 and refused is None:  # bounded: a broken limit fails, not hangs
            try:
                parser.feed(b"a" * 100)
            except HttpError as exc:
                refused = exc
            fed += 100
        assert refused is not None
        assert refused.status == (400 if reader is RequestReader else 502)
        assert fed <= 2048


def test_many_small_chunks_are_no_framing_abuse() -> None:
    parser = RequestReader(max_header_bytes=1024)
    body = b"".join(b"1\r\nx\r\n" for _ in range(5000)) + b"0\r\n\r\n"
    events = parser.feed(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    assert isinstance(events[-1], End)
    assert b"".join(e.data for e in events if isinstance(e, Body)) == b"x" * 5000
