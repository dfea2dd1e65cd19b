"""The composition root: a balancer process put together and run.

`build_server` makes the runtime's `Server` with the aiohttp admin endpoint;
`serve` runs it with the process's signals (SIGINT and SIGTERM drain, a second
one cuts at once; SIGHUP reloads), installed before anything slow so that a
stop during a long start-up cancels it; `run` does that in a new event loop
(uvloop when installed) and turns start-up failures into exit codes. Already
bound listening sockets (`sockets`, by the (host, port) a service's `listen`
names) are served instead of binding anew, so a supervisor can bind once.
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
from balancer.config.errors import ConfigError
from balancer.config.model import Config
from balancer.net.loops import loop_factory, loop_name
from balancer.runtime.server import Server
from balancer.runtime.services import ListenError
from balancer.runtime.starting import ServerStart

log = logging.getLogger("balancer")

Sockets = Mapping[tuple[str, int], socket.socket]


def _admin(server: ServerStart) -> AdminServer:
    assert isinstance(server, Server)
    return AdminServer(server)


def build_server(config: Config, reader: Callable[[], Config] | None = None) -> Server:
    """The runtime of `config`, with the admin endpoint when the config enables it."""
    return Server(config, reader, admin=_admin)


def _signals(loop: asyncio.AbstractEventLoop, server: Server, install: bool) -> None:
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


def run(
    config: Config,
    reader: Callable[[], Config] | None = None,
    sockets: Sockets | None = None,
) -> int:
    """Serve `config` until stopped; the exit code (1: a listen address cannot be bound,
    2: a backend is the balancer itself, 130: interrupted before the loop took over)."""
    log.info("balancer %s, %s", __version__, runtime_summary())
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            return runner.run(serve(build_server(config, reader), sockets))
    except ListenError as exc:
        log.error("%s", exc)
        return 1
    except ConfigError as exc:
        log.error("invalid configuration: %s", exc)
        return 2
    except KeyboardInterrupt:
        return 130
