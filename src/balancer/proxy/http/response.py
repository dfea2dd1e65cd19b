"""The response half of an http exchange: what the upstream connection hands it.

`Relay` holds an exchange's state and takes the upstream connection's
callbacks (it is the connection's `Sink`): a 1xx is passed on to an HTTP/1.1
client, the final head is written to the client re-framed (see
`balancer.proxy.http.exchange`), body pieces go to the client as they come,
and the end, a failure, a `retry_on_status` status or a 101 resolves the
exchange's `outcome`, which the exchange's task waits for.
"""

from __future__ import annotations

import asyncio
from time import monotonic

from balancer.core.http.affinity import set_cookie
from balancer.core.http.headers import response_headers, trailer_fields
from balancer.core.http.replay import Again, Stage, send_again
from balancer.core.http.wire import Body, End, Event, Head, HttpError, Upgrade
from balancer.core.http.writer import REASONS, chunk, last_chunk
from balancer.core.http.writer import response_head as write_response_head
from balancer.core.pool import Backend
from balancer.proxy.http.context import Client
from balancer.proxy.http.upstream import UpstreamConnection

_NO_BODY = (204, 304)


class Relay:
    """An exchange's state, and the relay of its response (the upstream's `Sink`)."""

    def __init__(self, client: Client, head: Head) -> None:
        self.client = client
        self.svc = svc = client.svc
        self.loop = svc.loop
        self.head = head
        self.started = monotonic()
        self.backend: Backend | None = None
        self.conn: UpstreamConnection | None = None
        self.outcome: asyncio.Future[str] | None = None
        self.response: Head | None = None
        self.relaying = False
        """The response head went to the client: no retry from here on."""
        self.rechunk = False
        self.client_keep = head.keep_alive
        self.body_done = not head.has_body
        self.replay: list[bytes] | None = []
        """The request body so far, framed as sent (None once over `replay_buffer`)."""
        self.replay_size = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.retries = 0
        self.race_retried = False
        self.extra = False
        self.status = 0
        self.term = "--"
        self.connect_time = 0.0
        self.header_time = 0.0
        self.writable: asyncio.Future[None] | None = None
        self.upstream_full = False
        self.upgrade_rest = b""
        self.request_id = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.failure = ""
        self.reused = False
        self.response_byte = False
        self.header_at = 0.0
        self.queue_time = 0.0
        self.queue_full = False
        """No turn came in the queue of requests waiting for a backend under its limit."""
        self.out_mark = 0
        self.last_byte = 0.0
        """When the backend last sent a byte of the response being relayed."""
        self.sticky_seen: bytes | None = None
        """The sticky cookie's value in the request."""

    def retry_allowed(self) -> bool:
        svc = self.svc
        if self.retries >= svc.config.retries:
            return False
        cfg = svc.config
        if not svc.budget.allow(monotonic(), cfg.retry_budget_percent, cfg.retry_budget_min):
            svc.retries_over_budget += 1
            return False
        self.retries += 1
        svc.retries_made += 1
        return True

    # -- the upstream connection's side (Sink)

    def _resolve(self, result: str) -> None:
        outcome = self.outcome
        if outcome is not None and not outcome.done():
            outcome.set_result(result)

    def upstream_events(self, events: list[Event]) -> None:
        """What the upstream connection parsed; what it completes goes to the client in
        one write."""
        self.response_byte = True
        self.last_byte = monotonic()
        out: list[bytes] = []
        for event in events:
            kind = type(event)
            if kind is Body:
                if self.relaying:
                    data = event.data  # type: ignore[union-attr]
                    self.bytes_out += len(data)
                    out.append(chunk(data) if self.rechunk else data)
            elif kind is Head:
                if self.response is not None:
                    self.extra = True  # more than one response to one request
                    continue
                self.on_head(event, out)  # type: ignore[arg-type]
            elif kind is End:
                if self.response is None or self.response.status == 101:
                    continue  # the end of a 1xx; a 101's Upgrade event follows
                if self.rechunk:
                    out.append(last_chunk(trailer_fields(event.trailers)))  # type: ignore[union-attr]
                self._resolve("done")
            elif kind is Upgrade:
                self.upgrade_rest = event.rest  # type: ignore[union-attr]
                self._resolve("upgrade")
        if out and not self.client.lost:
            self.client.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def on_head(self, rh: Head, out: list[bytes]) -> None:
        """A response head: a 1xx passed on, a final one re-framed (into `out`)."""
        status = rh.status
        svc = self.svc
        if status < 200 and status != 101:
            if self.head.version == b"1.1":
                out.append(write_response_head(status, rh.reason or REASONS.get(status, b""), []))
            return
        if status == 101 and (self.head.upgrade is None or rh.upgrade is None):
            # A switch nobody asked for would hand the client's connection to the backend
            # raw, past every rule of ours: a broken response.
            self.upstream_error(HttpError(502, "101 Switching Protocols without an upgrade"))
            return
        self.response = rh
        self.header_at = monotonic()
        self.status = status
        if status in svc.http.retry_on_status and self.status_retry():
            self.failure = f"status {status}"
            self._resolve("status")
            return
        head = self.head
        headers = response_headers(rh, svc.rules)
        keep = self.client_keep and self.body_done and self.client.svc.accepting
        if head.upgrade is not None and (status != 101 or rh.upgrade is None):
            keep = False  # the client's bytes after its upgrade request were not HTTP
        if status == 101 and rh.upgrade is not None:
            keep = True
        elif head.method == b"HEAD" or status in _NO_BODY:
            if rh.content_length is not None and status != 204:
                headers.append((b"Content-Length", b"%d" % rh.content_length))
        elif rh.content_length is not None:
            headers.append((b"Content-Length", b"%d" % rh.content_length))
        elif head.version == b"1.1":
            headers.append((b"Transfer-Encoding", b"chunked"))
            self.rechunk = True
        else:
            keep = False  # close-delimited for an HTTP/1.0 client
        if status != 101:
            if not keep:
                headers.append((b"Connection", b"close"))
            elif head.version == b"1.0":
                headers.append((b"Connection", b"keep-alive"))
        if svc.sticky_name and self.backend is not None:
            token = svc.sticky_token(self.backend)
            if token != self.sticky_seen:
                headers.append((b"Set-Cookie", set_cookie(svc.sticky_name, token)))
        self.client_keep = keep
        self.relaying = True
        out.append(write_response_head(status, rh.reason or REASONS.get(status, b""), headers))

    def status_retry(self) -> bool:
        """May a `retry_on_status` response be dropped for a retry? (Takes the retry.)"""
        again = send_again(
            Stage.STATUS, self.head.method, replayable=self.replay is not None and self.body_done,
            reused=False, response_byte=True, race_retried=True,
            retry_non_idempotent=self.svc.http.retry_non_idempotent,
        )  # fmt: skip
        return again is Again.OTHER and self.retry_allowed()

    def cut_if_stalled(self, now: float) -> None:
        """A response begun whose backend sent nothing for `response_header_timeout` is cut."""
        outcome = self.outcome
        if (
            self.relaying
            and outcome is not None
            and not outcome.done()
            and now - self.last_byte > self.svc.http.response_header_timeout
        ):
            self.failure = "the response stalled mid-body"
            self._resolve("cut")

    def upstream_error(self, error: HttpError) -> None:
        self.failure = f"invalid response: {error.reason}"
        self.svc.bad_responses += 1
        self._resolve("cut" if self.relaying else "bad")

    def upstream_lost(self, exc: Exception | None) -> None:
        if not self.failure:
            self.failure = f"connection lost: {exc}" if exc else "connection closed"
        self._resolve("cut" if self.relaying else "lost")
        self.upstream_paused(False)

    def upstream_paused(self, paused: bool) -> None:
        self.upstream_full = paused
        writable = self.writable
        if not paused and writable is not None and not writable.done():
            writable.set_result(None)

    # -- the client connection's side

    def client_paused(self, paused: bool) -> None:
        conn = self.conn
        if conn is not None:
            conn.pause(paused)

    def client_lost(self) -> None:
        self._resolve("client")
        self.upstream_paused(False)
