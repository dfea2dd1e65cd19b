"""The admin endpoint's routes: what each one reads or changes.

Read side: `/status` and `/metrics` (scrapes), `/api/services` (status plus the latest
per-second rates), `/api/history` (the one-second samples of the dashboard's charts),
`/api/openapi.json`, and the dashboard itself at `/`.

Write side (the runtime API): backend state and weight, adding and removing backends,
reloading the config. Every write is checked in full before anything changes (here for
what the client sent, by the server for what the running state allows). A service whose
backends are in etcd (`discover = "etcd"`) has its backend writes made in etcd
(`balancer.runtime.etcd`): they reach every balancer watching it, this one included.
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from balancer.admin.checks import ApiError, check_weight, json_object, show
from balancer.admin.documents import backend_status, services_document, status_document
from balancer.admin.history import TrafficHistory
from balancer.admin.openapi import OPENAPI
from balancer.config.addresses import parse_address
from balancer.config.errors import ConfigError
from balancer.config.model import BackendConfig
from balancer.core.states import SETTABLE

if TYPE_CHECKING:
    from balancer.runtime.etcd import EtcdDiscovery
    from balancer.runtime.server import Server


def etcd_of(server: Server, service: str) -> EtcdDiscovery | None:
    """The etcd discovery that holds `service`'s backends, if etcd does."""
    from balancer.runtime.etcd import EtcdDiscovery

    discovery = server.discovery
    if isinstance(discovery, EtcdDiscovery) and discovery.directory_of(service) is not None:
        return discovery
    return None


class AdminState(Protocol):
    """What the routes use of the admin server (`balancer.admin.app.AdminServer`)."""

    server: Server
    history: TrafficHistory

    def removing(self, service: str, address: str) -> bool: ...

    def start_removal(self, service: str, address: str) -> None: ...


SERVER_KEY: web.AppKey[Server] = web.AppKey("server")
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)
ADMIN_KEY: web.AppKey[AdminState] = web.AppKey("admin")

STATIC_DIR = Path(__file__).resolve().parent / "static"
BACKEND_STATES = tuple(SETTABLE)
"""Admin states a backend can be set to through the API."""


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
    if state is not None and (not isinstance(state, str) or state not in BACKEND_STATES):
        raise ApiError(
            400, f"invalid state {show(state)}: expected one of {', '.join(BACKEND_STATES)}"
        )
    weight = check_weight(body["weight"]) if "weight" in body else None
    etcd = etcd_of(server, service)
    if etcd is not None:
        await etcd.write_state(service, address, state, weight)  # 503: etcd did not take it
        _, backend = server.backend(service, address)
    else:
        backend = server.set_backend(service, address, state=state, weight=weight)
    return web.json_response(backend_status(backend, time.time()))


async def handle_add_backend(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    service = request.match_info["service"]
    server.runtime(service)  # 404 first
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
    await server.check_backend_address(host, port)  # 400: the balancer itself
    etcd = etcd_of(server, service)
    if etcd is None:
        backend = server.add_backend(service, config)  # 409: the service has it already
        return web.json_response(backend_status(backend, time.time()), status=201)
    if server.runtime(service).pool.get(config.address) is not None:
        raise ApiError(409, f"service {service!r} already has backend {config.address!r}")
    await etcd.add(service, config)  # 503: etcd did not take it
    found = server.runtime(service).pool.get(config.address)
    if found is None:  # in etcd, not applied here yet
        return web.json_response(
            {"service": service, "address": config.address, "message": "written to etcd"},
            status=202,
        )
    return web.json_response(backend_status(found, time.time()), status=201)


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
        etcd = etcd_of(admin.server, service)
        if etcd is not None:
            await etcd.remove(service, address)  # 503: etcd did not take it
        else:
            admin.start_removal(service, address)
            # let the removal task take its first step: the backend drains before we answer
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
    await server.reload()  # a rejected file: InvalidInput or Conflict, nothing changed
    return web.json_response({"reloaded": True, **status_document(server)})


async def handle_certificates(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    services = await server.reload_certificates()  # a bad file: InvalidInput, nothing changed
    return web.json_response({"reloaded": True, "services": services})


async def handle_openapi(request: web.Request) -> web.Response:
    return web.json_response(OPENAPI)


async def handle_index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html")
