"""The composition root: a balancer process put together and run.

`build_server` makes the runtime's `Server` with the aiohttp admin endpoint;
`serve` runs it with the process's signals (SIGINT and SIGTERM drain, a second
one cuts at once; SIGHUP reloads), installed before anything slow so that a
stop during a long start-up cancels it; `run` does that in a new event loop
(uvloop when installed) and turns start-up failures into exit codes. Already
bound listening sockets (`sockets`, by the (host, port) a service's `listen`
names) are served instead of binding anew, so a supervisor can bind once.

A restart that drops nothing (`takeover`): before the loop starts, the listening sockets
of the balancer answering on a handover socket are received (`balancer.runtime.handover`)
and given (`assign`: by service and address) to the services and the admin endpoint of
this config; a socket that none of them names is closed with a warning.

Worker processes (`--workers N`, N > 1): `run_supervisor` binds every listener once and
keeps N workers serving on them (`balancer.runtime.supervisor`), with the admin endpoint
that shows them as one balancer (`balancer.admin.cluster`); `run_worker` is one of them,
a `Server` on the sockets it inherited, with its admin API on its control socket only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import signal
import socket
from collections.abc import Callable, Mapping

from balancer import __version__, native
from balancer.admin.app import AdminServer
from balancer.admin.cluster import ClusterAdmin, add_worker_routes
from balancer.config.addresses import format_address
from balancer.config.errors import ConfigError
from balancer.config.model import Config
from balancer.net.handover import HandoverError, NothingToTakeOver, assign, check_path
from balancer.net.loops import loop_factory, loop_name
from balancer.runtime.handover import Takeover
from balancer.runtime.server import Server
from balancer.runtime.services import ListenError
from balancer.runtime.starting import ServerStart
from balancer.runtime.supervisor import Supervisor
from balancer.runtime.workers import WorkerServer, WorkerSpec, worker_log_filter

log = logging.getLogger("balancer")

Sockets = Mapping[tuple[str, int], socket.socket]


def _admin(server: ServerStart) -> AdminServer:
    assert isinstance(server, Server)
    return AdminServer(server)


def build_server(config: Config, reader: Callable[[], Config] | None = None) -> Server:
    """The runtime of `config`, with the admin endpoint when the config enables it."""
    return Server(config, reader, admin=_admin)


def _signals(loop: asyncio.AbstractEventLoop, server: Server | Supervisor, install: bool) -> None:
    handlers: dict[signal.Signals, Callable[[], None]] = {
        signal.SIGINT: lambda: server.request_stop(signal.SIGINT),
        signal.SIGTERM: lambda: server.request_stop(signal.SIGTERM),
    }
    if hasattr(signal, "SIGHUP"):
        handlers[signal.SIGHUP] = server.reload_on_signal
    for sig, handler in handlers.items():
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            if install:
                loop.add_signal_handler(sig, handler)
            else:
                loop.remove_signal_handler(sig)


async def serve(server: Server, sockets: Sockets | None = None) -> int:
    """Run `server` with the process's signals until it stops; the exit code."""
    loop = asyncio.get_running_loop()
    _signals(loop, server, install=True)
    try:
        return await server.run(sockets)
    finally:
        _signals(loop, server, install=False)


def runtime_summary() -> str:
    """What runs: the hot path's implementation, the event loop, the Python."""
    return (
        f"hot path (message and http mode) {native.implementation()}, event loop {loop_name()}, "
        f"Python {platform.python_version()}"
    )


def take_over(
    config: Config, path: str, if_running: bool = False
) -> tuple[Takeover, dict[str, socket.socket], socket.socket | None] | None:
    """The listening sockets of the balancer answering on `path`, by the name of the
    service that is to serve on each, and the admin endpoint's; None when nothing answers
    there and `if_running`. HandoverError when they cannot be had."""
    try:
        takeover, received = Takeover.receive(path)
    except NothingToTakeOver as exc:
        if not if_running:
            raise
        log.info("takeover: %s; starting afresh", exc)
        return None
    services = [(s.name, (s.listen_host, s.listen_port)) for s in config.services]
    admin = (config.admin.host, config.admin.port) if config.admin.enabled else None
    given = assign([h for h, _ in received], services, admin)
    for i in given.unused:
        handed, sock = received[i]
        log.warning(
            "takeover: no listener of this config is at %s (%s there): its socket is closed",
            format_address(*handed.listen),
            handed.what,
        )
        sock.close()
    by_name = {name: received[i][1] for name, i in given.services.items()}
    return takeover, by_name, received[given.admin][1] if given.admin is not None else None


def run(
    config: Config,
    reader: Callable[[], Config] | None = None,
    sockets: Sockets | None = None,
    *,
    handover: str | None = None,
    takeover: str | None = None,
    takeover_if_running: bool = False,
) -> int:
    """Serve `config` until stopped; the exit code (1: a listen address cannot be bound or
    the takeover failed, 2: a backend is the balancer itself, 130: interrupted before the
    loop took over). `handover`: once ready, listen on that Unix socket path for a new
    process to take the listeners over; `takeover`: take them from the one on that path."""
    log.info("balancer %s, %s", __version__, runtime_summary())
    server = build_server(config, reader)
    server.handover_path = handover
    try:
        if handover is not None:
            check_path(handover, replacing=takeover)
    except HandoverError as exc:
        log.error("handover socket: %s", exc)
        return 1
    if takeover is not None:
        try:
            taken = take_over(config, takeover, takeover_if_running)
        except HandoverError as exc:
            log.error("takeover from %s failed: %s", takeover, exc)
            return 1
        if taken is not None:
            server.takeover, server.handed_services, server.handed_admin = taken
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            return runner.run(serve(server, sockets))
    except ListenError as exc:
        log.error("%s", exc)
        return 1
    except ConfigError as exc:
        log.error("invalid configuration: %s", exc)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if server.takeover is not None:
            server.takeover.close()
        if server.handed_admin is not None:
            server.handed_admin.close()
        for sock in server.handed_services.values():
            sock.close()


# -- worker processes -------------------------------------------------------------------


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, ListenError):
        log.error("%s", exc)
        return 1
    if isinstance(exc, ConfigError):
        log.error("invalid configuration: %s", exc)
        return 2
    return 130


def run_supervisor(
    config: Config,
    reader: Callable[[], Config] | None,
    workers: int,
    argv: list[str],
    sockets: str = "shared",
) -> int:
    """Bind every listener once, serve with `workers` worker processes until stopped (each
    started as `argv` is); the exit code (1: a listen address cannot be bound, or that of
    a worker that failed to start)."""
    log.info("balancer %s, %s; %d worker processes", __version__, runtime_summary(), workers)
    supervisor = Supervisor(
        config, workers, argv, sockets=sockets, reader=reader, control=ClusterAdmin
    )
    try:
        supervisor.bind()
    except ListenError as exc:
        return _exit_code(exc)

    async def supervise() -> int:
        loop = asyncio.get_running_loop()
        _signals(loop, supervisor, install=True)
        try:
            return await supervisor.run()
        finally:
            _signals(loop, supervisor, install=False)

    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            return runner.run(supervise())
    except KeyboardInterrupt as exc:
        return _exit_code(exc)


def run_worker(config: Config, reader: Callable[[], Config] | None, spec: WorkerSpec) -> int:
    """Serve `config` as worker `spec.index` of a supervisor, on the sockets it inherited;
    the exit code."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(worker_log_filter(spec.index))
    server = WorkerServer(config, reader, spec)
    control = socket.socket(fileno=spec.control)
    control.setblocking(False)

    async def work() -> int:
        admin = AdminServer(server)
        add_worker_routes(admin)
        await admin.start(control)
        try:
            return await serve(server)
        finally:
            await admin.stop()

    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            return runner.run(work())
    except (ListenError, ConfigError, KeyboardInterrupt) as exc:
        return _exit_code(exc)
    finally:
        for sock in server.handed_services.values():
            sock.close()
