"""Proxy modes by name: the `mode` key of a service picks its implementation."""

from __future__ import annotations

from collections.abc import Callable

from balancer.config.model import ServiceConfig
from balancer.core.pool import BackendPool
from balancer.core.stats import LatencyHistogram
from balancer.observe.accesslog import AccessLog
from balancer.proxy.base import Proxy
from balancer.proxy.http.service import HttpService
from balancer.proxy.message.service import MessageService
from balancer.proxy.tcp.service import TcpService

ProxyFactory = Callable[[ServiceConfig, BackendPool, LatencyHistogram, AccessLog | None], Proxy]


def _message(
    config: ServiceConfig,
    pool: BackendPool,
    histogram: LatencyHistogram,
    access_log: AccessLog | None,
) -> Proxy:
    return MessageService(config, pool, histogram=histogram, access_log=access_log)


def _tcp(
    config: ServiceConfig,
    pool: BackendPool,
    histogram: LatencyHistogram,
    access_log: AccessLog | None,
) -> Proxy:
    return TcpService(config, pool)


def _http(
    config: ServiceConfig,
    pool: BackendPool,
    histogram: LatencyHistogram,
    access_log: AccessLog | None,
) -> Proxy:
    return HttpService(config, pool, histogram, access_log)


PROXY_MODES: dict[str, ProxyFactory] = {"message": _message, "tcp": _tcp, "http": _http}


def build_proxy(
    config: ServiceConfig,
    pool: BackendPool,
    histogram: LatencyHistogram,
    access_log: AccessLog | None,
) -> Proxy:
    """The proxy of a service's `mode`."""
    return PROXY_MODES[config.mode](config, pool, histogram, access_log)
