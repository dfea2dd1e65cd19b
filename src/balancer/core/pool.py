"""Backends of one service and which of them may take work.

How it works: a `Backend` carries its health state ("up"/"down"), an admin state
("ready", "drain", "maint"), its weight and its counters. The `BackendPool` keeps
the backends in config order and, whenever anything that decides eligibility
changes, hands the policy the eligible set: up, ready, effective weight above 0.

Handing the policy a new set costs O(backends) (a Maglev table is rebuilt), so
the health checker marks with `defer=True`: the transitions of one turn of the
event loop are handed over in one `refresh` at its end. Until then the pool is
"stale"; a backend marked down meanwhile is never picked all the same, since
its `effective_weight` is 0 from the moment it is down (policies never pick a
target of weight 0), and `pick` / `fallback` refresh first when a stale set
leaves nothing to pick.

A backend that is this balancer itself (`mark_loop`) stays down for good (a
reload or the API adding it again makes a new `Backend`, which starts fresh).

With `backend_framing = "auto"` and a probe to detect with, `Backend.framing`
is "" until the health checker finds out, and again whenever the backend goes
down (a backend restarted as another kind is detected again); the fallback
does not pick a backend whose framing is not known.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Collection, Iterable, Iterator

from balancer.config.model import BackendConfig, ServiceConfig
from balancer.core.policies import Policy, make_policy
from balancer.core.states import DOWN, READY, UP

log = logging.getLogger("balancer")


class Backend:
    """One backend server of a service: state, weight and counters."""

    __slots__ = (
        "_weight",
        "active_connections",
        "address_bytes",
        "admin_state",
        "bytes_in",
        "bytes_out",
        "cap_logged_at",
        "config",
        "connect_failures",
        "consecutive_failures",
        "ejected_until",
        "ejections",
        "failures",
        "framing",
        "host",
        "in_flight",
        "index",
        "last_change",
        "last_check",
        "last_check_ok",
        "last_reason",
        "looped",
        "port",
        "requests",
        "slow_start",
        "state",
        "total_connections",
        "up_since",
    )

    def __init__(
        self,
        config: BackendConfig,
        index: int = 0,
        slow_start: float = 0.0,
        framing: str = "line",
    ) -> None:
        self.config = config
        self.framing = "" if framing == "auto" else framing
        """"line" or "raw"; "" while `backend_framing = "auto"` has not found out yet."""
        self.address_bytes = config.address.encode()
        self.index = index
        self.host = config.host
        self.port = config.port
        self._weight = config.weight
        self.slow_start = slow_start
        self.state = UP
        self.admin_state = READY
        self.in_flight = 0
        self.requests = 0
        self.failures = 0
        self.last_check: float | None = None
        self.last_check_ok: bool | None = None
        self.last_reason = ""
        self.last_change = time.monotonic()
        self.up_since: float | None = None
        # tcp mode
        self.active_connections = 0
        self.total_connections = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.connect_failures = 0
        # outlier detection
        self.consecutive_failures = 0
        self.ejections = 0
        self.ejected_until = 0.0
        self.cap_logged_at = -1e9
        """When a failure last went unejected because of max_ejection_percent (logged)."""
        self.looped = False
        """This backend turned out to be the balancer itself: it never serves (see loopguard)."""

    @property
    def address(self) -> str:
        return self.config.address

    @property
    def weight(self) -> int:
        return self._weight

    @weight.setter
    def weight(self, value: int) -> None:
        self._weight = value

    @property
    def effective_weight(self) -> float:
        """Weight after slow start: ramps linearly for `slow_start` seconds after coming up.

        0 for a backend that may take no new work (down, drained, in maintenance): no
        policy picks it, even from an eligible set handed over before it changed.
        """
        if self.state != UP or self.admin_state != READY:
            return 0.0
        w = float(self._weight)
        if self.slow_start > 0 and self.up_since is not None and w > 0:
            elapsed = time.monotonic() - self.up_since
            if elapsed < self.slow_start:
                return max(w * elapsed / self.slow_start, w * 0.01)
        return w

    @property
    def is_up(self) -> bool:
        return self.state == UP

    @property
    def eligible(self) -> bool:
        return self.state == UP and self.admin_state == READY and self._weight > 0

    def __repr__(self) -> str:
        return (
            f"<Backend {self.address} {self.state}/{self.admin_state} w={self._weight} "
            f"in_flight={self.in_flight} requests={self.requests} failures={self.failures}>"
        )


TransitionHook = Callable[["Backend", str, str], None]

LoopOwner = tuple["BackendPool", Backend]
"""The owner of every outgoing connection in `loopguard`: a listener that finds it has
accepted one of them calls `pool.mark_loop(backend, reason)`."""


def detects_framing(service: ServiceConfig) -> bool:
    """Does the health checker find out each backend's framing (`backend_framing = "auto"`)?

    It needs a probe to detect with: message mode, health checks on and `send` set.
    Without one, `auto` means line framing.
    """
    health = service.health
    return (
        service.backend_framing == "auto"
        and service.mode == "message"
        and health.enabled
        and health.send is not None
    )


def initial_framing(service: ServiceConfig) -> str:
    """`Backend.framing` of a new backend: "" while it is to be detected."""
    if service.backend_framing == "auto":
        return "" if detects_framing(service) else "line"
    return service.backend_framing


class BackendPool:
    """The backends of one service, in config order, and the policy over the eligible ones."""

    def __init__(self, service: ServiceConfig, policy: Policy | None = None) -> None:
        self.service = service
        self.policy = policy if policy is not None else make_policy(service)
        framing = initial_framing(service)
        self.backends: list[Backend] = [
            Backend(b, i, service.slow_start, framing) for i, b in enumerate(service.backends)
        ]
        self._by_address: dict[str, Backend] = {b.address: b for b in self.backends}
        self.on_transition: list[TransitionHook] = []
        self._stale = False
        """Eligibility changed since the policy was last handed the eligible set."""
        self.defer: Callable[[Callable[[], None]], object] | None = None
        """Runs a callback at the end of this turn of the event loop (the health checker
        sets it); None: a deferred refresh happens at once."""
        self._refresh_pending = False
        self._batching = 0
        self.refresh()

    def __iter__(self) -> Iterator[Backend]:
        return iter(self.backends)

    def __len__(self) -> int:
        return len(self.backends)

    def get(self, address: str) -> Backend | None:
        return self._by_address.get(address)

    def refresh(self) -> None:
        """Recompute the eligible set and hand it to the policy."""
        self._stale = False
        self.policy.update([b for b in self.backends if b.eligible])

    def refresh_soon(self) -> None:
        """Refresh at the end of this turn of the event loop (once, however many calls)."""
        self._stale = True
        if self._refresh_pending or self._batching:
            return
        if self.defer is None:
            self.refresh()
            return
        self._refresh_pending = True
        self.defer(self._deferred_refresh)

    def _deferred_refresh(self) -> None:
        self._refresh_pending = False
        if self._stale:
            self.refresh()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Deferred marks inside (even across awaits) make one refresh, at the end."""
        self._batching += 1
        try:
            yield
        finally:
            self._batching -= 1
            if not self._batching and self._stale:
                self.refresh()

    def pick(self, key: bytes | None = None, exclude: Collection[Backend] = ()) -> Backend | None:
        target: Backend | None = self.policy.pick(key, exclude)  # type: ignore[assignment]
        if target is None and self._stale:
            self.refresh()  # a backend came up a moment ago
            target = self.policy.pick(key, exclude)  # type: ignore[assignment]
        return target

    def fallback(self, exclude: Collection[Backend] = ()) -> Backend | None:
        """With no eligible backend left to try, a down one that looks alive again.

        Outlier ejection keeps a backend out for its whole ejection time even after
        it recovers, and a backend marked down waits for `rise` good checks; if
        the other backends fail meanwhile, refusing everything would be worse than
        sending traffic to it (Envoy's panic routing, narrowed). Candidates: down
        backends whose last active check passed, and, without active checks,
        outlier-ejected ones. Drained, in maintenance and zero-weight backends are
        never chosen. Of several, the one whose ejection ends (or ended) first.
        """
        if self._stale:
            # the eligible set changed a moment ago: a backend that came up comes first
            self.refresh()
            fresh: Backend | None = self.policy.pick(None, exclude)  # type: ignore[assignment]
            if fresh is not None:
                return fresh
        now = time.monotonic()
        unknown_framing = detects_framing(self.service)
        best: Backend | None = None
        for b in self.backends:
            if (
                b.state == DOWN
                and not b.looped
                and not (unknown_framing and not b.framing)
                and (b.last_check_ok or (b.last_check_ok is None and b.ejected_until > now))
                and b.admin_state == READY
                and b.weight > 0
                and b not in exclude
                and (best is None or b.ejected_until < best.ejected_until)
            ):
                best = b
        return best

    @property
    def any_eligible(self) -> bool:
        if self._stale:
            self.refresh()
        return bool(self.policy.targets)

    def mark_down(
        self, backend: Backend, reason: str, *, defer: bool = False, quiet: bool = False
    ) -> None:
        """`backend` is down. `defer`: refresh at the end of this loop turn (see the header);
        `quiet`: the caller logs it (the first check of many backends sums them up)."""
        if backend.state == DOWN:
            backend.last_reason = reason
            return
        backend.state = DOWN
        backend.up_since = None
        backend.last_reason = reason
        backend.last_change = time.monotonic()
        if detects_framing(self.service):
            backend.framing = ""
        if not quiet:
            log.warning(
                "backend %s of service %s is DOWN: %s", backend.address, self.service.name, reason
            )
        if defer:
            self.refresh_soon()
        else:
            self.refresh()
        for hook in self.on_transition:
            hook(backend, DOWN, reason)

    def mark_up(self, backend: Backend, reason: str, *, defer: bool = False) -> bool:
        """`backend` is up again; False (nothing changed) when it is this balancer itself."""
        if backend.looped:
            return False
        if backend.state == UP:
            backend.last_reason = reason
            return True
        backend.state = UP
        backend.up_since = time.monotonic()
        backend.last_reason = reason
        backend.last_change = time.monotonic()
        log.info("backend %s of service %s is UP: %s", backend.address, self.service.name, reason)
        if defer:
            self.refresh_soon()
        else:
            self.refresh()
        for hook in self.on_transition:
            hook(backend, UP, reason)
        return True

    def mark_loop(self, backend: Backend, reason: str) -> None:
        """`backend` is this balancer itself: down for good (checks through it would pass).

        It stays out until it is removed, or changed by a reload or the runtime API.
        """
        if not backend.looped:
            backend.looped = True
            log.error(
                "backend %s of service %s is this balancer itself (%s); it will not be used",
                backend.address,
                self.service.name,
                reason,
            )
        self.mark_down(backend, f"connection loop: {reason}")

    # -- outlier detection (passive health) -------------------------------------
    def report_failure(self, backend: Backend, reason: str) -> bool:
        """A failure seen on live traffic; returns True when it ejected the backend.

        After `consecutive_failures` in a row the backend is ejected (marked down)
        for `base_ejection_time`, doubled for every recent repeat up to
        `max_ejection_time`, unless that would eject more than
        `max_ejection_percent` of the backends. The active checker readmits it
        once the ejection time has passed and its checks pass.
        """
        backend.consecutive_failures += 1
        outlier = self.service.outlier
        if backend.state == DOWN:
            return False
        if not outlier.enabled:
            self.mark_down(backend, reason)
            return True
        if backend.consecutive_failures < outlier.consecutive_failures:
            return False
        now = time.monotonic()
        n = len(self.backends)
        ejected = sum(1 for b in self.backends if b.state == DOWN and b.ejected_until > now)
        limit = max(1.0, n * outlier.max_ejection_percent / 100.0)
        if ejected + 1 > limit:
            if now - backend.cap_logged_at < outlier.base_ejection_time:
                return False  # said already: one line per backend per base_ejection_time
            backend.cap_logged_at = now
            log.warning(
                "backend %s of service %s not ejected (%s): %d of %d backends already "
                "ejected, max_ejection_percent %g",
                backend.address,
                self.service.name,
                reason,
                ejected,
                n,
                outlier.max_ejection_percent,
            )
            return False
        if backend.ejected_until and now - backend.ejected_until > 10 * outlier.max_ejection_time:
            backend.ejections = 0  # a long good spell forgives earlier offences
        backend.ejections += 1
        duration = min(
            outlier.base_ejection_time * (2 ** (backend.ejections - 1)), outlier.max_ejection_time
        )
        backend.ejected_until = now + duration
        self.mark_down(backend, f"{reason} (ejected for {duration:g}s)")
        return True

    def ejection_left(self, backend: Backend) -> float:
        """Seconds until an ejected backend may be readmitted (0 when not ejected)."""
        return max(0.0, backend.ejected_until - time.monotonic())

    def report_success(self, backend: Backend) -> None:
        """A reply on live traffic: the run of consecutive failures is broken."""
        backend.consecutive_failures = 0

    def add(self, config: BackendConfig) -> Backend:
        backend = Backend(
            config, len(self.backends), self.service.slow_start, initial_framing(self.service)
        )
        self.backends.append(backend)
        self._by_address[backend.address] = backend
        self.refresh()
        return backend

    def new_backend(self, config: BackendConfig) -> Backend:
        """A backend for this service, not yet in the pool (see `set_backends`)."""
        return Backend(config, 0, self.service.slow_start, initial_framing(self.service))

    def set_backends(self, backends: Iterable[Backend]) -> None:
        """Make `backends` the pool's, in this order: one pass, one refresh."""
        self.backends[:] = list(backends)
        self._by_address = {b.address: b for b in self.backends}
        for i, b in enumerate(self.backends):
            b.index = i
        self.refresh()

    def remove(self, backend: Backend) -> None:
        self.backends.remove(backend)
        if self._by_address.get(backend.address) is backend:
            del self._by_address[backend.address]
        self.refresh()

    def __repr__(self) -> str:
        up = sum(1 for b in self.backends if b.state == UP)
        down = len(self.backends) - up
        in_flight = sum(b.in_flight for b in self.backends)
        return (
            f"<BackendPool {self.service.name}: {len(self.backends)} backends: "
            f"{up} up, {down} down | {in_flight} in flight>"
        )
