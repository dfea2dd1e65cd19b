"""Reloads: the running state made the file's, or left as it was (`ServerReloads`).

Reloads are serialized (SIGHUP and `POST /api/reload` take one lock); the state after
any sequence of reloads is the last file's (`balancer.core.lifecycle`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import socket
from collections.abc import Collection, Mapping

from balancer.config.addresses import format_address
from balancer.config.errors import ConfigError
from balancer.config.model import Config, ServiceConfig
from balancer.core.lifecycle import plan_backends, plan_reload
from balancer.core.pool import Backend
from balancer.core.states import DOWN
from balancer.errors import BalancerError, Conflict, InvalidInput
from balancer.proxy.base import EdgeStatus
from balancer.proxy.edge import describe
from balancer.proxy.tls import load_service_tls
from balancer.runtime.changes import ServerChanges
from balancer.runtime.services import (
    Address,
    ListenError,
    Prepared,
    ServiceRuntime,
)
from balancer.runtime.stop import log_cut

log = logging.getLogger("balancer")


class ServerReloads(ServerChanges):
    """A running balancer's reloads."""

    # -- reload -------------------------------------------------------------------------
    def reload_on_signal(self) -> None:
        log.info("SIGHUP: reloading %s", self.config.source)
        self._background(self._reload_logged(), "reload")

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
        if new.workers != old.workers:
            log.warning("reload: workers changed; it takes effect on restart")
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

    async def reload_certificates(self) -> dict[str, EdgeStatus]:
        """Read again the certificate, key and CA files of every service with TLS, the
        config kept; all are swapped in, or none (InvalidInput naming every bad file)."""
        if self.stopping:
            raise Conflict("the balancer is stopping")
        async with self._reload_lock:
            configs = [r.config for r in self.services.values()]
            tls = [c for c in configs if c.tls is not None or c.backend_tls is not None]
            try:
                loaded = load_service_tls(tls, self.config.source)
            except ConfigError as exc:
                log.error("certificate reload rejected, keeping the running ones: %s", exc)
                raise InvalidInput(str(exc)) from None
            for name, (server, backend) in loaded.items():
                self.services[name].proxy.set_tls(server, backend)
            log.info("certificates reloaded: %d service(s)", len(loaded))
            return {name: self.services[name].proxy.edge_status() for name in loaded}

    # -- start-up ----------------------------------------------------------------------
    async def start(self, sockets: Mapping[Address, socket.socket] | None = None) -> None:
        """Bind every listener, start the admin endpoint, check, then serve.

        `sockets` are listening sockets already bound (by a supervisor, say), by the
        (host, port) a service's `listen` names: that service serves on its socket
        instead of binding one. A socket no service names is closed.
        """
        async with self._reload_lock:  # a SIGHUP meanwhile reloads after the start
            plan = plan_reload({}, self.config)
            prepared = await self._prepare(
                self.config, plan, admin=self.config.admin.enabled, sockets=sockets
            )
            await self._commit(prepared)
            for address, sock in prepared.batch.handover.items():
                log.warning(
                    "no service listens on %s: the socket handed over for it is closed",
                    format_address(*address),
                )
                sock.close()
            prepared.batch.handover.clear()
        # What start-up built lives as long as the process: keep it out of every later
        # collection (a full collection of 100,000 backends took 100-200 ms of the loop).
        gc.collect()
        gc.freeze()
        log.info("balancer ready")

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
            old[svc.name].proxy.set_tls(*prepared.tls[svc.name])
            self._update_service(
                old[svc.name], svc, prepared.config, prepared.joining.get(svc.name, {})
            )
        self.services = {name: prepared.runtimes.get(name) or old[name] for name in plan.order}
        self.config = prepared.config
        await prepared.batch.serve()
        for name, runtime in prepared.runtimes.items():
            runtime.checker.start()
            svc = runtime.config
            edge = describe(svc)
            log.info(
                "service %s listening on %s (mode %s, algorithm %s%s); %d of %d backends up",
                name,
                runtime.listen,
                svc.mode,
                svc.algorithm,
                f"; {edge}" if edge else "",
                sum(1 for b in runtime.pool if b.is_up),
                len(runtime.pool),
            )
        prepared.runtimes.clear()
        self._start_discovery()

    def _start_discovery(self) -> None:
        """Start discovery (DNS names re-resolved, or etcd watched), or take a reload's
        `[discovery]` (the next round at once; another kind: the old one stops)."""
        from balancer.runtime.discovery import Discovery
        from balancer.runtime.etcd import EtcdDiscovery

        config = self.config.discovery
        if config is None or not any(s.discover for s in self.config.services):
            return
        kind = EtcdDiscovery if config.kind == "etcd" else Discovery
        if self.discovery is not None and not isinstance(self.discovery, kind):
            if self._discovery_task is not None:
                self._discovery_task.cancel()
            self.discovery = None
        if self.discovery is None:
            self.discovery = kind(self, config)
            self._discovery_task = self._background(self.discovery.run(), "discovery")
        else:
            self.discovery.reconfigure(config)

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
        wanted = svc.backends
        if svc.discover and runtime.discovery_answered:  # the pool is discovery's own
            wanted = tuple(
                dataclasses.replace(b.config, weight=b.weight)
                for b in pool.backends
                if b.address not in runtime.removals
            )
        elif svc.discover:  # what discovery found stays until its next answer
            listed = {b.address for b in wanted}
            wanted += tuple(
                dataclasses.replace(b.config, weight=b.weight)
                for b in pool.backends
                if b.address in runtime.discovered and b.address not in listed
            )
        else:
            runtime.discovered.clear()
        changes = plan_backends(
            [(b.address, b.weight) for b in pool.backends], runtime.removals.keys(), wanted
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
