"""Admin endpoint (aiohttp, on the balancer's own event loop).

Read side: `/status` and `/metrics` (scrapes), `/api/services` (status plus
the latest per-second rates), `/api/history` (a ring buffer of one-second
samples for the dashboard's charts), `/api/openapi.json`, and the dashboard
itself at `/`.

Write side (the runtime API): backend state and weight, adding and removing
backends, reloading the config. Every write is validated in full before
anything changes; errors come back as `{"error": "..."}` (short, whatever the
input) with a 4xx status, and client input never costs a traceback.

Who may do what (Host, Origin, read and write tokens) is decided by
`balancer.admin.security`; `guard_middleware` applies it to every request and
`api_handler` to each route by its access ("open", "read" or "write"). Every
response carries headers that keep it out of frames and stop content sniffing.

How the history works: `TrafficHistory.sample` runs once a second, reads the
plain counters (per-backend requests and failures, the service's
"not available" count, the latency histogram's buckets), and stores the
difference from the previous sample as rates; p99 comes from the bucket
deltas of that second, interpolated linearly inside the bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from balancer.admin.metrics import LatencyHistogram, make_registry
from balancer.admin.openapi import BACKEND_STATES, MAX_BODY, OPENAPI
from balancer.admin.security import (
    ACCESS,
    OPEN,
    READ,
    TOKEN_ENV,
    WRITE,
    AdminGuard,
    admin_token,
    check_admin_security,
    is_loopback,
)
from balancer.config.addresses import parse_address
from balancer.config.errors import ConfigError
from balancer.config.model import BOUNDS, BackendConfig
from balancer.core.pool import Backend
from balancer.net.loops import listen_socket

if TYPE_CHECKING:
    from balancer.runtime.server import Server

__all__ = [
    "TOKEN_ENV",
    "AdminServer",
    "admin_token",
    "check_admin_security",
    "is_loopback",
    "quantile_of_counts",
]

log = logging.getLogger("balancer")

SERVER_KEY: web.AppKey[Server] = web.AppKey("server")
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)
ADMIN_KEY: web.AppKey[AdminServer] = web.AppKey("admin")
GUARD_KEY = web.AppKey("guard", AdminGuard)

STATIC_DIR = Path(__file__).resolve().parent / "static"
HISTORY_SECONDS = 300
STATES = BACKEND_STATES
MAX_ERROR = 500
"""Longest error message sent back, in characters."""
SHOWN_KEYS = 5
"""Unknown keys named in an error before "and N more"."""
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


# -- documents ------------------------------------------------------------------------------


def backend_status(b: Backend, now_wall: float) -> dict[str, Any]:
    return {
        "address": b.address,
        "state": b.state,
        "admin_state": b.admin_state,
        "weight": b.weight,
        "requests": b.requests,
        "in_flight": b.in_flight,
        "failures": b.failures,
        "connect_failures": b.connect_failures,
        "last_check": b.last_check,
        "last_check_ok": b.last_check_ok,
        "last_check_age_s": (
            round(now_wall - b.last_check, 3) if b.last_check is not None else None
        ),
        "reason": b.last_reason,
        "active_connections": b.active_connections,
        "total_connections": b.total_connections,
        "bytes_in": b.bytes_in,
        "bytes_out": b.bytes_out,
    }


def status_document(server: Server) -> dict[str, Any]:
    services: dict[str, Any] = {}
    now_wall = time.time()
    for name, runtime in server.services.items():
        runtime.proxy.account()
        backends = [backend_status(b, now_wall) for b in runtime.pool]
        proxy = runtime.proxy
        services[name] = {
            "listen": runtime.listen,
            "mode": runtime.config.mode,
            "algorithm": runtime.config.algorithm,
            "client_connections": proxy.client_connections,
            "not_available": proxy.not_available,
            "retries": proxy.retries,
            "refused": proxy.refused,
            "backends": backends,
        }
    return {"services": services}


# -- per-second history ---------------------------------------------------------------------


def quantile_of_counts(bounds: tuple[float, ...], counts: list[int], q: float) -> float:
    """Quantile `q` of bucket counts (bucket i holds values up to bounds[i]); 0 when empty.

    Linear inside the bucket; the overflow bucket answers its lower bound.
    """
    total = sum(counts)
    if total <= 0:
        return 0.0
    rank = q * total
    running = 0
    for i, n in enumerate(counts):
        if n <= 0:
            continue
        if running + n >= rank:
            if i >= len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i > 0 else 0.0
            fraction = (rank - running) / n
            return lower + (bounds[i] - lower) * fraction
        running += n
    return bounds[-1]


@dataclass
class _Snapshot:
    at: float
    requests: dict[str, int]
    failures: dict[str, int]
    not_available: int
    buckets: list[int]


@dataclass
class TrafficHistory:
    """One-second samples of every service's traffic, the last `seconds` of them.

    The ring keeps each service's totals (what the charts draw); the rates of each
    backend are kept for the latest second only (what the table shows), so memory and
    `/api/history` stay the same size however many backends a service has.
    """

    seconds: int = HISTORY_SECONDS
    samples: deque[dict[str, Any]] = field(default_factory=deque)
    backends: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    """service -> backend address -> its rates over the latest second."""
    _last: dict[str, _Snapshot] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.samples = deque(maxlen=self.seconds)

    @staticmethod
    def _snapshot(
        at: float, backends: list[Backend], not_available: int, histogram: LatencyHistogram
    ) -> _Snapshot:
        return _Snapshot(
            at,
            {b.address: b.requests for b in backends},
            {b.address: b.failures for b in backends},
            not_available,
            list(histogram.counts),
        )

    def sample(self, server: Server, now: float, now_wall: float) -> dict[str, Any] | None:
        """Take a sample at monotonic time `now`; the first call only sets the baseline."""
        services: dict[str, Any] = {}
        for name, runtime in server.services.items():
            backends = list(runtime.pool)
            snap = self._snapshot(now, backends, runtime.proxy.not_available, runtime.histogram)
            prev = self._last.get(name)
            self._last[name] = snap
            if prev is None or now <= prev.at:
                continue
            dt = now - prev.at
            per_backend: dict[str, Any] = {}
            served = failed = 0
            for addr, n in snap.requests.items():
                done = max(n - prev.requests.get(addr, n), 0)
                bad = max(snap.failures[addr] - prev.failures.get(addr, snap.failures[addr]), 0)
                served += done
                failed += bad
                per_backend[addr] = {
                    "rps": round(done / dt, 2),
                    "error_rate": round(bad / (done + bad), 4) if done + bad else 0.0,
                }
            unavailable = max(snap.not_available - prev.not_available, 0)
            failed += unavailable
            delta = [a - b for a, b in zip(snap.buckets, prev.buckets, strict=True)]
            p99 = quantile_of_counts(runtime.histogram.bounds, delta, 0.99)
            services[name] = {
                "requests": served,
                "errors": failed,
                "rps": round(served / dt, 2),
                "error_rate": round(failed / (served + failed), 4) if served + failed else 0.0,
                "p99_ms": round(p99 * 1000.0, 3),
            }
            self.backends[name] = per_backend
        for gone in set(self._last) - set(server.services):
            del self._last[gone]
            self.backends.pop(gone, None)
        if not services:
            return None
        entry = {"t": round(now_wall, 3), "services": services}
        self.samples.append(entry)
        return entry

    @property
    def latest(self) -> dict[str, Any] | None:
        return self.samples[-1] if self.samples else None

    def document(self, since: float | None = None) -> dict[str, Any]:
        samples = [s for s in self.samples if since is None or s["t"] > since]
        return {"interval_s": 1.0, "capacity": self.seconds, "samples": samples}


def services_document(server: Server, history: TrafficHistory) -> dict[str, Any]:
    """`/status` plus the rates of the latest one-second sample."""
    doc = status_document(server)
    latest = history.latest
    rates = latest["services"] if latest is not None else {}
    for name, svc in doc["services"].items():
        svc_rates = rates.get(name, {})
        svc["rps"] = svc_rates.get("rps", 0.0)
        svc["error_rate"] = svc_rates.get("error_rate", 0.0)
        svc["p99_ms"] = svc_rates.get("p99_ms", 0.0)
        backend_rates = history.backends.get(name, {})
        for b in svc["backends"]:
            r = backend_rates.get(b["address"], {})
            b["rps"] = r.get("rps", 0.0)
            b["error_rate"] = r.get("error_rate", 0.0)
    doc["sampled_at"] = latest["t"] if latest is not None else None
    return doc


# -- request helpers ------------------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(message)


def show(value: object, limit: int = 40) -> str:
    """`repr(value)`, cut to `limit` characters: error messages stay short whatever the input."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    if len(message) > MAX_ERROR:
        message = message[: MAX_ERROR - 1] + "…"
    extra = dict(headers or {})
    if status == 401:
        extra["WWW-Authenticate"] = "Bearer"
    return web.json_response({"error": message}, status=status, headers=extra or None)


def check_body_headers(request: web.Request) -> None:
    """A write's body, if it has one, must be plain JSON in UTF-8 (a form post never is)."""
    encoding = request.headers.get(hdrs.CONTENT_ENCODING, "").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(
            415, f"unsupported Content-Encoding {show(encoding)}: send the body uncompressed"
        )
    if hdrs.CONTENT_TYPE not in request.headers and not request.body_exists:
        return
    if request.content_type != "application/json":
        raise ApiError(
            415,
            f"writes take a JSON body: expected Content-Type application/json, got "
            f"{show(request.headers.get(hdrs.CONTENT_TYPE, ''))}",
        )
    charset = request.charset
    if charset is not None and charset.strip().lower() not in ("utf-8", "utf8"):
        raise ApiError(415, f"unsupported charset {show(charset)}: JSON is UTF-8")


async def read_body(request: web.Request) -> bytes:
    try:
        length = request.content_length
    except ValueError:
        raise ApiError(400, "invalid Content-Length") from None
    if length is not None and length > MAX_BODY:
        raise ApiError(413, f"the body is larger than {MAX_BODY} bytes")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"the body is larger than {MAX_BODY} bytes") from None
    except (RequestPayloadError, HttpProcessingError) as exc:
        raise ApiError(400, f"the body could not be read: {show(str(exc), 200)}") from None
    except ConnectionResetError:
        # the client left in the middle of its body: nobody to answer, nothing of ours failed
        raise ApiError(
            400, "the body could not be read: the client closed the connection"
        ) from None


async def json_object(request: web.Request, allowed: tuple[str, ...]) -> dict[str, Any]:
    raw = await read_body(request)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the body is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        body = json.loads(text)
    except RecursionError:
        raise ApiError(400, "the body is not valid JSON: nested too deeply") from None
    except ValueError as exc:
        raise ApiError(400, f"the body is not valid JSON: {show(str(exc), 200)}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"expected a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        shown = ", ".join(show(k) for k in unknown[:SHOWN_KEYS])
        more = f" and {len(unknown) - SHOWN_KEYS} more" if len(unknown) > SHOWN_KEYS else ""
        raise ApiError(400, f"unknown key(s) {shown}{more}: expected {', '.join(allowed)}")
    return body


def check_weight(value: object) -> int:
    bound = BOUNDS["weight"]
    if isinstance(value, bool) or not isinstance(value, int) or not bound.admits(value):
        raise ApiError(400, f"invalid weight {show(value)}: expected {bound.expected(True)}")
    return value


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _MalformedRequests(logging.Filter):
    """aiohttp logs a request its parser refuses (an invalid chunk size, a bad header) as an
    error with a traceback; it is the client's fault, answered with a 400: one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = "admin: refused a malformed request from %s: %s"
            args = record.args if isinstance(record.args, tuple) else ()
            record.args = (args[0] if args else "?", show(exc.message, 200))
            record.exc_info = None
            record.exc_text = None
            record.levelno = logging.INFO
            record.levelname = "INFO"
        return True


HTTP_LOG = logging.getLogger("balancer.admin.app.http")
HTTP_LOG.addFilter(_MalformedRequests())

RUNNER_OPTIONS: dict[str, Any] = {
    "access_log": None,
    "handle_signals": False,
    # a compressed body is refused with a 415 (check_body_headers) rather than inflated,
    # or answered by aiohttp's parser with a plain-text 400 and a traceback in the log
    "auto_decompress": False,
    "logger": HTTP_LOG,
}


def api_handler(handler: Handler, *, access: str = READ) -> Handler:
    """Check the route's access ("open", "read", "write"); ApiError and RuntimeChangeError
    become a JSON error."""
    from balancer.runtime.server import RuntimeChangeError

    if access not in ACCESS:
        raise ValueError(f"access {access!r}: expected one of {', '.join(ACCESS)}")

    async def wrapped(request: web.Request) -> web.StreamResponse:
        refusal = request.app[GUARD_KEY].check_token(
            access, request.headers.get(hdrs.AUTHORIZATION)
        )
        if refusal is not None:
            return error_response(refusal.status, refusal.message)
        try:
            if access == WRITE:
                check_body_headers(request)
            return await handler(request)
        except (ApiError, RuntimeChangeError) as exc:
            return error_response(exc.status, exc.message)

    return wrapped


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Host and Origin for every request; errors of any route as short JSON, never a 500
    with a traceback for what a client sent."""
    refusal = request.app[GUARD_KEY].check_request(
        request.headers.get(hdrs.HOST), request.headers.get(hdrs.ORIGIN)
    )
    if refusal is not None:
        return error_response(refusal.status, refusal.message)
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(
            exc.status, f"{exc.reason}: {request.method} {show(request.path, 200)}", allow
        )
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("admin: %s %s failed", request.method, show(request.path, 200))
        return error_response(500, "internal error; see the balancer's log")


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def guarded_app(guard: AdminGuard) -> web.Application:
    """An application whose every request passes `guard` (Host, Origin; the routes add the
    token check through `api_handler`), with the body limit and the security headers."""
    app = web.Application(middlewares=[guard_middleware], client_max_size=MAX_BODY)
    app[GUARD_KEY] = guard
    app.on_response_prepare.append(add_security_headers)
    return app


# -- handlers -------------------------------------------------------------------------------


async def handle_status(request: web.Request) -> web.Response:
    return web.json_response(status_document(request.app[SERVER_KEY]))


async def handle_metrics(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY_KEY]
    body = generate_latest(registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def handle_services(request: web.Request) -> web.Response:
    admin = request.app[ADMIN_KEY]
    return web.json_response(services_document(admin.server, admin.history))


async def handle_history(request: web.Request) -> web.Response:
    since_text = request.query.get("since")
    since: float | None = None
    if since_text is not None:
        try:
            since = float(since_text)
        except ValueError:
            since = math.nan
        if not math.isfinite(since):
            raise ApiError(
                400, f"invalid since {show(since_text)}: expected a Unix time in seconds"
            )
    return web.json_response(request.app[ADMIN_KEY].history.document(since))


async def handle_set_backend(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    service = request.match_info["service"]
    address = request.match_info["address"]
    server.backend(service, address)  # 404 first
    body = await json_object(request, ("state", "weight"))
    if not body:
        raise ApiError(400, "nothing to change: give 'state' and/or 'weight'")
    state = body.get("state")
    if state is not None and (not isinstance(state, str) or state not in STATES):
        raise ApiError(400, f"invalid state {show(state)}: expected one of {', '.join(STATES)}")
    weight = check_weight(body["weight"]) if "weight" in body else None
    backend = server.set_backend(service, address, state=state, weight=weight)
    return web.json_response(backend_status(backend, time.time()))


async def handle_add_backend(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    service = request.match_info["service"]
    runtime = server.runtime(service)
    body = await json_object(request, ("address", "weight"))
    if "address" not in body:
        raise ApiError(400, "missing 'address' (\"host:port\")")
    text = body["address"]
    if not isinstance(text, str):
        raise ApiError(400, f'invalid address {show(text)}: expected "host:port"')
    try:
        host, port = parse_address(text, where="address", source="request")
    except ConfigError as exc:
        raise ApiError(400, f"invalid address: {exc.message}") from None
    weight = check_weight(body["weight"]) if "weight" in body else 1
    config = BackendConfig(host, port, weight)
    if runtime.pool.get(config.address) is not None:
        raise ApiError(409, f"service {service!r} already has backend {config.address!r}")
    await server.check_backend_address(host, port)  # 400: the balancer itself
    backend = server.add_backend(service, config)
    return web.json_response(backend_status(backend, time.time()), status=201)


async def handle_remove_backend(request: web.Request) -> web.Response:
    admin = request.app[ADMIN_KEY]
    service = request.match_info["service"]
    address = request.match_info["address"]
    runtime, backend = admin.server.backend(service, address)
    if not admin.removing(service, address):
        staying = [b for b in runtime.pool if not admin.removing(service, b.address)]
        if staying == [backend]:
            raise ApiError(
                409,
                f"backend {address} is the last of service {service!r}, and a service needs "
                "at least one: add another backend first",
            )
        admin.start_removal(service, address)
        # let the removal task take its first step: the backend is draining before we answer
        await asyncio.sleep(0)
    return web.json_response(
        {
            "service": service,
            "address": address,
            "removing": True,
            "in_flight": backend.in_flight,
            "message": "draining; the backend is removed once its in-flight requests finish",
        },
        status=202,
    )


async def handle_reload(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    await server.reload()  # a rejected file: RuntimeChangeError 400 or 409, nothing changed
    return web.json_response({"reloaded": True, **status_document(server)})


async def handle_openapi(request: web.Request) -> web.Response:
    return web.json_response(OPENAPI)


async def handle_index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html")


# -- the server -----------------------------------------------------------------------------


class AdminServer:
    def __init__(self, server: Server, *, sample_interval: float = 1.0) -> None:
        self.server = server
        self.history = TrafficHistory()
        self.sample_interval = sample_interval
        self.guard = AdminGuard(server.config.admin)
        self.app = guarded_app(self.guard)
        self.app[SERVER_KEY] = server
        self.app[REGISTRY_KEY] = make_registry(server)
        self.app[ADMIN_KEY] = self
        r = self.app.router
        r.add_get("/status", api_handler(handle_status, access=READ))
        r.add_get("/metrics", api_handler(handle_metrics, access=READ))
        r.add_get("/", handle_index)
        r.add_static("/static/", STATIC_DIR)
        r.add_get("/api/openapi.json", api_handler(handle_openapi, access=OPEN))
        r.add_get("/api/services", api_handler(handle_services, access=READ))
        r.add_get("/api/history", api_handler(handle_history, access=READ))
        backend_path = "/api/services/{service}/backends/{address}"
        r.add_put(backend_path, api_handler(handle_set_backend, access=WRITE))
        r.add_delete(backend_path, api_handler(handle_remove_backend, access=WRITE))
        r.add_post(
            "/api/services/{service}/backends", api_handler(handle_add_backend, access=WRITE)
        )
        r.add_post("/api/reload", api_handler(handle_reload, access=WRITE))
        self.runner: web.AppRunner | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._removals: dict[tuple[str, str], asyncio.Task[None]] = {}

    def removing(self, service: str, address: str) -> bool:
        """Is this backend's removal under way (it still serves what it holds)?"""
        return (service, address) in self._removals

    def start_removal(self, service: str, address: str) -> None:
        key = (service, address)
        if key in self._removals:
            return
        task = asyncio.create_task(self._remove(service, address), name=f"remove {address}")
        self._removals[key] = task

    async def _remove(self, service: str, address: str) -> None:
        try:
            await self.server.remove_backend(service, address)
        except Exception:
            log.exception("removing backend %s of service %s failed", address, service)
        finally:
            self._removals.pop((service, address), None)

    async def _sample_forever(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                self.history.sample(self.server, loop.time(), time.time())
            except Exception:
                log.exception("traffic sampling failed")
            next_at += self.sample_interval
            delay = next_at - loop.time()
            if delay < 0:
                next_at = loop.time()
                delay = 0.0
            await asyncio.sleep(delay)

    async def start(self) -> tuple[str, int]:
        cfg = self.server.config.admin
        check_admin_security(cfg)
        runner = web.AppRunner(self.app, **RUNNER_OPTIONS)
        await runner.setup()
        try:
            # A socket bound here keeps aiohttp (uvloop) off the resolver's thread pool.
            sock = listen_socket(cfg.host, cfg.port, backlog=128)
            site: web.BaseSite = (
                web.TCPSite(runner, cfg.host, cfg.port, reuse_address=True)
                if sock is None
                else web.SockSite(runner, sock)
            )
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self.runner = runner
        self._sampler = asyncio.create_task(self._sample_forever(), name="admin sampler")
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        host, port = sockets[0].getsockname()[:2]
        self.guard.listening_on(str(host))
        return str(host), int(port)

    async def stop(self) -> None:
        tasks = [t for t in (self._sampler, *self._removals.values()) if t is not None]
        self._sampler = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
