"""The documents of the read side: `/status`, and `/api/services` (status plus rates).

Their shape is described in `openapi.json` (schemas Status and Services), and a test
checks what they return against it. A service in http mode has an "http" object too,
the counters only that mode keeps (`Proxy.mode_status`); a consistent_hash service a
"hash_table" object, its Maglev table's digest (`ConsistentHash.digest`), so instances that
would send a key to different backends show it.

`config_revision` names the running config: BLAKE2b-64 (hex) of the `repr` of the running
services' configs (`ServiceConfig`, by service name), as parsed from the file at start or at
the last reload. The same file gives the same revision in every process of the same balancer
version, wherever the file lies; the process-wide settings (the admin listener, per instance
and with secret tokens; drain times; the access log) are left out. Runtime API changes
(weights, backends added or removed) do not change it: they show in the services, and in a
consistent_hash service's table digest.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from balancer.admin.history import TrafficHistory
from balancer.config.model import ServiceConfig
from balancer.core.policies.consistent_hash import ConsistentHash
from balancer.core.pool import Backend

if TYPE_CHECKING:
    from balancer.runtime.server import Server
    from balancer.runtime.services import ServiceRuntime

_revision: tuple[tuple[ServiceConfig, ...], str] = ((), "")
"""The service configs last named and their revision (computed once, not per scrape)."""


def services_revision(services: Iterable[ServiceConfig]) -> str:
    """BLAKE2b-64 (hex) of the `repr` of `services` in order of name (module docstring)."""
    configs = tuple(sorted(services, key=lambda svc: svc.name))
    return hashlib.blake2b(repr(configs).encode(), digest_size=8).hexdigest()


def config_revision(server: Server) -> str:
    """The revision of the running services' configs (`services_revision`)."""
    global _revision
    configs = tuple(r.config for _, r in sorted(server.services.items()))
    last, revision = _revision
    if len(last) != len(configs) or any(a is not b for a, b in zip(last, configs, strict=True)):
        revision = services_revision(configs)
        _revision = (configs, revision)
    return revision


def hash_table(runtime: ServiceRuntime) -> dict[str, Any] | None:
    """The Maglev table of a consistent_hash service: digest, slots, backends with slots,
    rebuilds since the policy was made; None for the other algorithms."""
    policy = runtime.pool.policy
    if not isinstance(policy, ConsistentHash):
        return None
    return {
        "digest": policy.digest,
        "size": policy.table_size,
        "backends": policy.members,
        "rebuilds": policy.rebuilds,
    }


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
        table = hash_table(runtime)
        if table is not None:
            services[name]["hash_table"] = table
        cfg = runtime.config
        found = server.discovery.states.get(name) if server.discovery is not None else None
        if found is not None:
            services[name]["discovery"] = found.status()
        if cfg.front or cfg.backend_tls is not None:
            services[name]["tls"] = dict(proxy.edge_status())
    return {"config_revision": config_revision(server), "services": services}


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
