"""Prometheus metrics, read from the balancer's own counters at scrape time.

The hot path only bumps plain integers (on `Backend`) and a bucket array
(`balancer.core.stats.LatencyHistogram`); a custom collector turns them into
Prometheus families when `/metrics` is scraped, so serving a request costs no
metric-library call.
Shortages of the process's own resources (`balancer.net.resources`) are exported
too: errors by kind, and the file-descriptor budget once the server has set it.
Services in http mode add the `balancer_http_*` families, from `Proxy.mode_status`;
services with TLS or the PROXY protocol the `balancer_tls_*` ones (`admin.tls_metrics`).
`balancer_config_info{revision}` names the running config, and each consistent_hash service
has `balancer_hash_table_info{service, digest}` and `balancer_hash_table_rebuilds`: instances
with different digests for a service send some keys to different backends
(`admin.documents`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from balancer.admin.documents import config_revision, hash_table
from balancer.admin.tls_metrics import edge_metrics
from balancer.net import resources

if TYPE_CHECKING:
    from balancer.proxy.base import EdgeStatus, HttpStatus
    from balancer.runtime.server import Server


class BalancerCollector(Collector):
    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "balancer_requests",
            "Replies served by each backend (message mode) or connections (tcp mode).",
            labels=["service", "backend"],
        )
        failures = CounterMetricFamily(
            "balancer_backend_failures",
            "Requests or connections that failed on each backend.",
            labels=["service", "backend"],
        )
        up = GaugeMetricFamily(
            "balancer_backend_up", "1 when the backend is up.", labels=["service", "backend"]
        )
        in_flight = GaugeMetricFamily(
            "balancer_backend_in_flight",
            "Requests (message mode) or connections (tcp mode) held by each backend.",
            labels=["service", "backend"],
        )
        weight = GaugeMetricFamily(
            "balancer_backend_weight", "Configured weight.", labels=["service", "backend"]
        )
        connect_failures = CounterMetricFamily(
            "balancer_backend_connect_failures",
            "Failed connection attempts to each backend.",
            labels=["service", "backend"],
        )
        active = GaugeMetricFamily(
            "balancer_backend_connections",
            "Open proxied connections per backend (tcp mode).",
            labels=["service", "backend"],
        )
        bytes_in = CounterMetricFamily(
            "balancer_backend_bytes_sent",
            "Bytes relayed from clients to each backend (tcp mode).",
            labels=["service", "backend"],
        )
        bytes_out = CounterMetricFamily(
            "balancer_backend_bytes_received",
            "Bytes relayed from each backend to clients (tcp mode).",
            labels=["service", "backend"],
        )
        clients = GaugeMetricFamily(
            "balancer_client_connections", "Open client connections.", labels=["service"]
        )
        not_available = CounterMetricFamily(
            "balancer_not_available",
            "Requests answered 'Server not available' (message mode) or connections closed "
            "because no backend could take them (tcp mode).",
            labels=["service"],
        )
        retries = CounterMetricFamily(
            "balancer_retries",
            "Requests re-sent, or connects tried again, on another backend.",
            labels=["service"],
        )
        refused = CounterMetricFamily(
            "balancer_refused_connections",
            "Client connections refused by limits.",
            labels=["service"],
        )
        duration = HistogramMetricFamily(
            "balancer_request_duration_seconds",
            "Time from a request's arrival to its reply being written (message and http mode).",
            labels=["service"],
        )
        http: dict[str, HttpStatus] = {}
        edges: dict[str, EdgeStatus] = {}
        for name, runtime in self.server.services.items():
            runtime.proxy.account()
            for b in runtime.pool:
                labels = [name, b.address]
                requests.add_metric(labels, b.requests)
                failures.add_metric(labels, b.failures)
                up.add_metric(labels, 1.0 if b.is_up else 0.0)
                in_flight.add_metric(labels, b.in_flight)
                weight.add_metric(labels, b.weight)
                connect_failures.add_metric(labels, b.connect_failures)
                active.add_metric(labels, b.active_connections)
                bytes_in.add_metric(labels, b.bytes_in)
                bytes_out.add_metric(labels, b.bytes_out)
            proxy = runtime.proxy
            clients.add_metric([name], proxy.client_connections)
            not_available.add_metric([name], proxy.not_available)
            retries.add_metric([name], proxy.retries)
            refused.add_metric([name], proxy.refused)
            hist = runtime.histogram
            duration.add_metric([name], hist.cumulative(), hist.total)
            counters = proxy.mode_status()
            if counters is not None:
                http[name] = counters
            cfg = runtime.config
            if cfg.front or cfg.backend_tls is not None:
                edges[name] = proxy.edge_status()
        yield from process_metrics()
        yield from consistency_metrics(self.server)
        yield from discovery_metrics(self.server)
        if http:
            yield from http_metrics(http)
        if edges:
            yield from edge_metrics(edges)
        yield from (
            requests,
            failures,
            up,
            in_flight,
            weight,
            connect_failures,
            active,
            bytes_in,
            bytes_out,
            clients,
            not_available,
            retries,
            refused,
            duration,
        )


def http_metrics(services: dict[str, HttpStatus]) -> Iterator[Metric]:
    """The families of http mode, for the services in that mode (none without one)."""
    responses = CounterMetricFamily(
        "balancer_http_responses",
        "Responses sent to clients by status class, the balancer's own included (http mode).",
        labels=["service", "class"],
    )
    generated = CounterMetricFamily(
        "balancer_http_generated",
        "Responses the balancer made itself (its errors), by status (http mode).",
        labels=["service", "status"],
    )
    connections = CounterMetricFamily(
        "balancer_http_upstream_connections",
        "Upstream connections requests went on: made for the request (new), or kept alive "
        "from an earlier one (reused) (http mode).",
        labels=["service", "kind"],
    )
    retries = CounterMetricFamily(
        "balancer_http_retries",
        "Requests sent again: to another backend (backend), or on a fresh connection after "
        "a kept-alive one closed under them (keepalive_race) (http mode).",
        labels=["service", "kind"],
    )
    idle = GaugeMetricFamily(
        "balancer_http_idle_upstream_connections",
        "Kept-alive upstream connections idle now (http mode).",
        labels=["service"],
    )
    by_backend = CounterMetricFamily(
        "balancer_http_backend_responses",
        "Responses of each backend relayed to clients, by status class (http mode).",
        labels=["service", "backend", "class"],
    )
    tunnels = GaugeMetricFamily(
        "balancer_http_tunnels",
        "Upgraded connections (WebSocket, ...) relayed now (http mode).",
        labels=["service"],
    )
    for name, counters in services.items():
        for status_class, n in counters["responses"].items():
            responses.add_metric([name, status_class], n)
        for status, n in counters["generated"].items():
            generated.add_metric([name, status], n)
        upstream = counters["upstream_connections"]
        connections.add_metric([name, "new"], upstream["new"])
        connections.add_metric([name, "reused"], upstream["reused"])
        again = counters["retries"]
        retries.add_metric([name, "backend"], again["backend"])
        retries.add_metric([name, "keepalive_race"], again["keepalive_race"])
        idle.add_metric([name], counters["idle_upstream_connections"])
        tunnels.add_metric([name], counters["tunnels"])
        for backend, classes in counters["backend_responses"].items():
            for status_class, n in classes.items():
                by_backend.add_metric([name, backend, status_class], n)
    yield from (responses, generated, connections, retries, idle, tunnels, by_backend)


def consistency_metrics(server: Server) -> Iterator[Metric]:
    """The config's revision and, per consistent_hash service, its table's digest."""
    config = GaugeMetricFamily(
        "balancer_config_info",
        "The running config's revision (BLAKE2b-64 of its services' settings); always 1.",
        labels=["revision"],
    )
    config.add_metric([config_revision(server)], 1.0)
    yield config
    info = GaugeMetricFamily(
        "balancer_hash_table_info",
        "The Maglev table's digest of each consistent_hash service: equal digests, equal "
        "tables, the same backend for every key; always 1.",
        labels=["service", "digest"],
    )
    rebuilds = CounterMetricFamily(
        "balancer_hash_table_rebuilds",
        "Maglev table rebuilds of each consistent_hash service (a backend joined or left, or "
        "a weight changed) since its policy was made.",
        labels=["service"],
    )
    for name, runtime in server.services.items():
        table = hash_table(runtime)
        if table is not None:
            info.add_metric([name, table["digest"]], 1.0)
            rebuilds.add_metric([name], table["rebuilds"])
    yield info
    yield rebuilds


def discovery_metrics(server: Server) -> Iterator[Metric]:
    """Per service with `discover`: whether its source answers, and how old its view is."""
    if server.discovery is None:
        return
    up = GaugeMetricFamily(
        "balancer_discovery_up",
        "1 when the service's discovery source (DNS, etcd) answers; 0 while the last known "
        "backends are kept without it.",
        labels=["service", "kind"],
    )
    age = GaugeMetricFamily(
        "balancer_discovery_view_age_seconds",
        "Seconds since the source last confirmed the service's backends (absent before it "
        "ever answered).",
        labels=["service"],
    )
    for name, state in server.discovery.states.items():
        status = state.status()
        kind = "etcd" if status.get("kind") == "etcd" else "dns"
        up.add_metric([name, kind], 1.0 if status["ok"] else 0.0)
        last = status["last_success"]
        if last is not None:
            age.add_metric([name], max(0.0, time.time() - last))
    yield up
    yield age


def process_metrics() -> Iterator[Metric]:
    """Local resource shortages by kind and, once set, the file-descriptor budget."""
    errors = CounterMetricFamily(
        "balancer_local_resource_errors",
        "Connects and accepts that failed for want of the balancer's own resources "
        "(file descriptors, kernel memory, local ports); never counted against a backend.",
        labels=["kind"],
    )
    for kind, n in sorted(resources.ALARM.counts.items()):
        errors.add_metric([kind], n)
    yield errors
    fds = resources.FDS
    if fds is None:
        return
    yield GaugeMetricFamily("balancer_fd_limit", "The process's open-file limit.", value=fds.limit)
    yield GaugeMetricFamily(
        "balancer_fd_reserve",
        "File descriptors kept for health checks, backend connections and the admin endpoint.",
        value=fds.reserve,
    )
    yield GaugeMetricFamily(
        "balancer_fd_clients", "Client connections open now, in every service.", value=fds.clients
    )
    yield CounterMetricFamily(
        "balancer_fd_refused",
        "Client connections refused because they would have used the reserve.",
        value=fds.refused,
    )


def make_registry(server: Server) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BalancerCollector(server))
    return registry
