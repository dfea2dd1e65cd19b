"""A worker process of `balancer serve --workers N`: what it is told, how it serves.

How it works:
- The supervisor (`balancer.runtime.supervisor`) starts each worker as
  `python -m balancer serve ...` with its own command line, and tells it in the
  environment variable WORKER_ENV (a `WorkerSpec`, JSON) its index and which inherited
  file descriptors (pass_fds) are which service's listening socket and which its control
  socket. A worker is a full `Server` started on those sockets by the takeover's path
  (`handed_services`, by service name); it binds no listener of its own and has no TCP
  admin endpoint: it serves the admin API on the control socket (a Unix socket in the
  supervisor's private directory), for the supervisor to read and write.
- Readiness, reloads and stops reach the supervisor as `sd_notify` datagrams
  (`balancer.net.notify`): the worker's NOTIFY_SOCKET is one the supervisor reads.
- Health checks run once per backend: every worker checks each backend once at start-up
  (it serves with a known state), then only the worker with `checks` (worker 0 at first)
  checks; the others' checkers (`RelayedChecker`) schedule nothing and take the states
  the supervisor relays (`apply_states`, from what `backend_states` reports of each
  worker). When the checking worker dies, the supervisor elects another ready one
  (`WorkerServer.take_checks`), which checks from then on, also after the dead one is
  back.
  An outlier ejection seen by any worker is relayed to every other one with the time it
  has left, so none readmits the backend early.
"""

from __future__ import annotations

import array
import dataclasses
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from balancer.config.model import Config, ServiceConfig
from balancer.core.states import DOWN, UP
from balancer.runtime.health import HealthChecker
from balancer.runtime.server import Server
from balancer.runtime.services import ServiceRuntime
from balancer.runtime.starting import AdminFactory

log = logging.getLogger("balancer")

WORKER_ENV = "BALANCER_WORKER"
MAX_WORKERS = 64
FDS_PER_MESSAGE = 32


@dataclass(frozen=True)
class WorkerSpec:
    """What the supervisor tells one worker: its index, its inherited descriptors."""

    index: int
    count: int
    sockets: dict[str, int]
    """A service's name -> the descriptor of its listening socket."""
    control: int
    """The descriptor of the listening Unix socket the worker serves its admin API on."""
    checks: bool
    """Whether this worker runs the periodic health checks (worker 0)."""
    channel: int = -1
    """The descriptor of its end of the supervisor's channel (`send_listeners`)."""

    def to_env(self) -> str:
        return json.dumps(
            {
                "index": self.index,
                "count": self.count,
                "sockets": self.sockets,
                "control": self.control,
                "checks": self.checks,
                "channel": self.channel,
            }
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WorkerSpec | None:
        """The spec in the environment; None when this process is not a worker."""
        text = (os.environ if environ is None else environ).get(WORKER_ENV)
        if not text:
            return None
        doc = json.loads(text)
        return cls(
            index=int(doc["index"]),
            count=int(doc["count"]),
            sockets={str(k): int(v) for k, v in doc["sockets"].items()},
            control=int(doc["control"]),
            checks=bool(doc["checks"]),
            channel=int(doc.get("channel", -1)),
        )


class RelayedChecker(HealthChecker):
    """A worker's health checker that checks once at start-up and then never: the states
    come from the checking worker, through the supervisor (`apply_states`), until it is
    promoted (its worker elected to check)."""

    relayed = True

    def start(self) -> None:
        if not self.relayed:
            super().start()

    def watch(self, backend: Any) -> None:
        if not self.relayed:
            super().watch(backend)

    def promote(self) -> None:
        """Check on schedule from now on, as a worker with `checks` does."""
        if self.relayed:
            self.relayed = False
            self.pool.on_transition.append(self._on_transition)
            super().start()


class WorkerServer(Server):
    """A `Server` on the listening sockets its supervisor inherited to it."""

    def __init__(
        self,
        config: Config,
        reader: Callable[[], Config] | None,
        spec: WorkerSpec,
        admin: AdminFactory | None = None,
    ) -> None:
        super().__init__(config, reader, admin)
        self.spec = spec
        for name, fd in spec.sockets.items():
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            self.handed_services[name] = sock
        self.channel = socket.socket(fileno=spec.channel) if spec.channel >= 0 else None
        self.take_listeners()  # sent before this start: it has them already, by name

    def take_listeners(self) -> None:
        """The listening sockets the supervisor sent for a reload, by service name (the
        reload's new listeners take them instead of binding)."""
        if self.channel is None:
            return
        for name, sock in receive_listeners(self.channel).items():
            old = self.handed_services.pop(name, None)
            if old is not None and old.fileno() != sock.fileno():
                old.close()
            self.handed_services[name] = sock

    async def reload(self) -> None:
        self.take_listeners()
        try:
            await super().reload()
        finally:  # what the reload did not take is the supervisor's to keep
            while self.handed_services:
                self.handed_services.popitem()[1].close()

    def take_checks(self) -> bool:
        """This worker checks every backend from now on (the one that did is gone);
        whether it did not already."""
        if self.spec.checks:
            return False
        self.spec = dataclasses.replace(self.spec, checks=True)
        for runtime in self.services.values():
            if isinstance(runtime.checker, RelayedChecker):
                runtime.checker.promote()
        log.warning("worker %d checks the backends from now on", self.spec.index)
        return True

    def _build(self, svc: ServiceConfig, config: Config) -> ServiceRuntime:
        runtime = super()._build(svc, config)
        if not self.spec.checks:
            pool = runtime.pool
            pool.on_transition.remove(runtime.checker._on_transition)
            runtime.checker = RelayedChecker(pool)
        return runtime


def worker_log_filter(index: int) -> logging.Filter:
    """Each log line of worker `index` says so; its readiness is not the balancer's."""

    class WorkerLines(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if not getattr(record, "worker_marked", False):
                record.worker_marked = True
                msg = "ready" if record.msg == "balancer ready" else str(record.msg)
                record.msg = f"worker {index}: {msg}"
            return True

    return WorkerLines()


# -- the states relayed -----------------------------------------------------------------


def backend_states(server: Server) -> dict[str, dict[str, dict[str, Any]]]:
    """Each backend's health state in this process, by service and address, with the
    seconds an outlier ejection has left and its admin state and weight."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, runtime in server.services.items():
        pool = runtime.pool
        out[name] = {
            b.address: {
                "state": b.state,
                "reason": b.last_reason,
                "last_check": b.last_check,
                "last_check_ok": b.last_check_ok,
                "eject_left": round(pool.ejection_left(b), 3),
                "admin_state": b.admin_state,
                "weight": b.weight,
            }
            for b in pool
        }
    return out


def apply_states(server: Server, doc: Mapping[str, Any]) -> int:
    """Set the health states `doc` relays (as `backend_states` has them); how many
    backends changed state. Unknown services and backends are left out."""
    changed = 0
    now = time.monotonic()
    for name, backends in doc.items():
        runtime = server.services.get(name)
        if runtime is None or not isinstance(backends, dict):
            continue
        pool = runtime.pool
        for address, want in backends.items():
            backend = pool.get(address)
            if backend is None or not isinstance(want, dict):
                continue
            reason = str(want.get("reason", ""))[:300]
            left = float(want.get("eject_left") or 0.0)
            if left > 0:
                backend.ejected_until = max(backend.ejected_until, now + left)
            if "last_check" in want:
                backend.last_check = want["last_check"]
                backend.last_check_ok = want.get("last_check_ok")
            if want.get("state") == DOWN and backend.state == UP:
                pool.mark_down(backend, reason)
                changed += 1
            elif want.get("state") == UP and backend.state == DOWN:
                backend.consecutive_failures = 0
                changed += int(pool.mark_up(backend, reason))
            else:
                backend.last_reason = reason
    return changed


# -- listening sockets a reload adds --------------------------------------------------


def send_listeners(channel: socket.socket, sockets: Mapping[str, socket.socket]) -> None:
    """Send `sockets` (by service name) down the supervisor's end of a worker's channel,
    at most FDS_PER_MESSAGE in a message."""
    items = list(sockets.items())
    for start in range(0, len(items), FDS_PER_MESSAGE):
        part = items[start : start + FDS_PER_MESSAGE]
        names = json.dumps([name for name, _ in part]).encode()
        socket.send_fds(channel, [names], [sock.fileno() for _, sock in part])


def receive_listeners(channel: socket.socket) -> dict[str, socket.socket]:
    """What the supervisor sent down the channel so far, by service name (the latest of
    a name wins); never waits."""
    out: dict[str, socket.socket] = {}
    while True:
        room = socket.CMSG_LEN(FDS_PER_MESSAGE * array.array("i").itemsize)
        try:  # (socket.recv_fds drops its flags before Python 3.12)
            data, ancillary, _, _ = channel.recvmsg(65536, room, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return out
        fds = array.array("i")
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        socks = [socket.socket(fileno=fd) for fd in fds]
        try:
            names = json.loads(data)
        except ValueError:
            names = []
        if not data or not isinstance(names, list) or len(names) != len(socks):
            for sock in socks:
                sock.close()
            if not data:
                return out
            continue
        for name, sock in zip(names, socks, strict=True):
            sock.setblocking(False)
            previous = out.pop(str(name), None)
            if previous is not None:
                previous.close()
            out[str(name)] = sock
