"""Start-up at scale: time to "balancer ready", memory, false downs, reload and stops.

For each backend count N, `balancer serve` (one message service, admin on) runs
as a subprocess on 127.0.0.1 with N backends: `--live` of them (at most N) are
sample services that answer health checks (one helper process holds up to
15,000 of their listeners, several helpers hold more), the rest are closed
ports on other loopback addresses (127.2.0.0 and up), refused at once.
Health checks are on (`--checks on`, the default), off, or both in turn.
Reported for each N:

- seconds from spawning the balancer to its "balancer ready" line (at most
  `--deadline`; a balancer not ready by then is reported as such);
- its RSS at ready, the highest RSS seen while it settles, and its RSS after
  the last `/status` (a document of N backends);
- live backends that are down (falsely: they answer every check) at ready and
  after `--settle` seconds of periodic checks, read from `/status`;
- seconds a reload takes (`POST /api/reload`) to a file with half of the
  backends replaced by others;
- seconds from SIGTERM to exit, and the exit code (also when it was not ready
  by the deadline);
- in a second run, seconds from a SIGINT sent as soon as "balancer starting" is
  logged (mid start-up) to the exit, and the exit code.

Every wait is bounded: a run never takes much longer than deadline + settle +
the stop timeouts.

Usage: python bench/startup.py [--backends 10000 100000] [--live 10000]
       [--checks on|off|both] [--deadline 60] [--settle 6] [--interval 2]
       [--timeout 1] [--algorithm round_robin] [--framing line] [--label after]
Writes bench/results/startup[-LABEL].json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

import psutil

from harness import rss_mb, save_results

PER_HELPER = 15_000
STOP_TIMEOUT = 30.0
READY_RE = re.compile(r"balancer ready")
STARTING_RE = re.compile(r"balancer starting")
ADMIN_RE = re.compile(r"admin listening on http://(\S+):(\d+)")
CLOSED_PORT = 9


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- helper: many sample-service listeners in one process ---------------------------


async def _serve(count: int) -> None:
    from balancer.tools.service import protocol_factory

    loop = asyncio.get_running_loop()
    factory = protocol_factory()
    servers = [await loop.create_server(factory, "127.0.0.1", 0, backlog=64) for _ in range(count)]
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    print(json.dumps({"ports": ports}), flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for s in servers:
        s.close()


def serve_main(count: int) -> int:
    raise_nofile()
    from balancer.net.loops import loop_factory

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(_serve(count))
    return 0


class Helper:
    """A helper process holding `count` live sample-service listeners."""

    def __init__(self, count: int) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(count)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline()
        if not line:
            raise RuntimeError(f"helper exited with {self.popen.wait(10)}")
        self.ports: list[int] = json.loads(line)["ports"]

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(STOP_TIMEOUT)


def closed_address(i: int) -> str:
    """The i-th closed backend: a port nothing listens on, on 127.2.0.0 and up."""
    return f"127.{2 + i // 65536}.{(i // 256) % 256}.{i % 256}:{CLOSED_PORT}"


def check_closed() -> None:
    with socket.socket() as s:
        s.settimeout(2)
        if s.connect_ex(("127.2.0.1", CLOSED_PORT)) == 0:
            raise SystemExit(f"127.2.0.1:{CLOSED_PORT} answers; the closed backends need it closed")


# -- the balancer under test ----------------------------------------------------------


class Balancer:
    """`balancer serve CONFIG`, its output read by a thread, with the time of every line."""

    def __init__(self, config: Path) -> None:
        self.started = time.monotonic()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "balancer", "serve", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.admin_port: int | None = None
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        assert self.popen.stderr is not None
        self._reader = threading.Thread(target=self._pump, args=(self.popen.stderr,), daemon=True)
        self._reader.start()

    def _pump(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            with self._cond:
                self.lines.append((time.monotonic(), line))
                if self.admin_port is None:
                    m = ADMIN_RE.search(line)
                    if m:
                        self.admin_port = int(m.group(2))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: re.Pattern[str], deadline: float) -> float | None:
        """When a line matching `pattern` came (monotonic); None if not by `deadline`."""
        with self._cond:
            while True:
                for at, line in self.lines:
                    if pattern.search(line):
                        return at
                left = deadline - time.monotonic()
                if left <= 0 or self.popen.poll() is not None:
                    return None
                self._cond.wait(min(left, 0.2))

    @property
    def tail(self) -> list[str]:
        return [line for _, line in self.lines[-5:]]

    def status(self) -> dict[str, Any] | None:
        if self.admin_port is None:
            return None
        url = f"http://127.0.0.1:{self.admin_port}/status"
        try:
            with urllib.request.urlopen(url, timeout=60) as resp:
                doc: dict[str, Any] = json.loads(resp.read())
        except OSError:
            return None
        return doc

    def reload(self, timeout: float) -> float | None:
        """Seconds `POST /api/reload` took (None: it failed)."""
        if self.admin_port is None:
            return None
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.admin_port}/api/reload",
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        sent = time.monotonic()
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                resp.read()
        except OSError:
            return None
        return round(time.monotonic() - sent, 2)

    def rss(self) -> float:
        try:
            return rss_mb(self.popen.pid)
        except psutil.Error:
            return 0.0

    def stop(self, sig: int = signal.SIGTERM) -> tuple[float | None, int | None]:
        """Send `sig`; seconds until it exited and its exit code (None, None: killed)."""
        t0 = time.monotonic()
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(STOP_TIMEOUT)
                self._reader.join(5)
                return None, None
        self._reader.join(5)
        return round(time.monotonic() - t0, 2), self.popen.returncode

    def traceback(self) -> bool:
        return any("Traceback" in line for _, line in self.lines)


def write_config(path: Path, backends: list[str], args: argparse.Namespace, checks: bool) -> None:
    lines = [
        "[admin]",
        'listen = "127.0.0.1:0"',
        "[services.scale]",
        'listen = "127.0.0.1:0"',
        f'algorithm = "{args.algorithm}"',
        f'backend_framing = "{args.framing}"',
        "backends = [",
        *(f'  "{b}",' for b in backends),
        "]",
        "[services.scale.health]",
        f"enabled = {'true' if checks else 'false'}",
        f"interval = {args.interval}",
        f"timeout = {args.timeout}",
        "rise = 1",
        "fall = 1",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def falsely_down(status: dict[str, Any] | None, live: set[str]) -> dict[str, Any] | None:
    """Live backends that are down, and their reasons (up to 3 of them)."""
    if status is None:
        return None
    rows = status["services"]["scale"]["backends"]
    down = [b for b in rows if b["address"] in live and b["state"] != "up"]
    reasons: dict[str, int] = {}
    for b in down:
        reasons[b["reason"]] = reasons.get(b["reason"], 0) + 1
    top = sorted(reasons.items(), key=lambda kv: -kv[1])[:3]
    return {"count": len(down), "reasons": dict(top)}


def run_one(n: int, checks: bool, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    live_count = min(n, args.live)
    helpers: list[Helper] = []
    result: dict[str, Any] = {
        "backends": n,
        "checks": checks,
        "live": live_count,
        "closed": n - live_count,
    }
    try:
        left = live_count
        while left > 0:
            helpers.append(Helper(min(left, PER_HELPER)))
            left -= PER_HELPER
        live = [f"127.0.0.1:{p}" for h in helpers for p in h.ports]
        backends = live + [closed_address(i) for i in range(n - live_count)]
        config = workdir / f"scale-{n}-{checks}.toml"
        write_config(config, backends, args, checks)
        bal = Balancer(config)
        try:
            ready_at = bal.wait_for(READY_RE, bal.started + args.deadline)
            result["ready"] = ready_at is not None
            result["ready_s"] = round(ready_at - bal.started, 2) if ready_at else None
            result["rss_at_ready_mb"] = round(bal.rss(), 1)
            if ready_at is not None:
                live_set = set(live) if checks else set()
                if args.status_at_ready and checks:
                    result["falsely_down_at_ready"] = falsely_down(bal.status(), live_set)
                peak = result["rss_at_ready_mb"]
                settle_end = time.monotonic() + args.settle
                while time.monotonic() < settle_end and bal.popen.poll() is None:
                    peak = max(peak, bal.rss())
                    time.sleep(0.25)
                result["rss_settled_max_mb"] = round(peak, 1)
                if checks:
                    result["falsely_down_after_settle"] = falsely_down(bal.status(), live_set)
                result["rss_after_status_mb"] = round(bal.rss(), 1)
                # half of the backends replaced by addresses not listed before
                half = n // 2
                replaced = backends[: n - half] + [closed_address(n + i) for i in range(half)]
                write_config(config, replaced, args, checks)
                result["reload_half_replaced_s"] = bal.reload(args.deadline)
        finally:
            result["log_lines"] = len(bal.lines)
            result["stop_s"], result["stop_code"] = bal.stop(signal.SIGTERM)
            result["traceback"] = bal.traceback()
            if not result.get("ready"):
                result["log_tail"] = bal.tail
        write_config(config, backends, args, checks)
        bal = Balancer(config)
        try:
            starting = bal.wait_for(STARTING_RE, bal.started + args.deadline)
            if starting is not None:
                took, code = bal.stop(signal.SIGINT)
                result["sigint_mid_start_s"], result["sigint_mid_start_code"] = took, code
                result["sigint_mid_start_was_ready"] = any(
                    READY_RE.search(line) for _, line in bal.lines
                )
        finally:
            bal.stop(signal.SIGKILL)
            result["traceback"] = result["traceback"] or bal.traceback()
    finally:
        for h in helpers:
            h.stop()
    return result


def markdown(doc: dict[str, Any]) -> str:
    head = (
        f"# Start-up at scale ({doc['label']})\n\n"
        f"{doc['machine']}; interval {doc['interval']} s, timeout {doc['timeout']} s, "
        f"algorithm {doc['algorithm']}, framing {doc['framing']}, "
        f"deadline {doc['deadline']} s, settle {doc['settle']} s\n\n"
        "RSS at ready: at the deadline when not ready. RSS max settled includes one "
        "`/status` of every backend. Falsely down: live backends down (checks on only).\n\n"
        "| backends | live | checks | ready (s) | RSS at ready (MB) | RSS max settled (MB) "
        "| falsely down at ready / after settle | reload, half replaced (s) "
        "| SIGTERM to exit (s) | SIGINT mid-start to exit (s) |\n"
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    rows = []
    for r in doc["runs"]:

        def fd(key: str, r: dict[str, Any] = r) -> str:
            v = r.get(key)
            return "–" if v is None else str(v["count"])

        def stop(key: str, r: dict[str, Any] = r) -> str:
            took = r.get(f"{key}_s")
            if took is None:
                return f"no exit in {STOP_TIMEOUT:g}" if f"{key}_s" in r else "–"
            return f"{took} (exit {r.get(f'{key}_code')})"

        ready = f"{r['ready_s']}" if r["ready"] else f"not ready in {doc['deadline']:g}"
        rows.append(
            f"| {r['backends']:,} | {r['live']:,} | {'on' if r['checks'] else 'off'} | {ready} "
            f"| {r['rss_at_ready_mb']} | {r.get('rss_settled_max_mb', '–')} "
            f"| {fd('falsely_down_at_ready')} / {fd('falsely_down_after_settle')} "
            f"| {r.get('reload_half_replaced_s', '–')} | {stop('stop')} "
            f"| {stop('sigint_mid_start')} |"
        )
    return head + "\n".join(rows) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--backends", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--live", type=int, default=10_000, help="live backends at most")
    parser.add_argument("--checks", choices=["on", "off", "both"], default="on")
    parser.add_argument("--deadline", type=float, default=60.0)
    parser.add_argument("--settle", type=float, default=6.0)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--algorithm", default="round_robin")
    parser.add_argument("--framing", default="line", choices=["line", "raw", "auto"])
    parser.add_argument("--label", default="", help="suffix of the result files")
    parser.add_argument(
        "--no-status-at-ready",
        dest="status_at_ready",
        action="store_false",
        help="read /status only after settling (it is a big document: the admin's memory)",
    )
    args = parser.parse_args()
    if args.serve is not None:
        return serve_main(args.serve)
    limit = raise_nofile()
    check_closed()
    runs = []
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.checks]
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.backends:
            for checks in modes:
                r = run_one(n, checks, args, Path(tmp))
                print(json.dumps(r), flush=True)
                runs.append(r)
    doc = {
        "label": args.label or "current",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, open-file limit {limit}",
        "interval": args.interval,
        "timeout": args.timeout,
        "algorithm": args.algorithm,
        "framing": args.framing,
        "deadline": args.deadline,
        "settle": args.settle,
        "runs": runs,
    }
    stem = "startup" + (f"-{args.label}" if args.label else "")
    save_results(stem, doc, markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
