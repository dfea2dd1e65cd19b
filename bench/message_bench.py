"""Message mode throughput and cost: direct, through HAProxy, through the balancer.

Sample services run as subprocesses; the balancer (round robin, admin off) runs as a
subprocess in front of them twice, compiled and pure Python (`BALANCER_NO_EXTENSIONS=1`),
and so does HAProxy (`mode tcp`, `nbthread 1`, round robin over the same backends: it
relays per connection, the balancer balances per request). The load is the load client's
compiled engine (`balancer client --engine compiled`: C, epoll, one thread), each connection
keeping `pipeline` requests in flight and refilling as replies arrive.

Rows: the main ones (16 connections, 4 backends, 10-digit requests) in lockstep and with
16 in flight against every target, then rows that show how the cost grows with the work
(256 and 2,048 connections, 64 backends, 1 KB requests; 16 in flight). Targets alternate
within every round so slow drift of the machine hits all alike. Reported per row and
target: the median over rounds of requests/s, p50 and p99; the CPU seconds per 100k
requests of the target (the balancer, HAProxy, or the one backend for direct runs), of the
load client and of all backends together; the target's resident memory.

Usage: python bench/message_bench.py [--duration 5] [--rounds 3] [--quick]
Writes bench/results/message.json and bench/results/message.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.peers import haproxy

from balancer.net.loops import loop_name
from balancer.tools.demo import start_service
from balancer.tools.procs import ChildProcess as Child
from harness import RESULTS, RunningBalancer, run_load, save_results, start_balancer

TARGETS = ("direct", "haproxy", "balancer", "balancer-pure")
SIZE = 10


@dataclass(frozen=True)
class Row:
    name: str
    pipeline: int
    connections: int = 16
    backends: int = 4
    size: int = SIZE
    targets: tuple[str, ...] = TARGETS
    main: bool = False


MAIN_ROWS = (
    Row("lockstep", 1, main=True),
    Row("16 in flight", 16, main=True),
)
SCALE_ROWS = (
    Row("256 connections", 16, connections=256),
    Row("2,048 connections", 16, connections=2048, targets=("direct", "haproxy", "balancer")),
    Row("64 backends", 16, backends=64, targets=("haproxy", "balancer")),
    Row("1 KB requests", 16, size=1024),
)


def write_config(path: Path, backend_ports: Sequence[int]) -> None:
    backends = ", ".join(f'"127.0.0.1:{p}"' for p in backend_ports)
    path.write_text(
        "[services.bench]\n"
        'listen = "127.0.0.1:0"\n'
        'mode = "message"\n'
        'algorithm = "round_robin"\n'
        f"backends = [{backends}]\n",
        encoding="utf-8",
    )


def cpu_seconds(procs: Sequence[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        times = proc.cpu_times()
        total += times.user + times.system
    return total


@dataclass
class Target:
    proc: psutil.Process
    port: int


@dataclass
class BackendSet:
    """Sample services and what fronts them."""

    procs: list[psutil.Process]
    targets: dict[str, Target]


@contextmanager
def backend_set(count: int, tmp: Path, stack: ExitStack) -> Iterator[BackendSet]:
    children: list[Child] = []
    balancers: list[RunningBalancer] = []
    try:
        ports: list[int] = []
        for i in range(count):
            child, port = start_service(name=f"service {i + 1}")
            children.append(child)
            ports.append(port)
        config = tmp / f"bench-{count}.toml"
        write_config(config, ports)
        compiled = start_balancer(config, env={"BALANCER_NO_EXTENSIONS": "0"})
        balancers.append(compiled)
        pure = start_balancer(config, env={"BALANCER_NO_EXTENSIONS": "1"})
        balancers.append(pure)
        ha = stack.enter_context(haproxy([f"127.0.0.1:{p}" for p in ports]))
        yield BackendSet(
            procs=[psutil.Process(c.popen.pid) for c in children],
            targets={
                "direct": Target(psutil.Process(children[0].popen.pid), ports[0]),
                "haproxy": Target(psutil.Process(ha.proc.pid), ha.port),
                "balancer": Target(psutil.Process(compiled.pid), compiled.port),
                "balancer-pure": Target(psutil.Process(pure.pid), pure.port),
            },
        )
    finally:
        for bal in balancers:
            bal.stop()
        for child in reversed(children):
            child.stop()


def measure(backends: BackendSet, target: str, row: Row, duration: float) -> dict[str, Any]:
    t = backends.targets[target]
    before = cpu_seconds([t.proc])
    backends_before = cpu_seconds(backends.procs)
    report = run_load(
        t.port,
        "--engine",
        "compiled",
        "--client_count",
        str(row.connections),
        "--pipeline",
        str(row.pipeline),
        "--size",
        str(row.size),
        "--duration",
        str(duration),
        "--timeout",
        "10",
        timeout=duration + 60,
    )
    return {
        "requests": report["requests"],
        "ok": report["ok"],
        "errors": report["error_total"],
        "elapsed_s": report["elapsed_s"],
        "throughput_rps": report["throughput_rps"],
        "p50_ms": report["latency_ms"]["p50"],
        "p99_ms": report["latency_ms"]["p99"],
        "target_cpu_s": round(cpu_seconds([t.proc]) - before, 3),
        "backends_cpu_s": round(cpu_seconds(backends.procs) - backends_before, 3),
        "client_cpu_s": report["client_cpu_s"],
        "target_rss_mb": round(t.proc.memory_info().rss / 2**20, 1),
    }


def per_100k(seconds: float, requests: int) -> float | None:
    return round(seconds / requests * 100_000, 3) if requests else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    requests = sum(r["requests"] for r in runs)
    return {
        "rounds": len(runs),
        "requests": requests,
        "errors": sum(r["errors"] for r in runs),
        "throughput_rps": round(statistics.median(r["throughput_rps"] for r in runs), 1),
        "p50_ms": round(statistics.median(r["p50_ms"] for r in runs), 3),
        "p99_ms": round(statistics.median(r["p99_ms"] for r in runs), 3),
        "cpu_s_per_100k": per_100k(sum(r["target_cpu_s"] for r in runs), requests),
        "client_cpu_s_per_100k": per_100k(sum(r["client_cpu_s"] for r in runs), requests),
        "backends_cpu_s_per_100k": per_100k(sum(r["backends_cpu_s"] for r in runs), requests),
        "rss_mb_max": max(r["target_rss_mb"] for r in runs),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or not b:
        return None
    return round(a / b, 3)


def show(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    s = result["settings"]
    out = [
        f"Message mode, {s['rounds']} rounds x {s['duration_s']} s per row and target, load from "
        f"the compiled client (Python {env['python']}, {env['loop']}, {env['cpus']} CPUs, "
        f"{env['machine']}). Medians over rounds. CPU columns: user+sys seconds per 100k "
        "requests of the target (balancer, HAProxy, or the one backend for direct), of the "
        "load client, and of all backends together. `balancer` is the compiled build, "
        "`balancer-pure` the same code as pure Python.",
        "",
        "| row | target | req/s | p50 ms | p99 ms | target CPU | client CPU | backends CPU "
        "| RSS MB | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    out += [
        f"| {sc['row']} | {sc['target']} | {sc['throughput_rps']:,.0f} | "
        f"{sc['p50_ms']:.3f} | {sc['p99_ms']:.3f} | {show(sc['cpu_s_per_100k'])} | "
        f"{show(sc['client_cpu_s_per_100k'])} | {show(sc['backends_cpu_s_per_100k'])} | "
        f"{sc['rss_mb_max']:.1f} | {sc['errors']} |"
        for sc in result["scenarios"]
    ]
    out += [
        "",
        "| row | balancer/HAProxy | pure/HAProxy | balancer/direct | HAProxy/direct "
        "| CPU balancer/HAProxy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["ratios"]:
        out.append(
            f"| {r['row']} | {show(r['balancer_vs_haproxy'])} | {show(r['pure_vs_haproxy'])} | "
            f"{show(r['throughput'])} | {show(r['haproxy_throughput'])} | "
            f"{show(r['cpu_vs_haproxy'])} |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per row (default 3)")
    parser.add_argument("--quick", action="store_true", help="the main rows only")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.rounds < 1:
        parser.error("--duration and --rounds must be positive")
    rows = MAIN_ROWS if args.quick else MAIN_ROWS + SCALE_ROWS
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    rss_idle = 0.0
    with tempfile.TemporaryDirectory(prefix="balancer-bench-") as tmp, ExitStack() as stack:
        sets: dict[int, BackendSet] = {}
        for count in sorted({row.backends for row in rows}):
            sets[count] = stack.enter_context(backend_set(count, Path(tmp), stack))
        rss_idle = sets[4].targets["balancer"].proc.memory_info().rss / 2**20
        for target in TARGETS:  # warm-up: first connections and code paths, not recorded
            measure(sets[4], target, MAIN_ROWS[1], min(1.0, args.duration))
        for rnd in range(args.rounds):
            for row in rows:
                order = row.targets if rnd % 2 == 0 else row.targets[::-1]
                for target in order:
                    m = measure(sets[row.backends], target, row, args.duration)
                    runs.setdefault((row.name, target), []).append(m)
                    print(
                        f"round {rnd + 1}/{args.rounds} {row.name:18} {target:13}: "
                        f"{m['throughput_rps']:>10,.0f} req/s  p50 {m['p50_ms']:.3f} ms  "
                        f"p99 {m['p99_ms']:.3f} ms  cpu {m['target_cpu_s']:.2f} s  "
                        f"client {m['client_cpu_s']:.2f} s  errors {m['errors']}",
                        flush=True,
                    )

    scenarios = [
        {
            "row": row.name,
            "main": row.main,
            "target": target,
            "pipeline": row.pipeline,
            "connections": row.connections,
            "backends": row.backends,
            "size": row.size,
            **summarize(runs[(row.name, target)]),
        }
        for row in rows
        for target in row.targets
    ]
    by_key = {(s["row"], s["target"]): s for s in scenarios}

    def get(row: str, target: str, key: str) -> Any:
        s = by_key.get((row, target))
        return None if s is None else s[key]

    def between(row: str, a: str, b: str, key: str = "throughput_rps") -> float | None:
        return ratio(get(row, a, key), get(row, b, key))

    ratios = [
        {
            "row": row.name,
            "pipeline": row.pipeline,
            "throughput": between(row.name, "balancer", "direct"),
            "haproxy_throughput": between(row.name, "haproxy", "direct"),
            "balancer_vs_haproxy": between(row.name, "balancer", "haproxy"),
            "pure_vs_haproxy": between(row.name, "balancer-pure", "haproxy"),
            "cpu_vs_haproxy": between(row.name, "balancer", "haproxy", "cpu_s_per_100k"),
        }
        for row in rows
    ]
    result = {
        "environment": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": psutil.cpu_count(),
            "loop": loop_name(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "pid": os.getpid(),
        },
        "settings": {
            "duration_s": args.duration,
            "rounds": args.rounds,
            "rows": [row.name for row in rows],
        },
        "balancer_rss_idle_mb": round(rss_idle, 1),
        "scenarios": scenarios,
        "ratios": ratios,
        "runs": [
            {"row": r, "target": t, "round": i + 1, **m}
            for (r, t), ms in runs.items()
            for i, m in enumerate(ms)
        ],
    }
    print()
    save_results("message", result, markdown(result), args.out)
    errors = sum(s["errors"] for s in scenarios)
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
