"""Admin endpoint (aiohttp, on the balancer's own event loop): status and metrics."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from balancer.metrics import make_registry
from balancer.pool import Backend

if TYPE_CHECKING:
    from balancer.server import Server

SERVER_KEY: web.AppKey[Server] = web.AppKey("server")
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)


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
        backends = [backend_status(b, now_wall) for b in runtime.pool]
        proxy = runtime.proxy
        services[name] = {
            "listen": runtime.listen,
            "mode": runtime.config.mode,
            "algorithm": runtime.config.algorithm,
            "client_connections": proxy.client_connections,
            "not_available": getattr(proxy, "not_available", 0),
            "retries": getattr(proxy, "retries", 0),
            "refused": getattr(proxy, "refused", 0),
            "backends": backends,
        }
    return {"services": services}


async def handle_status(request: web.Request) -> web.Response:
    return web.json_response(status_document(request.app[SERVER_KEY]))


async def handle_metrics(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY_KEY]
    body = generate_latest(registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class AdminServer:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.app = web.Application()
        self.app[SERVER_KEY] = server
        self.app[REGISTRY_KEY] = make_registry(server)
        self.app.router.add_get("/status", handle_status)
        self.app.router.add_get("/metrics", handle_metrics)
        self.runner: web.AppRunner | None = None

    async def start(self) -> tuple[str, int]:
        cfg = self.server.config.admin
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, cfg.host, cfg.port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self.runner = runner
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        host, port = sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
