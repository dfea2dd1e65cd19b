"""What a reload and a stop decide, without I/O.

How it works:
- Reload: `plan_reload` compares the services running now (name -> config) with a
  newly read `Config`: services to start (new names), to retire (gone from the file),
  to replace (listen address or mode changed: a new listener, the old one drains) and
  to update in place. A new listener on the address a retired or replaced service
  listens on takes over that listener's socket (`takeover`), so renaming a service,
  changing its mode or swapping two services' ports loses no connection. The server
  binds every new listener first (prepare) and applies the plan only once all of
  them are bound and checked (commit); a reload that cannot be made changes nothing.
- Within a service updated in place, `plan_backends` compares the pool with the
  file: backends to add, to remove (after they finish what they hold), whose removal
  under way the file cancels (it lists them again), and whose weight the file sets.
  The result is the file: a later reload always wins over an earlier one still
  draining, and over changes made through the runtime API.
- Stop: a proxy's `drain(timeout)` returns a `DrainCut`: what it had to cut when the
  time ran out (or a second signal asked to hurry): client connections closed with
  requests unanswered, and those requests. The server logs it as the stop's doing,
  never as a backend failure.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from balancer.config.model import BackendConfig, Config, ServiceConfig


@dataclass(frozen=True)
class DrainCut:
    """What a drain cut: client connections closed with requests unanswered."""

    connections: int = 0
    requests: int = 0

    def __add__(self, other: DrainCut) -> DrainCut:
        return DrainCut(self.connections + other.connections, self.requests + other.requests)

    def __bool__(self) -> bool:
        return bool(self.connections or self.requests)


def _listener(svc: ServiceConfig) -> tuple[str, int, str, bool]:
    """What a listener is made for: a change of any of it needs a new one (the socket is
    taken over, not one connection in its backlog lost). `front`: connections are read
    before the mode gets them (PROXY header, TLS), by a listener of another kind."""
    return svc.listen_host, svc.listen_port, svc.mode, svc.front


@dataclass(frozen=True)
class ReloadPlan:
    """How the running services become the file's."""

    order: tuple[str, ...]
    """Service names in file order: the running set after the commit."""
    start: tuple[ServiceConfig, ...] = ()
    replace: tuple[ServiceConfig, ...] = ()
    update: tuple[ServiceConfig, ...] = ()
    retire: tuple[str, ...] = ()
    takeover: Mapping[str, str] | None = None
    """New listener's service name -> the released service whose listening socket it takes."""

    @property
    def listeners(self) -> tuple[ServiceConfig, ...]:
        """Services that need a new listener, in file order."""
        new = {s.name for s in (*self.start, *self.replace)}
        by_name = {s.name: s for s in (*self.start, *self.replace)}
        return tuple(by_name[n] for n in self.order if n in new)

    @property
    def empty(self) -> bool:
        return not (self.start or self.replace or self.retire)

    def __repr__(self) -> str:
        return (
            f"<ReloadPlan start={[s.name for s in self.start]} "
            f"replace={[s.name for s in self.replace]} update={[s.name for s in self.update]} "
            f"retire={list(self.retire)} takeover={dict(self.takeover or {})}>"
        )


def plan_reload(running: Mapping[str, ServiceConfig], new: Config) -> ReloadPlan:
    """The plan that turns the `running` services into `new`'s."""
    start: list[ServiceConfig] = []
    replace: list[ServiceConfig] = []
    update: list[ServiceConfig] = []
    names = {s.name for s in new.services}
    retire = [name for name in running if name not in names]
    for svc in new.services:
        old = running.get(svc.name)
        if old is None:
            start.append(svc)
        elif _listener(old) != _listener(svc):
            replace.append(svc)
        else:
            update.append(svc)
    released = {
        (running[n].listen_host, running[n].listen_port): n
        for n in (*retire, *(s.name for s in replace))
        if running[n].listen_port != 0
    }
    takeover = {
        svc.name: released[(svc.listen_host, svc.listen_port)]
        for svc in (*start, *replace)
        if (svc.listen_host, svc.listen_port) in released
    }
    return ReloadPlan(
        order=tuple(s.name for s in new.services),
        start=tuple(start),
        replace=tuple(replace),
        update=tuple(update),
        retire=tuple(retire),
        takeover=takeover,
    )


@dataclass(frozen=True)
class BackendChanges:
    """How a pool's backends become the file's."""

    add: tuple[BackendConfig, ...] = ()
    remove: tuple[str, ...] = ()
    """In the pool, not in the file, not leaving yet: to drain and remove."""
    rescue: tuple[str, ...] = ()
    """Leaving (a removal under way) but in the file again: the removal is called off."""
    weights: tuple[tuple[str, int, int], ...] = ()
    """(address, running weight, the file's weight) where they differ."""
    configs: tuple[BackendConfig, ...] = ()
    """The file's backends, in file order (the pool's order after the change)."""

    @property
    def empty(self) -> bool:
        return not (self.add or self.remove or self.rescue or self.weights)


def plan_backends(
    running: Sequence[tuple[str, int]],
    leaving: Collection[str],
    wanted: Sequence[BackendConfig],
) -> BackendChanges:
    """Compare the pool (`running`: address and weight, `leaving`: removals under way)
    with the file's backends `wanted`."""
    current = dict(running)
    listed = {b.address for b in wanted}
    add = tuple(b for b in wanted if b.address not in current)
    remove = tuple(a for a, _ in running if a not in listed and a not in leaving)
    rescue = tuple(b.address for b in wanted if b.address in leaving and b.address in current)
    weights = tuple(
        (b.address, current[b.address], b.weight)
        for b in wanted
        if b.address in current and current[b.address] != b.weight
    )
    return BackendChanges(add, remove, rescue, weights, tuple(wanted))
