"""A new connection to a backend for http mode, through the shared dialer.

`connect` dials within `connect_timeout` (`balancer.proxy.upstream.dial`,
registered with the loop guard), hands the socket to the loop as an
`UpstreamConnection`, and turns every way that can fail into `Refused`: the
backend's failures are counted and reported to the pool (passive health);
our own shortages (descriptors, ports) and a backend address that is one of
our own listeners are not the backend's fault and are only noted.
"""

from __future__ import annotations

import asyncio
import logging

from balancer.core.pool import Backend
from balancer.proxy.http.context import Client, Serving
from balancer.proxy.http.upstream import UpstreamConnection
from balancer.proxy.upstream import (
    OwnListener,
    TlsFailed,
    adopt,
    connect_failure,
    dial,
    local_shortage,
    mark_own_listener,
)

log = logging.getLogger("balancer")


class Refused(Exception):
    """No connection to the backend; the message says why."""


async def connect(svc: Serving, backend: Backend, origin: Client) -> UpstreamConnection:
    """A new connection to `backend` for the client connection `origin`."""
    loop = asyncio.get_running_loop()
    pool = svc.pool
    timeout = svc.config.connect_timeout
    try:
        async with asyncio.timeout(timeout):
            sock, registration = await dial(loop, backend, svc.owner(backend), origin)
    except OwnListener as exc:
        mark_own_listener(pool, backend, exc)
        raise Refused(f"{backend.address} is this balancer") from None
    except (OSError, TimeoutError) as exc:
        what = f"connecting to backend {backend.address} of service {svc.config.name}"
        if local_shortage(exc, what):
            raise Refused(f"no local resources: {exc}") from None
        reason = str(connect_failure(exc, timeout))
        backend.connect_failures += 1
        backend.failures += 1
        pool.report_failure(backend, reason)
        raise Refused(reason) from None
    conn = UpstreamConnection(backend, registration, svc.http.max_header_bytes)
    origination = svc.origination(origin.arrival, origin.transport)
    try:
        await adopt(loop, conn, sock, backend, origination)
    except TlsFailed as exc:
        registration.release()
        backend.connect_failures += 1
        backend.failures += 1
        pool.report_failure(backend, str(exc))
        raise Refused(str(exc)) from None
    except OSError as exc:  # pragma: no cover - a connected socket the loop refused
        registration.release()
        log.warning("service %s: backend connection lost: %s", svc.config.name, exc)
        raise Refused(f"connection lost: {exc}") from None
    return conn
