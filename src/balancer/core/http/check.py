"""An HTTP health check without I/O: the request it sends and what its response means.

How it works: `HttpCheck` builds the request (`METHOD PATH HTTP/1.1`, Host,
User-Agent, `Connection: close`) and reads the response with a
`ResponseReader` as bytes arrive (`feed`, `feed_eof`). It is `done` as soon as
the response can be judged: at its head when no body is to be checked, else
at the end of the body or once `BODY_WINDOW` bytes of it came. Interim (1xx)
responses are skipped. `verdict` then says what the response means:

- a 404 when `disable_on_404` is set: `drain` (as HAProxy's http-check
  disable-on-404, it takes precedence over `expect_status`);
- a status outside `expect_status`: failed;
- `expect_body` not within the first `BODY_WINDOW` bytes of the body: failed;
- else passed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from balancer.config.addresses import format_address
from balancer.config.model import HealthConfig
from balancer.core.http.wire import Body, End, Event, Head, HttpError, ResponseReader, Upgrade

BODY_WINDOW = 64 * 1024
"""Bytes of a response body `expect_body` is looked for in (the rest is not read)."""
USER_AGENT = "balancer-health"
PREVIEW = 40
"""Characters of `expect_body` quoted in a failed check's reason."""


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    reason: str
    drain: bool = False
    """A 404 with `disable_on_404`: the backend is alive but takes no new work."""


def describe(ranges: tuple[tuple[int, int], ...]) -> str:
    """`expect_status` as a user wrote it: "200-399", "200, 204"."""
    return ", ".join(str(low) if low == high else f"{low}-{high}" for low, high in ranges)


class HttpCheck:
    """One HTTP check of one backend: its request, then its response fed in as it comes."""

    def __init__(self, health: HealthConfig, host: str, port: int) -> None:
        self.health = health
        authority = health.host or format_address(host, port)
        self.request = (
            f"{health.method} {health.path} HTTP/1.1\r\n"
            f"Host: {authority}\r\n"
            f"User-Agent: {USER_AGENT}\r\n"
            "Connection: close\r\n\r\n"
        ).encode("latin-1")
        self.reader = ResponseReader()
        self.reader.expect(health.method.encode())
        self.head: Head | None = None
        self.body = bytearray()
        self.received = 0
        """Bytes of the response that came."""
        self.complete = False
        """The whole response (or all of the body that is looked at) came."""
        self.error = ""
        """Why the response cannot be judged (it breaks HTTP), "" if it can."""

    @property
    def done(self) -> bool:
        """Nothing more is needed to judge the response."""
        if self.error or self.complete:
            return True
        return self.head is not None and not self.health.expect_body

    def feed(self, data: bytes) -> None:
        """Bytes of the response as they come."""
        self.received += len(data)
        if not self.done:
            self._take(self.reader.feed, data)

    def feed_eof(self) -> None:
        """The backend closed the connection."""
        if not self.done:
            self._take(lambda _: self.reader.feed_eof(), b"")
        if not self.done:
            self.error = "connection closed before a response"

    def _take(self, read: Callable[[bytes], list[Event]], data: bytes) -> None:
        try:
            events = read(data)
        except HttpError as exc:
            self.error = f"invalid HTTP response: {exc.reason}"
            return
        for event in events:
            if isinstance(event, Head):
                if event.status >= 200:
                    self.head = event
            elif isinstance(event, Body) and self.head is not None:
                self.body += event.data[: BODY_WINDOW - len(self.body)]
                if len(self.body) >= BODY_WINDOW:
                    self.complete = True
                    return
            elif isinstance(event, End) and self.head is not None:
                self.complete = True
                return
            elif isinstance(event, Upgrade):
                self.error = "the response switched protocols"
                return

    def verdict(self) -> Verdict:
        """What the response means (once `done`; before it, what came so far)."""
        if self.error:
            return Verdict(False, self.error)
        head = self.head
        if head is None:
            return Verdict(False, "no response")
        health = self.health
        status = head.status
        if status == 404 and health.disable_on_404:
            return Verdict(False, "status 404 (disable_on_404)", drain=True)
        if not health.passes(status):
            return Verdict(False, f"status {status} (expected {describe(health.expect_status)})")
        wanted = health.expect_body
        if wanted and wanted.encode() not in self.body:
            shown = wanted if len(wanted) <= PREVIEW else wanted[:PREVIEW] + "..."
            return Verdict(False, f"status {status}, but the body does not contain {shown!r}")
        return Verdict(True, f"status {status}")
