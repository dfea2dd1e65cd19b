"""The documents of the read side: `/status`, and `/api/services` (status plus rates).

Their shape is described in `openapi.json` (schemas Status and Services), and a test
checks what they return against it. A service in http mode has an "http" object too,
the counters only that mode keeps (`Proxy.mode_status`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from balancer.admin.history import TrafficHistory
from balancer.core.pool import Backend

if TYPE_CHECKING:
    from balancer.runtime.server import Server


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
        extra = proxy.mode_status()
        if extra is not None:
            services[name]["http"] = dict(extra)
        cfg = runtime.config
        if cfg.front or cfg.backend_tls is not None:
            services[name]["tls"] = dict(proxy.edge_status())
    return {"services": services}


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
