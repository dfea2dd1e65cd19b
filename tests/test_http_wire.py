"""The HTTP/1.1 readers: messages come out the same however their bytes are cut, and the
framing of HEAD, 204, 304, 1xx, chunked, pipelined and upgraded messages."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.core.http import writer
from balancer.core.http.wire import (
    HEAD_PIECE,
    End,
    Event,
    Head,
    Headers,
    HttpError,
    RequestReader,
    ResponseReader,
    Upgrade,
)
from tests.http_wire_support import feed_requests, keys, messages, pieces, request

TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
names = st.text(TOKEN, min_size=1, max_size=12).map(lambda s: b"X-" + s.encode())
# a field value as llhttp hands it on: visible characters, inner spaces, no edge whitespace
values = st.from_regex(r"\A([!-~]([ !-~]{0,20}[!-~])?)?\Z").map(str.encode)
fields = st.lists(st.tuples(names, values), max_size=6)
targets = st.from_regex(r"\A/[A-Za-z0-9/._~%?=&-]{0,30}\Z").map(str.encode)
methods = st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"])
bodies = st.binary(min_size=1, max_size=300)
cut_lists = st.lists(st.integers(min_value=0, max_value=10_000), max_size=12)
SETTINGS = settings(max_examples=150, deadline=None)


@dataclass
class Sent:
    """One message as the test wrote it, and what the reader must report of it."""

    data: bytes
    first: tuple[bytes, bytes] | int
    headers: Headers
    body: bytes
    trailers: Headers
    interim: bool = False


@st.composite
def sent_requests(draw: st.DrawFn) -> Sent:
    method, target, extra = draw(methods), draw(targets), draw(fields)
    headers: Headers = [(b"Host", b"h.test"), *extra]
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    body, trailers, data = b"", [], b""
    if framing == "length":
        body = draw(bodies)
        headers.append((b"Content-Length", str(len(body)).encode()))
        data = body
    elif framing == "chunked":
        parts = draw(st.lists(bodies, min_size=0, max_size=4))
        trailers = draw(fields)
        headers.append((b"Transfer-Encoding", b"chunked"))
        body = b"".join(parts)
        data = b"".join(writer.chunk(p) for p in parts) + writer.last_chunk(trailers)
    data = writer.request_head(method, target, headers) + data
    return Sent(data, (method, target), headers, body, trailers)


def check_requests(sent: list[Sent], events: list[Event]) -> None:
    found, rest = messages(events)
    assert rest is None
    assert len(found) == len(sent)
    for want, got in zip(sent, found, strict=True):
        assert (got.head.method, got.head.target) == want.first
        assert got.head.headers == want.headers
        assert got.body == want.body
        assert got.trailers == want.trailers
        assert got.ended


@SETTINGS
@given(st.lists(sent_requests(), min_size=1, max_size=4), cut_lists)
def test_requests_read_the_same_whole_or_cut_anywhere(sent: list[Sent], cuts: list[int]) -> None:
    stream = b"".join(s.data for s in sent)
    whole = feed_requests([stream])
    check_requests(sent, whole)
    assert keys(feed_requests(pieces(stream, cuts))) == keys(whole)


@settings(max_examples=25, deadline=None)
@given(st.lists(sent_requests(), min_size=1, max_size=3))
def test_requests_read_the_same_fed_byte_by_byte(sent: list[Sent]) -> None:
    stream = b"".join(s.data for s in sent)
    events = feed_requests([stream[i : i + 1] for i in range(len(stream))])
    check_requests(sent, events)


@st.composite
def sent_responses(draw: st.DrawFn) -> tuple[bytes, Sent]:
    """(the method of the request answered, the response)."""
    kind = draw(st.sampled_from(["length", "chunked", "head", "204", "304", "interim"]))
    extra = draw(fields)
    status, method, body, trailers, data = 200, draw(methods), b"", [], b""
    headers: Headers = list(extra)
    interim = b""
    if kind in ("length", "interim"):
        body = draw(bodies)
        headers.append((b"Content-Length", str(len(body)).encode()))
        data = body
        if kind == "interim":
            interim = writer.response_head(100, b"Continue", []) + writer.response_head(
                103, b"Early Hints", [(b"Link", b"</a.css>; rel=preload")]
            )
    elif kind == "chunked":
        parts = draw(st.lists(bodies, max_size=4))
        trailers = draw(fields)
        headers.append((b"Transfer-Encoding", b"chunked"))
        body = b"".join(parts)
        data = b"".join(writer.chunk(p) for p in parts) + writer.last_chunk(trailers)
    elif kind == "head":
        method = b"HEAD"
        headers.append((b"Content-Length", str(draw(st.integers(1, 10**6))).encode()))
    else:
        status = int(kind)
        headers.append((b"Content-Length", b"100"))  # says nothing: these have no body
    data = interim + writer.response_head(status, b"Some Reason", headers) + data
    return method, Sent(data, status, headers, body, trailers, bool(interim))


def read_responses(
    exchanges: list[tuple[bytes, Sent]], cuts: list[int], close_delimited: bytes | None
) -> tuple[list[tuple[object, ...]], ResponseReader]:
    reader = ResponseReader()
    events: list[Event] = []
    for method, sent in exchanges:
        reader.expect(method)
        for piece in pieces(sent.data, cuts):
            events += reader.feed(piece)
        assert not reader.extra
    if close_delimited is not None:
        reader.expect(b"GET")
        for piece in pieces(writer.response_head(200, b"OK", []) + close_delimited, cuts):
            events += reader.feed(piece)
        events += reader.feed_eof()
    found, rest = messages(events)
    assert rest is None
    want: list[tuple[object, ...]] = []
    for _, sent in exchanges:
        if sent.interim:
            want += [(100, b"", (), True), (103, b"", (), True)]
        want.append((sent.first, sent.body, tuple(sent.trailers), True))
    if close_delimited is not None:
        want.append((200, close_delimited, (), True))
    got = [(m.head.status, m.body, tuple(m.trailers), m.ended) for m in found]
    assert got == want
    assert [m.head.headers for m in found if m.head.status >= 200][: len(exchanges)] == [
        s.headers for _, s in exchanges
    ]
    return [m.key() for m in found], reader


@SETTINGS
@given(
    st.lists(sent_responses(), min_size=1, max_size=4),
    cut_lists,
    st.none() | st.binary(max_size=200),
)
def test_responses_read_the_same_whole_or_cut_anywhere(
    exchanges: list[tuple[bytes, Sent]], cuts: list[int], close_delimited: bytes | None
) -> None:
    whole, _ = read_responses(exchanges, [], close_delimited)
    cut, _ = read_responses(exchanges, cuts, close_delimited)
    assert cut == whole
    every, _ = read_responses(exchanges, list(range(0, 10_000, 1)), close_delimited)
    assert every == whole


# -- framing


def test_a_response_to_head_has_no_body_and_the_next_response_parses() -> None:
    reader = ResponseReader()
    reader.expect(b"HEAD")
    events = reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    found, _ = messages(events)
    assert [(m.head.status, m.head.content_length, m.body, m.ended) for m in found] == [
        (200, 100, b"", True)
    ]
    assert not reader.extra
    reader.expect(b"GET")
    found, _ = messages(reader.feed(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno"))
    assert [(m.head.status, m.body, m.ended) for m in found] == [(404, b"no", True)]


@pytest.mark.parametrize(
    "after",
    [b"x", b"HTTP/1.1 200 OK\r\n\r\n", b"0123456789\r\n\r\n"],
    ids=["a byte", "a whole response", "bytes ending in CRLF CRLF"],
)
def test_bytes_after_a_head_response_head_mark_the_connection(after: bytes) -> None:
    reader = ResponseReader()
    reader.expect(b"HEAD")
    events = reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n" + after)
    assert [type(e) for e in events] == [Head, End]
    assert reader.extra


def test_a_head_response_head_cut_just_before_its_end_is_clean() -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
    for cut in range(len(data) - 3, len(data)):
        reader = ResponseReader()
        reader.expect(b"HEAD")
        events = reader.feed(data[:cut]) + reader.feed(data[cut:])
        assert [type(e) for e in events] == [Head, End]
        assert not reader.extra, cut


@pytest.mark.parametrize("status", [204, 304])
def test_204_and_304_end_at_their_head_whatever_their_length_says(status: int) -> None:
    reader = ResponseReader()
    reader.expect(b"GET")
    data = b"HTTP/1.1 %d X\r\nContent-Length: 50\r\n\r\n" % status
    data += b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
    found, _ = messages(reader.feed(data))
    assert [(m.head.status, m.body, m.ended) for m in found] == [
        (status, b"", True),
        (200, b"abc", True),
    ]
    assert reader.feed_eof() == []


def test_interim_responses_come_before_the_final_one() -> None:
    reader = ResponseReader()
    reader.expect(b"POST")
    data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    found, _ = messages(reader.feed(data))
    assert [(m.head.status, m.body, m.ended) for m in found] == [
        (100, b"", True),
        (200, b"ok", True),
    ]


def test_a_close_delimited_response_ends_with_the_connection_only() -> None:
    reader = ResponseReader()
    reader.expect(b"GET")
    found, _ = messages(reader.feed(b"HTTP/1.0 200 OK\r\n\r\nsome") + reader.feed(b" body"))
    assert [(m.body, m.ended) for m in found] == [(b"some body", False)]
    assert [type(e) for e in reader.feed_eof()] == [End]


def test_a_response_cut_short_by_the_connection_is_a_502() -> None:
    reader = ResponseReader()
    reader.expect(b"GET")
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    with pytest.raises(HttpError) as caught:
        reader.feed_eof()
    assert caught.value.status == 502


def test_a_chunked_request_gives_its_body_and_trailers() -> None:
    data = request(
        b"POST",
        headers=[(b"Host", b"h"), (b"Transfer-Encoding", b"chunked")],
        body=b"3\r\nabc\r\n5;ext=1\r\ndefgh\r\n0\r\nX-Sum: 12\r\nX-Other: b\r\n\r\n",
    )
    found, _ = messages(RequestReader().feed(data))
    assert len(found) == 1
    assert found[0].head.chunked
    assert found[0].body == b"abcdefgh"
    assert found[0].trailers == [(b"X-Sum", b"12"), (b"X-Other", b"b")]


def test_pipelined_requests_come_out_in_order() -> None:
    data = (
        request(target=b"/one")
        + request(b"POST", b"/two", [(b"Host", b"h"), (b"Content-Length", b"3")], b"abc")
        + request(b"DELETE", b"/three")
    )
    events = RequestReader().feed(data)
    assert [type(e).__name__ for e in events] == [
        "Head",
        "End",
        "Head",
        "Body",
        "End",
        "Head",
        "End",
    ]
    found, _ = messages(events)
    assert [(m.head.target, m.body) for m in found] == [
        (b"/one", b""),
        (b"/two", b"abc"),
        (b"/three", b""),
    ]


def test_an_upgrade_carries_the_bytes_after_the_head() -> None:
    data = request(
        target=b"/ws",
        headers=[(b"Host", b"h"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")],
        body=b"\x81\x05hello",
    )
    found, rest = messages(RequestReader().feed(data))
    assert found[0].head.upgrade == b"websocket"
    assert rest == b"\x81\x05hello"
    reader = ResponseReader()
    reader.expect(b"GET")
    head = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    found, rest = messages(reader.feed(head + b"frames"))
    assert (found[0].head.status, rest) == (101, b"frames")


def test_an_upgrade_header_without_connection_upgrade_is_no_upgrade() -> None:
    data = request(headers=[(b"Host", b"h"), (b"Upgrade", b"websocket")]) + request(target=b"/b")
    events = RequestReader().feed(data)
    assert not any(isinstance(e, Upgrade) for e in events)
    found, _ = messages(events)
    assert [(m.head.upgrade, m.head.target) for m in found] == [(None, b"/"), (None, b"/b")]


@pytest.mark.parametrize("size", [100, 1000, HEAD_PIECE - 100, 2 * HEAD_PIECE])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_small_heads_with_bodies_in_one_read_are_under_a_small_limit(
    size: int, chunked: bool
) -> None:
    body = b"x" * size
    if chunked:
        framing, sent = (
            (b"Transfer-Encoding", b"chunked"),
            writer.chunk(body) + writer.last_chunk([]),
        )
    else:
        framing, sent = (b"Content-Length", b"%d" % size), body
    data = request(b"POST", headers=[(b"Host", b"h"), framing], body=sent)
    # exact after a Content-Length body; after a chunked one, a head that begins in a piece
    # of it is counted from that piece's start: up to half the limit more
    pad = b"p" * (400 if chunked else 900)
    pipelined = request(headers=[(b"Host", b"h"), (b"X-Pad", pad)]) * 3
    found, _ = messages(feed_requests([data + pipelined + data], max_header_bytes=1024))
    assert [(m.head.method, len(m.body)) for m in found] == [
        (b"POST", size),
        (b"GET", 0),
        (b"GET", 0),
        (b"GET", 0),
        (b"POST", size),
    ]


def test_max_header_bytes_is_the_size_of_the_head() -> None:
    head = request(headers=[(b"Host", b"h"), (b"X-Pad", b"")])
    exact = head[:-4] + b"p" * (1024 - len(head)) + b"\r\n\r\n"
    assert len(exact) == 1024
    assert len(feed_requests([exact], max_header_bytes=1024)) == 2
    with pytest.raises(HttpError) as caught:
        feed_requests([exact[:-4] + b"p\r\n\r\n"], max_header_bytes=1024)
    assert caught.value.status == 431


def test_request_head_fields() -> None:
    data = request(
        b"PUT",
        b"/x?y=1",
        [(b"Host", b"h:81"), (b"Connection", b"close, X-Hop"), (b"Expect", b"100-continue")],
        version=b"1.1",
    )
    (head,) = [e for e in RequestReader().feed(data) if isinstance(e, Head)]
    assert (head.method, head.target, head.host, head.version) == (
        b"PUT",
        b"/x?y=1",
        b"h:81",
        b"1.1",
    )
    assert head.connection == frozenset({b"close", b"x-hop"})
    assert not head.keep_alive
    assert head.expect_continue
    (old,) = [e for e in RequestReader().feed(request(version=b"1.0")) if isinstance(e, Head)]
    assert not old.keep_alive


def test_a_reader_stays_broken_after_an_error() -> None:
    reader = RequestReader()
    with pytest.raises(HttpError):
        reader.feed(request(headers=[(b"Host", b"a"), (b"Host", b"b")]))
    with pytest.raises(HttpError):
        reader.feed(request())


def test_error_response_is_a_whole_response() -> None:
    data = writer.error_response(503, close=True, detail="no backend", retry_after=5)
    reader = ResponseReader()
    reader.expect(b"GET")
    found, _ = messages(reader.feed(data))
    (message,) = found
    assert (message.head.status, message.head.reason) == (503, b"Service Unavailable")
    assert message.body == b"Service Unavailable: no backend\n"
    assert (b"Retry-After", b"5") in message.head.headers
    assert not message.head.keep_alive
    assert message.ended
