"""Shortages of the balancer's own resources, told apart from backend failures.

How it works: a connect or accept that fails with EMFILE/ENFILE (out of file
descriptors), ENOBUFS/ENOMEM (out of kernel memory) or EADDRNOTAVAIL (out of
local ports) says nothing about the backend it was meant for: the shortage is
ours. `is_local_shortage` tells such errors apart so callers do not count them
against a backend; `ResourceAlarm.note` counts them by kind (read by
`/metrics`) and logs one line per kind per `LOG_EVERY` seconds instead of one
per failure. `FdBudget` keeps a reserve of descriptors for health checks,
backend connections and the admin endpoint: client connections beyond
`limit - reserve` are refused by the proxies before the process runs out.
"""

from __future__ import annotations

import errno
import logging
import resource
import time

log = logging.getLogger("balancer")

LOCAL_ERRNOS: dict[int, str] = {
    errno.EMFILE: "file_descriptors",
    errno.ENFILE: "file_descriptors",
    errno.ENOBUFS: "memory",
    errno.ENOMEM: "memory",
    errno.EADDRNOTAVAIL: "local_ports",
}
"""errno -> the resource it says we are out of."""

LOG_EVERY = 10.0

_HINTS = {
    "file_descriptors": "raise the open-file limit (ulimit -n / LimitNOFILE) or lower "
    "max_connections",
    "memory": "the kernel is short of socket memory",
    "local_ports": "out of local ports towards a backend (net.ipv4.ip_local_port_range)",
}


def is_local_shortage(exc: BaseException) -> bool:
    """True when `exc` reports a shortage of our own resources, not a backend's fault."""
    return isinstance(exc, OSError) and exc.errno in LOCAL_ERRNOS


class ResourceAlarm:
    """Counts local shortages by kind and logs each kind at most once per `LOG_EVERY`."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = dict.fromkeys(sorted(set(LOCAL_ERRNOS.values())), 0)
        self._logged_at: dict[str, float] = {}

    def note(self, exc: BaseException, where: str) -> None:
        """Count `exc` (a local shortage) met while `where` ("connecting to ...")."""
        if not isinstance(exc, OSError) or exc.errno not in LOCAL_ERRNOS:
            return
        kind = LOCAL_ERRNOS[exc.errno]
        self.counts[kind] += 1
        now = time.monotonic()
        if now - self._logged_at.get(kind, -1e9) >= LOG_EVERY:
            self._logged_at[kind] = now
            log.error(
                "out of %s while %s: %s (%s); not counted against any backend, "
                "%d such error(s) so far",
                kind.replace("_", " "),
                where,
                exc.strerror or exc,
                _HINTS[kind],
                self.counts[kind],
            )

    def __repr__(self) -> str:
        return f"<ResourceAlarm {self.counts}>"


ALARM = ResourceAlarm()
"""The process's alarm: every proxy and the health checker report here."""


class FdBudget:
    """The process's file descriptors: the limit, and the share kept for our own needs."""

    def __init__(self, limit: int | None = None, reserve: int | None = None) -> None:
        if limit is None:
            limit = raise_nofile_limit()
        self.limit = limit
        self.reserve = reserve if reserve is not None else max(32, limit // 10)
        self.clients = 0
        """Client connections open now, in every service."""
        self.refused = 0

    @property
    def client_limit(self) -> int:
        """Client connections allowed at once, leaving the reserve free."""
        return max(1, self.limit - self.reserve)

    def admit(self) -> bool:
        """Count a new client connection; False (not counted) when it would eat the reserve."""
        if self.clients >= self.client_limit:
            self.refused += 1
            return False
        self.clients += 1
        return True

    def release(self, count: int = 1) -> None:
        self.clients = max(0, self.clients - count)

    def __repr__(self) -> str:
        return (
            f"<FdBudget {self.clients} of {self.client_limit} client connections "
            f"(limit {self.limit}, reserve {self.reserve})>"
        )


def raise_nofile_limit() -> int:
    """Raise the soft open-file limit to the hard one (as HAProxy and nginx do); the result."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY:
        return int(hard)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return int(soft)
        return int(hard)
    return int(soft)


FDS: FdBudget | None = None
"""Set by the server at start-up; None in tests that build proxies directly."""
