"""etcd service discovery: each `discover = "etcd"` service's backends are keys in etcd.

How it works: one task (`EtcdDiscovery.run`) reads every key under `[discovery] prefix`
once, applies each service's view (`balancer.core.etcd_layout.view`) through the server's
own add and remove (`apply_backends`: new backends are checked before they take traffic,
missing ones drain) and admin states, then watches the prefix from the revision it read:
a change is applied as soon as its watch event arrives. While the watch is quiet, a
small read every `[discovery] interval` checks that the member still answers; one that
does not (down, or cut off from its cluster's quorum) is left for the next member,
reading everything again there.

etcd unreachable: the last view stays (backends keep being balanced and health-checked
locally), one warning per outage, `/status` and `balancer_discovery_up` say so and
`balancer_discovery_view_age_seconds` grows; when a member answers again the whole
prefix is read again and applied.

Runtime API writes (state, weight, add, remove) to such a service go to etcd first
(`write_state`, `add`, `remove`) and take effect when their watch event comes back, on
this instance as on every other; they are refused (EtcdUnavailable, a 503) when etcd
does not answer, so no instance's view drifts from the others'.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from balancer.config.discovery import DiscoveryConfig, etcd_name
from balancer.config.model import BackendConfig
from balancer.core import etcd_layout
from balancer.core.states import ACCEPTED
from balancer.errors import BalancerError, Unavailable
from balancer.net.etcd import EtcdClient, EtcdError
from balancer.runtime.discovery import Changes

log = logging.getLogger("balancer")

BACKOFF = (0.1, 0.2, 0.5, 1.0, 2.0)
"""Waits between attempts to reach etcd again (the last one repeats)."""
APPLIED_WAIT = 2.0
"""How long a runtime API write waits to see its own change applied."""


class EtcdUnavailable(Unavailable):
    """A runtime API write that etcd did not take (nothing changed)."""


@dataclass
class EtcdState:
    """What etcd discovery knows of one service, for `/status`."""

    target: str
    directory: str
    discovery: EtcdDiscovery
    backends: tuple[BackendConfig, ...] = ()
    problems: tuple[str, ...] = ()
    applied_revision: int = 0

    def status(self) -> dict[str, Any]:
        d = self.discovery
        return {
            "target": self.target,
            "kind": "etcd",
            "directory": self.directory,
            "ok": d.up,
            "endpoint": d.client.endpoints[d.client.current],
            "revision": self.applied_revision,
            "last_success": d.last_contact,
            "view_age": d.view_age(),
            "last_error": d.last_error,
            "last_error_time": d.last_error_time,
            "failures": d.failures,
            "problems": list(self.problems),
            "records": [{"address": b.address, "weight": b.weight} for b in self.backends],
        }


@dataclass(eq=False)
class EtcdDiscovery:
    """Keeps every `discover = "etcd"` service's backends those etcd lists."""

    server: Changes
    config: DiscoveryConfig
    states: dict[str, EtcdState] = field(default_factory=dict)
    kvs: dict[str, bytes] = field(default_factory=dict)
    """Every key under the prefix, as last read or watched."""
    revision: int = 0
    """The etcd revision `kvs` is at (0: never read)."""
    up: bool = False
    last_contact: float | None = None
    last_error: str | None = None
    last_error_time: float | None = None
    failures: int = 0
    client: EtcdClient = field(init=False)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _restart: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.client = EtcdClient(self.config.endpoints, self.config.timeout)

    @property
    def prefix(self) -> str:
        return self.config.prefix.rstrip("/") + "/"

    def view_age(self) -> float | None:
        """Seconds since etcd last confirmed the view (None: it never answered)."""
        return None if self.last_contact is None else max(0.0, time.time() - self.last_contact)

    def name_of(self, service: str) -> str | None:
        """The etcd directory name (under the prefix) of a running service that takes its
        backends from etcd: its `discover = "etcd:NAME"`, or its own name."""
        runtime = self.server.services.get(service)
        return None if runtime is None else etcd_name(service, runtime.config.discover)

    def directory_of(self, service: str) -> str | None:
        """The etcd directory of a running service that takes its backends from etcd."""
        name = self.name_of(service)
        return None if name is None else etcd_layout.service_dir(self.config.prefix, name)

    def reconfigure(self, config: DiscoveryConfig) -> None:
        """A reload's `[discovery]` (new members or prefix: read everything again), and its
        services: each is made its view (a service new to etcd gets its backends)."""
        if (config.endpoints, config.prefix, config.timeout) != (
            self.config.endpoints,
            self.config.prefix,
            self.config.timeout,
        ):
            old = self.client
            self.config = config
            self.client = EtcdClient(config.endpoints, config.timeout)
            asyncio.get_running_loop().create_task(old.close())
            self._restart.set()
            return
        self.config = config
        if self.revision:
            self.apply_all()

    # -- the watch --------------------------------------------------------------------------
    async def run(self) -> None:
        attempt = 0
        self.track()
        try:
            while not self.server.stopping:
                self._restart.clear()
                try:
                    await self._read_and_watch()
                except EtcdError as exc:
                    self._lost(str(exc))
                if self._restart.is_set():
                    attempt = 0
                    continue
                wait = BACKOFF[min(attempt, len(BACKOFF) - 1)]
                attempt = 0 if self.up else attempt + 1
                try:
                    async with asyncio.timeout(wait):
                        await self._restart.wait()
                except TimeoutError:
                    pass
        finally:
            await self.client.close()

    async def _read_and_watch(self) -> None:
        revision, kvs = await self.client.range_prefix(self.prefix)
        self.kvs = {kv.key: kv.value for kv in kvs}
        self._contact(revision)
        self.apply_all()
        member = self.client.current
        watch = asyncio.ensure_future(self._follow(revision + 1))
        restart = asyncio.ensure_future(self._restart.wait())
        try:
            while not watch.done() and not restart.done():
                await asyncio.wait({watch, restart}, timeout=self.config.interval)
                if watch.done() or restart.done():
                    break
                await self.client.ping(self.prefix)
                self._contact(None)
                if self.client.current != member:
                    return  # the member the watch is on did not answer: watch another
        finally:
            for task in (watch, restart):
                task.cancel()
            await asyncio.gather(watch, restart, return_exceptions=True)
        if watch.done() and not watch.cancelled():
            watch.result()  # its EtcdError

    async def _follow(self, start: int) -> None:
        async for revision, events in self.client.watch(self.prefix, start):
            for event in events:
                if event.kind == "delete":
                    self.kvs.pop(event.kv.key, None)
                else:
                    self.kvs[event.kv.key] = event.kv.value
            self._contact(revision)
            self.apply_all({event.kv.key for event in events})

    def _contact(self, revision: int | None) -> None:
        if not self.up:
            if self.failures:
                log.warning(
                    "discovery: etcd answers again (%s): applying its view",
                    self.client.endpoints[self.client.current],
                )
            self.up = True
        self.last_contact = time.time()
        if revision is not None and revision > self.revision:
            self.revision = revision

    def _lost(self, error: str) -> None:
        self.track()
        self.failures += 1
        self.last_error = error
        self.last_error_time = time.time()
        if self.up or self.failures == 1:
            log.warning(
                "discovery: etcd does not answer (%s); the last known backends are kept "
                "until it does",
                error,
            )
        self.up = False

    # -- applying ---------------------------------------------------------------------------
    def track(self) -> dict[str, EtcdState]:
        """The state of every running etcd service (made for new ones, dropped for those
        gone), for `/status` also before etcd ever answered; the new ones' names."""
        for name in list(self.states):
            if self.directory_of(name) is None:
                del self.states[name]
        new: dict[str, EtcdState] = {}
        for name in list(self.server.services):
            directory = self.directory_of(name)
            if directory is None:
                continue
            state = self.states.get(name)
            if state is None or state.directory != directory:
                target = self.server.services[name].config.discover
                state = self.states[name] = new[name] = EtcdState(target, directory, self)
        return new

    def apply_all(self, keys: set[str] | None = None) -> None:
        """Make every etcd service its view (only those with a key in `keys`, if given)."""
        new = self.track()
        for name, state in self.states.items():
            if keys is not None and name not in new:
                if not any(k.startswith(state.directory) for k in keys):
                    state.applied_revision = self.revision
                    continue
            self._apply(name, state)
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _apply(self, name: str, state: EtcdState) -> None:
        found = etcd_layout.view(state.directory, self.kvs)
        for problem in set(found.problems) - set(state.problems):
            log.warning("discovery: service %s: etcd key skipped: %s", name, problem)
        state.problems = found.problems
        why = f"etcd ({state.directory})"
        try:
            added, removed = self.server.apply_backends(name, found.backends, why)
        except BalancerError as exc:
            log.warning("discovery: service %s: %s not applied: %s", name, why, exc)
            return
        runtime = self.server.services[name]
        for backend in runtime.pool.backends:
            wanted = found.states.get(backend.address)
            if wanted is None or backend.address in runtime.removals:
                continue
            if backend.admin_state != ACCEPTED[wanted]:
                self.server.set_backend(name, backend.address, state=wanted)
        if added or removed:
            log.info("discovery: service %s: %d added, %d leaving (etcd)", name, added, removed)
        runtime.discovery_answered = True
        state.backends = found.backends
        state.applied_revision = self.revision

    # -- runtime API writes -----------------------------------------------------------------
    async def write_state(
        self, service: str, address: str, state: str | None, weight: int | None
    ) -> None:
        """Set a backend's admin state and/or weight in etcd; returns once applied here."""
        key = etcd_layout.admin_key(self.config.prefix, self._name(service), address)
        entry = etcd_layout.admin_entry(self.kvs.get(key, b""))
        if isinstance(entry, etcd_layout.AdminEntry):
            state = state if state is not None else entry.state
            weight = weight if weight is not None else entry.weight
        await self._write(lambda: self.client.put(key, etcd_layout.encode_admin(state, weight)))

    async def add(self, service: str, config: BackendConfig) -> None:
        key = etcd_layout.backend_key(self.config.prefix, self._name(service), config.address)
        await self._write(lambda: self.client.put(key, etcd_layout.encode_backend(config.weight)))

    async def remove(self, service: str, address: str) -> None:
        name = self._name(service)
        for make in (etcd_layout.backend_key, etcd_layout.admin_key):
            key = make(self.config.prefix, name, address)
            await self._write(lambda key=key: self.client.delete(key))

    def _name(self, service: str) -> str:
        name = self.name_of(service)
        assert name is not None  # the caller asked `directory_of` first
        return name

    async def _write(self, call: Any) -> None:
        try:
            revision = int(await call())
        except EtcdError as exc:
            raise EtcdUnavailable(f"etcd did not take the change, nothing changed: {exc}") from None
        try:
            async with asyncio.timeout(APPLIED_WAIT):
                async with self._changed:
                    await self._changed.wait_for(lambda: self.revision >= revision)
        except TimeoutError:
            log.warning("discovery: etcd took a change (revision %d) not seen back yet", revision)
