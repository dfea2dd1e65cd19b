"""Start-up, listeners, signals, reloads and shutdown of a balancer process.

How it works:
- Start-up and reload go through the same two steps. Prepare: build each service that
  needs a new listener (pool, proxy, health checker) and bind its listener inside a
  `ListenerBatch` (bound, accepting nothing yet); refuse a backend that is one of this
  process's own listeners; run the new services' first health checks. Commit: retire
  the services the file dropped or moved, change the others in place, swap the new
  ones in and start accepting. Only prepare can fail, and a failure there closes what
  it bound: a rejected reload changes nothing, and says why (`balancer.errors`:
  InvalidInput for a bad file, Conflict for a listen address in use or a stop under way).
- Reloads are serialized (SIGHUP and `POST /api/reload` take one lock); the state after
  any sequence of reloads is the last file's (`balancer.core.lifecycle`).
- Signals: the SIGINT, SIGTERM and SIGHUP handlers are installed before anything slow,
  and start-up runs as a task raced against the stop request, so a stop during a long
  start cancels it and the process exits cleanly. The first SIGINT or SIGTERM drains:
  no new connections or requests, what is in flight is answered within
  `drain_timeout`, what is left then is cut by the proxies (in message mode each
  unanswered request gets an error line) and logged as cut by the stop, not as a
  backend failure. A second signal cuts at once (`balancer.runtime.stop`). A stop takes at most
  `drain_timeout` and a grace of about a second for what is closed after the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import signal
import time
from collections.abc import Callable, Collection, Coroutine
from typing import TYPE_CHECKING, Any

from balancer.config.addresses import format_address
from balancer.config.errors import ConfigError
from balancer.config.model import BOUNDS, BackendConfig, Config, ServiceConfig
from balancer.core.lifecycle import DrainCut, ReloadPlan, plan_backends, plan_reload
from balancer.core.pool import DOWN, DRAIN, MAINT, READY, Backend, BackendPool
from balancer.core.stats import LatencyHistogram
from balancer.errors import BalancerError, Conflict, InvalidInput, NotFound
from balancer.net import resources
from balancer.net.loops import listening_addresses, listening_socket
from balancer.observe.accesslog import AccessLog
from balancer.proxy.registry import build_proxy
from balancer.runtime.health import HealthChecker, check_concurrency
from balancer.runtime.probe import ProbeResult, probe
from balancer.runtime.services import (
    Address,
    ListenError,
    Prepared,
    Removal,
    ServiceRuntime,
    numeric_addresses,
    own_listener,
    resolve,
)
from balancer.runtime.stop import STOP_GRACE, drain_all, log_cut

if TYPE_CHECKING:
    from balancer.admin.app import AdminServer

__all__ = [
    "ListenError",
    "Server",
    "ServiceRuntime",
]

log = logging.getLogger("balancer")

SUMMARY_BACKENDS = 100
"""A service with more backends is summed up in one line at the stop."""

ADMIN_STATES = {"up": READY, "ready": READY, "drain": DRAIN, "maint": MAINT}


class Server:
    """Runs every service of a `Config` in one event loop, plus the admin endpoint."""

    def __init__(self, config: Config, reader: Callable[[], Config] | None = None) -> None:
        # for the life of the process
        self.config = config
        self.reader = reader
        """Re-reads the config for a reload (the CLI's overrides applied again)."""
        self.services: dict[str, ServiceRuntime] = {}
        self.admin: AdminServer | None = None
        self.admin_address: tuple[str, int] | None = None
        # background work: reloads on SIGHUP, retired services draining
        self._tasks: set[asyncio.Task[None]] = set()
        self.draining: dict[ServiceRuntime, asyncio.Task[None]] = {}
        """Services retired by a reload, still draining."""
        self._reload_lock = asyncio.Lock()
        self._preparing: asyncio.Task[Prepared] | None = None
        # the stop
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()
        self.stopping = False

    # -- building services -------------------------------------------------------------
    def _build(self, svc: ServiceConfig, config: Config) -> ServiceRuntime:
        pool = BackendPool(svc)
        histogram = LatencyHistogram()
        access_log = AccessLog(svc.name) if self.config.access_log else None
        proxy = build_proxy(svc, pool, histogram, access_log)
        proxy.configure(config)
        checker = HealthChecker(pool)
        return ServiceRuntime(svc, pool, proxy, checker, histogram, access_log)

    async def _prepare(self, new: Config, plan: ReloadPlan, *, admin: bool = False) -> Prepared:
        """Bind and build what `plan` needs, check it; nothing serves yet. Raises
        ListenError (a listen address cannot be bound), ConfigError (a backend is this
        balancer itself) or Conflict, having closed what it bound."""
        prepared = Prepared(new, plan)
        try:
            for name, old in (plan.takeover or {}).items():
                svc = new.service(name)
                sock = listening_socket(self.services[old].bound)
                if sock is None:
                    raise Conflict(
                        f"service {name}: cannot take over {svc.listen} from service {old}: "
                        "its listener is bound to several addresses; restart to make this change",
                    )
                prepared.batch.hand_over((svc.listen_host, svc.listen_port), sock)
            with prepared.batch.binding():
                for svc in plan.listeners:
                    runtime = prepared.runtimes[svc.name] = self._build(svc, new)
                    try:
                        runtime.bound = await runtime.proxy.start()
                    except OSError as exc:
                        raise ListenError(
                            f"service {svc.name}: cannot listen on {svc.listen}: "
                            f"{exc.strerror or exc}"
                        ) from exc
            if admin:
                await self._start_admin()
            await self._check_loops(new, prepared)
            await asyncio.gather(
                *(r.checker.initial_round() for r in prepared.runtimes.values()),
                *(self._first_checks(svc, prepared) for svc in plan.update),
            )
        except BaseException:
            await prepared.abandon()
            raise
        return prepared

    async def _first_checks(self, svc: ServiceConfig, prepared: Prepared) -> None:
        """The backends an updated service gains, checked once as at start-up: those that
        pass join up at the commit (a file replacing every backend is no blackout)."""
        pool = self.services[svc.name].pool
        running = {b.address for b in pool}
        joining = prepared.joining[svc.name] = {
            bc.address: pool.new_backend(bc) for bc in svc.backends if bc.address not in running
        }
        if not joining or not svc.health.enabled:
            return
        backends = list(joining.values())
        bound = asyncio.Semaphore(check_concurrency())

        async def check(backend: Backend) -> ProbeResult:
            async with bound:
                return await probe(
                    backend.host,
                    backend.port,
                    svc.health,
                    framing=backend.framing,
                    owner=(pool, backend),
                )

        results = await asyncio.gather(*(check(b) for b in backends))
        now = time.time()
        for backend, result in zip(backends, results, strict=True):
            if result.shortage is not None:
                resources.ALARM.note(result.shortage, f"checking backend {backend.address}")
                backend.state = DOWN
                backend.last_reason = "added; waiting for health checks"
                continue
            backend.last_check = now
            backend.last_check_ok = result.ok
            if result.ok:
                if result.framing:
                    backend.framing = result.framing
                backend.last_reason = f"added; first check: {result.reason}"
            else:
                backend.state = DOWN
                backend.last_reason = f"added; first check failed: {result.reason}"

    def _listeners(self, prepared: Prepared) -> list[tuple[str, Address]]:
        """Every listener of this process once `prepared` is committed: (what, bound)."""
        out: list[tuple[str, Address]] = []
        for svc in prepared.config.services:
            runtime = prepared.runtimes.get(svc.name) or self.services.get(svc.name)
            if runtime is not None and runtime.bound[1]:
                what = f"service {svc.name}"
                out.extend((what, a) for a in listening_addresses(runtime.bound) or [runtime.bound])
        if self.admin_address is not None:
            out.append(("the admin endpoint", self.admin_address))
        return out

    def _running_listeners(self) -> list[tuple[str, Address]]:
        return self._listeners(Prepared(self.config, _NO_CHANGE))

    def listen_addresses(self) -> list[tuple[str, int]]:
        """The bound (host, port) of every service's listener and of the admin endpoint."""
        return [bound for _, bound in self._running_listeners()]

    async def _check_loops(self, new: Config, prepared: Prepared) -> None:
        listeners = self._listeners(prepared)
        ports = {port for _, (_, port) in listeners}
        loop = asyncio.get_running_loop()
        for svc in new.services:
            for b in svc.backends:
                if b.port not in ports:
                    continue
                resolved = numeric_addresses(b.host, b.port)
                if resolved is None:
                    resolved = await resolve(loop, b.host, b.port)
                what = own_listener(resolved, listeners)
                if what is not None:
                    raise ConfigError(
                        new.source,
                        f"services.{svc.name}.backends",
                        f"expected backends other than this balancer itself, got "
                        f"{b.address!r}: {what} (a connection loop)",
                    )

    def loop_listener(self, host: str, port: int) -> str | None:
        """Which of our listeners a backend at (host, port) is, for a numeric host; else None.

        Names are not resolved here (that may block): the proxies catch such loops when
        the balancer connects to itself (see `balancer.net.loopguard`).
        """
        resolved = numeric_addresses(host, port)
        if resolved is None:
            return None
        return own_listener(resolved, self._running_listeners())

    async def check_backend_address(self, host: str, port: int) -> None:
        """Raise InvalidInput if a backend at (host, port) would be this balancer
        itself (names resolved without blocking the loop)."""
        listeners = self._running_listeners()
        if port not in {p for _, (_, p) in listeners}:
            return
        resolved = numeric_addresses(host, port)
        if resolved is None:
            resolved = await resolve(asyncio.get_running_loop(), host, port)
        what = own_listener(resolved, listeners)
        if what is not None:
            raise InvalidInput(
                f"backend {format_address(host, port)} is this balancer itself ({what}): "
                "refused, it would be a connection loop",
            )

    async def _commit(self, prepared: Prepared) -> None:
        """Apply a prepared plan: nothing here can fail for want of a resource."""
        plan = prepared.plan
        old = self.services
        for name in plan.retire:
            self._retire(old[name], "removed from the config")
        for svc in plan.replace:
            kept = {b.address for b in svc.backends}
            self._retire(old[svc.name], "listen address or mode changed", kept)
        for svc in plan.update:
            self._update_service(
                old[svc.name], svc, prepared.config, prepared.joining.get(svc.name, {})
            )
        self.services = {name: prepared.runtimes.get(name) or old[name] for name in plan.order}
        self.config = prepared.config
        await prepared.batch.serve()
        for name, runtime in prepared.runtimes.items():
            runtime.checker.start()
            svc = runtime.config
            log.info(
                "service %s listening on %s (mode %s, algorithm %s); %d of %d backends up",
                name,
                runtime.listen,
                svc.mode,
                svc.algorithm,
                sum(1 for b in runtime.pool if b.is_up),
                len(runtime.pool),
            )
        prepared.runtimes.clear()

    # -- start-up ----------------------------------------------------------------------
    async def start(self) -> None:
        """Bind every listener, start the admin endpoint, check, then serve."""
        async with self._reload_lock:  # a SIGHUP meanwhile reloads after the start
            plan = plan_reload({}, self.config)
            prepared = await self._prepare(self.config, plan, admin=self.config.admin.enabled)
            await self._commit(prepared)
        # What start-up built lives as long as the process: keep it out of every later
        # collection (a full collection of 100,000 backends took 100-200 ms of the loop).
        gc.collect()
        gc.freeze()
        log.info("balancer ready")

    async def _start_admin(self) -> None:
        from balancer.admin.app import AdminServer

        admin = AdminServer(self)
        try:
            self.admin_address = await admin.start()
        except OSError as exc:
            log.warning(
                "admin endpoint not started: cannot listen on %s: %s; balancing goes on",
                self.config.admin.listen,
                exc.strerror or exc,
            )
        else:
            self.admin = admin
            host, port = self.admin_address
            log.info("admin listening on http://%s:%d", host, port)

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
        if state is not None and state not in ADMIN_STATES:
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
            new = ADMIN_STATES[state]
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

    def _start_removal(
        self, runtime: ServiceRuntime, backend: Backend, timeout: float | None = None
    ) -> Removal:
        """Drain `backend` and remove it once idle (at most `timeout`, default drain_timeout).

        The caller refreshes the pool.
        """
        address = backend.address
        removal = Removal(backend, backend.admin_state)
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
        task.add_done_callback(_log_failure)
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

    # -- reload -------------------------------------------------------------------------
    def _reload_on_signal(self) -> None:
        log.info("SIGHUP: reloading %s", self.config.source)
        self._background(self._reload_logged(), "reload")

    def _background(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)
        return task

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except BalancerError:
            pass  # logged by reload()
        except Exception:
            log.exception("reload failed; the running config is kept")

    def read_config(self) -> Config:
        if self.reader is not None:
            return self.reader()
        from balancer.config.load import load_config

        return load_config(self.config.source)

    async def reload(self) -> None:
        """Re-read the config and make the running state the file's, or change nothing.

        Services are added, retired (after draining) or changed in place; a service
        whose listen address or mode changed gets a new listener while the old one
        drains. Within a service, backends are added (health-checked first), removed
        (after finishing what they hold) or re-weighted, backends added through the
        runtime API and not in the file included. Every new listener is bound before
        anything changes: a file that cannot be applied (invalid, a listen address in
        use, a backend that is the balancer itself) is rejected whole with a
        InvalidInput or a Conflict and the running config is kept.
        """
        if self.stopping:
            raise Conflict("the balancer is stopping")
        async with self._reload_lock:
            if self.stopping:
                raise Conflict("the balancer is stopping")
            try:
                await self._reload()
            except BalancerError as exc:
                log.error("reload rejected, keeping the running config: %s", exc)
                raise

    async def _reload(self) -> None:
        try:
            new = self.read_config()
        except ConfigError as exc:
            raise InvalidInput(str(exc)) from None
        old = self.config
        if new.admin != old.admin:
            log.warning("reload: admin settings changed; they take effect on restart")
        new = dataclasses.replace(new, admin=old.admin, access_log=old.access_log)
        plan = plan_reload({n: r.config for n, r in self.services.items()}, new)
        self._preparing = prepare = asyncio.get_running_loop().create_task(
            self._prepare(new, plan), name="reload: prepare"
        )
        try:
            prepared = await prepare
        except ListenError as exc:
            raise Conflict(str(exc)) from None
        except ConfigError as exc:
            raise InvalidInput(str(exc)) from None
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            raise Conflict("the balancer is stopping") from None
        except BalancerError:
            raise
        except Exception as exc:
            log.exception("reload failed while binding and building")
            raise BalancerError(f"reload failed: {exc}") from None
        finally:
            self._preparing = None
        if self.stopping:
            await prepared.abandon()
            raise Conflict("the balancer is stopping")
        await self._commit(prepared)
        log.info("reload done: %d service(s)", len(self.services))

    def _retire(self, runtime: ServiceRuntime, why: str, kept: Collection[str] = ()) -> None:
        """Stop accepting, drain in the background (`kept`: backends the file's new
        listener for this service has too)."""
        name = runtime.config.name
        log.warning("service %s retired (%s); draining", name, why)
        for address in sorted(set(runtime.api_added) - set(kept)):
            log.warning(
                "backend %s of service %s added through the API is not in the file: removed",
                address,
                name,
            )
        runtime.proxy.stop_accepting()
        for removal in list(runtime.removals.values()):
            if removal.task is not None:
                removal.task.cancel()
        runtime.removals.clear()

        async def finish() -> None:
            try:
                cut = await runtime.proxy.drain(self.config.drain_timeout)
                if cut:
                    log_cut(f"retired service {name}", "drain_timeout reached", cut, "reload")
            finally:
                await runtime.checker.stop()
                if runtime.access_log is not None:
                    runtime.access_log.flush()

        task = self._background(finish(), f"retire {name}")
        self.draining[runtime] = task
        task.add_done_callback(lambda _: self.draining.pop(runtime, None))

    def _update_service(
        self,
        runtime: ServiceRuntime,
        svc: ServiceConfig,
        config: Config,
        joining: dict[str, Backend],
    ) -> None:
        """Make a running service (same listener) the file's `svc`, in one pass; new
        backends are taken from `joining` (checked once) where prepared there."""
        from balancer.core.policies import make_policy

        old = runtime.config
        pool = runtime.pool
        name = svc.name
        changes = plan_backends(
            [(b.address, b.weight) for b in pool.backends], runtime.removals.keys(), svc.backends
        )
        by_address = {b.address: b for b in pool.backends}
        runtime.config = svc
        pool.service = svc
        for b in pool.backends:
            b.slow_start = svc.slow_start
        if (old.algorithm, old.policy_options, old.hash_balance_factor) != (
            svc.algorithm,
            svc.policy_options,
            svc.hash_balance_factor,
        ):
            pool.policy = make_policy(svc)
        runtime.proxy.reconfigure(svc)
        runtime.proxy.configure(config)
        for address in changes.rescue:
            self._call_off_removal(runtime, address, "the reloaded file lists it")
        for address, was, now in changes.weights:
            log.warning("backend %s of service %s: weight %d -> %d", address, name, was, now)
            by_address[address].weight = now
        added: list[Backend] = []
        for bc in changes.configs:
            backend = by_address.get(bc.address)
            if backend is None:
                backend = joining.get(bc.address) or pool.new_backend(bc)
                if svc.health.enabled and backend.last_check is None:
                    backend.state = DOWN
                    backend.last_reason = "added; waiting for health checks"
                pool.backends.append(backend)
                added.append(backend)
                log.warning("backend %s added to service %s (%s)", bc.address, name, backend.state)
            else:
                backend.config = bc
            runtime.api_added.discard(bc.address)
        idle: list[Backend] = []
        for address in changes.remove:
            backend = by_address[address]
            if address in runtime.api_added:
                log.warning(
                    "backend %s of service %s added through the API is not in the file: removed",
                    address,
                    name,
                )
            if backend.in_flight > 0:
                self._start_removal(runtime, backend, config.drain_timeout)
            else:
                idle.append(backend)
        if idle:
            self._remove_now(runtime, idle)
        # config order for the status page and the policies; leaving backends after them
        order = {b.address: i for i, b in enumerate(svc.backends)}
        pool.set_backends(sorted(pool.backends, key=lambda b: order.get(b.address, len(order))))
        if svc.health != old.health or svc.backend_framing != old.backend_framing:
            runtime.checker.reconfigure()
        else:
            for backend in added:
                runtime.checker.watch(backend)
        pool.refresh()
        if svc != old:
            log.info("service %s updated", name)

    # -- stop ---------------------------------------------------------------------------
    def request_stop(self, sig: int | None = None) -> None:
        """A stop signal: the first drains, a second one cuts what is left at once."""
        what = signal.Signals(sig).name if sig is not None else "stop"
        if not self._stop.is_set():
            log.info(
                "%s: stopping; draining for at most %gs (a second signal stops at once)",
                what,
                self.config.drain_timeout,
            )
            self._stop.set()
        elif not self._hurry.is_set():
            log.warning("%s again: stopping now, cutting what is left", what)
            self._hurry.set()

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    async def shutdown(self) -> None:
        """Drain every service within drain_timeout (a second signal: at once), then close.

        Everything after the drain (cut connections closing, health checks, the admin
        endpoint) shares one grace of STOP_GRACE seconds: a stop ends by then.
        """
        self.stopping = True
        loop = asyncio.get_running_loop()
        if self._preparing is not None:
            self._preparing.cancel()
        timeout = self.config.drain_timeout
        end = loop.time() + timeout + STOP_GRACE
        runtimes = list(self.services.values())
        for runtime in runtimes:
            runtime.proxy.stop_accepting()
            for removal in list(runtime.removals.values()):
                if removal.task is not None:
                    removal.task.cancel()
        drains: dict[asyncio.Task[DrainCut | None], ServiceRuntime] = {
            loop.create_task(r.proxy.drain(timeout), name=f"drain {r.config.name}"): r
            for r in runtimes
        }
        cuts = await drain_all(drains, self.draining, self._hurry, timeout, end)
        for runtime, (why, cut) in cuts.items():
            log_cut(f"stop: service {runtime.config.name}", why, cut, "stop")
        await self._close_rest(runtimes, end)
        self.log_summary()

    async def _close_rest(self, runtimes: list[ServiceRuntime], end: float) -> None:
        """After the drain: background work, health checks, access logs, the admin endpoint."""
        loop = asyncio.get_running_loop()

        def left() -> float:
            return max(0.1, end - loop.time())

        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=left())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(left()):
                await asyncio.gather(*(r.checker.stop() for r in runtimes))
        for runtime in runtimes:
            if runtime.access_log is not None:
                runtime.access_log.flush()
        if self.admin is not None:
            try:
                async with asyncio.timeout(left()):
                    await self.admin.stop()
            except TimeoutError:
                log.warning("admin endpoint not closed in time; left to the exit")

    def log_summary(self) -> None:
        """One line per backend at the stop, or per service beyond SUMMARY_BACKENDS."""
        for name, runtime in self.services.items():
            backends = list(runtime.pool)
            if len(backends) > SUMMARY_BACKENDS:
                up = sum(1 for b in backends if b.is_up)
                log.info(
                    "summary: service %s: %d backends (%d up), %d requests, %d failures, "
                    "%d connect failures",
                    name,
                    len(backends),
                    up,
                    sum(b.requests for b in backends),
                    sum(b.failures for b in backends),
                    sum(b.connect_failures for b in backends),
                )
                continue
            for b in backends:
                log.info(
                    "summary: service %s backend %s: %s, %d requests, %d failures, "
                    "%d connect failures",
                    name,
                    b.address,
                    b.state,
                    b.requests,
                    b.failures,
                    b.connect_failures,
                )

    # -- the process --------------------------------------------------------------------
    def _signals(self, loop: asyncio.AbstractEventLoop, install: bool) -> None:
        handlers: dict[signal.Signals, Callable[[], None]] = {
            signal.SIGINT: lambda: self.request_stop(signal.SIGINT),
            signal.SIGTERM: lambda: self.request_stop(signal.SIGTERM),
        }
        if hasattr(signal, "SIGHUP"):
            handlers[signal.SIGHUP] = self._reload_on_signal
        for sig, handler in handlers.items():
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                if install:
                    loop.add_signal_handler(sig, handler)
                else:
                    loop.remove_signal_handler(sig)

    async def run(self) -> int:
        """Start, serve until SIGINT/SIGTERM, drain, stop. Returns the exit code.

        The signal handlers come first: a stop during a long start-up cancels it.
        """
        from balancer.net.loops import loop_name

        loop = asyncio.get_running_loop()
        self._signals(loop, install=True)
        fds_before = resources.FDS
        fds = resources.FDS = resources.FdBudget()
        log.info(
            "balancer starting: %d service(s) from %s, event loop %s; open files: limit %d, "
            "%d kept for health checks, backend connections and the admin endpoint",
            len(self.config.services),
            self.config.source,
            loop_name(),
            fds.limit,
            fds.reserve,
        )
        starting = loop.create_task(self.start(), name="start-up")
        stop = loop.create_task(self._stop.wait(), name="stop request")
        try:
            await asyncio.wait({starting, stop}, return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                starting.result()  # a start-up error ends the process here
                await stop
            else:
                log.warning("stop requested during start-up: abandoning the start")
                starting.cancel()
                await asyncio.wait({starting})
        finally:
            stop.cancel()
            await self.shutdown()
            self._signals(loop, install=False)
            resources.FDS = fds_before
        log.info("balancer stopped")
        return 0


_NO_CHANGE = ReloadPlan(order=())


def _log_failure(task: asyncio.Task[None]) -> None:
    """A background task's error, logged (never "Task exception was never retrieved")."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("%s failed: %r", task.get_name(), exc, exc_info=exc)
