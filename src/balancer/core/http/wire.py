"""HTTP/1.1 messages read from bytes and written back, without I/O.

How it works: `RequestReader` and `ResponseReader` wrap httptools' llhttp
parsers. They are fed bytes as they arrive and return the events those bytes
complete, in order:

    Head        a request or response head, checked (see below)
    Body        a piece of the body, already de-chunked
    End         the message is complete (with its trailers, if any)
    Upgrade     the head was a switch of protocols; `rest` are the bytes after it

A message that breaks the rules raises `HttpError`, whose `status` is what the
proxy answers (400, 431, 501, 505 for requests; 502 for a response). The reader
is then unusable: the connection it reads must be closed. llhttp in its strict
mode (the default) refuses bare CR and LF, obs-fold, invalid tokens and
characters, Content-Length with Transfer-Encoding, duplicate or invalid
Content-Length and bad chunk sizes; the checks of `_check` add what a proxy
must refuse as well: several Host headers, Transfer-Encoding that is not
exactly `chunked` or on HTTP/1.0, versions other than 1.0 and 1.1, and the
header limits, which llhttp does not have.

A response to HEAD has no body whatever its Content-Length says. llhttp cannot
be told so through httptools, so the reader ends the message at the end of its
head itself and starts a fresh parser for the next response.

What the proxy sends on is written by `writer` from what was parsed, never the
bytes received, so the proxy and the peer behind it cannot disagree about
where a message ends.
"""

from __future__ import annotations

from typing import Any

import httptools

Headers = list[tuple[bytes, bytes]]

DEFAULT_MAX_HEADER_BYTES = 16 * 1024
DEFAULT_MAX_HEADERS = 100

_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_NO_BODY_STATUS = (204, 304)
HEAD_PIECE = 4096
"""Bytes of a head fed to llhttp at once: `max_header_bytes` holds to within this."""


class HttpError(Exception):
    """A message the proxy refuses; `status` is the answer it gets (or 502 for a response)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _Stop(Exception):
    """Raised inside a callback to stop llhttp at the end of a head (HEAD responses)."""


class Head:
    """A parsed request or response head; header names keep their case, values are raw."""

    __slots__ = (
        "chunked",
        "connection",
        "content_length",
        "expect_continue",
        "headers",
        "host",
        "keep_alive",
        "method",
        "reason",
        "status",
        "target",
        "upgrade",
        "version",
    )

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.status = 0
        self.reason = b""
        self.version = b"1.1"
        self.headers: Headers = []
        self.host: bytes | None = None
        self.content_length: int | None = None
        self.chunked = False
        self.keep_alive = True
        self.connection: frozenset[bytes] = frozenset()
        """The lower-cased tokens of the Connection header(s)."""
        self.upgrade: bytes | None = None
        self.expect_continue = False

    @property
    def has_body(self) -> bool:
        """The message has a body to read (requests: framed by Content-Length or chunked)."""
        return self.chunked or bool(self.content_length)

    def __repr__(self) -> str:
        first = (
            f"{self.method.decode()} {self.target.decode('latin-1')}"
            if self.method
            else str(self.status)
        )
        return f"<Head {first} HTTP/{self.version.decode()} {len(self.headers)} headers>"


class Body:
    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class End:
    __slots__ = ("trailers",)

    def __init__(self, trailers: Headers) -> None:
        self.trailers = trailers


class Upgrade:
    __slots__ = ("rest",)

    def __init__(self, rest: bytes) -> None:
        self.rest = rest


Event = Head | Body | End | Upgrade


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


class _Reader:
    """What request and response readers share: callbacks, limits and the head checks."""

    status_on_error = 400

    def __init__(self, max_header_bytes: int, max_headers: int) -> None:
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.events: list[Event] = []
        self.head: Head | None = None
        self.in_head = False
        self.head_bytes = 0
        """Bytes of the head being read so far (exact, but for a head that begins in a piece
        of a chunked body: that whole piece, at most half the limit, is counted)."""
        self.tail = b""
        """The last bytes of a head fed so far, to find its end across feeds."""
        self.body_left: int | None = None
        """Bytes of a Content-Length body still to come."""
        self.framing = 0
        """Bytes of a chunked body fed in a row without data coming of them."""
        self.counted = False
        """The piece being fed was counted in `head_bytes`."""
        self.piece_len = 0
        self.trailers: Headers | None = None
        self.broken: HttpError | None = None
        self.parser: Any = None

    # -- llhttp callbacks

    def on_message_begin(self) -> None:
        self.head = Head()
        self.in_head = True
        self.trailers = None
        self.body_left = None
        if not self.counted:  # after a chunked body, somewhere in this piece
            self.head_bytes = self.piece_len

    def on_header(self, name: bytes, value: bytes) -> None:
        trailers = self.trailers
        if trailers is not None:
            if len(trailers) >= self.max_headers:
                raise HttpError(self.status_on_error, f"more than {self.max_headers} trailers")
            trailers.append((name, value))
            return
        head = self.head
        assert head is not None
        headers = head.headers
        if len(headers) >= self.max_headers:
            raise HttpError(self._status(431), f"more than {self.max_headers} header fields")
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        head = self.head
        assert head is not None
        if self.head_bytes > self.max_header_bytes:
            raise HttpError(self._status(431), f"header block over {self.max_header_bytes} bytes")
        self.in_head = False
        self.head_bytes = 0
        self._complete_head(head)
        self.body_left = None if head.chunked else head.content_length
        self.events.append(head)

    def on_body(self, data: bytes) -> None:
        if self.body_left is not None:
            self.body_left -= len(data)
        self.events.append(Body(data))

    def on_chunk_header(self) -> None:
        # llhttp gives no chunk size: headers after a chunk header are the last chunk's
        # trailers (none can come after any other).
        if self.trailers is None:
            self.trailers = []

    def on_message_complete(self) -> None:
        self.events.append(End(self.trailers or []))
        self.trailers = None
        self.head = None

    # -- checks

    def _status(self, request_status: int) -> int:
        """The answer to a message refused: `request_status` for a request, 502 for a response."""
        return request_status if self.status_on_error == 400 else 502

    def _complete_head(self, head: Head) -> None:
        version = self.parser.get_http_version().encode()
        if version not in (b"1.1", b"1.0"):
            raise HttpError(self._status(505), f"HTTP version {version.decode()} is not supported")
        head.version = version
        lengths = 0
        encodings: list[bytes] = []
        connection: list[bytes] = []
        hosts = 0
        for name, value in head.headers:
            lower = name.lower()
            if lower == b"content-length":
                lengths += 1
                head.content_length = int(value)  # llhttp checked it is digits only
            elif lower == b"transfer-encoding":
                encodings += _tokens(value)
            elif lower == b"connection":
                connection += _tokens(value)
            elif lower == b"host":
                hosts += 1
                head.host = value
            elif lower == b"upgrade":
                head.upgrade = value
            elif lower == b"expect":
                head.expect_continue = value.strip().lower() == b"100-continue"
            if not name or not _TOKEN.issuperset(name):
                raise HttpError(self.status_on_error, "invalid header name")
        if lengths > 1:
            raise HttpError(self.status_on_error, "several Content-Length headers")
        if encodings:
            if head.content_length is not None:
                raise HttpError(self.status_on_error, "Content-Length with Transfer-Encoding")
            if version == b"1.0":
                raise HttpError(self.status_on_error, "Transfer-Encoding on HTTP/1.0")
            if encodings != [b"chunked"]:
                raise HttpError(self._status(501), "Transfer-Encoding other than chunked")
            head.chunked = True
        head.connection = frozenset(connection)
        if version == b"1.1":
            head.keep_alive = b"close" not in head.connection
        else:
            head.keep_alive = b"keep-alive" in head.connection
        self._check(head, hosts)

    def _check(self, head: Head, hosts: int) -> None:
        """Checks of one kind of message only."""

    # -- feeding

    def _feed(self, data: bytes) -> list[Event]:
        if self.broken is not None:
            raise self.broken
        events: list[Event] = []
        self.events = events
        view = memoryview(data)
        end = len(data)
        at = 0
        while at < end:
            upto = self._piece_end(view, at)
            piece = view[at:upto]
            self.piece_len = upto - at
            if self.counted:
                self.head_bytes += upto - at
            at = upto
            before = len(events)
            try:
                self.parser.feed_data(piece)
            except httptools.HttpParserUpgrade as exc:
                events.append(Upgrade(bytes(piece[exc.args[0] :]) + bytes(view[at:])))
                return events
            except httptools.HttpParserCallbackError as exc:
                cause = exc.__context__
                if isinstance(cause, HttpError):
                    self._break(cause)
                if not isinstance(cause, _Stop):
                    self._break(HttpError(self.status_on_error, str(exc) or "invalid message"))
                self._stopped(at == end)
                if at < end:
                    return events
            except httptools.HttpParserError as exc:
                self._break(HttpError(self.status_on_error, str(exc) or "invalid message"))
            if self.in_head and self.head_bytes > self.max_header_bytes:
                limit = f"header block over {self.max_header_bytes} bytes"
                self._break(HttpError(self._status(431), limit))
            if not self.counted and self.head is not None and self.head.chunked:
                # chunk sizes, extensions and trailers carry no data: bounded like a head
                # (llhttp would keep a trailer's value in memory however long it grows)
                self.framing = 0 if len(events) > before else self.framing + self.piece_len
                if self.framing > self.max_header_bytes:
                    limit = f"chunk framing or trailers over {self.max_header_bytes} bytes"
                    self._break(HttpError(self.status_on_error, limit))
        return events

    def _piece_end(self, view: memoryview, at: int) -> int:
        """Where the next piece fed to llhttp ends. A head is fed up to its end (the first
        CRLF CRLF: strict llhttp allows no bare CR or LF), HEAD_PIECE bytes at most at a
        time, so that its size is known (llhttp has no limit of its own) and the next message
        starts a piece; a Content-Length body exactly; a chunked body in pieces of at most
        half `max_header_bytes`; a close-delimited one in one go."""
        end = len(view)
        head = self.head
        self.counted = self.in_head or head is None
        if self.counted:
            upto = min(end, at + HEAD_PIECE)
            window = self.tail + bytes(view[at:upto])
            found = window.find(b"\r\n\r\n")
            if found >= 0:
                self.tail = b""
                return at + found + 4 - (len(window) - (upto - at))
            self.tail = window[-3:]
            return upto
        self.tail = b""
        if self.body_left is not None:
            return min(end, at + max(self.body_left, 1))
        assert head is not None
        if head.chunked:
            return min(end, at + min(HEAD_PIECE, self.max_header_bytes // 2))
        return end

    def _stopped(self, clean: bool) -> None:
        """llhttp was stopped at the end of a head (only responses to HEAD do that);
        `clean`: nothing came after it."""
        raise AssertionError("not stopped by a request reader")

    def _break(self, error: HttpError) -> None:
        self.broken = error
        raise error


class RequestReader(_Reader):
    """Requests from one client connection, pipelined or not."""

    status_on_error = 400

    def __init__(
        self,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_headers: int = DEFAULT_MAX_HEADERS,
    ) -> None:
        super().__init__(max_header_bytes, max_headers)
        self.parser = httptools.HttpRequestParser(self)

    def on_url(self, url: bytes) -> None:
        head = self.head
        assert head is not None
        head.target += url

    def _check(self, head: Head, hosts: int) -> None:
        head.method = self.parser.get_method()
        if hosts > 1:
            raise HttpError(400, "several Host headers")
        if hosts == 0 and head.version == b"1.1":
            raise HttpError(400, "no Host header")
        if head.method == b"CONNECT":
            raise HttpError(501, "CONNECT is not served by a reverse proxy")
        if not head.target or (head.target[:1] not in (b"/", b"*") and b"://" not in head.target):
            raise HttpError(400, "invalid request target")
        if head.upgrade is not None and b"upgrade" not in head.connection:
            head.upgrade = None

    def feed(self, data: bytes) -> list[Event]:
        """The events `data` completes; HttpError when the client broke the rules."""
        return self._feed(data)


class ResponseReader(_Reader):
    """Responses on one upstream connection; `expect` each before its bytes come."""

    status_on_error = 502

    def __init__(
        self,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_headers: int = DEFAULT_MAX_HEADERS,
    ) -> None:
        super().__init__(max_header_bytes, max_headers)
        self.parser = httptools.HttpResponseParser(self)
        self.head_request = False
        self.close_delimited = False
        """The response being read ends when the connection does (no length, not chunked)."""
        self.extra = False
        """Bytes came after a HEAD response's head: the connection cannot be reused."""

    def expect(self, method: bytes) -> None:
        """The next response answers a request of `method` (HEAD: it has no body)."""
        self.head_request = method == b"HEAD"
        self.close_delimited = False

    def on_status(self, reason: bytes) -> None:
        head = self.head
        assert head is not None
        head.reason += reason

    def _check(self, head: Head, hosts: int) -> None:
        status = self.parser.get_status_code()
        head.status = status
        if status >= 200 and status != 101 and status not in _NO_BODY_STATUS:
            if self.head_request:
                self.events.append(head)
                self.events.append(End([]))
                self.head = None
                raise _Stop
            self.close_delimited = head.content_length is None and not head.chunked
        if head.upgrade is not None and (status != 101 or b"upgrade" not in head.connection):
            head.upgrade = None

    def _stopped(self, clean: bool) -> None:
        self.in_head = False
        self.head_bytes = 0
        self.extra = not clean
        self.parser = httptools.HttpResponseParser(self)

    def feed(self, data: bytes) -> list[Event]:
        """The events `data` completes; HttpError (502) when the response breaks framing."""
        return self._feed(data)

    def feed_eof(self) -> list[Event]:
        """The connection ended: the end of a close-delimited body, else an error."""
        if self.head is None and not self.in_head:
            return []
        if self.close_delimited and not self.in_head:
            self.head = None
            self.close_delimited = False
            return [End([])]
        self._break(HttpError(502, "upstream closed the connection mid-response"))
        return []  # pragma: no cover - _break raises
