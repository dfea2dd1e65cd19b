"""Admin endpoint (aiohttp, on the balancer's own event loop).

Read side: `/status` and `/metrics` (scrapes), `/api/services` (status plus
the latest per-second rates), `/api/history` (a ring buffer of one-second
samples for the dashboard's charts), `/api/openapi.json`, and the dashboard
itself at `/`.

Write side (the runtime API): backend state and weight, adding and removing
backends, reloading the config. Every write is validated in full before
anything changes; errors come back as `{"error": "..."}` with a 4xx status.
When a token is configured (`[admin] token` or `BALANCER_ADMIN_TOKEN`), every
write needs `Authorization: Bearer <token>`; a non-loopback listener without
a token is refused at start-up (`check_admin_security`). Writes that carry a
browser `Origin` of another site are refused, so a web page cannot drive a
loopback admin endpoint.

How the history works: `TrafficHistory.sample` runs once a second, reads the
plain counters (per-backend requests and failures, the service's
"not available" count, the latency histogram's buckets), and stores the
difference from the previous sample as rates; p99 comes from the bucket
deltas of that second, interpolated linearly inside the bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from balancer.config import AdminConfig, BackendConfig, ConfigError, parse_address
from balancer.loops import listen_socket
from balancer.metrics import LatencyHistogram, make_registry
from balancer.pool import Backend

if TYPE_CHECKING:
    from balancer.server import Server

log = logging.getLogger("balancer")

SERVER_KEY: web.AppKey[Server] = web.AppKey("server")
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)
ADMIN_KEY: web.AppKey[AdminServer] = web.AppKey("admin")

STATIC_DIR = Path(__file__).resolve().parent / "static"
TOKEN_ENV = "BALANCER_ADMIN_TOKEN"
HISTORY_SECONDS = 300
STATES = ("up", "drain", "maint")


# -- security -------------------------------------------------------------------------------


def admin_token(config: AdminConfig) -> str | None:
    """The token writes need: `[admin] token`, else $BALANCER_ADMIN_TOKEN, else None."""
    token = config.token or os.environ.get(TOKEN_ENV) or None
    return token


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_admin_security(config: AdminConfig) -> None:
    """Refuse an admin listener reachable from other hosts unless writes need a token."""
    if not config.enabled or is_loopback(config.host) or admin_token(config):
        return
    raise ConfigError(
        "admin",
        "listen",
        f"the admin endpoint {config.listen} is reachable from other hosts, so its runtime "
        f"API needs a token: set [admin] token in the config or the {TOKEN_ENV} environment "
        "variable (or listen on 127.0.0.1)",
    )


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
    """One-second samples of every service's traffic, the last `seconds` of them."""

    seconds: int = HISTORY_SECONDS
    samples: deque[dict[str, Any]] = field(default_factory=deque)
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
                "backends": per_backend,
            }
        for gone in set(self._last) - set(server.services):
            del self._last[gone]
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
        backend_rates = svc_rates.get("backends", {})
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


def error_response(status: int, message: str) -> web.Response:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return web.json_response({"error": message}, status=status, headers=headers)


def authorize_write(request: web.Request) -> None:
    """Raise ApiError unless this write may change anything."""
    origin = request.headers.get("Origin")
    if origin is not None and origin != "null":
        if urlsplit(origin).netloc.lower() != request.host.lower():
            raise ApiError(403, f"cross-site write refused (Origin {origin})")
    elif origin == "null":
        raise ApiError(403, "cross-site write refused (Origin null)")
    config = request.app[SERVER_KEY].config.admin
    token = admin_token(config)
    if token is None:
        if is_loopback(config.host):
            return
        raise ApiError(401, "writes need a token; none is configured")
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise ApiError(401, "missing 'Authorization: Bearer <token>' header")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(401, "wrong token")


async def json_object(request: web.Request, allowed: tuple[str, ...]) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"expected a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ApiError(
            400, f"unknown key(s) {', '.join(map(repr, unknown))}: expected {', '.join(allowed)}"
        )
    return body


def check_weight(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ApiError(400, f"invalid weight {value!r}: expected an integer >= 0")
    return value


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def api_handler(handler: Handler, *, write: bool = False) -> Handler:
    """Turn ApiError / RuntimeChangeError into a JSON error; check authorization of writes."""
    from balancer.server import RuntimeChangeError

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            if write:
                authorize_write(request)
            return await handler(request)
        except (ApiError, RuntimeChangeError) as exc:
            return error_response(exc.status, exc.message)

    return wrapped


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
            raise ApiError(400, f"invalid since {since_text!r}: expected a number") from None
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
    if state is not None and state not in STATES:
        raise ApiError(400, f"invalid state {state!r}: expected one of {', '.join(STATES)}")
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
        raise ApiError(400, f'invalid address {text!r}: expected "host:port"')
    try:
        host, port = parse_address(text, where="address", source="request")
    except ConfigError as exc:
        raise ApiError(400, f"invalid address: {exc.message}") from None
    weight = check_weight(body["weight"]) if "weight" in body else 1
    config = BackendConfig(host, port, weight)
    if runtime.pool.get(config.address) is not None:
        raise ApiError(409, f"service {service!r} already has backend {config.address!r}")
    backend = server.add_backend(service, config)
    return web.json_response(backend_status(backend, time.time()), status=201)


async def handle_remove_backend(request: web.Request) -> web.Response:
    admin = request.app[ADMIN_KEY]
    service = request.match_info["service"]
    address = request.match_info["address"]
    _, backend = admin.server.backend(service, address)
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
    reload: Callable[[], Awaitable[None]] | None = getattr(server, "reload", None)
    if reload is None:
        raise ApiError(501, "this balancer cannot reload its config at run time")
    try:
        await reload()
    except ConfigError as exc:
        raise ApiError(400, str(exc)) from None
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
        self.app = web.Application()
        self.app[SERVER_KEY] = server
        self.app[REGISTRY_KEY] = make_registry(server)
        self.app[ADMIN_KEY] = self
        r = self.app.router
        r.add_get("/status", handle_status)
        r.add_get("/metrics", handle_metrics)
        r.add_get("/", handle_index)
        r.add_static("/static/", STATIC_DIR)
        r.add_get("/api/openapi.json", handle_openapi)
        r.add_get("/api/services", api_handler(handle_services))
        r.add_get("/api/history", api_handler(handle_history))
        backend_path = "/api/services/{service}/backends/{address}"
        r.add_put(backend_path, api_handler(handle_set_backend, write=True))
        r.add_delete(backend_path, api_handler(handle_remove_backend, write=True))
        r.add_post("/api/services/{service}/backends", api_handler(handle_add_backend, write=True))
        r.add_post("/api/reload", api_handler(handle_reload, write=True))
        self.runner: web.AppRunner | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._removals: dict[tuple[str, str], asyncio.Task[None]] = {}

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
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
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


# -- OpenAPI description --------------------------------------------------------------------


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_SERVICE = {"name": "service", "in": "path", "required": True, "schema": {"type": "string"}}
_ADDRESS = {
    "name": "address",
    "in": "path",
    "required": True,
    "description": "the backend as host:port",
    "schema": {"type": "string", "example": "127.0.0.1:8081"},
}
_BACKEND_REF = {"$ref": "#/components/schemas/Backend"}
_WRITE_ERRORS = {
    "400": _error("invalid request; nothing changed"),
    "401": _error("missing or wrong bearer token"),
    "403": _error("cross-site request refused"),
    "404": _error("no such service or backend"),
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "balancer admin API",
        "version": "1",
        "description": (
            "Status, metrics and runtime changes of a running balancer. Writes need "
            "'Authorization: Bearer <token>' when a token is configured ([admin] token or "
            "BALANCER_ADMIN_TOKEN); a non-loopback admin listener always needs one."
        ),
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "string"}},
            },
            "Backend": {
                "type": "object",
                "properties": {
                    "address": {"type": "string"},
                    "state": {"type": "string", "enum": ["up", "down"]},
                    "admin_state": {"type": "string", "enum": ["ready", "drain", "maint"]},
                    "weight": {"type": "integer", "minimum": 0},
                    "requests": {"type": "integer"},
                    "in_flight": {"type": "integer"},
                    "failures": {"type": "integer"},
                    "last_check": {"type": "number", "nullable": True},
                    "rps": {"type": "number"},
                    "error_rate": {"type": "number"},
                },
            },
            "Services": {
                "type": "object",
                "properties": {
                    "services": {
                        "type": "object",
                        "additionalProperties": {
                            "type": "object",
                            "properties": {
                                "listen": {"type": "string"},
                                "mode": {"type": "string"},
                                "algorithm": {"type": "string"},
                                "rps": {"type": "number"},
                                "error_rate": {"type": "number"},
                                "p99_ms": {"type": "number"},
                                "backends": {"type": "array", "items": _BACKEND_REF},
                            },
                        },
                    }
                },
            },
            "BackendChange": {
                "type": "object",
                "additionalProperties": False,
                "minProperties": 1,
                "properties": {
                    "state": {"type": "string", "enum": list(STATES)},
                    "weight": {"type": "integer", "minimum": 0},
                },
            },
            "NewBackend": {
                "type": "object",
                "additionalProperties": False,
                "required": ["address"],
                "properties": {
                    "address": {"type": "string", "example": "127.0.0.1:8085"},
                    "weight": {"type": "integer", "minimum": 0, "default": 1},
                },
            },
        },
    },
    "paths": {
        "/status": {
            "get": {
                "summary": "Services and backends with their counters",
                "responses": {"200": _json({"$ref": "#/components/schemas/Services"}, "status")},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {"200": {"description": "text exposition format"}},
            }
        },
        "/api/services": {
            "get": {
                "summary": "Same as /status, plus the rates of the latest one-second sample",
                "responses": {"200": _json({"$ref": "#/components/schemas/Services"}, "status")},
            }
        },
        "/api/history": {
            "get": {
                "summary": "One-second samples (requests/s, error rate, p99) of the last minutes",
                "parameters": [
                    {
                        "name": "since",
                        "in": "query",
                        "required": False,
                        "description": "only samples taken after this Unix time",
                        "schema": {"type": "number"},
                    }
                ],
                "responses": {"200": _json({"type": "object"}, "samples, oldest first")},
            }
        },
        "/api/services/{service}/backends": {
            "post": {
                "summary": "Add a backend; it takes traffic once its health checks pass",
                "security": [{"bearer": []}],
                "parameters": [_SERVICE],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/NewBackend"}}
                    },
                },
                "responses": {
                    "201": _json(_BACKEND_REF, "added"),
                    "409": _error("the service already has this backend"),
                    **_WRITE_ERRORS,
                },
            }
        },
        "/api/services/{service}/backends/{address}": {
            "put": {
                "summary": "Set a backend's admin state (up, drain, maint) and/or weight",
                "security": [{"bearer": []}],
                "parameters": [_SERVICE, _ADDRESS],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/BackendChange"}
                        }
                    },
                },
                "responses": {"200": _json(_BACKEND_REF, "changed"), **_WRITE_ERRORS},
            },
            "delete": {
                "summary": (
                    "Remove a backend: answered at once with 202; the backend drains (no new "
                    "requests) and is removed when its in-flight requests finish or the drain "
                    "timeout passes"
                ),
                "security": [{"bearer": []}],
                "parameters": [_SERVICE, _ADDRESS],
                "responses": {"202": _json({"type": "object"}, "removal started"), **_WRITE_ERRORS},
            },
        },
        "/api/reload": {
            "post": {
                "summary": "Re-read the config file and apply it",
                "security": [{"bearer": []}],
                "responses": {
                    "200": _json({"type": "object"}, "reloaded"),
                    "501": _error("reload is not available"),
                    **_WRITE_ERRORS,
                },
            }
        },
    },
}
