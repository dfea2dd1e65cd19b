"""Start-up at scale: time to "balancer ready", memory and false downs with many backends.

For each backend count N, `balancer serve` (one message service, admin on) runs
as a subprocess on 127.0.0.1 with N backends: `--live` of them (at most N) are
sample services that answer health checks (one helper process holds up to
15,000 of their listeners, several helpers hold more), the rest are closed
ports on other loopback addresses (127.2.0.0 and up), refused at once.
Reported for each N:

- seconds from spawning the balancer to its "balancer ready" line (at most
  `--deadline`; a balancer not ready by then is reported as such);
- its RSS at ready, the highest RSS seen while it settles, and its RSS after
  the last `/status` (a document of N backends);
- live backends that are down (falsely: they answer every check) at ready and
  after `--settle` seconds of periodic checks, read from `/status`;
- seconds from SIGTERM to exit (also when it was not ready by the deadline).

Every wait is bounded: a run never takes much longer than deadline + settle +
the stop timeout.

Usage: python bench/startup_scale.py [--backends 10000 100000] [--live 10000]
       [--deadline 60] [--settle 6] [--interval 2] [--timeout 1]
       [--algorithm round_robin] [--framing line] [--label after]
Writes bench/results/startup_scale[-LABEL].json and .md.
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
ADMIN_RE = re.compile(r"admin listening on http://(\S+):(\d+)")
CLOSED_PORT = 9


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- helper: many sample-service listeners in one process ---------------------------


async def _serve(count: int) -> None:
    from balancer.service import protocol_factory

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
    from balancer.loops import loop_factory

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
    """`balancer serve CONFIG`, its output read by a thread; times of the lines we wait for."""

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
        self.ready_at: float | None = None
        self.admin_port: int | None = None
        self.lines = 0
        self.tail: list[str] = []
        self._ready = threading.Event()
        assert self.popen.stderr is not None
        self._reader = threading.Thread(target=self._pump, args=(self.popen.stderr,), daemon=True)
        self._reader.start()

    def _pump(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            self.lines += 1
            self.tail = [*self.tail[-19:], line]
            if self.admin_port is None:
                m = ADMIN_RE.search(line)
                if m:
                    self.admin_port = int(m.group(2))
            if self.ready_at is None and READY_RE.search(line):
                self.ready_at = time.monotonic()
                self._ready.set()
        self._ready.set()

    def wait_ready(self, deadline: float) -> bool:
        self._ready.wait(max(0.0, deadline - time.monotonic()))
        return self.ready_at is not None

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

    def rss(self) -> float:
        try:
            return rss_mb(self.popen.pid)
        except psutil.Error:
            return 0.0

    def stop(self) -> float | None:
        """SIGTERM; seconds until it exited (None: killed after STOP_TIMEOUT)."""
        t0 = time.monotonic()
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(STOP_TIMEOUT)
                return None
        self._reader.join(5)
        return round(time.monotonic() - t0, 2)


def write_config(path: Path, backends: list[str], args: argparse.Namespace) -> None:
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


def run_one(n: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    live_count = min(n, args.live)
    helpers: list[Helper] = []
    try:
        left = live_count
        while left > 0:
            helpers.append(Helper(min(left, PER_HELPER)))
            left -= PER_HELPER
        live = [f"127.0.0.1:{p}" for h in helpers for p in h.ports]
        backends = live + [closed_address(i) for i in range(n - live_count)]
        config = workdir / f"scale-{n}.toml"
        write_config(config, backends, args)
        bal = Balancer(config)
        try:
            ready = bal.wait_ready(bal.started + args.deadline)
            result: dict[str, Any] = {
                "backends": n,
                "live": live_count,
                "closed": n - live_count,
                "ready": ready,
                "ready_s": round(bal.ready_at - bal.started, 2) if bal.ready_at else None,
                "rss_at_ready_mb": round(bal.rss(), 1),
            }
            if ready:
                live_set = set(live)
                if args.status_at_ready:
                    result["falsely_down_at_ready"] = falsely_down(bal.status(), live_set)
                peak = result["rss_at_ready_mb"]
                settle_end = time.monotonic() + args.settle
                while time.monotonic() < settle_end and bal.popen.poll() is None:
                    peak = max(peak, bal.rss())
                    time.sleep(0.25)
                result["rss_settled_max_mb"] = round(peak, 1)
                result["falsely_down_after_settle"] = falsely_down(bal.status(), live_set)
                result["rss_after_status_mb"] = round(bal.rss(), 1)
        finally:
            result["log_lines"] = bal.lines
            result["stop_s"] = bal.stop()
            if not result["ready"]:
                result["log_tail"] = bal.tail[-5:]
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
        "RSS at ready: at the deadline when not ready. RSS max settled includes the admin "
        "endpoint's per-second history of every backend, and one `/status` of them all.\n\n"
        "| backends | live | ready (s) | RSS at ready (MB) | RSS max settled (MB) "
        "| falsely down at ready | falsely down after settle | SIGTERM to exit (s) |\n"
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    rows = []
    for r in doc["runs"]:

        def fd(key: str, r: dict[str, Any] = r) -> str:
            v = r.get(key)
            return "–" if v is None else str(v["count"])

        ready = f"{r['ready_s']}" if r["ready"] else f"not ready in {doc['deadline']:g}"
        stop = r["stop_s"] if r["stop_s"] is not None else f"no exit in {STOP_TIMEOUT:g}"
        rows.append(
            f"| {r['backends']:,} | {r['live']:,} | {ready} | {r['rss_at_ready_mb']} "
            f"| {r.get('rss_settled_max_mb', '–')} | {fd('falsely_down_at_ready')} "
            f"| {fd('falsely_down_after_settle')} | {stop} |"
        )
    return head + "\n".join(rows) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--backends", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--live", type=int, default=10_000, help="live backends at most")
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
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.backends:
            r = run_one(n, args, Path(tmp))
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
    stem = "startup_scale" + (f"-{args.label}" if args.label else "")
    save_results(stem, doc, markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
