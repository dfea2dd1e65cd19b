"""HTTP/1.1 messages written from parsed parts, without I/O.

What the proxy sends on is written here from what `wire` parsed, never the
bytes received, so the proxy and the peer behind it cannot disagree about
where a message ends.
"""

from __future__ import annotations

from balancer.core.http.wire import Headers


def _write_headers(out: list[bytes], headers: Headers) -> None:
    for name, value in headers:
        out.append(name)
        out.append(b": ")
        out.append(value)
        out.append(b"\r\n")


def request_head(method: bytes, target: bytes, headers: Headers) -> bytes:
    """An HTTP/1.1 request head (the headers carry the framing)."""
    out = [method, b" ", target, b" HTTP/1.1\r\n"]
    _write_headers(out, headers)
    out.append(b"\r\n")
    return b"".join(out)


def response_head(status: int, reason: bytes, headers: Headers) -> bytes:
    """An HTTP/1.1 status line and headers (the headers carry the framing)."""
    out = [b"HTTP/1.1 ", str(status).encode(), b" ", reason, b"\r\n"]
    _write_headers(out, headers)
    out.append(b"\r\n")
    return b"".join(out)


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (never the last: `data` is not empty)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def last_chunk(trailers: Headers) -> bytes:
    out = [b"0\r\n"]
    _write_headers(out, trailers)
    out.append(b"\r\n")
    return b"".join(out)


REASONS = {
    100: b"Continue",
    101: b"Switching Protocols",
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    417: b"Expectation Failed",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


def error_response(
    status: int, *, close: bool, detail: str = "", retry_after: int | None = None
) -> bytes:
    """A short plain-text response the proxy makes itself."""
    reason = REASONS.get(status, b"Error")
    body = reason + (b": " + detail.encode("ascii", "replace") if detail else b"") + b"\n"
    headers: Headers = [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Content-Length", str(len(body)).encode()),
        (b"Cache-Control", b"no-store"),
    ]
    if retry_after is not None:
        headers.append((b"Retry-After", str(retry_after).encode()))
    if close:
        headers.append((b"Connection", b"close"))
    return response_head(status, reason, headers) + body
