"""Tcp-mode soak: redis traffic through the relay while redis backends are killed.

Two redis-servers and `balancer serve` (one tcp service, round robin, health
checks every 0.5 s, admin on) run as subprocesses on 127.0.0.1. For
`--minutes`, `--clients` workers each loop: connect through the balancer, 20
SET/GET pairs of random values (1 B to 64 KiB) each read back and compared,
close. A poller reads `/status` every 0.2 s meanwhile (the relay's byte counters
are brought up to date on each read). Every `--kill-every` seconds one redis
(in turn) is killed with SIGKILL and restarted on its port 1 s later.

An L4 relay cannot save a connection whose backend dies: those connections are
cut and counted as such. What must hold (the goals): no value ever comes back
altered, no connection is closed for want of a backend (one redis is always
up: the balancer's own `not_available` count stays 0), the balancer
holds no connection once the clients are gone, its RSS after the run is within
10 % of its RSS after warm-up, and it exits 0 on SIGTERM.

Usage: python bench/tcp_soak.py [--minutes 5] [--clients 16] [--kill-every 5]
Writes bench/results/tcp_soak.json and bench/results/tcp_soak.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.peers import HOST, Resp, free_port, need, wait_connectable  # noqa: E402

from balancer.net.loops import loop_name  # noqa: E402
from harness import rss_mb, rss_summary, sample_rss, save_results  # noqa: E402

OUTAGE = 1.0
PAIRS = 20
SIZES = (1, 100, 5000, 65536)


def start_redis(port: int) -> subprocess.Popen[bytes]:
    args = [
        need("redis-server"), "--bind", HOST, "--port", str(port), "--save", "",
        "--appendonly", "no", "--protected-mode", "no", "--loglevel", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    wait_connectable(port, proc, "redis-server")
    return proc


def config(port: int, admin_port: int, redis_ports: list[int]) -> str:
    backends = ", ".join(f'"{HOST}:{p}"' for p in redis_ports)
    return (
        f'[admin]\nlisten = "{HOST}:{admin_port}"\n'
        f'[services.redis]\nlisten = "{HOST}:{port}"\nmode = "tcp"\n'
        f'algorithm = "round_robin"\nbackends = [{backends}]\n'
        "[services.redis.health]\ninterval = 0.5\n"
    )


class Tally:
    def __init__(self) -> None:
        self.connections = 0
        self.completed = 0
        """Connections that did all their pairs."""
        self.pairs_ok = 0
        self.altered = 0
        """Values that came back different (goal 0)."""
        self.cut = 0
        """Connections closed or reset before their last reply (their backend was killed)."""
        self.status_reads = 0


async def worker(n: int, port: int, stop_at: float, tally: Tally) -> None:
    rng = random.Random(n)
    while time.monotonic() < stop_at:
        tally.connections += 1
        try:
            client = await Resp.connect(port)
            try:
                for i in range(PAIRS):
                    key = b"soak:%d:%d" % (n, i)
                    value = os.urandom(rng.choice(SIZES))
                    if await client.command(b"SET", key, value) != "OK":
                        tally.altered += 1
                    if await client.command(b"GET", key) == value:
                        tally.pairs_ok += 1
                    else:
                        tally.altered += 1
                tally.completed += 1
            finally:
                client.writer.close()
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            tally.cut += 1
            await asyncio.sleep(0.01)


def read_status(admin_port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{HOST}:{admin_port}/status", timeout=10) as resp:
        doc: dict[str, Any] = json.load(resp)
    service: dict[str, Any] = doc["services"]["redis"]
    return service


async def poll_status(admin_port: int, stop_at: float, tally: Tally) -> None:
    while time.monotonic() < stop_at:
        await asyncio.to_thread(read_status, admin_port)
        tally.status_reads += 1
        await asyncio.sleep(0.2)


async def kill_in_turn(
    redis: list[subprocess.Popen[bytes]],
    ports: list[int],
    every: float,
    stop_at: float,
) -> int:
    kills = 0
    while time.monotonic() + every + OUTAGE < stop_at:
        await asyncio.sleep(every)
        victim = kills % len(redis)
        redis[victim].kill()
        redis[victim].wait()
        kills += 1
        await asyncio.sleep(OUTAGE)
        redis[victim] = await asyncio.to_thread(start_redis, ports[victim])
    return kills


def run(minutes: float, clients: int, kill_every: float) -> dict[str, Any]:
    ports = [free_port(), free_port()]
    redis = [start_redis(p) for p in ports]
    port, admin_port = free_port(), free_port()
    tally = Tally()
    samples: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(prefix="balancer-tcp-soak-") as tmp:
        cfg = Path(tmp) / "tcp.toml"
        cfg.write_text(config(port, admin_port, ports))
        bal = subprocess.Popen(
            [sys.executable, "-m", "balancer", "serve", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_connectable(port, bal, "balancer")
            wait_connectable(admin_port, bal, "balancer admin")
            start = time.monotonic()
            stop_at = start + minutes * 60

            async def soak() -> int:
                rss = asyncio.to_thread(sample_rss, bal.pid, samples, start, stop_at)
                killer = asyncio.ensure_future(kill_in_turn(redis, ports, kill_every, stop_at))
                await asyncio.gather(
                    killer,
                    poll_status(admin_port, stop_at, tally),
                    rss,
                    *(worker(n, port, stop_at, tally) for n in range(clients)),
                )
                return killer.result()

            kills = asyncio.run(soak())
            deadline = time.monotonic() + 10
            status = read_status(admin_port)
            while time.monotonic() < deadline and (
                status["client_connections"]
                or any(b["active_connections"] for b in status["backends"])
            ):
                time.sleep(0.1)
                status = read_status(admin_port)
            end_rss = rss_mb(bal.pid)
            bal.terminate()
            exit_code = bal.wait(30)
        finally:
            if bal.poll() is None:
                bal.kill()
                bal.wait(10)
            for proc in redis:
                proc.kill()
                proc.wait(10)
    warm = next((mb for t, mb in samples if t >= 30), samples[0][1])
    return {
        "minutes": minutes,
        "clients": clients,
        "kill_every": kill_every,
        "kills": kills,
        "connections": tally.connections,
        "completed": tally.completed,
        "pairs_verified": tally.pairs_ok,
        "values_altered": tally.altered,
        "connections_cut": tally.cut,
        "connections_without_backend": status["not_available"],
        "status_reads": tally.status_reads,
        "held_after": {
            "client_connections": status["client_connections"],
            "backend_connections": sum(b["active_connections"] for b in status["backends"]),
        },
        "bytes": {
            "in": sum(b["bytes_in"] for b in status["backends"]),
            "out": sum(b["bytes_out"] for b in status["backends"]),
        },
        **rss_summary(samples, warm, end_rss),
        "balancer_exit_code": exit_code,
        "python": platform.python_version(),
        "loop": loop_name(),
        "cpus": psutil.cpu_count(),
    }


def passed(doc: dict[str, Any]) -> bool:
    return bool(
        doc["values_altered"] == 0
        and doc["connections_without_backend"] == 0
        and doc["held_after"] == {"client_connections": 0, "backend_connections": 0}
        and abs(doc["rss_mb"]["end_vs_warm_percent"]) <= 10
        and doc["balancer_exit_code"] == 0
    )


def markdown(doc: dict[str, Any]) -> str:
    rss = doc["rss_mb"]
    held = doc["held_after"]
    return "\n".join(
        [
            f"Tcp-mode soak: {doc['minutes']:g} min of redis traffic through the relay "
            f"(Python {doc['python']}, {doc['loop']}, {doc['cpus']} CPUs)",
            "",
            "| | value |",
            "|---|---:|",
            f"| client connections made | {doc['connections']:,} |",
            f"| ... that did all {PAIRS} SET/GET pairs | {doc['completed']:,} |",
            f"| SET/GET pairs read back intact | {doc['pairs_verified']:,} |",
            f"| values altered (goal 0) | {doc['values_altered']} |",
            f"| connections cut by a backend kill | {doc['connections_cut']} |",
            f"| connections the balancer closed for want of a backend (goal 0) | "
            f"{doc['connections_without_backend']} |",
            f"| redis kills (SIGKILL, restart {OUTAGE:g} s later) | {doc['kills']} |",
            f"| /status reads during the run | {doc['status_reads']:,} |",
            f"| connections held after the clients left (goal 0) | "
            f"{held['client_connections']} client, {held['backend_connections']} backend |",
            f"| bytes relayed to / from the backends | {doc['bytes']['in']:,} / "
            f"{doc['bytes']['out']:,} |",
            f"| balancer RSS at start / after warm-up / end / max, MB | {rss['start']} / "
            f"{rss['warm']} / {rss['end']} / {rss['max']} |",
            f"| end vs warm-up (goal within 10%) | {rss['end_vs_warm_percent']:+.1f}% |",
            f"| balancer exit code after SIGTERM | {doc['balancer_exit_code']} |",
            "",
            f"Load: {doc['clients']} workers, each connecting, doing {PAIRS} SET/GET pairs "
            f"of 1 B to 64 KiB values and closing, in a loop; one redis of two killed every "
            f"{doc['kill_every']:g} s, in turn. Goals {'met' if passed(doc) else 'MISSED'}.",
            "",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--kill-every", type=float, default=5.0, metavar="SECONDS")
    args = parser.parse_args()
    if args.minutes <= 0 or args.clients < 1 or args.kill_every <= 0:
        parser.error("--minutes, --clients and --kill-every must be positive")
    doc = run(args.minutes, args.clients, args.kill_every)
    save_results("tcp_soak", doc, markdown(doc))
    return 0 if passed(doc) else 1


if __name__ == "__main__":
    sys.exit(main())
