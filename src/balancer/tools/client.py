"""Load client for message mode, and the tutorial's synchronous `Client` / `Server`.

How the load client works: `--client_count` connections each send decimal
numbers (a per-client counter) as lines and check every reply, in order,
against `It’s instance number N`. Closed loop by default: each connection keeps
`--pipeline` requests in flight until it has sent `--requests_per_client` or
`--duration` has passed. With `--rate` the load is open loop: requests are
scheduled at a constant total rate, spread over the connections, and latency
is measured from the scheduled send time (as wrk2 does), so a stall shows up
in the percentiles instead of slowing the schedule down.

Every request ends as ok or as exactly one error:
`wrong_reply`, `server_not_available`, `timeout` (no reply within `--timeout`;
the connection is then abandoned and its outstanding requests count as
timeouts), `connection_error` (refused, reset or closed with requests
outstanding; in a count-bounded run a client that cannot reconnect has its
unsent requests counted too) and `error_reply` (a line starting `Error`).
A reply nobody asked for is counted as `wrong_reply`. Throughput counts
successful replies per second; latencies are those of successful replies.

With `--raw` the client speaks the tutorial's original framing, as its
`client.py` did against its `server.py`: each message is sent unterminated and
each read is one reply (the tutorial read one `recv(1024)` per message), so
the connection runs in lockstep and `--pipeline` must be 1.

Before and after the run the balancer's admin endpoint (`GET /status`) is read
to show how the requests spread over the backends; an absent admin is fine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, cast

from hdrh.histogram import HdrHistogram

from balancer.net.loops import loop_factory
from balancer.tools.report import RateSampler, client_report_data, write_html_report
from balancer.tools.service import PREFIX

ERROR_KINDS = ("wrong_reply", "server_not_available", "timeout", "connection_error", "error_reply")
SERVER_NOT_AVAILABLE = b"Server not available"
HEALTH_CHECK = "!HEALTH_CHECK"
MAX_REPLY_LINE = 1 << 20

LATENCY_MIN_US = 1
LATENCY_MAX_US = 60_000_000


def expected_reply(number: int) -> str:
    return f"It’s instance number {number}"


@dataclass
class LoadSettings:
    host: str = "localhost"
    port: int = 8080
    clients: int = 1
    requests_per_client: int = 1000
    pipeline: int = 1
    duration: float | None = None
    rate: float | None = None
    timeout: float = 5.0
    raw: bool = False
    """Unterminated messages, one read per reply (lockstep only)."""


class LoadStats:
    """Counters and the latency histogram shared by all connections of a run."""

    def __init__(self) -> None:
        self.requests = 0
        self.ok = 0
        self.errors: dict[str, int] = dict.fromkeys(ERROR_KINDS, 0)
        self.histogram = HdrHistogram(LATENCY_MIN_US, LATENCY_MAX_US, 3)

    def error(self, kind: str, count: int = 1) -> None:
        if count > 0:
            self.errors[kind] += count

    def unsent(self, kind: str, count: int = 1) -> None:
        """Requests that failed before they could be sent: counted as made and failed."""
        if count > 0:
            self.requests += count
            self.errors[kind] += count

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())

    @property
    def done(self) -> int:
        return self.ok + self.error_total

    def __repr__(self) -> str:
        kinds = ", ".join(f"{k}={n}" for k, n in self.errors.items() if n)
        return (
            f"<LoadStats {self.requests} requests: {self.ok} ok, "
            f"{self.error_total} errors{' (' + kinds + ')' if kinds else ''}>"
        )


@dataclass
class ClientState:
    """What one load client has left to do; survives reconnects."""

    index: int
    remaining: int | None
    """Requests not yet sent (closed loop) or not yet scheduled (open loop); None: no bound."""
    deadline: float | None
    next_number: int = 1
    backlog: deque[float] | None = None
    """Open loop only: scheduled send times not yet sent."""
    first_due: float = 0.0
    interval: float = 0.0
    scheduled: int = 0
    next_due: float = 0.0
    connection: LoadConnection | None = None

    def schedule_done(self, now: float) -> bool:
        if self.remaining is not None and self.remaining <= 0:
            return True
        if self.backlog is not None:
            return self.deadline is not None and self.next_due >= self.deadline
        return self.deadline is not None and now >= self.deadline

    def finished(self, now: float) -> bool:
        return self.schedule_done(now) and not self.backlog

    def unsent(self) -> int:
        """Requests this client still owes (for a count-bounded run that gives up)."""
        return (self.remaining or 0) + (len(self.backlog) if self.backlog else 0)


class LoadConnection(asyncio.Protocol):
    """One client connection: pipelined sends, replies matched in order."""

    def __init__(
        self, state: ClientState, stats: LoadStats, pipeline: int, raw: bool = False
    ) -> None:
        self.state = state
        self.stats = stats
        self.pipeline = pipeline
        self.raw = raw
        self.pending: deque[tuple[bytes, float, float]] = deque()
        """(expected reply, latency start, send time) per request in flight."""
        self.replies = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        self.state.connection = self
        self.fill()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self.state.connection is self:
            self.state.connection = None
        self.stats.error("connection_error", len(self.pending))
        self.pending.clear()
        if not self.done.done():
            self.done.set_result(None)

    def fill(self) -> None:
        """Send as many requests as the pipeline and the budget allow, in one write."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        pending = self.pending
        room = self.pipeline - len(pending)
        state = self.state
        now = time.perf_counter()
        if room > 0:
            parts: list[bytes] = []
            backlog = state.backlog
            number = state.next_number
            if backlog is None:
                if state.deadline is not None and now >= state.deadline:
                    room = 0
                if state.remaining is not None:
                    room = min(room, state.remaining)
                    state.remaining -= room
                for _ in range(room):
                    nb = b"%d" % number
                    number += 1
                    parts.append(nb)
                    pending.append((PREFIX + nb, now, now))
            else:
                while room and backlog:
                    scheduled = backlog.popleft()
                    nb = b"%d" % number
                    number += 1
                    parts.append(nb)
                    pending.append((PREFIX + nb, scheduled, now))
                    room -= 1
            if parts:
                state.next_number = number
                self.stats.requests += len(parts)
                if self.raw:
                    transport.write(parts[0])  # one at a time: the pipeline is 1
                else:
                    parts.append(b"")
                    transport.write(b"\n".join(parts))
        if not pending and state.finished(now):
            transport.close()

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if self.raw:
            self._raw_reply(data.rstrip(b"\r\n"), now)
            return
        if self._buffer:
            data = self._buffer + data
        if b"\n" not in data:
            self._buffer = data
            if len(data) > MAX_REPLY_LINE:
                self.fail("wrong_reply")
            return
        lines = data.split(b"\n")
        self._buffer = lines.pop()
        pending = self.pending
        stats = self.stats
        record = stats.histogram.record_value
        ok = 0
        for line in lines:
            if line[-1:] == b"\r":
                line = line[:-1]
            if not pending:
                stats.error("wrong_reply")
                continue
            expected, start, _ = pending.popleft()
            if line == expected:
                ok += 1
                us = int((now - start) * 1_000_000)
                record(LATENCY_MIN_US if us < LATENCY_MIN_US else min(us, LATENCY_MAX_US))
            elif line == SERVER_NOT_AVAILABLE:
                stats.error("server_not_available")
            elif line.startswith(b"Error"):
                stats.error("error_reply")
            else:
                stats.error("wrong_reply")
        stats.ok += ok
        self.replies += len(lines)
        self.fill()

    def _raw_reply(self, reply: bytes, now: float) -> None:
        """Raw framing: one read is one reply, to the one request in flight."""
        stats = self.stats
        self.replies += 1
        if not self.pending:
            stats.error("wrong_reply")
            return
        expected, start, _ = self.pending.popleft()
        if reply == expected:
            stats.ok += 1
            us = int((now - start) * 1_000_000)
            stats.histogram.record_value(min(max(us, LATENCY_MIN_US), LATENCY_MAX_US))
        elif reply == SERVER_NOT_AVAILABLE:
            stats.error("server_not_available")
        elif reply.startswith(b"Error"):
            stats.error("error_reply")
        else:
            stats.error("wrong_reply")
        self.fill()

    def check_timeout(self, now: float, timeout: float) -> None:
        if self.pending and now - self.pending[0][2] > timeout:
            self.fail("timeout")

    def fail(self, kind: str) -> None:
        """Give up on this connection; its outstanding requests count as `kind`."""
        self.stats.error(kind, len(self.pending))
        self.pending.clear()
        if self._transport is not None:
            self._transport.abort()


class LoadRun:
    """One run of the load client: workers, the open-loop scheduler, the watchdog."""

    def __init__(self, settings: LoadSettings) -> None:
        self.settings = settings
        self.stats = LoadStats()
        self.states: list[ClientState] = []
        self.started = 0.0
        self.finished = 0.0

    @property
    def total(self) -> int | None:
        """Requests the run will make, when bounded by count."""
        if self.settings.duration is not None:
            return None
        return self.settings.clients * self.settings.requests_per_client

    async def run(self) -> LoadStats:
        s = self.settings
        self.started = time.perf_counter()
        deadline = self.started + s.duration if s.duration is not None else None
        remaining = None if s.duration is not None else s.requests_per_client
        for i in range(s.clients):
            state = ClientState(i, remaining, deadline)
            if s.rate is not None:
                state.backlog = deque()
                state.interval = s.clients / s.rate
                state.first_due = state.next_due = self.started + i / s.rate
            self.states.append(state)
        watchdog = asyncio.create_task(self._watchdog())
        try:
            await asyncio.gather(*(self._worker(state) for state in self.states))
        finally:
            self.finished = time.perf_counter()
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
        return self.stats

    async def _worker(self, state: ClientState) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        scheduler = (
            asyncio.create_task(self._schedule(state)) if state.backlog is not None else None
        )
        failures_in_row = 0
        try:
            while not state.finished(time.perf_counter()):
                progressed = False
                try:
                    _, conn = await asyncio.wait_for(
                        loop.create_connection(
                            lambda: LoadConnection(state, self.stats, s.pipeline, s.raw),
                            s.host,
                            s.port,
                        ),
                        s.timeout,
                    )
                except (OSError, TimeoutError):
                    pass
                else:
                    await conn.done
                    progressed = conn.replies > 0
                if progressed:
                    failures_in_row = 0
                    continue
                failures_in_row += 1
                if state.deadline is None and failures_in_row >= 3:
                    # A count-bounded client that cannot get through owes the rest.
                    if scheduler is not None:
                        scheduler.cancel()
                    self.stats.unsent("connection_error", state.unsent())
                    state.remaining = 0
                    if state.backlog is not None:
                        state.backlog.clear()
                    return
                if state.deadline is not None:
                    if state.backlog is None:
                        self.stats.unsent("connection_error")
                    pause = min(0.05 * failures_in_row, 0.5)
                    pause = min(pause, max(state.deadline - time.perf_counter(), 0.0))
                else:
                    pause = 0.05 * failures_in_row
                await asyncio.sleep(pause)
        finally:
            if scheduler is not None:
                scheduler.cancel()

    async def _schedule(self, state: ClientState) -> None:
        """Open loop: move due send times into the client's backlog."""
        backlog = state.backlog
        assert backlog is not None
        while True:
            now = time.perf_counter()
            while not state.schedule_done(now) and state.next_due <= now:
                backlog.append(state.next_due)
                state.scheduled += 1
                state.next_due = state.first_due + state.scheduled * state.interval
                if state.remaining is not None:
                    state.remaining -= 1
            if state.connection is not None:
                state.connection.fill()
            if state.schedule_done(now):
                return
            await asyncio.sleep(max(state.next_due - time.perf_counter(), 0.0))

    async def _watchdog(self) -> None:
        timeout = self.settings.timeout
        tick = min(max(timeout / 10, 0.01), 0.25)
        while True:
            await asyncio.sleep(tick)
            now = time.perf_counter()
            for state in self.states:
                if state.connection is not None:
                    state.connection.check_timeout(now, timeout)


# -- admin endpoint ---------------------------------------------------------------------------


async def fetch_status(admin: str, patience: float = 1.0) -> dict[str, Any] | None:
    """GET http://ADMIN/status; None when the endpoint does not answer with JSON.

    Sends `Authorization: Bearer $BALANCER_ADMIN_TOKEN` when that is set (an admin
    endpoint whose reads need a token).
    """
    host, _, port = admin.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    token = os.environ.get("BALANCER_ADMIN_TOKEN")
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    try:
        async with asyncio.timeout(patience):
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                writer.write(
                    f"GET /status HTTP/1.0\r\nHost: {admin}\r\nAccept: application/json\r\n"
                    f"{auth}Connection: close\r\n\r\n".encode()
                )
                raw = await reader.read(16 * 1024 * 1024)
                while chunk := await reader.read(65536):
                    raw += chunk
            finally:
                writer.close()
                try:
                    await writer.wait_closed()
                except OSError:
                    pass
    except (OSError, TimeoutError, ValueError):
        return None
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or head.split(b" ", 2)[1:2] != [b"200"]:
        return None
    try:
        status = json.loads(body)
    except ValueError:
        return None
    return status if isinstance(status, dict) else None


def backend_counts(status: dict[str, Any] | None, port: int) -> dict[str, int] | None:
    """Requests per backend address of the service listening on `port` (or the only one)."""
    if status is None:
        return None
    services = status.get("services")
    if not isinstance(services, dict) or not services:
        return None
    chosen: Any = None
    for svc in services.values():
        if isinstance(svc, dict) and str(svc.get("listen", "")).rpartition(":")[2] == str(port):
            chosen = svc
            break
    if chosen is None:
        if len(services) != 1:
            return None
        chosen = next(iter(services.values()))
    backends = chosen.get("backends") if isinstance(chosen, dict) else None
    if not isinstance(backends, list):
        return None
    counts: dict[str, int] = {}
    for b in backends:
        if isinstance(b, dict) and "address" in b:
            counts[str(b["address"])] = int(b.get("requests", 0))
    return counts


def spread(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, int] | None:
    if before is None or after is None:
        return None
    return {addr: n - before.get(addr, 0) for addr, n in after.items()}


# -- report -----------------------------------------------------------------------------------


def build_report(
    stats: LoadStats, elapsed: float, backends: dict[str, int] | None
) -> dict[str, Any]:
    h = stats.histogram
    count = h.get_total_count()

    def ms(us: float) -> float:
        return round(us / 1000.0, 3) if count else 0.0

    report: dict[str, Any] = {
        "requests": stats.requests,
        "ok": stats.ok,
        "errors": dict(stats.errors),
        "error_total": stats.error_total,
        "elapsed_s": round(elapsed, 6),
        "throughput_rps": round(stats.ok / elapsed, 1) if elapsed > 0 else 0.0,
        "latency_ms": {
            "p50": ms(h.get_value_at_percentile(50)),
            "p90": ms(h.get_value_at_percentile(90)),
            "p99": ms(h.get_value_at_percentile(99)),
            "p999": ms(h.get_value_at_percentile(99.9)),
            "max": ms(h.get_max_value()),
        },
    }
    if backends is not None:
        report["backends"] = backends
    return report


def print_report(report: dict[str, Any], file: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout, highlight=False)
    table = Table(title="Load client summary", show_header=False, title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    table.add_row("requests", f"{report['requests']:,}")
    table.add_row("ok", f"{report['ok']:,}")
    errors = report["errors"]
    table.add_row("errors", f"{report['error_total']:,}")
    for kind in ERROR_KINDS:
        if errors.get(kind):
            table.add_row(f"  {kind}", f"{errors[kind]:,}", style="red")
    table.add_row("elapsed", f"{report['elapsed_s']:.3f} s")
    table.add_row("throughput", f"{report['throughput_rps']:,.1f} req/s")
    lat = report["latency_ms"]
    for key, label in (("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("p999", "p99.9")):
        table.add_row(f"latency {label}", f"{lat[key]:.3f} ms")
    table.add_row("latency max", f"{lat['max']:.3f} ms")
    console.print(table)
    backends: dict[str, int] | None = report.get("backends")
    if backends:
        total = sum(backends.values())
        spread_table = Table(title="Spread over backends", title_justify="left")
        spread_table.add_column("backend")
        spread_table.add_column("requests", justify="right")
        spread_table.add_column("share", justify="right")
        for addr, n in backends.items():
            share = f"{100.0 * n / total:.1f} %" if total else "-"
            spread_table.add_row(addr, f"{n:,}", share)
        console.print(spread_table)


# -- command line -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--requests_per_client",
        type=int,
        default=1000,
        metavar="N",
        help="requests each client sends (default: 1000)",
    )
    parser.add_argument(
        "--client_count", type=int, default=1, metavar="N", help="connections (default: 1)"
    )
    parser.add_argument(
        "--balancerPort", type=int, default=8080, metavar="PORT", help="default: 8080"
    )
    parser.add_argument(
        "--balancerIp", default="localhost", metavar="HOST", help="default: localhost"
    )
    parser.add_argument(
        "--pipeline",
        type=int,
        default=1,
        metavar="N",
        help="requests in flight per connection (default: 1, lockstep)",
    )
    parser.add_argument(
        "--raw",
        action="store_true",
        help="the tutorial's original framing: messages unterminated, one read per reply "
        "(lockstep: --pipeline 1 only)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="SECONDS",
        help="send until this time is up instead of a fixed count",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        metavar="R",
        help="open loop: R requests/s in total; latency counts from the scheduled send time",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="a reply later than this is a timeout error (default: 5)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the report as one JSON object on the last line of stdout "
        "(the table then goes to stderr unless --quiet)",
    )
    parser.add_argument(
        "--admin",
        default="127.0.0.1:9100",
        metavar="HOST:PORT",
        help="balancer admin endpoint for the spread over backends, or 'off'",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--report",
        metavar="FILE.html",
        default=None,
        help="also write a self-contained HTML report (latency percentiles, throughput, spread)",
    )


def settings_from_args(args: argparse.Namespace) -> LoadSettings:
    checks = (
        (args.requests_per_client >= 0, "--requests_per_client must be >= 0"),
        (args.client_count >= 1, "--client_count must be >= 1"),
        (0 < args.balancerPort < 65536, "--balancerPort must be 1..65535"),
        (args.pipeline >= 1, "--pipeline must be >= 1"),
        (
            not args.raw or args.pipeline == 1,
            "--raw sends one message at a time and reads one reply: --pipeline must be 1",
        ),
        (args.duration is None or args.duration > 0, "--duration must be > 0"),
        (args.rate is None or args.rate > 0, "--rate must be > 0"),
        (args.timeout > 0, "--timeout must be > 0"),
    )
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    return LoadSettings(
        host=args.balancerIp,
        port=args.balancerPort,
        clients=args.client_count,
        requests_per_client=args.requests_per_client,
        pipeline=args.pipeline,
        duration=args.duration,
        rate=args.rate,
        timeout=args.timeout,
        raw=args.raw,
    )


async def _progress(load: LoadRun) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    duration = load.settings.duration
    total = load.total
    with Progress(
        TextColumn("[bold]load"),
        BarColumn(),
        TextColumn("{task.fields[done]:>10,} done  {task.fields[errors]:>6,} errors"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task("load", total=duration if duration else total, done=0, errors=0)
        while True:
            stats = load.stats
            completed = time.perf_counter() - load.started if duration else stats.done
            progress.update(task, completed=completed, done=stats.done, errors=stats.error_total)
            await asyncio.sleep(0.1)


async def run_async(args: argparse.Namespace) -> dict[str, Any]:
    settings = settings_from_args(args)
    admin: str | None = None if args.admin == "off" else args.admin
    before = None
    if admin is not None:
        before = backend_counts(await fetch_status(admin), settings.port)
    load = LoadRun(settings)
    show_progress = not args.quiet and sys.stderr.isatty()
    progress = asyncio.create_task(_progress(load)) if show_progress else None
    sampler = None
    if args.report is not None:
        sampler = RateSampler(lambda: load.stats.ok)
        sampler.start()
    throughput: list[tuple[float, float]] = []
    try:
        stats = await load.run()
    finally:
        if progress is not None:
            progress.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await progress
        if sampler is not None:
            throughput = await sampler.stop()
    after = None
    if admin is not None and before is not None:
        after = backend_counts(await fetch_status(admin), settings.port)
    report = build_report(stats, load.finished - load.started, spread(before, after))
    if args.report is not None:
        try:
            write_html_report(args.report, client_report_data(report, stats.histogram, throughput))
        except OSError as exc:
            print(f"cannot write the HTML report {args.report}: {exc}", file=sys.stderr)
    return report


def run(args: argparse.Namespace) -> int:
    try:
        settings_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        report = runner.run(run_async(args))
    if args.json:
        if not args.quiet:
            print_report(report, file=sys.stderr)
        print(json.dumps(report), flush=True)
    else:
        print_report(report)
    return 0 if report["error_total"] == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="balancer client", description="Load client for a message-mode balancer."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


# -- the tutorial's synchronous API -----------------------------------------------------------


class Client:
    """A blocking line client: connects on creation, `send` returns the reply line."""

    def __init__(self, host: str = "localhost", port: int = 8080, timeout: float = 5.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._sock: socket.socket | None = socket.create_connection((host, port), timeout)
        self._reader = self._sock.makefile("rb")

    def send(self, msg: str) -> str:
        """Send one request line and return the reply line (without its line ending)."""
        if self._sock is None:
            raise ConnectionError("client is disconnected")
        self._sock.sendall(msg.encode() + b"\n")
        line = self._reader.readline(MAX_REPLY_LINE)
        if not line:
            raise ConnectionError(f"{self.host}:{self.port} closed the connection")
        return line.rstrip(b"\r\n").decode("utf-8", "replace")

    def disconnect(self) -> None:
        if self._sock is not None:
            self._reader.close()
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.disconnect()


class Server:
    """A handle on one backend: health check and requests over a kept connection."""

    def __init__(self, host: str, port: int, timeout: float = 1.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._client: Client | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def check_connection(self) -> bool:
        """True when the backend answers `!HEALTH_CHECK` on a fresh connection."""
        try:
            with Client(self.host, self.port, self.timeout) as probe:
                return probe.send(HEALTH_CHECK) == HEALTH_CHECK
        except (OSError, UnicodeError):
            return False

    def send(self, msg: str) -> str:
        """One request on the kept connection (reconnecting once if it broke)."""
        for attempt in range(2):
            if self._client is None:
                self._client = Client(self.host, self.port, self.timeout)
            try:
                return self._client.send(msg)
            except OSError:
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client = None

    def __repr__(self) -> str:
        return f"<Server {self.address}>"


if __name__ == "__main__":
    sys.exit(main())
