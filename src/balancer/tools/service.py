"""The sample backend service: answers `N` with `It’s instance number N`.

Line framing (default): one request per line (`\\n`, `\\r\\n` tolerated), one reply
line per request, in order. A decimal number N gets `It’s instance number N`,
`!HEALTH_CHECK` gets `!HEALTH_CHECK`, anything else `Invalid message`. Every
read is answered with a single write, so pipelined input costs one syscall per
batch. A line longer than `--max-line` gets `Error: line too long` and the
connection is closed.

Raw framing (`--raw`, the tutorial's original service): each read is one
unterminated message and the reply is sent without a newline.

`--delay` adds latency to every reply. Delayed batches wait in a per-connection
queue drained by one timer, so replies leave in the order the requests came.

`--register etcd://HOST:PORT[,...]/PREFIX/SERVICE` registers the service in etcd once it
listens, as `--advertise HOST` (default: `--host`) and its port, with `--weight`, under
a lease of `--register-ttl` seconds kept alive while it runs and revoked on SIGTERM or
SIGINT before the listener closes (`balancer.tools.registrar`).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import signal
import sys
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from balancer import wire
from balancer.config.addresses import format_address, host_problem
from balancer.config.model import DEFAULT_MAX_LINE
from balancer.core.framing import LineFramer, LineTooLong
from balancer.net.loops import create_listener, loop_factory
from balancer.tools import registrar
from balancer.wire import INSTANCE_PREFIX, INVALID_MESSAGE

HEALTH_CHECK = wire.HEALTH_CHECK.encode()
LINE_TOO_LONG = wire.LINE_TOO_LONG + b"\n"


def reply_for(message: bytes) -> bytes:
    """The reply (without line ending) to one request (without line ending)."""
    if message.isdigit():
        return INSTANCE_PREFIX + message
    if message == HEALTH_CHECK:
        return HEALTH_CHECK
    return INVALID_MESSAGE


class _DelayedWriter:
    """Holds reply batches until they are due, then writes them in arrival order."""

    __slots__ = ("_delay", "_loop", "_queue", "_timer", "_transport")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport, delay: float
    ) -> None:
        self._loop = loop
        self._transport = transport
        self._delay = delay
        self._queue: deque[tuple[float, bytes, bool]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def write(self, data: bytes, close_after: bool = False) -> None:
        due = self._loop.time() + self._delay
        self._queue.append((due, data, close_after))
        if self._timer is None:
            self._timer = self._loop.call_at(due, self._flush)

    def _flush(self) -> None:
        self._timer = None
        now = self._loop.time()
        out: list[bytes] = []
        close = False
        queue = self._queue
        while queue and queue[0][0] <= now:
            _, data, close = queue.popleft()
            out.append(data)
            if close:
                queue.clear()
                break
        if out and not self._transport.is_closing():
            self._transport.write(b"".join(out))
        if close:
            self._transport.close()
        elif queue:
            self._timer = self._loop.call_at(queue[0][0], self._flush)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()


class _ServiceConnection(asyncio.Protocol):
    """What both framings share: the transport and the optional reply delay."""

    __slots__ = ("_delay", "_delayed", "_transport")

    def __init__(self, delay: float = 0.0) -> None:
        self._delay = delay
        self._transport: asyncio.Transport | None = None
        self._delayed: _DelayedWriter | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        if self._delay > 0:
            self._delayed = _DelayedWriter(asyncio.get_running_loop(), transport, self._delay)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._delayed is not None:
            self._delayed.cancel()
        self._transport = None

    def _usable(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def _send(self, payload: bytes, close_after: bool = False) -> None:
        if self._delayed is not None:
            self._delayed.write(payload, close_after)
            return
        assert self._transport is not None
        self._transport.write(payload)
        if close_after:
            self._transport.close()


def _replies(lines: list[bytes]) -> list[bytes]:
    return [INSTANCE_PREFIX + ln + b"\n" if ln.isdigit() else reply_for(ln) + b"\n" for ln in lines]


class LineServiceProtocol(_ServiceConnection):
    """Line-framed sample service connection (framing by `balancer.core.framing.LineFramer`)."""

    __slots__ = ("_framer",)

    def __init__(self, delay: float = 0.0, max_line: int = DEFAULT_MAX_LINE) -> None:
        super().__init__(delay)
        self._framer = LineFramer(max_line)

    def data_received(self, data: bytes) -> None:
        if not self._usable():
            return
        try:
            lines = self._framer.feed(data)
        except LineTooLong as exc:
            self._send(b"".join([*_replies(exc.lines), LINE_TOO_LONG]), close_after=True)
            return
        if lines:
            self._send(b"".join(_replies(lines)))


class RawServiceProtocol(_ServiceConnection):
    """Raw-framed sample service connection: each read is one message."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        if self._usable():
            self._send(reply_for(data.rstrip(b"\r\n")))


def protocol_factory(
    raw: bool = False, delay: float = 0.0, max_line: int = DEFAULT_MAX_LINE
) -> Callable[[], asyncio.Protocol]:
    if raw:
        return lambda: RawServiceProtocol(delay)
    return lambda: LineServiceProtocol(delay, max_line)


async def serve(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    factory = protocol_factory(args.raw, args.delay, args.max_line)
    try:
        server = await create_listener(loop, factory, args.host, args.port, backlog=1024)
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sockname: Any = server.sockets[0].getsockname()
    print(f"instance listening on {format_address(sockname[0], sockname[1])}", flush=True)
    registration = _registrar(args, sockname[1]) if args.register else None
    try:
        if registration is not None:
            await registration.start()
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if registration is not None:
            await registration.stop()  # out of every balancer before the listener closes
        server.close()
        await server.wait_closed()
    return 0


def _registrar(args: argparse.Namespace, port: int) -> registrar.Registrar:
    endpoints, prefix, service = registrar.parse_register_url(args.register)
    key = registrar.backend_key(prefix, service, args.advertise or args.host, port)
    return registrar.Registrar(
        endpoints, key, registrar.backend_value(args.weight), args.register_ttl
    )


def registration_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the registration options, or None."""
    if not registrar.MIN_TTL <= args.register_ttl <= registrar.MAX_TTL:
        return f"--register-ttl must be {registrar.MIN_TTL}..{registrar.MAX_TTL} seconds"
    if not registrar.MIN_WEIGHT <= args.weight <= registrar.MAX_WEIGHT:
        return f"--weight must be {registrar.MIN_WEIGHT}..{registrar.MAX_WEIGHT}"
    if args.register is None:
        return None
    try:
        registrar.parse_register_url(args.register)
    except ValueError as exc:
        return f"--register: {exc}"
    host = (args.advertise or args.host).strip("[]")
    option = "--advertise" if args.advertise else "--host"
    problem = host_problem(host, bare_ipv6=True) if host else None
    if problem is not None:
        return f"{option} {host}: {problem}"
    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        unspecified = not host
    if unspecified:
        return (
            f"{option} {host or '(empty)'} is no address a balancer can reach: "
            "give the one to register with --advertise HOST"
        )
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-p", "--port", type=int, default=0, help="port to listen on (default: 0, a free port)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--delay", type=float, default=0.0, metavar="SECONDS", help="latency added to every reply"
    )
    parser.add_argument(
        "--raw",
        action="store_true",
        help="raw framing: each read is one message, replies have no newline",
    )
    parser.add_argument(
        "--max-line",
        type=int,
        default=DEFAULT_MAX_LINE,
        metavar="BYTES",
        help=f"longest accepted request line (default: {DEFAULT_MAX_LINE})",
    )
    parser.add_argument(
        "--register",
        metavar="URL",
        help=f"register in etcd once listening: {registrar.URL_FORM}",
    )
    parser.add_argument(
        "--register-ttl",
        type=int,
        default=registrar.DEFAULT_TTL,
        metavar="SECONDS",
        help=f"lease of the etcd registration (default: {registrar.DEFAULT_TTL})",
    )
    parser.add_argument(
        "--advertise", metavar="HOST", help="host to register in etcd (default: --host)"
    )
    parser.add_argument(
        "--weight",
        type=int,
        default=1,
        help=f"weight to register in etcd, {registrar.MIN_WEIGHT}..{registrar.MAX_WEIGHT} "
        "(default: 1)",
    )


def run(args: argparse.Namespace) -> int:
    if args.delay < 0:
        print("--delay must be >= 0", file=sys.stderr)
        return 2
    if args.max_line < 1:
        print("--max-line must be >= 1", file=sys.stderr)
        return 2
    problem = registration_problem(args)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(serve(args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="balancer service",
        description="Sample backend: answers N with “It’s instance number N”.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
