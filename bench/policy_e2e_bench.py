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
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from balancer.tools.demo import start_service
from balancer.tools.procs import ChildProcess as Child
from harness import RunningBalancer, run_load, save_results, start_balancer

POLICIES = ("round_robin", "least_connections", "power_of_two", "peak_ewma")
CLIENTS = 16
PIPELINE = 4


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


def run_policy(port: int, admin_port: int, seconds: float) -> dict[str, Any]:
    return run_load(
        port,
        "--client_count",
        str(CLIENTS),
        "--pipeline",
        str(PIPELINE),
        "--duration",
        str(seconds),
        admin_port=admin_port,
        timeout=seconds + 60,
        check=True,
    )


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
    balancer: RunningBalancer | None = None
    try:
        ports = []
        for i in range(4):
            extra = ["--delay", str(delay)] if i == 1 else []
            svc, port = start_service(*extra)
            services.append(svc)
            ports.append(port)
        slow = f"127.0.0.1:{ports[1]}"
        with tempfile.TemporaryDirectory() as tmp:
            cfg = Path(tmp) / "bench.toml"
            write_config(cfg, ports)
            balancer = start_balancer(cfg, admin="127.0.0.1:0")
        listen = balancer.ports
        assert balancer.admin_port is not None
        admin_port = balancer.admin_port
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in POLICIES}
        for r in range(rounds):
            order = POLICIES[r % len(POLICIES) :] + POLICIES[: r % len(POLICIES)]
            for name in order:
                doc = run_policy(listen[name], admin_port, seconds)
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
    save_results("policy_e2e", result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
