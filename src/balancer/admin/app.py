"""Admin endpoint (aiohttp, on the balancer's own event loop): `AdminServer`, its routes.

Read side: `/status`, `/metrics`, `/api/services`, `/api/history`, `/api/openapi.json`
and the dashboard; write side (the runtime API): backend state and weight, adding and
removing backends, reloading the config. Errors come back as `{"error": "..."}` (short,
whatever the input) with a 4xx status, and client input never costs a traceback.

Where each part is: `handlers` (what each route reads or changes), `checks` (the checks
every request and body passes, and the error answers), `documents` (`/status`),
`history` (the per-second samples), `security` (who may do what: Host, Origin, read and
write tokens), `metrics` (the Prometheus collector), `openapi` (the API's description).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from balancer.admin.checks import (
    GUARD_KEY,
    MAX_BODY,
    add_security_headers,
    api_handler,
    guard_middleware,
    show,
)
from balancer.admin.handlers import (
    ADMIN_KEY,
    REGISTRY_KEY,
    SERVER_KEY,
    STATIC_DIR,
    handle_add_backend,
    handle_certificates,
    handle_history,
    handle_index,
    handle_metrics,
    handle_openapi,
    handle_reload,
    handle_remove_backend,
    handle_services,
    handle_set_backend,
    handle_status,
)
from balancer.admin.history import TrafficHistory
from balancer.admin.metrics import make_registry
from balancer.admin.security import OPEN, READ, WRITE, AdminGuard, check_admin_security
from balancer.net.loops import listen_socket

if TYPE_CHECKING:
    from balancer.runtime.server import Server

log = logging.getLogger("balancer")


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


def guarded_app(guard: AdminGuard) -> web.Application:
    """An application whose every request passes `guard` (Host, Origin; the routes add the
    token check through `api_handler`), with the body limit and the security headers."""
    app = web.Application(middlewares=[guard_middleware], client_max_size=MAX_BODY)
    app[GUARD_KEY] = guard
    app.on_response_prepare.append(add_security_headers)
    return app


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
        r.add_post("/api/certificates/reload", api_handler(handle_certificates, access=WRITE))
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

    async def start(self, sock: socket.socket | None = None) -> tuple[str, int]:
        """Serve on `sock` (a listening socket bound beforehand, or handed over by the
        balancer this one takes over from), or else on one bound here; the bound address."""
        cfg = self.server.config.admin
        check_admin_security(cfg)
        runner = web.AppRunner(self.app, **RUNNER_OPTIONS)
        await runner.setup()
        try:
            # A socket bound here keeps aiohttp (uvloop) off the resolver's thread pool.
            if sock is None:
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
        name = sockets[0].getsockname()
        if isinstance(name, str):  # a Unix socket: a worker's control socket
            return name, 0
        host, port = name[:2]
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
