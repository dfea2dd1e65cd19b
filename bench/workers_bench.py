"""Worker processes against HAProxy threads: `--workers 1` and `2` vs `nbthread 1` and `2`.

    .venv/bin/python bench/workers_bench.py [--rounds 3] [--quick]

Workloads: tcp mode over two redis-servers with redis-benchmark -c 50 (small values -P 16,
100 KB values -P 1), and message mode over four sample services with the load client's
compiled engine (16 connections, 16 requests in flight each). Targets, alternating
within every round so drift hits all alike: the balancer with 1 worker (one process),
2 workers on one shared listening socket, 2 workers on SO_REUSEPORT sockets, and HAProxy
with nbthread 1 and 2. Per row and target, the median over rounds of requests/s and p99,
the CPU seconds of the target (supervisor and workers, or HAProxy) and of the load
generator, the machine's busy CPU seconds, and for the balancer with 2 workers each
worker's share of the connections (from its own `/status`). Ratios: balancer N workers /
HAProxy N threads. Writes bench/results/workers.json and bench/results/workers.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tests.peers import HOST, free_port, haproxy_config, need, redis_server, running

from balancer.tools.demo import start_service
from balancer.tools.procs import ChildProcess, ready_balancer_ports
from harness import run_load, save_results
from tcp_bench import machine_busy_seconds, run_redis_benchmark, tcp_config

BALANCERS = {"w1": ("1", "shared"), "w2": ("2", "shared"), "w2-reuseport": ("2", "reuseport")}
HAPROXIES = {"ha-t1": 1, "ha-t2": 2}
TARGETS = (*BALANCERS, *HAPROXIES)


@dataclass
class Target:
    port: int
    proc: psutil.Process
    admin_port: int | None = None

    def cpu(self) -> float:
        procs = [self.proc, *self.proc.children(recursive=True)]
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.NoSuchProcess:
                pass
        return total

    def worker_counts(self) -> list[int]:
        """Connections each worker accepted so far (tcp) or requests it relayed (message)."""
        if self.admin_port is None:
            return []
        url = f"http://127.0.0.1:{self.admin_port}/api/workers"
        with urllib.request.urlopen(url, timeout=5) as r:
            workers = json.loads(r.read())["workers"]
        out = []
        for w in workers:
            url = f"http://127.0.0.1:{self.admin_port}/status?worker={w['index']}"
            with urllib.request.urlopen(url, timeout=5) as r:
                doc = json.loads(r.read())
            n = 0
            for svc in doc["services"].values():
                n += sum(max(b["total_connections"], 0) for b in svc["backends"])
                if svc["mode"] == "message":
                    n += sum(b["requests"] for b in svc["backends"])
            out.append(n)
        return out


@contextmanager
def balancer(config: Path, workers: str, sockets: str) -> Iterator[Target]:
    args = [sys.executable, "-m", "balancer", "serve", str(config), "--admin", "127.0.0.1:0"]
    args += ["--workers", workers, "--worker-sockets", sockets]
    child = ChildProcess(args, name=f"balancer {workers}w {sockets}", max_lines=2000)
    try:
        ports, admin = ready_balancer_ports(child)
        admin_port = admin if workers != "1" else None  # one process: no /api/workers
        yield Target(next(iter(ports.values())), psutil.Process(child.popen.pid), admin_port)
    finally:
        child.stop()


@contextmanager
def haproxy(backends: list[str], threads: int, tmp: Path) -> Iterator[Target]:
    port = free_port()
    cfg = tmp / f"haproxy-{threads}-{port}.cfg"
    cfg.write_text(haproxy_config(port, backends).replace("nbthread 1", f"nbthread {threads}"))
    with running("haproxy", [need("haproxy"), "-db", "-f", str(cfg)], port) as peer:
        yield Target(port, psutil.Process(peer.proc.pid))


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measure(target: Target, row: str, quick: bool) -> dict[str, Any]:
    counts = target.worker_counts()
    cpu, busy, gen = target.cpu(), machine_busy_seconds(), children_cpu()
    if row == "message 16x16":
        report = run_load(
            target.port, "--engine", "compiled", "--client_count", "16", "--pipeline", "16",
            "--duration", "1" if quick else "5", "--timeout", "10", timeout=90,
        )  # fmt: skip
        result = {"rps": report["throughput_rps"], "p99_ms": report["latency_ms"]["p99"]}
        load_cpu = float(report["client_cpu_s"])
        requests = float(report["requests"])
    else:
        small = row == "tcp small -P16"
        n = (2_000 if quick else 200_000) if small else (200 if quick else 5_000)
        result = run_redis_benchmark(target.port, 16 if small else 1, 3 if small else 100_000, n)
        requests = result["requests"]
        load_cpu = children_cpu() - gen
    after = target.worker_counts()
    out = {
        "rps": round(result["rps"]),
        "p99_ms": result["p99_ms"],
        "target_cpu_per_100k": round((target.cpu() - cpu) / requests * 1e5, 3),
        "load_cpu_per_100k": round(load_cpu / requests * 1e5, 3),
        "machine_cpu_per_100k": round((machine_busy_seconds() - busy) / requests * 1e5, 3),
    }
    if counts:
        delta = [a - b for a, b in zip(after, counts, strict=True)]
        out["worker_share"] = [round(d / max(1, sum(delta)), 3) for d in delta]
    return out


def median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in runs[0].items():
        if isinstance(value, list):
            out[key] = [round(statistics.median(r[key][i] for r in runs), 3) for i in range(2)]
        else:
            out[key] = round(statistics.median(r[key] for r in runs), 3)
    return out


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"# Worker processes vs HAProxy threads ({doc['cpus']} CPUs, load generator on the same)",
        "",
        "| row | target | req/s | p99 ms | target CPU s/100k | load CPU s/100k | machine "
        "CPU s/100k | worker shares |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row, targets in doc["rows"].items():
        for name, r in targets.items():
            share = " / ".join(f"{s:.0%}" for s in r.get("worker_share", []))
            lines.append(
                f"| {row} | {name} | {r['rps']:,} | {r['p99_ms']} | {r['target_cpu_per_100k']} "
                f"| {r['load_cpu_per_100k']} | {r['machine_cpu_per_100k']} | {share} |"
            )
    lines += ["", "| row | w1 / ha-t1 | w2 / ha-t2 | w2-reuseport / ha-t2 | w2 / w1 |"]
    lines.append("| --- | ---: | ---: | ---: | ---: |")
    for row, ratios in doc["ratios"].items():
        lines.append(
            f"| {row} | {ratios['w1/ha-t1']} | {ratios['w2/ha-t2']} | "
            f"{ratios['w2-reuseport/ha-t2']} | {ratios['w2/w1']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny runs (a smoke test)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    rows = ("tcp small -P16", "tcp 100KB -P1", "message 16x16")
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {r: {t: [] for t in TARGETS} for r in rows}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="workers-bench-") as t:
        tmp = Path(t)
        redis = [f"{HOST}:{stack.enter_context(redis_server()).port}" for _ in range(2)]
        samples = []
        for i in range(4):
            child, port = start_service(name=f"service {i + 1}")
            stack.callback(child.stop)
            samples.append(f"127.0.0.1:{port}")
        tcp_cfg, msg_cfg = tmp / "tcp.toml", tmp / "message.toml"
        tcp_cfg.write_text(tcp_config(redis))
        msg_cfg.write_text(tcp_config(samples).replace('mode = "tcp"', 'mode = "message"'))
        for _ in range(1 if args.quick else args.rounds):
            for row in rows:
                cfg, backends = (
                    (msg_cfg, samples) if row.startswith("message") else (tcp_cfg, redis)
                )
                for name in TARGETS:
                    with ExitStack() as one:
                        if name in BALANCERS:
                            target = one.enter_context(balancer(cfg, *BALANCERS[name]))
                        else:
                            target = one.enter_context(haproxy(backends, HAPROXIES[name], tmp))
                        time.sleep(0.2)
                        runs[row][name].append(measure(target, row, args.quick))
    medians = {row: {t: median(r) for t, r in targets.items()} for row, targets in runs.items()}

    def ratio(row: str, a: str, b: str) -> float:
        return round(float(medians[row][a]["rps"]) / max(1.0, float(medians[row][b]["rps"])), 2)

    doc = {
        "cpus": os.cpu_count(),
        "rows": medians,
        "ratios": {
            row: {
                "w1/ha-t1": ratio(row, "w1", "ha-t1"),
                "w2/ha-t2": ratio(row, "w2", "ha-t2"),
                "w2-reuseport/ha-t2": ratio(row, "w2-reuseport", "ha-t2"),
                "w2/w1": ratio(row, "w2", "w1"),
            }
            for row in rows
        },
    }
    text = markdown(doc)
    print(text)
    if not args.no_save:
        save_results("workers", doc, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
