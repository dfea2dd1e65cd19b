"""Idle client connections: the balancer's memory with 10,000 of them open.

One sample service and the balancer (message mode, admin off) run as
subprocesses on 127.0.0.1. The harness raises its open-file limit to the hard
limit (the children inherit it; the balancer's own limit is read back and
reported), opens `--connections` client connections, has each send one
request and read its reply (so every session has framed a line, as a real
client's would), and leaves them idle. Then a new client makes `--requests`
lockstep requests, all checked, while the idle ones stay open. Reported: the
balancer's RSS before, with the idle connections open, and after the new
client; its open file descriptors; the new client's latency percentiles.

Usage: python bench/idle_connections.py [--connections 10000] [--requests 2000]
Writes bench/results/idle.json and bench/results/idle.md.
"""

from __future__ import annotations

import argparse
import platform
import resource
import selectors
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from balancer.net.loops import loop_name
from balancer.tools.demo import start_service
from harness import rss_mb, save_results, start_balancer

BATCH = 500


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def open_idle(port: int, count: int) -> list[socket.socket]:
    """Open `count` connections in batches; each makes one request and then idles."""
    socks: list[socket.socket] = []
    sel = selectors.DefaultSelector()
    while len(socks) < count:
        batch = [
            socket.create_connection(("127.0.0.1", port), timeout=10)
            for _ in range(min(BATCH, count - len(socks)))
        ]
        for i, s in enumerate(batch):
            s.sendall(b"%d\n" % (len(socks) + i))
            sel.register(s, selectors.EVENT_READ)
        waiting = {s.fileno(): s for s in batch}
        deadline = time.monotonic() + 30
        while waiting:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(waiting)} idle connections got no first reply")
            for key, _ in sel.select(timeout=1):
                s = waiting.pop(key.fd)
                sel.unregister(s)
                if not s.recv(4096).startswith("It\u2019s instance number".encode()):
                    raise RuntimeError("wrong first reply on an idle connection")
        socks.extend(batch)
    sel.close()
    return socks


def lockstep(port: int, requests: int) -> list[float]:
    """Latencies in ms of `requests` lockstep requests on a new connection, all checked."""
    latencies: list[float] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        buf = b""
        for i in range(requests):
            t0 = time.perf_counter()
            s.sendall(b"%d\n" % i)
            while b"\n" not in buf:
                chunk = s.recv(4096)
                if not chunk:
                    raise RuntimeError("the balancer closed the new client's connection")
                buf += chunk
            line, buf = buf.split(b"\n", 1)
            latencies.append((time.perf_counter() - t0) * 1000)
            if line.decode() != f"It\u2019s instance number {i}":
                raise RuntimeError(f"wrong reply {line!r} to {i}")
    return latencies


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def run(connections: int, requests: int) -> dict[str, Any]:
    limit = raise_nofile()
    if limit < connections + 100:
        raise SystemExit(f"open-file limit {limit} is too low for {connections} connections")
    service, backend_port = start_service()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "idle.toml"
        config.write_text(
            f'[services.idle]\nlisten = "127.0.0.1:0"\nbackends = ["127.0.0.1:{backend_port}"]\n',
            encoding="utf-8",
        )
        bal = start_balancer(config)
        port, pid = bal.port, bal.pid
        socks: list[socket.socket] = []
        try:
            lockstep(port, 100)  # warm-up
            before = rss_mb(pid)
            fds_before = psutil.Process(pid).num_fds()
            t0 = time.monotonic()
            socks = open_idle(port, connections)
            opened_s = time.monotonic() - t0
            idle_rss = rss_mb(pid)
            fds_idle = psutil.Process(pid).num_fds()
            bal_limit = psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE)[0]
            latencies = lockstep(port, requests)
            after = rss_mb(pid)
            still_open = sum(1 for s in socks if s.fileno() >= 0)
        finally:
            for s in socks:
                s.close()
            bal.stop()
            service.stop()
    return {
        "connections": connections,
        "still_open": still_open,
        "open_seconds": round(opened_s, 2),
        "rss_mb": {
            "before": round(before, 1),
            "idle": round(idle_rss, 1),
            "after_new_client": round(after, 1),
        },
        "kb_per_connection": round((idle_rss - before) * 1000 / connections, 2),
        "balancer_fds": {"before": fds_before, "idle": fds_idle},
        "new_client": {
            "requests": requests,
            "ok": len(latencies),
            "p50_ms": round(statistics.median(latencies), 3),
            "p99_ms": round(percentile(latencies, 99), 3),
            "max_ms": round(max(latencies), 3),
        },
        "nofile_limit": {"harness": limit, "balancer": bal_limit},
        "python": platform.python_version(),
        "loop": loop_name(),
        "cpus": psutil.cpu_count(),
    }


def markdown(doc: dict[str, Any]) -> str:
    rss = doc["rss_mb"]
    new = doc["new_client"]
    return "\n".join(
        [
            f"Idle connections: {doc['connections']:,} open on a message-mode service "
            f"(Python {doc['python']}, {doc['loop']}, {doc['cpus']} CPUs)",
            "",
            "| | value |",
            "|---|---:|",
            f"| balancer RSS before, MB | {rss['before']} |",
            f"| balancer RSS with the idle connections (goal <= 80), MB | {rss['idle']} |",
            f"| balancer RSS after the new client, MB | {rss['after_new_client']} |",
            f"| RSS per idle connection, KB | {doc['kb_per_connection']} |",
            f"| balancer open fds, before / idle | {doc['balancer_fds']['before']} / "
            f"{doc['balancer_fds']['idle']} |",
            f"| time to open them (one request each), s | {doc['open_seconds']} |",
            f"| new client: lockstep requests ok | {new['ok']:,} of {new['requests']:,} |",
            f"| new client: p50 / p99 / max, ms | {new['p50_ms']} / {new['p99_ms']} / "
            f"{new['max_ms']} |",
            "",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    doc = run(args.connections, args.requests)
    save_results("idle", doc, markdown(doc))
    return 0 if doc["rss_mb"]["idle"] <= 80 and doc["new_client"]["ok"] == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
