"""End-to-end latency, throughput and slow-backend share of the balancing policies.

Four sample services, one of them answering every request `--delay` seconds
late (20 ms by default), behind one balancer process that runs one service
per policy (round_robin, least_connections, power_of_two, peak_ewma), all
over the same four backends. Each round runs the load client (a subprocess:
16 connections x 4 pipelined requests, for `--seconds`) against every policy
once, in an order rotated from round to round, so that drift on the machine
(other processes, CPU frequency) falls on all policies alike. The client
reports p50/p99 and throughput; the share of the slow backend comes from the
spread it reads from the admin endpoint before and after its run.

Per policy the table shows the median over the rounds of p50 and of p99, the
total throughput (all ok replies / all run time) and the slow backend's share
of all requests. Load client, balancer and services share the machine's
cores, so absolute figures are those of this whole loopback setup.

Usage: python bench/policy_e2e_bench.py [--rounds N] [--seconds S] [--quick]
Writes bench/results/policy_e2e.json and bench/results/policy_e2e.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
POLICIES = ("round_robin", "least_connections", "power_of_two", "peak_ewma")
CLIENTS = 16
PIPELINE = 4
READY_TIMEOUT = 20.0

_INSTANCE_RE = re.compile(r"instance listening on (\S+):(\d+)")
_LISTEN_RE = re.compile(r"service (\S+) listening on (\S+):(\d+)")
_ADMIN_RE = re.compile(r"admin listening on http://(\S+):(\d+)")


class Child:
    """A subprocess whose stdout and stderr lines are collected by threads."""

    def __init__(self, args: Sequence[str]) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.args = list(args)
        self.popen = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._pump, args=(stream,), daemon=True)
            for stream in (self.popen.stdout, self.popen.stderr)
        ]
        for t in self._threads:
            t.start()

    def _pump(self, stream: Any) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            self._queue.put(line)

    def wait_for(self, regex: re.Pattern[str]) -> re.Match[str]:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self.popen.poll() is not None:
                    break
                continue
            m = regex.search(line)
            if m:
                return m
        raise RuntimeError(
            f"{' '.join(self.args[:4])}: no line matching {regex.pattern!r}:\n"
            + "\n".join(self.lines[-20:])
        )

    def finish(self, timeout: float) -> int:
        code = self.popen.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=5)
        return code

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        for t in self._threads:
            t.join(timeout=5)


def write_config(path: Path, ports: Sequence[int]) -> None:
    backends = ", ".join(f'"127.0.0.1:{p}"' for p in ports)
    parts = [
        f"[services.{name}]\n"
        'listen = "127.0.0.1:0"\n'
        f'algorithm = "{name}"\n'
        f"backends = [{backends}]\n"
        f"[services.{name}.health]\n"
        "interval = 1.0\n"
        for name in POLICIES
    ]
    path.write_text("\n".join(parts))


def run_load(port: int, admin_port: int, seconds: float) -> dict[str, Any]:
    client = Child(
        [
            sys.executable,
            "-m",
            "balancer",
            "client",
            "--balancerIp",
            "127.0.0.1",
            "--balancerPort",
            str(port),
            "--client_count",
            str(CLIENTS),
            "--pipeline",
            str(PIPELINE),
            "--duration",
            str(seconds),
            "--admin",
            f"127.0.0.1:{admin_port}",
            "--json",
            "--quiet",
        ]
    )
    code = client.finish(timeout=seconds + 60)
    docs = [line for line in client.lines if line.startswith("{")]
    if code != 0 or not docs:
        raise RuntimeError(f"load client failed ({code}):\n" + "\n".join(client.lines[-20:]))
    doc: dict[str, Any] = json.loads(docs[-1])
    return doc


def summarise(runs: list[dict[str, Any]], slow: str) -> dict[str, Any]:
    ok = sum(r["ok"] for r in runs)
    elapsed = sum(r["elapsed_s"] for r in runs)
    served = sum(sum(r["backends"].values()) for r in runs)
    slow_served = sum(r["backends"].get(slow, 0) for r in runs)
    return {
        "rounds": len(runs),
        "requests": sum(r["requests"] for r in runs),
        "ok": ok,
        "errors": sum(r["error_total"] for r in runs),
        "throughput_rps": round(ok / elapsed, 1) if elapsed > 0 else 0.0,
        "throughput_rps_per_round": [r["throughput_rps"] for r in runs],
        "p50_ms": round(statistics.median(r["latency_ms"]["p50"] for r in runs), 3),
        "p99_ms": round(statistics.median(r["latency_ms"]["p99"] for r in runs), 3),
        "p99_ms_per_round": [r["latency_ms"]["p99"] for r in runs],
        "slow_share": round(slow_served / served, 4) if served else 0.0,
    }


def run(rounds: int, seconds: float, delay: float) -> dict[str, Any]:
    services: list[Child] = []
    balancer: Child | None = None
    try:
        ports = []
        for i in range(4):
            extra = ["--delay", str(delay)] if i == 1 else []
            svc = Child([sys.executable, "-m", "balancer.service", "-p", "0", *extra])
            services.append(svc)
            ports.append(int(svc.wait_for(_INSTANCE_RE).group(2)))
        slow = f"127.0.0.1:{ports[1]}"
        with tempfile.TemporaryDirectory() as tmp:
            cfg = Path(tmp) / "bench.toml"
            write_config(cfg, ports)
            balancer = Child(
                [sys.executable, "-m", "balancer", "serve", str(cfg), "--admin", "127.0.0.1:0"]
            )
            balancer.wait_for(re.compile("balancer ready"))
        listen = {m.group(1): int(m.group(3)) for m in map(_LISTEN_RE.search, balancer.lines) if m}
        admin = next(m for m in map(_ADMIN_RE.search, balancer.lines) if m)
        admin_port = int(admin.group(2))
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in POLICIES}
        for r in range(rounds):
            order = POLICIES[r % len(POLICIES) :] + POLICIES[: r % len(POLICIES)]
            for name in order:
                doc = run_load(listen[name], admin_port, seconds)
                runs[name].append(doc)
                print(
                    f"round {r + 1}/{rounds} {name:18} {doc['throughput_rps']:>9,.0f} req/s "
                    f"p50 {doc['latency_ms']['p50']:.2f} ms p99 {doc['latency_ms']['p99']:.2f} ms",
                    file=sys.stderr,
                )
    finally:
        if balancer is not None:
            balancer.stop()
        for svc in services:
            svc.stop()
    return {
        "setup": {
            "backends": 4,
            "slow_backend_delay_s": delay,
            "clients": CLIENTS,
            "pipeline": PIPELINE,
            "seconds_per_run": seconds,
            "rounds": rounds,
        },
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "policies": {name: summarise(runs[name], slow) for name in POLICIES},
    }


def markdown(result: dict[str, Any]) -> str:
    setup = result["setup"]
    lines = [
        f"End to end, 4 backends, one answering {setup['slow_backend_delay_s'] * 1000:g} ms late "
        f"({setup['clients']} connections x {setup['pipeline']} pipelined, "
        f"{setup['rounds']} rounds of {setup['seconds_per_run']:g} s per policy; "
        f"Python {result['python']}, {result['cpus']} CPUs, everything on one machine)",
        "",
        "| policy | p50 ms | p99 ms | throughput req/s | per round | slow backend's share "
        "| errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in result["policies"].items():
        per_round = row["throughput_rps_per_round"]
        lines.append(
            f"| {name} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
            f"{row['throughput_rps']:,.0f} | {min(per_round):,.0f} to {max(per_round):,.0f} | "
            f"{row['slow_share'] * 100:.1f} % | {row['errors']} |"
        )
    lines += [
        "",
        "p50 and p99: median over the rounds of each run's percentile; throughput: all ok "
        "replies over all run time; share: of all requests the policy sent (25 % is an even "
        "split).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default: 5)")
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="seconds per run of one policy (default: 2)"
    )
    parser.add_argument(
        "--delay", type=float, default=0.02, help="the slow backend's delay (default: 0.02)"
    )
    parser.add_argument("--quick", action="store_true", help="1 round of 0.5 s (a smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = 1, 0.5
    if args.rounds < 1 or args.seconds <= 0 or args.delay <= 0:
        parser.error("--rounds must be >= 1, --seconds and --delay > 0")
    result = run(args.rounds, args.seconds, args.delay)
    table = markdown(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "policy_e2e.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "policy_e2e.md").write_text(table)
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
