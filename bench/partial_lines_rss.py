"""Partial request lines: the balancer's memory while many clients hold unfinished lines,
and after they close.

One sample service and the balancer (message mode) run as subprocesses on 127.0.0.1.
The probe opens `--connections` client connections (in batches), each makes one request
(so it is line-framed whatever the version's detection), then sends `--size` bytes of a
line and no newline, and holds it. Reported: the balancer's RSS at rest, with
the partial lines held (once it stops growing), and after every such client has closed
(once it stops falling); how many clients were cut with `Error: line too long` (the
service-wide `max_buffered` cap); and that a new client is served meanwhile. Every wait
is bounded.

`--no-trim` runs the balancer with the heap trim after large releases disabled, and
`--src DIR` runs it from another source tree (e.g. an older commit, for a before/after).

Usage: python bench/partial_lines_rss.py [--connections 3000] [--size 60000]
       [--max-buffered BYTES] [--no-trim] [--src DIR] [--label NAME]
Writes bench/results/partial_lines_<label>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from balancer.net.heap import TRIM_INTERVAL
from balancer.tools.demo import KEEP_LINES, start_service
from balancer.tools.procs import ChildProcess, ready_balancer_ports
from harness import rss_mb, save_results

BATCH = 250
NO_TRIM = (
    "import sys, balancer.proxy.message.service as m; m.TRIM_HEAP = lambda now: False; "
    "from balancer.cli import main; sys.exit(main(sys.argv[1:]))"
)


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def settled(pid: int, rising: bool, limit: float) -> float:
    """RSS (MB) once it has not moved by 0.5 MB in a second; at most `limit` seconds."""
    deadline = time.monotonic() + limit
    last = rss_mb(pid)
    best = last
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = rss_mb(pid)
        best = max(best, now) if rising else min(best, now)
        if abs(now - last) < 0.5:
            return best
        last = now
    return best


def clients_open(admin_port: int) -> int:
    url = f"http://127.0.0.1:{admin_port}/status"
    with urllib.request.urlopen(url, timeout=5) as resp:
        doc = json.loads(resp.read())
    return int(doc["services"]["numbers"]["client_connections"])


def request(port: int, n: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"%d\n" % n)
        return s.recv(100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=3000)
    ap.add_argument("--size", type=int, default=60000)
    ap.add_argument("--max-buffered", type=int, default=0, help="bytes; 0: the default")
    ap.add_argument("--no-trim", action="store_true")
    ap.add_argument("--src", default="", help="source tree to run the balancer from")
    ap.add_argument("--label", default="run")
    args = ap.parse_args()
    raise_nofile()
    if args.src:
        os.environ["PYTHONPATH"] = str(Path(args.src).resolve())
    service, service_port = start_service()
    tmp = Path(tempfile.mkdtemp(prefix="partial-lines-"))
    cfg = tmp / "b.toml"
    extra = f"max_buffered = {args.max_buffered}\n" if args.max_buffered else ""
    cfg.write_text(
        '[services.numbers]\nlisten = "127.0.0.1:0"\nmax_line = 65536\n'
        f'{extra}backends = ["127.0.0.1:{service_port}"]\n'
    )
    serve = ["serve", str(cfg), "--admin", "127.0.0.1:0"]
    argv = ["-c", NO_TRIM, *serve] if args.no_trim else ["-m", "balancer", *serve]
    bal = ChildProcess([sys.executable, *argv], name="balancer", max_lines=KEEP_LINES)
    socks: list[socket.socket] = []
    try:
        ports, admin = ready_balancer_ports(bal)
        port = next(iter(ports.values()))
        assert admin is not None, "the balancer runs with its admin endpoint on"
        pid = bal.popen.pid
        for i in range(200):
            assert request(port, i).startswith("It’s".encode())
        at_rest = settled(pid, rising=False, limit=10)
        chunk = b"5" * args.size
        started = time.monotonic()
        while len(socks) < args.connections and time.monotonic() - started < 120:
            batch = [
                socket.create_connection(("127.0.0.1", port), timeout=10)
                for _ in range(min(BATCH, args.connections - len(socks)))
            ]
            for s in batch:  # one whole line first, so the connection is line-framed
                s.sendall(b"1\n")
            for s in batch:
                s.recv(100)
                try:
                    s.sendall(chunk)
                except OSError:
                    pass  # cut already
            socks.extend(batch)
        held = settled(pid, rising=True, limit=30)
        served = request(port, 7).startswith("It’s".encode())
        cut = 0
        for s in socks:
            s.setblocking(False)
            try:
                if s.recv(100).startswith(b"Error: line too long"):
                    cut += 1
            except (BlockingIOError, ConnectionResetError):
                pass
        for s in socks:
            s.close()
        socks.clear()
        deadline = time.monotonic() + 60
        while clients_open(admin) > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(TRIM_INTERVAL + 3.0)  # a trim waits out the interval after the last one
        after = settled(pid, rising=False, limit=20)
    finally:
        for s in socks:
            s.close()
        bal.stop()
        service.stop()
    doc: dict[str, Any] = {
        "label": args.label,
        "connections": args.connections,
        "size": args.size,
        "max_buffered": args.max_buffered or "default (32 MiB)",
        "trim": not args.no_trim,
        "src": args.src or "this tree",
        "rss_mb": {"at_rest": round(at_rest, 1), "held": round(held, 1), "after": round(after, 1)},
        "cut_line_too_long": cut,
        "new_client_served_meanwhile": served,
    }
    text = (
        f"# Partial lines: {args.connections} x {args.size} bytes ({args.label})\n\n"
        f"| at rest | held | after close | cut | new client served |\n"
        f"| --- | --- | --- | --- | --- |\n"
        f"| {at_rest:.1f} MB | {held:.1f} MB | {after:.1f} MB | {cut} | {served} |\n"
    )
    save_results(f"partial_lines_{args.label}", doc, text)
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
