"""TCP mode against HAProxy (mode tcp, nbthread 1) and a direct connection.

    .venv/bin/python bench/tcp_bench.py [--rounds 3] [--quick] [--only TEXT ...] [--strace]

Starts two redis-servers and nginx on loopback ports, then the balancer
(`python -m balancer serve` with a generated TOML, admin and health checks
off, uvloop) twice, once per relay engine (`ours`: engine = "uvloop", `uring`:
engine = "io_uring", left out where io_uring cannot be set up), and HAProxy over
the same backends, and runs in alternating rounds: redis-benchmark -c 50 with
small values (-P 1, -P 16) and 100 KB values, and wrk against nginx's small
page. For each it records requests/s, the load generator's CPU,
p50/p99 latency, the proxy's CPU seconds per 100k requests and the whole
machine's (all processes and the kernel's softirq work: load generator,
backends and proxy; direct gives the cost without a proxy) (psutil), then
the RSS each proxy adds per idle proxied connection with 5,000 connections
open. Medians over rounds go to bench/results/tcp.json and bench/results/tcp.md;
with --only, the chosen workloads run and their medians are printed only. With
--strace, each proxy instead runs redis-benchmark -P 1 and -P 16 under
`strace -c -f` and the system calls per request are printed (strace slows the
proxy down many times: its figures are counts, not speeds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.peers import (  # noqa: E402
    HOST,
    Peer,
    haproxy,
    need,
    nginx,
    redis_server,
    wait_connectable,
)

from balancer.proxy.tcp import engine  # noqa: E402

RESULTS = ROOT / "bench" / "results"
IDLE_CONNECTIONS = 5000


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _raise_child_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 6 * IDLE_CONNECTIONS))  # 4 descriptors each with io_uring
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def tcp_config(backends: list[str], engine: str = "uvloop") -> str:
    listed = ", ".join(f'"{b}"' for b in backends)
    return (
        "[services.bench]\n"
        f'listen = "{HOST}:0"\n'
        'mode = "tcp"\n'
        f'engine = "{engine}"\n'
        'algorithm = "round_robin"\n'
        f"backends = [{listed}]\n"
        "[services.bench.health]\n"
        "enabled = false\n"
    )


@contextmanager
def our_relay(backends: list[str], engine: str = "uvloop") -> Iterator[Peer]:
    """`balancer serve` with one tcp service over `backends`, admin off, no health checks."""
    with tempfile.TemporaryDirectory(prefix="balancer-tcp-bench-") as tmp:
        cfg = Path(tmp) / "tcp.toml"
        cfg.write_text(tcp_config(backends, engine))
        args = [sys.executable, "-m", "balancer", "serve", str(cfg), "--admin", "off"]
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_raise_child_nofile,
        )
        assert proc.stderr is not None
        port = 0
        seen: list[str] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = proc.stderr.readline().decode(errors="replace")
            if not line:
                break
            seen.append(line)
            m = re.search(r"service \S+ listening on \S+:(\d+) ", line)
            if m:
                port = int(m.group(1))
            if "balancer ready" in line:
                break
        if not port:
            proc.kill()
            proc.wait(10)
            raise RuntimeError("balancer serve did not become ready:\n" + "".join(seen))
        # Keep reading its log so that a chatty child never blocks on a full pipe.
        drain = threading.Thread(target=proc.stderr.read, daemon=True)
        drain.start()
        wait_connectable(port, proc, "balancer")
        try:
            yield Peer("balancer", proc, port)
        finally:
            proc.terminate()
            proc.wait(10)
            drain.join(5)
            proc.stderr.close()


def machine_busy_seconds() -> float:
    """CPU seconds spent on all CPUs so far, idle and I/O wait excluded."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def run_redis_benchmark(port: int, pipeline: int, size: int, n: int) -> dict[str, float]:
    cmd = [
        need("redis-benchmark"), "-h", HOST, "-p", str(port), "-c", "50", "-n", str(n),
        "-P", str(pipeline), "-d", str(size), "-r", "10000", "-t", "set,get", "--csv",
        "--dbnum", "1" if size > 1000 else "0",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    rows = []
    for line in out.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells[0] in ("SET", "GET"):
            rows.append([float(c) for c in cells[1:]])
    if len(rows) != 2:
        raise RuntimeError(f"redis-benchmark output not understood: {out}")
    # Both tests have the same request count: total rate is the harmonic combination.
    total_time = sum(n / r[0] for r in rows)
    return {
        "requests": 2.0 * n,
        "rps": 2 * n / total_time,
        "p50_ms": statistics.mean(r[3] for r in rows),
        "p99_ms": max(r[5] for r in rows),
    }


_WRK_LAT = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)


def run_wrk(port: int, seconds: float) -> dict[str, float]:
    cmd = [
        need("wrk"), "-t1", "-c50", f"-d{seconds}s", "--latency",
        f"http://{HOST}:{port}/index.html",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    m = re.search(r"(\d+) requests in ([\d.]+)s", out)
    if m is None or "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk failed: {out}")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    lat = {q: float(v) * scale[u] for q, v, u in _WRK_LAT.findall(out)}
    requests = float(m.group(1))
    return {
        "requests": requests,
        "rps": requests / float(m.group(2)),
        "p50_ms": lat["50"],
        "p99_ms": lat["99"],
    }


async def _hold_idle(port: int, count: int) -> list[asyncio.StreamWriter]:
    writers = []
    for _ in range(count):
        for attempt in range(3):
            try:
                reader, writer = await asyncio.open_connection(HOST, port)
                break
            except ConnectionRefusedError:
                # A burst of thousands of connects can overflow a listen queue for a moment.
                if attempt == 2:
                    raise
                await asyncio.sleep(0.1)
        writer.write(b"PING\r\n")
        if await reader.readline() != b"+PONG\r\n":
            raise RuntimeError("PING through the proxy failed")
        writers.append(writer)
    return writers


def idle_rss_per_connection(pid: int, port: int) -> float:
    async def measure() -> float:
        proc = psutil.Process(pid)
        before = int(proc.memory_info().rss)
        writers = await _hold_idle(port, IDLE_CONNECTIONS)
        after = int(proc.memory_info().rss)
        for w in writers:
            w.close()
        return (after - before) / IDLE_CONNECTIONS

    return asyncio.run(measure())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one short round, for a smoke run")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help="run only workloads whose name contains TEXT ('idle' for the RSS run); "
        "results are printed, not written",
    )
    parser.add_argument(
        "--strace", action="store_true", help="count system calls per request instead"
    )
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    scale = 0.2 if args.quick else 1.0
    raise_nofile()

    workloads: dict[str, dict[str, Any]] = {
        "redis P1 small": {"kind": "redis", "pipeline": 1, "size": 3, "n": int(100_000 * scale)},
        "redis P16 small": {"kind": "redis", "pipeline": 16, "size": 3, "n": int(400_000 * scale)},
        "redis 100KB": {"kind": "redis", "pipeline": 1, "size": 100_000, "n": int(10_000 * scale)},
        "wrk nginx": {"kind": "wrk", "seconds": 3 if not args.quick else 1},
    }
    if args.only:
        workloads = {k: v for k, v in workloads.items() if any(o in k for o in args.only)}
    measure_idle = not args.only or "idle" in args.only
    proxies = ["ours", "uring", "haproxy"] if engine.unavailable() is None else ["ours", "haproxy"]
    samples: dict[str, dict[str, list[dict[str, float]]]] = {
        w: {t: [] for t in [*proxies, "direct"]} for w in workloads
    }
    idle: dict[str, float] = {}

    with ExitStack() as stack:
        r1 = stack.enter_context(redis_server())
        r2 = stack.enter_context(redis_server())
        web = stack.enter_context(nginx())
        redis_backends = [r1.address, r2.address]
        targets: dict[str, dict[str, tuple[int, int | None]]] = {
            "redis": {"direct": (r1.port, None)},
            "wrk": {"direct": (web.port, None)},
        }
        for kind, backends in (("redis", redis_backends), ("wrk", [web.address])):
            for target in proxies:
                if target == "haproxy":
                    peer = stack.enter_context(haproxy(backends))
                else:
                    which = "io_uring" if target == "uring" else "uvloop"
                    peer = stack.enter_context(our_relay(backends, which))
                targets[kind][target] = (peer.port, peer.proc.pid)
        if args.strace:
            for target in proxies:
                port, pid = targets["redis"][target]
                assert pid is not None
                for pipeline in (1, 16):
                    calls = syscalls_per_request(pid, port, pipeline, int(20_000 * scale))
                    print(f"syscalls {target:8} -P {pipeline:<2} {calls:.3f} per request")
            return 0
        for rnd in range(rounds):
            for name, w in workloads.items():
                order = [*proxies, "direct"]
                if rnd % 2:
                    order.reverse()
                for target in order:
                    port, pid = targets[w["kind"]][target]
                    cpu0 = cpu_seconds(pid)
                    busy0 = machine_busy_seconds()
                    load0 = children_cpu_seconds()
                    if w["kind"] == "redis":
                        res = run_redis_benchmark(port, w["pipeline"], w["size"], w["n"])
                    else:
                        res = run_wrk(port, w["seconds"])
                    cpu = cpu_seconds(pid) - cpu0
                    busy = machine_busy_seconds() - busy0
                    load = children_cpu_seconds() - load0
                    res["cpu_s_per_100k"] = cpu / res["requests"] * 100_000 if pid else 0.0
                    res["machine_cpu_s_per_100k"] = busy / res["requests"] * 100_000
                    res["loadgen_cpu_s_per_100k"] = load / res["requests"] * 100_000
                    samples[name][target].append(res)
                    print(
                        f"round {rnd + 1} {name:16} {target:8} {res['rps']:>11.0f} req/s "
                        f"p50 {res['p50_ms']:.3f} ms p99 {res['p99_ms']:.3f} ms "
                        f"cpu {res['cpu_s_per_100k']:.3f} s/100k "
                        f"machine {res['machine_cpu_s_per_100k']:.3f} s/100k "
                        f"loadgen {res['loadgen_cpu_s_per_100k']:.3f} s/100k",
                        flush=True,
                    )
        for target in proxies if measure_idle else ():
            port, pid = targets["redis"][target]
            assert pid is not None
            idle[target] = idle_rss_per_connection(pid, port)
            print(f"idle RSS {target}: {idle[target]:.0f} B per connection", flush=True)

    if args.only:
        for name, per_target in samples.items():
            for target, runs in per_target.items():
                rps = statistics.median(r["rps"] for r in runs)
                cpu = statistics.median(r["cpu_s_per_100k"] for r in runs)
                print(f"median {name:16} {target:8} {rps:>11.0f} req/s cpu {cpu:.3f} s/100k")
        return 0
    report = summarise(samples, idle, rounds)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tcp.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "tcp.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def children_cpu_seconds() -> float:
    """CPU seconds of this process's finished children: the load generator's runs."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def syscalls_per_request(pid: int, port: int, pipeline: int, n: int) -> float:
    """System calls the proxy `pid` (all its threads) makes per request of a redis-benchmark
    run of `n` SET and `n` GET, counted by `strace -c -f`."""
    with tempfile.TemporaryDirectory(prefix="balancer-strace-") as tmp:
        out = Path(tmp) / "strace.txt"
        tracer = subprocess.Popen(
            [need("strace"), "-c", "-f", "-o", str(out), "-p", str(pid)],
            stderr=subprocess.PIPE,
        )
        assert tracer.stderr is not None
        tracer.stderr.readline()  # "strace: Process N attached"
        result = run_redis_benchmark(port, pipeline, 3, n)
        tracer.send_signal(signal.SIGINT)
        tracer.wait(30)
        tracer.stderr.close()
        total = out.read_text().strip().splitlines()[-1].split()
    return int(total[3]) / result["requests"]


ENGINES = {"ours": "uvloop", "uring": "io_uring"}
"""Our targets and the relay engine each runs."""


def summarise(
    samples: dict[str, dict[str, list[dict[str, float]]]], idle: dict[str, float], rounds: int
) -> dict[str, Any]:
    out: dict[str, Any] = {"rounds": rounds, "cpus": psutil.cpu_count(), "workloads": {}}
    for name, per_target in samples.items():
        med = {
            t: {k: statistics.median(s[k] for s in runs) for k in runs[0]}
            for t, runs in per_target.items()
            if runs
        }
        hap = med["haproxy"]
        for target in ENGINES:
            if target not in med:
                continue
            ours = med[target]
            med[f"ratio_{target}_haproxy"] = {
                "rps": ours["rps"] / hap["rps"],
                "cpu_per_request": ours["cpu_s_per_100k"] / hap["cpu_s_per_100k"],
                "machine_cpu_per_request": ours["machine_cpu_s_per_100k"]
                / hap["machine_cpu_s_per_100k"],
                "p99": ours["p99_ms"] / hap["p99_ms"],
            }
        out["workloads"][name] = med
    out["idle_rss_bytes_per_connection"] = {
        **idle,
        **{f"ratio_{t}": idle[t] / idle["haproxy"] for t in ENGINES if t in idle},
    }
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# TCP mode vs HAProxy (mode tcp, nbthread 1)",
        "",
        f"Medians of {report['rounds']} alternating rounds on {report['cpus']} CPUs. "
        "redis-benchmark -c 50 (SET+GET), wrk -t1 -c50 against nginx; direct = no proxy "
        "(redis: one of the two backends). Proxy CPU is the proxy process only; ours is "
        '`python -m balancer serve` on uvloop with engine = "uvloop", uring the same with '
        'engine = "io_uring". Machine CPU is every CPU\'s busy time '
        "(load generator, backends, proxy, the kernel's network work) per 100k requests; "
        "load generator CPU is redis-benchmark's or wrk's own.",
        "",
        "| workload | target | req/s | p50 ms | p99 ms | proxy CPU s / 100k req | "
        "machine CPU s / 100k req | load generator CPU s / 100k req |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, med in report["workloads"].items():
        for target in ("ours", "uring", "haproxy", "direct"):
            if target not in med:
                continue
            m = med[target]
            cpu = f"{m['cpu_s_per_100k']:.3f}" if target != "direct" else "-"
            cells = [
                f"{m[k]:.3f}" if k in m else "-"
                for k in ("machine_cpu_s_per_100k", "loadgen_cpu_s_per_100k")
            ]
            lines.append(
                f"| {name} | {target} | {m['rps']:.0f} | {m['p50_ms']:.3f} | "
                f"{m['p99_ms']:.3f} | {cpu} | {' | '.join(cells)} |"
            )
    lines += [
        "",
        "| workload | engine | ours/HAProxy req/s | ours/HAProxy proxy CPU per req | "
        "ours/HAProxy machine CPU per req | p99 ratio |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, med in report["workloads"].items():
        for target, engine_name in ENGINES.items():
            r = med.get(f"ratio_{target}_haproxy")
            if r is None:
                continue
            lines.append(
                f"| {name} | {engine_name} | {r['rps']:.2f} | {r['cpu_per_request']:.2f} | "
                f"{r['machine_cpu_per_request']:.2f} | {r['p99']:.2f} |"
            )
    idle = report["idle_rss_bytes_per_connection"]
    ours = ", ".join(
        f"ours ({ENGINES[t]}) {idle[t]:.0f} B (ratio {idle[f'ratio_{t}']:.2f})"
        for t in ENGINES
        if t in idle
    )
    lines += [
        "",
        f"RSS per idle proxied connection ({IDLE_CONNECTIONS} open): {ours}; "
        f"HAProxy {idle['haproxy']:.0f} B.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
