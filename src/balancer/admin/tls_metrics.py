"""The `balancer_tls_*` and `balancer_proxy_*` metric families, for the services with TLS,
the PROXY protocol or SNI routes (from `Proxy.edge_status`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from balancer.proxy.base import EdgeStatus


def edge_metrics(services: dict[str, EdgeStatus]) -> Iterator[Metric]:
    expiry = GaugeMetricFamily(
        "balancer_tls_certificate_expiry_days",
        "Days until each served certificate expires (negative: expired).",
        labels=["service", "certificate", "subject"],
    )
    handshakes = CounterMetricFamily(
        "balancer_tls_handshakes",
        "Client TLS handshakes completed.",
        labels=["service"],
    )
    closed = CounterMetricFamily(
        "balancer_front_closed",
        "Client connections closed before their mode got them (TLS handshake, PROXY header, "
        "ClientHello, SNI route), by reason.",
        labels=["service", "reason"],
    )
    proxied = CounterMetricFamily(
        "balancer_proxy_headers",
        "Client connections whose PROXY protocol header was read.",
        labels=["service"],
    )
    routed = CounterMetricFamily(
        "balancer_sni_routed",
        "Connections handed to another tcp service by the server name of their ClientHello.",
        labels=["service", "target"],
    )
    backend = CounterMetricFamily(
        "balancer_backend_tls_handshakes",
        "TLS handshakes with backends: full, or resuming a session (resumed).",
        labels=["service", "kind"],
    )
    for name, status in services.items():
        for cert in status["certificates"]:
            expiry.add_metric([name, cert["path"], cert["subject"]], cert["days_left"])
        handshakes.add_metric([name], status["handshakes"])
        for reason, n in sorted(status["errors"].items()):
            closed.add_metric([name, reason], n)
        proxied.add_metric([name], status["proxied"])
        for target, n in sorted(status["routed"].items()):
            routed.add_metric([name, target], n)
        resumed = status["backend_resumed"]
        backend.add_metric([name, "full"], status["backend_handshakes"] - resumed)
        backend.add_metric([name, "resumed"], resumed)
    yield from (expiry, handshakes, closed, proxied, routed, backend)
