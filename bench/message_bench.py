"""Message mode throughput and latency: direct, through HAProxy, through the balancer.

Four sample services run as subprocesses; the balancer (round robin, admin off)
runs as a subprocess in front of them, and so does HAProxy (`mode tcp`,
`nbthread 1`, round robin over the same four: it balances per connection,
the balancer per request). Each round runs the load client, itself a
separate subprocess with `--json`, against (a) one backend directly, (b)
HAProxy and (c) the balancer, each in lockstep (pipeline 1) and pipelined
(pipeline 16), over 16 connections for a fixed duration. Scenarios alternate within every round so
slow drift of the machine hits both sides alike. Reported per scenario: the
median over rounds of requests/s, p50 and p99; the CPU seconds the target
process (the balancer, or the backend for direct runs) spent per 100k requests;
and the balancer's resident memory. Everything listens on 127.0.0.1.

Usage: python bench/message_bench.py [--duration 5] [--rounds 3] [--connections 16]
Writes bench/results/message.json and bench/results/message.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.peers import haproxy

from balancer.net.loops import loop_name
from balancer.tools.demo import start_service
from balancer.tools.procs import ChildProcess as Child
from harness import RESULTS, run_load, save_results, start_balancer

BACKENDS = 4
PIPELINES = (1, 16)
TARGETS = ("direct", "haproxy", "balancer")


def write_config(path: Path, backend_ports: list[int]) -> None:
    backends = ", ".join(f'"127.0.0.1:{p}"' for p in backend_ports)
    path.write_text(
        "[services.bench]\n"
        'listen = "127.0.0.1:0"\n'
        'mode = "message"\n'
        'algorithm = "round_robin"\n'
        f"backends = [{backends}]\n",
        encoding="utf-8",
    )


def run_client(port: int, connections: int, pipeline: int, duration: float) -> dict[str, Any]:
    return run_load(
        port,
        "--client_count",
        str(connections),
        "--pipeline",
        str(pipeline),
        "--duration",
        str(duration),
        "--timeout",
        "10",
        timeout=duration + 60,
    )


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def measure(
    target: psutil.Process, port: int, connections: int, pipeline: int, duration: float
) -> dict[str, Any]:
    before = cpu_seconds(target)
    report = run_client(port, connections, pipeline, duration)
    cpu = cpu_seconds(target) - before
    return {
        "requests": report["requests"],
        "ok": report["ok"],
        "errors": report["error_total"],
        "elapsed_s": report["elapsed_s"],
        "throughput_rps": report["throughput_rps"],
        "p50_ms": report["latency_ms"]["p50"],
        "p99_ms": report["latency_ms"]["p99"],
        "target_cpu_s": round(cpu, 3),
        "target_rss_mb": round(target.memory_info().rss / 2**20, 1),
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    requests = sum(r["requests"] for r in runs)
    cpu = sum(r["target_cpu_s"] for r in runs)
    return {
        "rounds": len(runs),
        "requests": requests,
        "errors": sum(r["errors"] for r in runs),
        "throughput_rps": round(statistics.median(r["throughput_rps"] for r in runs), 1),
        "p50_ms": round(statistics.median(r["p50_ms"] for r in runs), 3),
        "p99_ms": round(statistics.median(r["p99_ms"] for r in runs), 3),
        "cpu_s_per_100k": round(cpu / requests * 100_000, 3) if requests else None,
        "rss_mb_max": max(r["target_rss_mb"] for r in runs),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or not b:
        return None
    return round(a / b, 3)


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    s = result["settings"]
    out = [
        f"Message mode, {s['connections']} connections, {BACKENDS} sample-service backends, "
        f"{s['rounds']} rounds x {s['duration_s']} s per scenario "
        f"(Python {env['python']}, {env['loop']}, {env['cpus']} CPUs, {env['machine']}).",
        "Medians over rounds; CPU is the target process's user+sys seconds per 100k requests "
        "(the balancer, HAProxy, or the one backend for direct runs); "
        "RSS is the target's peak resident size.",
        "",
        "| target | pipeline | req/s | p50 ms | p99 ms | CPU s/100k req | RSS MB | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for sc in result["scenarios"]:
        cpu = sc["cpu_s_per_100k"]
        out.append(
            f"| {sc['target']} | {sc['pipeline']} | {sc['throughput_rps']:,.0f} | "
            f"{sc['p50_ms']:.3f} | {sc['p99_ms']:.3f} | "
            f"{'-' if cpu is None else f'{cpu:.2f}'} | {sc['rss_mb_max']:.1f} | {sc['errors']} |"
        )
    out += [
        "",
        "| pipeline | req/s balancer/direct | req/s HAProxy/direct | req/s balancer/HAProxy "
        "| p50 balancer/direct | p99 balancer/direct |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["ratios"]:

        def show(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}"

        out.append(
            f"| {r['pipeline']} | {show(r['throughput'])} | {show(r.get('haproxy_throughput'))} "
            f"| {show(r.get('balancer_vs_haproxy'))} | {show(r['p50'])} | {show(r['p99'])} |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per scenario (default 3)")
    parser.add_argument("--connections", type=int, default=16, help="client connections")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.rounds < 1 or args.connections < 1:
        parser.error("--duration, --rounds and --connections must be positive")

    children: list[Child] = []
    tmp = tempfile.TemporaryDirectory(prefix="balancer-bench-")
    stack = ExitStack()
    try:
        ports: list[int] = []
        for i in range(BACKENDS):
            child, port = start_service(name=f"service {i + 1}")
            children.append(child)
            ports.append(port)
        config = Path(tmp.name) / "bench.toml"
        write_config(config, ports)
        balancer = start_balancer(config)
        children.append(balancer.child)
        ha = stack.enter_context(haproxy([f"127.0.0.1:{p}" for p in ports]))
        processes = {
            "direct": (psutil.Process(children[0].popen.pid), ports[0]),
            "haproxy": (psutil.Process(ha.proc.pid), ha.port),
            "balancer": (psutil.Process(balancer.pid), balancer.port),
        }
        rss_idle = processes["balancer"][0].memory_info().rss / 2**20
        # Warm-up: the first connections and code paths, not recorded.
        for target in TARGETS:
            run_client(processes[target][1], args.connections, 1, min(1.0, args.duration))

        runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for rnd in range(args.rounds):
            for pipeline in PIPELINES:
                order = TARGETS if rnd % 2 == 0 else TARGETS[::-1]
                for target in order:
                    proc, port = processes[target]
                    m = measure(proc, port, args.connections, pipeline, args.duration)
                    runs.setdefault((target, pipeline), []).append(m)
                    print(
                        f"round {rnd + 1}/{args.rounds} {target:8} pipeline {pipeline:2}: "
                        f"{m['throughput_rps']:>10,.0f} req/s  p50 {m['p50_ms']:.3f} ms  "
                        f"p99 {m['p99_ms']:.3f} ms  cpu {m['target_cpu_s']:.2f} s  "
                        f"errors {m['errors']}",
                        flush=True,
                    )
    finally:
        stack.close()
        for child in reversed(children):
            child.stop()
        tmp.cleanup()

    scenarios = [
        {"target": target, "pipeline": pipeline, **summarize(runs[(target, pipeline)])}
        for pipeline in PIPELINES
        for target in TARGETS
    ]
    by_key = {(s["target"], s["pipeline"]): s for s in scenarios}
    ratios = []
    for pipeline in PIPELINES:
        b, d = by_key[("balancer", pipeline)], by_key[("direct", pipeline)]
        h = by_key[("haproxy", pipeline)]
        ratios.append(
            {
                "pipeline": pipeline,
                "throughput": ratio(b["throughput_rps"], d["throughput_rps"]),
                "p50": ratio(b["p50_ms"], d["p50_ms"]),
                "p99": ratio(b["p99_ms"], d["p99_ms"]),
                "haproxy_throughput": ratio(h["throughput_rps"], d["throughput_rps"]),
                "balancer_vs_haproxy": ratio(b["throughput_rps"], h["throughput_rps"]),
            }
        )
    result = {
        "environment": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": psutil.cpu_count(),
            "loop": loop_name(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        },
        "settings": {
            "connections": args.connections,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "backends": BACKENDS,
            "pipelines": list(PIPELINES),
        },
        "balancer_rss_idle_mb": round(rss_idle, 1),
        "scenarios": scenarios,
        "ratios": ratios,
        "runs": [
            {"target": t, "pipeline": p, "round": i + 1, **m}
            for (t, p), ms in runs.items()
            for i, m in enumerate(ms)
        ],
    }
    print()
    save_results("message", result, markdown(result), args.out)
    errors = sum(s["errors"] for s in scenarios)
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
