"""DNS service discovery: each service's `discover` name re-resolved every interval.

How it works: one task (`Discovery.run`, started with the server) resolves, every
`[discovery] interval`, the `discover` target of every running service that has one,
all at once, with dnspython's asyncio resolver (the `nameservers` given, or the
system's). An answer becomes a list of backends (`answer_backends`, pure) and the
service's pool becomes it through the server's own add and remove (`apply_backends`):
new backends are health-checked before they take traffic, missing ones drain and are
removed. A failed resolution, or one with no records, keeps the last set (a pool is
never emptied for the resolver's sake) and logs one warning per streak of failures.
`/status` shows each service's state (`DiscoveryState.status`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import dns.asyncresolver
import dns.exception
import dns.resolver
from dns.nameserver import Do53Nameserver

from balancer.config.discovery import (
    DiscoverTarget,
    DiscoveryConfig,
    parse_discover,
    parse_nameserver,
)
from balancer.config.model import MAX_WEIGHT, BackendConfig
from balancer.errors import BalancerError
from balancer.runtime.services import ServiceRuntime

log = logging.getLogger("balancer")


@dataclass(frozen=True, order=True)
class Record:
    """One backend a DNS answer names."""

    host: str
    port: int
    weight: int = 1


def answer_backends(records: Iterable[Record]) -> tuple[BackendConfig, ...]:
    """The backends `records` name, each address once (the largest weight), in address
    order; weights clamped to 1..MAX_WEIGHT (an SRV weight of 0 means "rarely", not
    "never": it gets the smallest share there is, not a drain)."""
    best: dict[tuple[str, int], int] = {}
    for record in records:
        weight = max(1, min(MAX_WEIGHT, record.weight))
        key = (record.host.lower().rstrip("."), record.port)
        best[key] = max(weight, best.get(key, 0))
    return tuple(BackendConfig(host, port, weight) for (host, port), weight in sorted(best.items()))


class EmptyAnswer(Exception):
    """An answer without a record: no backend to be had, the last set is kept."""


class Resolver(Protocol):
    async def resolve(self, qname: str, rdtype: str) -> Any: ...


def make_resolver(config: DiscoveryConfig) -> dns.asyncresolver.Resolver:
    """dnspython's asyncio resolver for `config` (its nameservers, or the system's)."""
    if config.nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        servers = [parse_nameserver(text) for text in config.nameservers]
        resolver.nameservers = [Do53Nameserver(h, p) for h, p in filter(None, servers)]
    else:
        resolver = dns.asyncresolver.Resolver()
    resolver.lifetime = config.timeout
    resolver.timeout = config.timeout
    resolver.cache = None
    return resolver


async def resolve_target(resolver: Resolver, target: DiscoverTarget) -> list[Record]:
    """The records `target` names; raises dns.exception.DNSException when nothing answers
    (an address family that fails, without records or refused, is no failure while the
    other has some)."""
    if target.kind == "srv":
        answer = await resolver.resolve(target.name, "SRV")
        return [
            Record(r.target.to_text(omit_final_dot=True), int(r.port), int(r.weight))
            for r in answer
        ]
    records: list[Record] = []
    errors: list[dns.exception.DNSException] = []
    for rdtype in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(target.name, rdtype)
        except dns.exception.DNSException as exc:
            errors.append(exc)
            continue
        records.extend(Record(r.address, target.port) for r in answer)
    if not records and errors:
        raise errors[0]
    return records


@dataclass
class DiscoveryState:
    """What discovery knows of one service, for `/status`."""

    target: str
    last_success: float | None = None
    """Wall time of the last answer that was applied."""
    last_error: str | None = None
    last_error_time: float | None = None
    failing: bool = False
    """In a streak of failures (warned of once)."""
    records: tuple[BackendConfig, ...] = ()
    resolutions: int = 0
    failures: int = 0

    def status(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "kind": "dns",
            "ok": not self.failing and self.last_success is not None,
            "last_success": self.last_success,
            "last_error": self.last_error,
            "last_error_time": self.last_error_time,
            "resolutions": self.resolutions,
            "failures": self.failures,
            "records": [{"address": b.address, "weight": b.weight} for b in self.records],
        }


class Changes(Protocol):
    """What discovery needs of the server."""

    services: dict[str, ServiceRuntime]
    stopping: bool

    def apply_backends(
        self, service: str, wanted: Sequence[BackendConfig], why: str
    ) -> tuple[int, int]: ...

    def set_backend(
        self, service: str, address: str, *, state: str | None = None, weight: int | None = None
    ) -> Any: ...


@dataclass(eq=False)
class Discovery:
    """Re-resolves every running service's `discover` target every interval."""

    server: Changes
    config: DiscoveryConfig
    states: dict[str, DiscoveryState] = field(default_factory=dict)
    _resolver: Resolver | None = None
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    def reconfigure(self, config: DiscoveryConfig) -> None:
        """A reload's `[discovery]`: a new resolver from the next round on, at once."""
        if config != self.config:
            self.config = config
            self._resolver = None
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.server.stopping:
            started = loop.time()
            await self.round()
            self._wake.clear()
            left = self.config.interval - (loop.time() - started)
            if left > 0:
                try:
                    async with asyncio.timeout(left):
                        await self._wake.wait()
                except TimeoutError:
                    pass

    async def round(self) -> None:
        """Resolve every service's target once, at once, and apply the answers."""
        if self._resolver is None:
            self._resolver = make_resolver(self.config)
        targets = {
            name: runtime.config.discover
            for name, runtime in self.server.services.items()
            if runtime.config.discover
        }
        for name in set(self.states) - set(targets):
            del self.states[name]
        for name, text in targets.items():
            state = self.states.get(name)
            if state is None or state.target != text:
                self.states[name] = DiscoveryState(text)
        await asyncio.gather(*(self._one(name, text) for name, text in targets.items()))

    async def _one(self, name: str, text: str) -> None:
        state = self.states[name]
        target = parse_discover(text)
        assert target is not None  # checked by the loader
        assert self._resolver is not None
        state.resolutions += 1
        try:
            records = await resolve_target(self._resolver, target)
            if not records:
                raise EmptyAnswer("no records")
        except (dns.exception.DNSException, OSError, EmptyAnswer) as exc:
            self._failed(name, state, f"{type(exc).__name__}: {exc}")
            return
        wanted = answer_backends(records)
        if name not in self.server.services or self.server.stopping:
            return
        try:
            added, removed = self.server.apply_backends(name, wanted, f"discovery ({text})")
        except BalancerError as exc:
            self._failed(name, state, str(exc))
            return
        if state.failing:
            log.warning(
                "discovery: service %s: %s resolves again (%d record(s))", name, text, len(wanted)
            )
        elif added or removed:
            log.info("discovery: service %s: %d added, %d leaving", name, added, removed)
        self.server.services[name].discovery_answered = True
        state.failing = False
        state.records = wanted
        state.last_success = time.time()

    def _failed(self, name: str, state: DiscoveryState, error: str) -> None:
        state.failures += 1
        state.last_error = error
        state.last_error_time = time.time()
        if not state.failing:
            log.warning(
                "discovery: service %s: resolving %s failed (%s); its %d backend(s) are kept "
                "until an answer comes",
                name,
                state.target,
                error,
                len(self.server.services[name].pool.backends)
                if name in self.server.services
                else 0,
            )
        state.failing = True
