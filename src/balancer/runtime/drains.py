"""`disable_on_404`: the backends an http check drained, and giving them back.

How it works: a backend whose http check answers 404 while it is up goes to
the admin state DRAIN (as HAProxy's http-check disable-on-404): it keeps the
work it holds and gets no new work. `CheckDrains` remembers the backends the
checker drained; the first check that passes again gives them back (READY),
only those and only while they are still drained. A backend an operator had
drained or put in maintenance is never touched, and a change of its admin
state by the API, or its removal, takes it over: the checker forgets it.
"""

from __future__ import annotations

import logging

from balancer.core.pool import Backend, BackendPool
from balancer.core.states import DRAIN, READY

log = logging.getLogger("balancer")


class CheckDrains:
    """The backends of one pool that their health check drained."""

    def __init__(self, pool: BackendPool) -> None:
        self.pool = pool
        self.drained: set[Backend] = set()

    def __contains__(self, backend: Backend) -> bool:
        return backend in self.drained

    def drain(self, backend: Backend, reason: str) -> None:
        """The check asks for a drain: a ready backend goes to DRAIN, until it passes again."""
        backend.last_reason = f"drained: {reason}"
        if backend in self.drained or backend.admin_state != READY:
            return
        backend.admin_state = DRAIN
        self.drained.add(backend)
        log.warning(
            "backend %s of service %s is drained (no new work): check answered %s",
            backend.address,
            self.pool.service.name,
            reason,
        )
        self.pool.refresh_soon()

    def restore(self, backend: Backend, reason: str) -> None:
        """A check passed: a backend the checker drained takes new work again."""
        if not self.release(backend) or backend.admin_state != DRAIN:
            return
        backend.admin_state = READY
        backend.last_reason = reason
        log.warning(
            "backend %s of service %s takes new work again: check answered %s",
            backend.address,
            self.pool.service.name,
            reason,
        )
        self.pool.refresh_soon()

    def release(self, backend: Backend) -> bool:
        """Forget `backend` (its admin state is someone else's now); True if it was drained."""
        if backend not in self.drained:
            return False
        self.drained.discard(backend)
        return True

    def restore_all(self, reason: str) -> None:
        """Give back every backend the checker drained (the setting is gone)."""
        for backend in list(self.drained):
            self.restore(backend, reason)
