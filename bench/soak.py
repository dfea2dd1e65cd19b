"""Soak: mixed load for minutes while backends are killed and restarted.

Four sample services and the balancer (round robin, admin on) run as
subprocesses on 127.0.0.1. For `--minutes` the harness keeps three kinds of load
going at once:

- an open-loop load client: 16 connections, `--rate` requests/s, pipeline 8;
- a closed-loop load client: 4 lockstep connections (pipeline 1);
- connection churn: a new connection every 0.1 s sends 5 requests and closes.

Every `--kill-every` seconds one backend (in turn) is killed with SIGKILL and
restarted on the same port 2 s later. The balancer's resident memory (RSS) is
sampled every 5 s. Reported: requests, failures by kind (goal 0), kills, and the
RSS after start-up, after warm-up (the first sample 30 s in, or the first one
for short runs), at the end and at its highest (goal: end within 10% of warm-up).

Usage: python bench/soak.py [--minutes 10] [--rate 2000] [--kill-every 10]
Writes bench/results/soak.json and bench/results/soak.md.
"""

from __future__ import annotations

import argparse
import platform
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from balancer.net.loops import loop_name
from balancer.tools.demo import start_service
from balancer.tools.procs import ChildProcess as Child
from harness import load_result, rss_mb, rss_summary, save_results, start_balancer, start_load

BACKENDS = 4
OUTAGE = 2.0
RSS_PERIOD = 5.0
WARMUP = 30.0
ERROR_KINDS = ("wrong_reply", "server_not_available", "timeout", "connection_error", "error_reply")


def write_config(path: Path, ports: list[int]) -> None:
    backends = ", ".join(f'"127.0.0.1:{p}"' for p in ports)
    path.write_text(
        "[services.soak]\n"
        'listen = "127.0.0.1:0"\n'
        f"backends = [{backends}]\n"
        "[services.soak.health]\n"
        "interval = 0.5\n"
        "timeout = 1\n"
        "rise = 1\n"
        "fall = 1\n",
        encoding="utf-8",
    )


class Churn:
    """New connections all the time: each sends a few requests, checks the replies, closes."""

    def __init__(self, port: int, period: float = 0.1, per_connection: int = 5) -> None:
        self.port = port
        self.period = period
        self.per_connection = per_connection
        self.requests = 0
        self.ok = 0
        self.errors: dict[str, int] = dict.fromkeys(ERROR_KINDS, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self.period):
            numbers = list(range(n, n + self.per_connection))
            n += self.per_connection
            self.requests += len(numbers)
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    s.sendall(b"".join(b"%d\n" % i for i in numbers))
                    buf = b""
                    while buf.count(b"\n") < len(numbers):
                        chunk = s.recv(4096)
                        if not chunk:
                            raise ConnectionError("closed")
                        buf += chunk
            except TimeoutError:
                self.errors["timeout"] += len(numbers)
                continue
            except OSError:
                self.errors["connection_error"] += len(numbers)
                continue
            for i, line in zip(numbers, buf.split(b"\n"), strict=False):
                text = line.decode("utf-8", "replace")
                if text == f"It\u2019s instance number {i}":
                    self.ok += 1
                elif text == "Server not available":
                    self.errors["server_not_available"] += 1
                elif text.startswith("Error"):
                    self.errors["error_reply"] += 1
                else:
                    self.errors["wrong_reply"] += 1


def run(minutes: float, rate: float, kill_every: float) -> dict[str, Any]:
    seconds = minutes * 60
    services: list[Child] = []
    ports: list[int] = []
    for _ in range(BACKENDS):
        child, port = start_service()
        services.append(child)
        ports.append(port)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "soak.toml"
        write_config(config, ports)
        bal = start_balancer(config, admin="127.0.0.1:0")
        port, pid = bal.port, bal.pid
        samples: list[tuple[float, float]] = [(0.0, rss_mb(pid))]
        kills = 0
        try:
            started = time.monotonic()
            duration = ("--duration", f"{seconds:g}")
            open_loop = start_load(
                port, *duration, "--client_count", "16", "--rate", f"{rate:g}", "--pipeline", "8"
            )
            lockstep = start_load(port, *duration, "--client_count", "4", "--pipeline", "1")
            churn = Churn(port)
            churn.start()
            next_kill = started + kill_every
            next_sample = started + RSS_PERIOD
            victim = 0
            end = started + seconds
            while True:
                now = time.monotonic()
                if now >= end:
                    break
                if now >= next_sample:
                    samples.append((now - started, rss_mb(pid)))
                    next_sample += RSS_PERIOD
                if now >= next_kill and now + OUTAGE + 1 < end:
                    i = victim % BACKENDS
                    victim += 1
                    services[i].popen.send_signal(signal.SIGKILL)
                    services[i].stop()
                    kills += 1
                    time.sleep(OUTAGE)
                    services[i], _ = start_service(port=ports[i])
                    next_kill += kill_every
                    continue
                time.sleep(min(0.2, max(0.0, end - now)))
            churn.stop()
            results = [load_result(p, timeout=120) for p in (open_loop, lockstep)]
            samples.append((time.monotonic() - started, rss_mb(pid)))
        finally:
            bal.stop()
            for child in services:
                child.stop()
        bal_code = bal.child.popen.returncode
    errors = dict.fromkeys(ERROR_KINDS, 0)
    requests = churn.requests
    ok = churn.ok
    for doc in [*results, {"errors": churn.errors}]:
        for kind in ERROR_KINDS:
            errors[kind] += int(doc["errors"].get(kind, 0))
    for doc in results:
        requests += int(doc["requests"])
        ok += int(doc["ok"])
    warm = next((mb for t, mb in samples if t >= min(WARMUP, seconds / 4)), samples[-1][1])
    end_rss = samples[-1][1]
    return {
        "minutes": minutes,
        "rate": rate,
        "kill_every": kill_every,
        "kills": kills,
        "requests": requests,
        "ok": ok,
        "failures": sum(errors.values()),
        "errors": errors,
        "open_loop": {k: results[0][k] for k in ("requests", "ok", "errors")},
        "lockstep": {k: results[1][k] for k in ("requests", "ok", "errors")},
        "churn": {"requests": churn.requests, "ok": churn.ok, "errors": churn.errors},
        **rss_summary(samples, warm, end_rss),
        "balancer_exit_code": bal_code,
        "python": platform.python_version(),
        "loop": loop_name(),
        "cpus": psutil.cpu_count(),
    }


def markdown(doc: dict[str, Any]) -> str:
    rss = doc["rss_mb"]
    errors = ", ".join(f"{k} {v}" for k, v in doc["errors"].items())
    return "\n".join(
        [
            f"Soak: {doc['minutes']:g} min of mixed load (Python {doc['python']}, "
            f"{doc['loop']}, {doc['cpus']} CPUs)",
            "",
            "| | value |",
            "|---|---:|",
            f"| requests | {doc['requests']:,} |",
            f"| ok | {doc['ok']:,} |",
            f"| failures (goal 0) | {doc['failures']:,} |",
            f"| backend kills (SIGKILL, restart {OUTAGE:g} s later) | {doc['kills']} |",
            f"| balancer RSS at start, MB | {rss['start']} |",
            f"| balancer RSS after warm-up, MB | {rss['warm']} |",
            f"| balancer RSS at end, MB | {rss['end']} |",
            f"| balancer RSS max, MB | {rss['max']} |",
            f"| end vs warm-up (goal within 10%) | {rss['end_vs_warm_percent']:+.1f}% |",
            f"| balancer exit code after SIGTERM | {doc['balancer_exit_code']} |",
            "",
            f"Errors by kind: {errors}.",
            f"Load: open loop {doc['rate']:g} req/s over 16 connections (pipeline 8), "
            "4 lockstep connections as fast as they go, a new 5-request connection every 0.1 s; "
            f"one backend killed every {doc['kill_every']:g} s, in turn.",
            "",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=2000.0, help="open-loop requests/s")
    parser.add_argument("--kill-every", type=float, default=10.0, metavar="SECONDS")
    args = parser.parse_args()
    doc = run(args.minutes, args.rate, args.kill_every)
    save_results("soak", doc, markdown(doc))
    return 0 if doc["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
