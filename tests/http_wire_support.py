"""What the HTTP wire tests share: feeding a reader in pieces and what its events say."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from balancer.core.http.wire import Body, End, Event, Head, Headers, RequestReader, Upgrade


@dataclass
class Message:
    """One message as a reader's events told it: its head, whole body, trailers."""

    head: Head
    body: bytes = b""
    trailers: Headers = field(default_factory=list)
    ended: bool = False

    def key(self) -> tuple[object, ...]:
        """What a user of the reader sees of the message, comparable."""
        h = self.head
        return (
            h.method,
            h.target,
            h.status,
            h.reason,
            h.version,
            tuple(h.headers),
            h.content_length,
            h.chunked,
            self.body,
            tuple(self.trailers),
            self.ended,
        )


def messages(events: Iterable[Event]) -> tuple[list[Message], bytes | None]:
    """The messages of `events`, and the rest bytes of an Upgrade (None: no Upgrade)."""
    out: list[Message] = []
    rest: bytes | None = None
    for event in events:
        if isinstance(event, Head):
            out.append(Message(event))
        elif isinstance(event, Body):
            assert out, "a body before any head"
            assert not out[-1].ended, "a body after the end"
            out[-1].body += event.data
        elif isinstance(event, End):
            assert out, "an end before any head"
            assert not out[-1].ended, "two ends for one head"
            out[-1].trailers = event.trailers
            out[-1].ended = True
        elif isinstance(event, Upgrade):
            rest = event.rest
    return out, rest


def pieces(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """`data` cut at the offsets `cuts` (taken modulo its length + 1)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    out = []
    prev = 0
    for p in [*points, len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


def feed_requests(chunks: Iterable[bytes], **limits: int) -> list[Event]:
    reader = RequestReader(**limits)
    events: list[Event] = []
    for chunk in chunks:
        events += reader.feed(chunk)
    return events


def keys(events: Iterable[Event]) -> list[tuple[object, ...]]:
    found, _ = messages(events)
    return [m.key() for m in found]


def request(
    method: bytes = b"GET",
    target: bytes = b"/",
    headers: Headers | None = None,
    body: bytes = b"",
    version: bytes = b"1.1",
) -> bytes:
    """A request's bytes, written by hand (the writers are under test elsewhere)."""
    lines = [method + b" " + target + b" HTTP/" + version]
    for name, value in [(b"Host", b"example.test")] if headers is None else headers:
        lines.append(name + b": " + value)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
