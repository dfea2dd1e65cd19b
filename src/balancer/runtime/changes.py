"""Runtime changes through the admin API: backends' states and weights, additions,
removals after a drain (`ServerChanges`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from balancer.config.model import BOUNDS, BackendConfig
from balancer.core.lifecycle import plan_backends
from balancer.core.pool import Backend
from balancer.core.states import ACCEPTED, DOWN, DRAIN, READY
from balancer.errors import Conflict, InvalidInput, NotFound
from balancer.runtime.services import (
    Removal,
    ServiceRuntime,
)
from balancer.runtime.starting import ServerStart, log_failure

log = logging.getLogger("balancer")


class ServerChanges(ServerStart):
    """A running balancer's changes made at run time."""

    # -- runtime changes (admin API, reload) ------------------------------------------------
    def runtime(self, service: str) -> ServiceRuntime:
        runtime = self.services.get(service)
        if runtime is None:
            known = ", ".join(sorted(self.services)) or "none"
            raise NotFound(f"no service {service!r} (services: {known})")
        return runtime

    def backend(self, service: str, address: str) -> tuple[ServiceRuntime, Backend]:
        runtime = self.runtime(service)
        backend = runtime.pool.get(address)
        if backend is None:
            known = ", ".join(b.address for b in runtime.pool) or "none"
            raise NotFound(f"service {service!r} has no backend {address!r} (backends: {known})")
        return runtime, backend

    def set_backend(
        self, service: str, address: str, *, state: str | None = None, weight: int | None = None
    ) -> Backend:
        """Change a backend's admin state ("up", "drain", "maint") and/or weight, at once."""
        runtime, backend = self.backend(service, address)
        if state is not None and state not in ACCEPTED:
            raise InvalidInput(f"invalid state {state!r}: expected one of up, drain, maint")
        if weight is not None and (
            isinstance(weight, bool)
            or not isinstance(weight, int)
            or not BOUNDS["weight"].admits(weight)
        ):
            raise InvalidInput(
                f"invalid weight {weight!r}: expected {BOUNDS['weight'].expected(True)}",
            )
        if state is not None:
            runtime.checker.drains.release(backend)  # the operator's now, not the check's
            new = ACCEPTED[state]
            if new != backend.admin_state:
                log.warning(
                    "backend %s of service %s: admin state %s -> %s",
                    address,
                    service,
                    backend.admin_state,
                    new,
                )
                backend.admin_state = new
        if weight is not None and weight != backend.weight:
            log.warning(
                "backend %s of service %s: weight %d -> %d",
                address,
                service,
                backend.weight,
                weight,
            )
            backend.weight = weight
        runtime.pool.refresh()
        return backend

    def add_backend(self, service: str, config: BackendConfig) -> Backend:
        """Add a backend; it takes traffic once health checks pass (at once if they are off).

        A backend at one of this balancer's own listen addresses is refused (InvalidInput); names
        are checked by `check_backend_address`, which may resolve them.
        """
        runtime = self.runtime(service)
        if runtime.pool.get(config.address) is not None:
            raise Conflict(f"service {service!r} already has backend {config.address!r}")
        what = self.loop_listener(config.host, config.port)
        if what is not None:
            raise InvalidInput(
                f"backend {config.address} is this balancer itself ({what}): refused, "
                "it would be a connection loop",
            )
        backend = runtime.pool.add(config)
        if runtime.config.health.enabled:
            backend.state = DOWN
            backend.last_reason = "added; waiting for health checks"
            runtime.pool.refresh()
            runtime.checker.watch(backend)
        runtime.api_added.add(config.address)
        log.warning("backend %s added to service %s", config.address, service)
        return backend

    async def remove_backend(
        self, service: str, address: str, timeout: float | None = None
    ) -> None:
        """Stop sending new work to a backend, let it finish what it holds, then remove it.

        Returns once it is removed, or once a reload that lists it again called the
        removal off.
        """
        runtime, backend = self.backend(service, address)
        removal = runtime.removals.get(address)
        if removal is None:
            removal = self._start_removal(runtime, backend, timeout)
            runtime.pool.refresh()
        assert removal.task is not None
        await asyncio.wait({removal.task})

    def apply_backends(
        self, service: str, wanted: Sequence[BackendConfig], why: str
    ) -> tuple[int, int]:
        """Make the service's backends `wanted` (service discovery's answer): new ones added
        as `add_backend` does (checked before they take traffic), missing ones drained and
        removed as `remove_backend` does, weights changed in place, a removal under way
        called off for one listed again. (added, removed) counts.
        """
        runtime = self.runtime(service)
        pool = runtime.pool
        changes = plan_backends(
            [(b.address, b.weight) for b in pool.backends], runtime.removals.keys(), wanted
        )
        for address in changes.rescue:
            self._call_off_removal(runtime, address, why)
        for address, _, weight in changes.weights:
            self.set_backend(service, address, weight=weight)
        added = 0
        for config in changes.add:
            try:
                self.add_backend(service, config)
            except (Conflict, InvalidInput) as exc:
                log.warning("%s: backend %s not added: %s", why, config.address, exc)
                continue
            runtime.api_added.discard(config.address)
            runtime.discovered.add(config.address)
            added += 1
        for address in changes.remove:
            backend = pool.get(address)
            if backend is not None:
                runtime.discovered.discard(address)
                log.warning("%s: backend %s of service %s leaves", why, address, service)
                self._start_removal(runtime, backend)
        pool.refresh()
        return added, len(changes.remove)

    def _start_removal(
        self, runtime: ServiceRuntime, backend: Backend, timeout: float | None = None
    ) -> Removal:
        """Drain `backend` and remove it once idle (at most `timeout`, default drain_timeout).

        The caller refreshes the pool.
        """
        address = backend.address
        # a drain by the check is no admin state to give back: called off, it is checked again
        drained = runtime.checker.drains.release(backend)
        removal = Removal(backend, READY if drained else backend.admin_state)
        backend.admin_state = DRAIN
        wait = self.config.drain_timeout if timeout is None else timeout
        removal.task = task = asyncio.get_running_loop().create_task(
            self._finish_removal(runtime, backend, wait), name=f"remove {address}"
        )
        runtime.removals[address] = removal

        def done(_: asyncio.Task[None]) -> None:
            if runtime.removals.get(address) is removal:
                del runtime.removals[address]

        task.add_done_callback(done)
        task.add_done_callback(log_failure)
        return removal

    async def _finish_removal(
        self, runtime: ServiceRuntime, backend: Backend, timeout: float
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # in_flight is a plain counter bumped on the hot path; poll it rather than signal
        while backend.in_flight > 0 and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        self._remove_now(runtime, [backend])

    def _remove_now(self, runtime: ServiceRuntime, backends: list[Backend]) -> None:
        """Take `backends` out of the pool at once (one pass, one refresh)."""
        gone = set(backends)
        pool = runtime.pool
        pool.set_backends(b for b in pool.backends if b not in gone)
        name = runtime.config.name
        for backend in backends:
            runtime.checker.unwatch(backend)
            runtime.proxy.remove_backend(backend)
            runtime.api_added.discard(backend.address)
            log.warning("backend %s removed from service %s", backend.address, name)

    def _call_off_removal(self, runtime: ServiceRuntime, address: str, why: str) -> None:
        removal = runtime.removals.pop(address, None)
        if removal is None:
            return
        if removal.task is not None:
            removal.task.cancel()
        if removal.backend.admin_state == DRAIN:
            removal.backend.admin_state = removal.admin_state
        log.warning(
            "backend %s of service %s stays: its removal is called off (%s)",
            address,
            runtime.config.name,
            why,
        )
