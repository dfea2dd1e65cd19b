"""A TLS ClientHello read without terminating TLS, sans-IO.

How it works: on a TLS port the client speaks first, and its first flight is
a ClientHello carried in handshake records. `parse(data)` is given the bytes
that have arrived and returns either

    a ClientHello   the server name asked for (SNI), the application protocols
                    offered (ALPN), the TLS versions offered; `length` is the
                    bytes of the records that carried it
    an int          the hello is not complete: the total number of bytes that
                    must have arrived before parsing can go on (more than
                    `len(data)`, never more than `limit` nor than the hello,
                    and never less as more bytes arrive)

or raises `NotTls` when the first bytes are not a TLS handshake record (a
plain-text request sent to a TLS port, an SSLv2 hello), or `ClientHelloError`
("malformed", "too_large") for a hello that breaks the rules or would need
more than `limit` bytes. The bytes are only read: the caller passes them on,
untouched, to whoever terminates TLS.

The handshake message may be cut over several records (each one a handshake
record, content type 22); their fragments are joined before the message is
read. Every length field is checked against what holds it, so no input makes
the parser read past its bytes or raise anything else.
"""

from __future__ import annotations

from dataclasses import dataclass

HANDSHAKE = 22
CLIENT_HELLO = 1
RECORD_HEADER = 5
MAX_FRAGMENT = 1 << 14
"""The largest plaintext record fragment TLS allows."""
DEFAULT_LIMIT = 16 * 1024

EXT_SERVER_NAME = 0
EXT_ALPN = 16
EXT_SUPPORTED_VERSIONS = 43

_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


class NotTls(Exception):
    """The connection does not start with a TLS handshake record."""


class ClientHelloError(Exception):
    """A ClientHello refused; `reason` is "malformed" or "too_large"."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason} ClientHello: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What a client's ClientHello tells before any key is exchanged."""

    server_name: str | None
    """The SNI host name: lower case, without a trailing dot; None when not sent (or only
    names of another type than host_name, which none defines)."""
    alpn: tuple[str, ...]
    """The application protocols offered, in the client's order (bytes as latin-1)."""
    versions: tuple[int, ...]
    """The versions offered (supported_versions, else the legacy version): 0x0304 is TLS 1.3."""
    length: int
    """Bytes of the records that carried the hello."""


def _malformed(detail: str) -> ClientHelloError:
    return ClientHelloError("malformed", detail)


def parse(data: bytes, *, limit: int = DEFAULT_LIMIT) -> ClientHello | int:
    """The ClientHello at the start of `data`, or the total bytes needed before it can be read."""
    if (data[:1] and data[0] != HANDSHAKE) or (data[1:2] and data[1] != 3):
        raise NotTls("not a TLS handshake record")
    message, end = _reassemble(data, limit)
    if isinstance(message, int):
        return message
    return _client_hello(message, end)


def _reassemble(data: bytes, limit: int) -> tuple[bytes, int] | tuple[int, int]:
    """The handshake message's bytes and the end of its last record, or (bytes needed, 0)."""
    message = bytearray()
    at = 0
    wanted = 4  # handshake bytes needed: its header, then all of it
    while True:
        lower = at + RECORD_HEADER + wanted - len(message)
        if lower > limit:
            raise ClientHelloError("too_large", f"more than {limit} bytes")
        if at > 0 and data[at : at + 1] and data[at] != HANDSHAKE:
            raise _malformed("a record other than handshake inside the hello")
        if at > 0 and data[at + 1 : at + 2] and data[at + 1] != 3:
            raise _malformed("a record of another protocol version inside the hello")
        if len(data) < at + RECORD_HEADER:
            return lower, 0
        size = int.from_bytes(data[at + 3 : at + 5], "big")
        if size == 0 or size > MAX_FRAGMENT:
            raise _malformed(f"a record of {size} bytes")
        end = at + RECORD_HEADER + size
        if end > limit:
            raise ClientHelloError("too_large", f"more than {limit} bytes")
        if len(data) < end:
            return max(end, lower), 0
        message += data[at + RECORD_HEADER : end]
        at = end
        if message[0] != CLIENT_HELLO:
            raise _malformed(f"handshake message {message[0]} instead of a ClientHello")
        if len(message) >= 4 and wanted == 4:
            wanted = 4 + int.from_bytes(message[1:4], "big")
        if len(message) >= wanted:
            if len(message) > wanted:
                raise _malformed("bytes after the ClientHello in its record")
            return bytes(message[4:]), end


class _Reader:
    """Bytes read front to back, each length checked against what is left."""

    __slots__ = ("at", "data", "end")

    def __init__(self, data: bytes, at: int = 0, end: int | None = None) -> None:
        self.data = data
        self.at = at
        self.end = len(data) if end is None else end

    @property
    def left(self) -> int:
        return self.end - self.at

    def take(self, n: int, what: str) -> bytes:
        if n > self.left:
            raise _malformed(f"{what} runs past its end")
        chunk = self.data[self.at : self.at + n]
        self.at += n
        return chunk

    def number(self, width: int, what: str) -> int:
        return int.from_bytes(self.take(width, what), "big")

    def vector(self, width: int, what: str) -> _Reader:
        """The bytes of a field led by its `width`-byte length, as a reader of their own."""
        size = self.number(width, what)
        if size > self.left:
            raise _malformed(f"{what} runs past its end")
        inner = _Reader(self.data, self.at, self.at + size)
        self.at += size
        return inner


def _client_hello(message: bytes, length: int) -> ClientHello:
    r = _Reader(message)
    legacy_version = r.number(2, "legacy_version")
    r.take(32, "random")
    session = r.vector(1, "legacy_session_id")
    if session.left > 32:
        raise _malformed("a session id over 32 bytes")
    suites = r.vector(2, "cipher_suites")
    if suites.left == 0 or suites.left % 2:
        raise _malformed(f"cipher_suites of {suites.left} bytes")
    if r.vector(1, "compression_methods").left == 0:
        raise _malformed("no compression method")
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = (legacy_version,)
    if r.left:
        extensions = r.vector(2, "extensions")
        if r.left:
            raise _malformed("bytes after the extensions")
        seen: set[int] = set()
        while extensions.left:
            kind = extensions.number(2, "extension type")
            body = extensions.vector(2, f"extension {kind}")
            if kind in seen:
                raise _malformed(f"extension {kind} twice")
            seen.add(kind)
            if kind == EXT_SERVER_NAME:
                server_name = _server_name(body)
            elif kind == EXT_ALPN:
                alpn = _alpn(body)
            elif kind == EXT_SUPPORTED_VERSIONS:
                versions = _versions(body)
    return ClientHello(server_name, alpn, versions, length)


def _server_name(body: _Reader) -> str | None:
    if body.left == 0:
        return None  # the empty form a server answers with, tolerated
    names = body.vector(2, "server_name_list")
    if body.left:
        raise _malformed("bytes after the server_name_list")
    host: str | None = None
    while names.left:
        name_type = names.number(1, "name_type")
        entry = names.vector(2, "server name")
        name = entry.take(entry.left, "server name")
        if name_type != 0:
            continue  # no other name type is defined; a client may send it
        if host is not None:
            raise _malformed("two host names in server_name")
        host = _host_name(name)
    return host


def _host_name(raw: bytes) -> str:
    """A host name as sent in SNI: letters, digits, '-' and '_' in dot-separated labels."""
    try:
        host = raw.decode("ascii").lower()
    except UnicodeDecodeError:
        raise _malformed("a server name that is not ASCII") from None
    host = host.removesuffix(".")
    labels = host.split(".")
    if not host or len(host) > 253 or not all(0 < len(label) <= 63 for label in labels):
        raise _malformed(f"server name {host!r} is not a host name")
    if not _HOST_CHARS.issuperset(host.replace(".", "")):
        raise _malformed(f"server name {host!r} is not a host name")
    return host


def _alpn(body: _Reader) -> tuple[str, ...]:
    names = body.vector(2, "protocol_name_list")
    if body.left or names.left == 0:
        raise _malformed("an ALPN extension that is not one non-empty list")
    protocols: list[str] = []
    while names.left:
        name = names.vector(1, "protocol name")
        if name.left == 0:
            raise _malformed("an empty ALPN protocol name")
        protocols.append(name.take(name.left, "protocol name").decode("latin-1"))
    return tuple(protocols)


def _versions(body: _Reader) -> tuple[int, ...]:
    listed = body.vector(1, "supported_versions")
    if body.left or listed.left == 0 or listed.left % 2:
        raise _malformed("a supported_versions extension that is not a list of versions")
    return tuple(listed.number(2, "version") for _ in range(listed.left // 2))
