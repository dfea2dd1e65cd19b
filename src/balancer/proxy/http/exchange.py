"""One request and its response in http mode: backend, retries, relay, accounting.

`Exchange.run` picks a backend, takes a kept-alive connection to it or makes
one, sends the request head re-serialized from what was parsed, and streams
the body (each piece kept for a replay while the body fits in
`replay_buffer`). The response is relayed as its bytes arrive, in the upstream
connection's callbacks (`upstream_events`), without a task switch per piece;
the task waits once, for the exchange's outcome. When the attempt fails, the
rules of `balancer.core.http.replay` say whether the request goes again and
where; the client sees a generated error only when it does not.

Framing towards the client: a Content-Length is passed on, a chunked or
close-delimited body is re-chunked for an HTTP/1.1 client (an HTTP/1.0
client gets it close-delimited), and responses to HEAD and 204/304 have none.
"""

from __future__ import annotations

import asyncio
from time import monotonic

from balancer.core.http.affinity import cookie_value, request_key
from balancer.core.http.headers import is_trusted, request_headers, rewrite_target, trailer_fields
from balancer.core.http.replay import Again, Stage, send_again
from balancer.core.http.routing import normalize_target, origin_form
from balancer.core.http.wire import Body, End, HttpError
from balancer.core.http.writer import chunk, error_response, last_chunk, request_head
from balancer.core.pool import Backend
from balancer.proxy.http.connect import Refused, connect
from balancer.proxy.http.context import count
from balancer.proxy.http.response import Relay
from balancer.proxy.http.tunnel import Tunnel
from balancer.proxy.http.upstream import UpstreamConnection
from balancer.proxy.upstream import has_room


class Exchange(Relay):
    """A request from its head to the end of its response."""

    # -- the task's side

    async def run(self) -> bool:
        """Serve the request; whether the client connection may serve another."""
        head = self.head
        if head.target[:1] != b"/" and b"://" in head.target:
            try:
                origin_form(head)
            except HttpError as exc:
                return self.answer(exc.status, "CR", exc.reason)
        head.target = normalize_target(head.target)
        front = self.svc
        front.requests += 1
        svc = front.route(head)
        if svc is None:
            return self.answer(404, "PR", "no route for this request")
        if svc is not front:
            self.svc = svc
            svc.requests += 1
        cfg = svc.http
        svc.budget.received += 1
        if cfg.max_body_bytes and (head.content_length or 0) > cfg.max_body_bytes:
            return self.answer(413, "PR", f"request body over {cfg.max_body_bytes} bytes")
        client = self.client
        rules = svc.rules
        trusted = is_trusted(client.peer_ip, rules.trusted_proxies)
        headers, rid = request_headers(
            head, rules, client_ip=client.peer_ip, proto=client.proto, port=client.port,
            trusted=trusted, request_id=None,
        )  # fmt: skip
        if client.subject_header:
            headers = client.with_subject(headers)
        self.request_id = rid or b""
        if head.content_length is not None:
            headers.append((b"Content-Length", b"%d" % head.content_length))
        elif head.chunked:
            headers.append((b"Transfer-Encoding", b"chunked"))
        self.headers = headers
        target = rewrite_target(head.target, rules.strip_prefix)
        tried: list[Backend] = []
        fresh = False
        backend: Backend | None = None
        stage: Stage | None = None
        while True:
            if not fresh:
                backend = await self.choose(tried)
                if backend is None:
                    if self.queue_full:
                        return self.answer(503, "sQ", "every backend is busy", retry_after=1)
                    if stage is None:
                        return self.answer(503, "SC", "no backend available", retry_after=1)
                    return self.failed(stage)
                tried.append(backend)
            assert backend is not None
            stage = await self.attempt(backend, target, fresh)
            if stage is None:
                return self.client_keep
            if self.client.lost:
                self.term = "CH"
                return False
            again = send_again(
                stage, head.method, replayable=self.replay is not None, reused=self.reused,
                response_byte=self.response_byte, race_retried=self.race_retried,
                retry_non_idempotent=cfg.retry_non_idempotent,
            )  # fmt: skip
            fresh = again is Again.FRESH
            if fresh:
                self.race_retried = True
                svc.race_retries += 1
                continue
            if again is Again.OTHER and self.retry_allowed():
                continue
            return self.failed(stage)

    def failed(self, stage: Stage) -> bool:
        """The generated answer to a request that failed at `stage` and goes no further."""
        if stage is Stage.TIMEOUT:
            return self.answer(504, "sH", "no response from the backend in time")
        if stage is Stage.CONNECT and not self.race_retried:
            return self.answer(503, "SC", "backend unavailable", retry_after=1)
        return self.answer(502, "SH", self.failure or "backend failed")

    async def choose(self, tried: list[Backend]) -> Backend | None:
        """A backend for the next try. When every one left is at `max_backend_requests`,
        the request waits its turn (at most `queue_size` wait, each `queue_timeout`)."""
        busy: list[Backend] = []
        backend = self.pick(tried, busy)
        if backend is not None or not busy:
            return backend
        svc = self.svc
        config = svc.config
        if len(svc.queue) >= config.queue_size:
            self.queue_full = True
            return None
        queued_at = monotonic()
        deadline = queued_at + config.queue_timeout
        try:
            return await self._wait_turn(tried, deadline)
        finally:
            self.queue_time += monotonic() - queued_at

    async def _wait_turn(self, tried: list[Backend], deadline: float) -> Backend | None:
        """Wait for a turn (a backend finishing a request), then pick again, until
        `deadline`."""
        svc = self.svc
        while True:
            left = deadline - monotonic()
            if left <= 0 or self.client.lost:
                self.queue_full = True
                svc.pass_turn()  # a turn this request was given goes to the next one
                return None
            turn = self.loop.create_future()
            svc.queue.append(turn)
            try:
                async with asyncio.timeout(left):
                    await turn
            except TimeoutError:
                pass
            finally:
                if turn in svc.queue:
                    svc.queue.remove(turn)
            busy: list[Backend] = []
            backend = self.pick(tried, busy)
            if backend is not None or not busy:
                return backend

    def pick(self, tried: list[Backend], busy: list[Backend]) -> Backend | None:
        """The algorithm's backend for this request; those at their limit go to `busy`."""
        svc = self.svc
        pool = svc.pool
        limit = svc.config.max_backend_requests
        cookie = svc.sticky_name
        if cookie and not tried:
            self.sticky_seen = cookie_value(self.head, cookie)
            pinned = svc.sticky_backend(self.sticky_seen) if self.sticky_seen else None
            if pinned is not None and pinned.eligible and has_room(pinned.in_flight, limit):
                return pinned
        hash_key = svc.config.hash_key
        if hash_key == "source":
            key = self.client.peer_ip.encode()
        else:
            key = request_key(self.head, hash_key, self.client.peer_ip)
        excluded = [*tried]
        while True:
            backend = pool.pick(key, excluded) or pool.fallback(excluded)
            if backend is None or has_room(backend.in_flight, limit):
                return backend
            busy.append(backend)
            excluded.append(backend)

    async def attempt(self, backend: Backend, target: bytes, fresh: bool) -> Stage | None:
        """One try on `backend`: None when it answered (or the client went), else where
        it failed."""
        svc = self.svc
        loop = self.loop
        self.failure = ""
        self.reused = False
        self.response_byte = False
        head = self.head
        # A body that may not fit the replay buffer could not be sent again should a kept-alive
        # connection turn out closed under it: such a request gets a new connection.
        unsure = head.chunked or (head.content_length or 0) > svc.http.replay_buffer
        conn = None if fresh or unsure else self.client.idle_pool(svc).take(backend, monotonic())
        if conn is not None:
            self.reused = True
            svc.reused += 1
        else:
            began = monotonic()
            try:
                conn = await connect(svc, backend, self.client)
            except Refused as exc:
                self.failure = str(exc)
                return Stage.CONNECT
            finally:
                self.connect_time += monotonic() - began
            svc.dialed += 1
        self.conn = conn
        self.backend = backend
        self.out_mark = self.bytes_out
        backend.requests += 1
        backend.in_flight += 1
        svc.pool.policy.on_start(backend)
        sent_at = monotonic()
        self.outcome = outcome = loop.create_future()
        self.response = None
        self.header_at = 0.0
        conn.begin(self, head.method)
        headers = self.headers
        if head.host is None:
            headers = [(b"Host", svc.rules.host_rewrite or backend.address_bytes), *headers]
        conn.transport.write(
            b"".join([request_head(head.method, target, headers), *(self.replay or ())])
        )
        failed = await self.send_body(conn)
        if failed is not None:
            self.finish_attempt(conn, ok=None)
            self.client_keep = False
            if failed is not None and failed.status:
                self.svc.client_errors += 1
                self.answer(failed.status, "cR", failed.reason)
            return None
        timer = None
        if not outcome.done():
            timer = loop.call_later(svc.http.response_header_timeout, self._header_timeout)
        try:
            result = await outcome
        finally:
            if timer is not None:
                timer.cancel()
        self.header_time += (self.header_at or monotonic()) - sent_at
        if result == "done" or result == "upgrade":
            upgrade = result == "upgrade"
            self.finish_attempt(conn, ok=True, reuse=not upgrade, keep_open=upgrade)
            svc.pool.report_success(backend)
            if upgrade:
                self.client_keep = False
                await Tunnel(self.client, conn, svc).run(self.upgrade_rest)
            return None
        self.finish_attempt(conn, ok=None if result == "client" else False)
        if result == "client":
            self.term = "CD" if self.relaying else "CH"
            self.client_keep = False
            return None
        if result == "cut":
            self.term = "SD"
            self.client_keep = False
            self.client.reset()
            self.note_failure(backend, self.failure or "connection lost mid-response")
            return None
        if result == "status":
            return Stage.STATUS
        if not (self.reused and not self.response_byte):
            self.note_failure(backend, self.failure or result)
        return Stage.TIMEOUT if result == "timeout" else Stage.SENT

    def note_failure(self, backend: Backend, reason: str) -> None:
        backend.failures += 1
        self.svc.pool.report_failure(backend, reason)

    async def send_body(self, conn: UpstreamConnection) -> HttpError | None:
        """Stream the rest of the request body; None when it went, else what to answer
        (status 0: the client went)."""
        client = self.client
        head = self.head
        cfg = self.svc.http
        outcome = self.outcome
        assert outcome is not None
        while not self.body_done and not outcome.done():
            if self.upstream_full:
                self.writable = self.loop.create_future()
                await self.writable
                continue
            if not client.queue and cfg.request_body_timeout > 0:
                try:
                    async with asyncio.timeout(cfg.request_body_timeout):
                        event = await client.next_event()
                except TimeoutError:
                    return HttpError(408, "request body not received in time")
            else:
                event = await client.next_event()
            if event is None or isinstance(event, HttpError):
                self.term = "CD" if event is None else "CR"
                return HttpError(0, "client gone") if event is None else event
            if type(event) is Body:
                data = event.data
                self.bytes_in += len(data)
                if cfg.max_body_bytes and self.bytes_in > cfg.max_body_bytes:
                    return HttpError(413, f"request body over {cfg.max_body_bytes} bytes")
                piece = chunk(data) if head.chunked else data
            elif type(event) is End:
                self.body_done = True
                if not head.chunked:
                    continue
                piece = last_chunk(trailer_fields(event.trailers))
            else:
                continue
            if self.replay is not None:
                self.replay_size += len(piece)
                if self.replay_size <= cfg.replay_buffer:
                    self.replay.append(piece)
                else:
                    self.replay = None
            if not conn.lost:
                conn.transport.write(piece)
        return None

    def finish_attempt(
        self,
        conn: UpstreamConnection,
        *,
        ok: bool | None,
        reuse: bool = False,
        keep_open: bool = False,
    ) -> None:
        """The backend no longer holds the request: count it, and keep or close `conn`."""
        backend = conn.backend
        backend.in_flight -= 1
        backend.bytes_in += self.bytes_in
        backend.bytes_out += self.bytes_out - self.out_mark
        svc = self.svc
        svc.pass_turn()
        if ok is not None:
            svc.pool.policy.on_finish(backend, monotonic() - self.started, ok)
        self.conn = None
        if keep_open:
            return
        reader = conn.reader
        response = self.response
        if (
            reuse
            and response is not None
            and response.keep_alive
            and self.body_done
            and not self.extra
            and not reader.close_delimited
            and not reader.extra
            and svc.accepting
        ):
            self.client.idle_pool(svc).put(conn, monotonic())
        elif not conn.lost:
            if reuse:
                conn.close()
            else:
                conn.abort()

    def answer(
        self, status: int, term: str, detail: str, *, retry_after: int | None = None
    ) -> bool:
        """Answer with an error of ours (unless a response began); keep-alive when safe."""
        self.term = term
        if self.relaying or self.client.lost:
            return False
        keep = self.client_keep and self.body_done and status not in (408, 413)
        self.status = status
        self.client_keep = keep
        count(self.svc.generated, status)
        self.client.transport.write(
            error_response(status, close=not keep, detail=detail, retry_after=retry_after)
        )
        return keep

    def _header_timeout(self) -> None:
        if self.response is None and self.outcome is not None and not self.outcome.done():
            self.failure = "response head timeout"
            self.outcome.set_result("timeout")

    def record(self) -> None:
        """The exchange ended: its counters, latency and access log line."""
        svc = self.svc
        now = monotonic()
        if self.term == "SC":
            svc.not_available += 1
        if self.status:
            status_class = f"{self.status // 100}xx"
            count(svc.statuses, status_class)
            if self.relaying and self.backend is not None:
                address = self.backend.address
                classes = svc.backend_statuses.get(address)
                if classes is None:
                    classes = svc.backend_statuses[address] = {}
                count(classes, status_class)
            if svc.histogram is not None:
                svc.histogram.observe(now - self.started)
        access = svc.access_log
        if access is None:
            return
        head = self.head
        backend = self.backend
        access.record_http(
            self.client.peer_text,
            {
                "method": head.method.decode("latin-1"),
                "host": (head.host or b"").decode("latin-1"),
                "path": head.target.decode("latin-1"),
                "status": self.status,
                "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
                "backend": backend.address if backend is not None else "-",
                "retries": self.retries + self.race_retried,
                "queue_ms": round(self.queue_time * 1000, 3),
                "connect_ms": round(self.connect_time * 1000, 3),
                "header_ms": round(self.header_time * 1000, 3),
                "total_ms": round((now - self.started) * 1000, 3),
                "term": self.term,
                "request_id": self.request_id.decode("latin-1"),
                **self.client.tls_log,
            },
        )
