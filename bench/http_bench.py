"""HTTP mode against HAProxy (mode http) and nginx as a proxy, with a direct reference.

    .venv/bin/python bench/http_bench.py [--duration 5] [--rounds 3] [--quick]
        [--targets direct,haproxy,nginx-proxy,ours] [--budget 170] [--out bench/results]

Two nginx backends (one worker each, keep-alive) serve a small response (`ok\\n`) and a
100 KB static file. wrk -t1 -c50 --latency loads, in alternating rounds, one backend
directly, HAProxy (mode http, nbthread 1, http-reuse safe), nginx as a proxy (one worker,
upstream keep-alive 32) and the balancer (`balancer serve`, a service in mode "http"); the
three proxies go round robin over both backends. Per workload and target, medians over
rounds: requests/s, p50/p99, CPU seconds per 100k requests of the target's processes
(/proc/PID/stat; for direct, the backend itself), of wrk, and of the whole machine
(/proc/stat: load generator, backends, proxy and the kernel), the target's RSS; then the
ratios ours/HAProxy and ours/nginx-proxy. A target that does not come up, or whose runs
fail, is reported absent or failed with the reason, and the others are measured as usual.
Rounds stop early when the next would end past --budget seconds. Writes
bench/results/http.json and http.md.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from tests.peers import HOST, Peer, need  # noqa: E402

from balancer.tools.procs import ChildError  # noqa: E402
from harness import RESULTS, RunningBalancer, save_results  # noqa: E402
from http_peers import (  # noqa: E402
    BIG_PATH,
    BIG_SIZE,
    SMALL_BODY,
    SMALL_PATH,
    haproxy_http,
    nginx_backend,
    nginx_proxy,
    ours,
    short_reason,
)

TARGETS = ("direct", "haproxy", "nginx-proxy", "ours")
REFERENCES = TARGETS[:-1]
WORKLOADS = {"small": (SMALL_PATH, len(SMALL_BODY)), "100 KB": (BIG_PATH, BIG_SIZE)}
CONNECTIONS = 50
MAX_ERROR_SHARE = 0.01
"""A run with more socket errors and non-2xx answers than this share of its requests fails."""
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
METRICS = (
    "rps",
    "p50_ms",
    "p99_ms",
    "target_cpu_s_per_100k",
    "wrk_cpu_s_per_100k",
    "machine_cpu_s_per_100k",
    "rss_mb",
)
RATIO_KEYS = ("rps", "p99", "cpu_per_request", "machine_cpu_per_request", "rss")
RATIOS = (
    ("ours/haproxy", "ours", "haproxy"),
    ("ours/nginx-proxy", "ours", "nginx-proxy"),
    ("nginx-proxy/haproxy", "nginx-proxy", "haproxy"),
)


class RunFailed(Exception):
    """A wrk run that did not measure anything usable."""


@dataclass
class Target:
    name: str
    port: int = 0
    pid: int = 0
    """Its main process; the process's children (nginx workers) count with it."""
    status: str = "ok"
    """ok, absent (did not come up) or failed (a run failed)."""
    reason: str = ""


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of one process, from /proc/PID/stat (0 once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # from field 3 (state) on
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds(stat: str | None = None) -> float:
    """CPU seconds every CPU spent busy (idle and I/O wait excluded), from /proc/stat."""
    text = stat if stat is not None else Path("/proc/stat").read_text()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(v) for v in text.splitlines()[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except OSError:
        return 0


def process_tree(pid: int) -> list[int]:
    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


_TIME_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_LATENCY = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h),", re.M)
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def parse_wrk(out: str) -> dict[str, float]:
    """requests, seconds, rps, p50_ms, p99_ms, errors (socket) and non_2xx of `wrk --latency`."""
    total = _TOTAL.search(out)
    latency = {q: float(v) * _TIME_UNITS[u] for q, v, u in _LATENCY.findall(out)}
    if total is None or set(latency) != {"50", "99"}:
        raise RunFailed(f"wrk output not understood: {out[-500:]!r}")
    requests = float(total.group(1))
    seconds = float(total.group(2)) * _TIME_UNITS[total.group(3)] / 1000.0
    socket = _SOCKET.search(out)
    non_2xx = _NON_2XX.search(out)
    return {
        "requests": requests,
        "seconds": seconds,
        "rps": requests / seconds if seconds else 0.0,
        "p50_ms": latency["50"],
        "p99_ms": latency["99"],
        "errors": float(sum(int(n) for n in socket.groups())) if socket else 0.0,
        "non_2xx": float(non_2xx.group(1)) if non_2xx else 0.0,
    }


def check_run(res: dict[str, float]) -> None:
    if res["requests"] <= 0:
        raise RunFailed("no request answered")
    bad = res["errors"] + res["non_2xx"]
    if bad > MAX_ERROR_SHARE * res["requests"]:
        raise RunFailed(
            f"{bad:.0f} of {res['requests']:.0f} requests failed "
            f"({res['errors']:.0f} socket errors, {res['non_2xx']:.0f} non-2xx)"
        )


def wrk_command(port: int, path: str, seconds: int) -> list[str]:
    url = f"http://{HOST}:{port}{path}"
    threads, connections = "-t1", f"-c{CONNECTIONS}"
    return [need("wrk"), threads, connections, f"-d{seconds}s", "--latency", "--timeout", "5s", url]


def run_wrk(port: int, path: str, seconds: int) -> tuple[dict[str, float], float]:
    """One wrk run: its figures and its CPU seconds (the rusage of this process's children
    that were waited for during the run: wrk alone)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        done = subprocess.run(
            wrk_command(port, path, seconds),
            capture_output=True,
            text=True,
            timeout=seconds + 30,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise RunFailed(f"wrk did not end within {seconds + 30} s") from exc
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    if done.returncode != 0:
        raise RunFailed(f"wrk exited with {done.returncode}: {done.stderr.strip()[-300:]}")
    res = parse_wrk(done.stdout)
    check_run(res)
    return res, cpu


def measure(target: Target, path: str, seconds: int) -> dict[str, float]:
    pids = process_tree(target.pid)
    cpu0 = sum(process_cpu_seconds(p) for p in pids)
    busy0 = machine_busy_seconds()
    res, wrk_cpu = run_wrk(target.port, path, seconds)
    busy = machine_busy_seconds() - busy0
    cpu = sum(process_cpu_seconds(p) for p in pids) - cpu0
    per_100k = 100_000 / res["requests"]
    res["target_cpu_s_per_100k"] = cpu * per_100k
    res["wrk_cpu_s_per_100k"] = wrk_cpu * per_100k
    res["machine_cpu_s_per_100k"] = busy * per_100k
    res["rss_mb"] = sum(rss_bytes(p) for p in pids) / 1e6
    return res


def ratios(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, float | None] | None:
    """a / b of throughput, p99, the target's and the machine's CPU per request and RSS."""
    if not a or not b:
        return None
    keys = {
        "rps": "rps",
        "p99": "p99_ms",
        "cpu_per_request": "target_cpu_s_per_100k",
        "machine_cpu_per_request": "machine_cpu_s_per_100k",
        "rss": "rss_mb",
    }
    return {name: round(a[k] / b[k], 3) if b[k] else None for name, k in keys.items()}


def summarise(
    runs: dict[str, dict[str, list[dict[str, float]]]],
    targets: dict[str, Target],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """Medians over rounds per workload and target (targets that are ok only), the ratios."""
    workloads: dict[str, Any] = {}
    for workload, per_target in runs.items():
        path, size = WORKLOADS[workload]
        entry: dict[str, Any] = {"path": path, "bytes": size}
        for name, rs in per_target.items():
            if rs and targets[name].status == "ok":
                entry[name] = {k: round(statistics.median(r[k] for r in rs), 3) for k in METRICS}
                entry[name]["rounds"] = len(rs)
                entry[name]["requests"] = int(sum(r["requests"] for r in rs))
                entry[name]["errors"] = int(sum(r["errors"] + r["non_2xx"] for r in rs))
        entry["ratios"] = {label: ratios(entry.get(a), entry.get(b)) for label, a, b in RATIOS}
        workloads[workload] = entry
    return {
        "environment": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": psutil.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        },
        "settings": settings,
        "targets": {n: {"status": t.status, "reason": t.reason} for n, t in targets.items()},
        "workloads": workloads,
    }


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown(report: dict[str, Any]) -> str:
    s, env = report["settings"], report["environment"]
    status = "; ".join(
        f"{n} {t['status']}" + (f" ({t['reason']})" if t["reason"] else "")
        for n, t in report["targets"].items()
    )
    lines = [
        "# HTTP mode vs HAProxy (mode http) and nginx (proxy_pass)",
        "",
        f"Medians of {s['rounds_done']} alternating round(s) x {s['duration_s']} s on "
        f"{env['cpus']} CPUs. wrk -t1 -c{s['connections']} --latency; two nginx backends (1 "
        "worker, keep-alive), the proxies round robin over both; direct = one backend. Target "
        "CPU: the target's processes (the proxy; for direct, the backend); wrk CPU: the load "
        "generator; machine CPU: every CPU's busy time (wrk, backends, proxy, kernel). CPU in "
        "seconds per 100k requests. Ours adds X-Forwarded-* and X-Request-Id (its defaults); "
        "the references add no header.",
        "",
        f"Targets: {status}.",
        "",
        "| workload | target | req/s | p50 ms | p99 ms | target CPU | wrk CPU | machine CPU "
        "| RSS MB | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for workload, entry in report["workloads"].items():
        for name in report["targets"]:
            m = entry.get(name)
            if m is None:
                lines.append(f"| {workload} | {name} | - | - | - | - | - | - | - | - |")
                continue
            lines.append(
                f"| {workload} | {name} | {m['rps']:.0f} | {m['p50_ms']:.3f} | "
                f"{m['p99_ms']:.3f} | {m['target_cpu_s_per_100k']:.3f} | "
                f"{m['wrk_cpu_s_per_100k']:.3f} | {m['machine_cpu_s_per_100k']:.3f} | "
                f"{m['rss_mb']:.1f} | {m['errors']} |"
            )
    lines += [
        "",
        "| workload | ratio | req/s | p99 | target CPU per req | machine CPU per req | RSS |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for workload, entry in report["workloads"].items():
        for label, r in entry["ratios"].items():
            cells = [_cell(r[k] if r else None, ".2f") for k in RATIO_KEYS]
            lines.append(f"| {workload} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _start(
    stack: ExitStack, target: Target, cm: AbstractContextManager[Peer | RunningBalancer]
) -> None:
    """Enter `cm` (a starter of http_peers); on failure the target is absent, with why."""
    try:
        started = stack.enter_context(cm)
    except (ChildError, RuntimeError, OSError) as exc:
        target.status, target.reason = "absent", short_reason(exc)
        print(f"{target.name}: absent: {target.reason}", flush=True)
        return
    target.port = started.port
    target.pid = started.proc.pid if isinstance(started, Peer) else started.pid


def _run_one(target: Target, workload: str, seconds: int) -> dict[str, float] | None:
    try:
        return measure(target, WORKLOADS[workload][0], seconds)
    except RunFailed as exc:
        target.status, target.reason = "failed", f"{workload}: {short_reason(exc)}"
        print(f"{target.name}: failed: {target.reason}", flush=True)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--duration", type=float, default=5.0, help="seconds per wrk run, whole (5)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    parser.add_argument("--quick", action="store_true", help="1 round of 1 s, for a smoke run")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset")
    parser.add_argument("--budget", type=float, default=170.0, help="seconds for all rounds")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args(argv)
    duration, rounds = (1, 1) if args.quick else (math.ceil(args.duration), args.rounds)
    chosen = [t for t in TARGETS if t in args.targets.split(",")]
    if duration < 1 or not 1 <= rounds <= 100 or not chosen:
        parser.error("--duration and --rounds must be positive, --targets name known targets")
    targets = {name: Target(name) for name in chosen}
    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        w: {name: [] for name in chosen} for w in WORKLOADS
    }
    started_at = time.monotonic()
    done = 0
    with ExitStack() as stack:
        b1 = stack.enter_context(nginx_backend())
        b2 = stack.enter_context(nginx_backend())
        backends = [b1.address, b2.address]
        starters: dict[str, AbstractContextManager[Peer | RunningBalancer]] = {
            "haproxy": haproxy_http(backends),
            "nginx-proxy": nginx_proxy(backends),
            "ours": ours(backends),
        }
        for name, target in targets.items():
            if name == "direct":
                target.port, target.pid = b1.port, b1.proc.pid
            else:
                _start(stack, target, starters.pop(name))
        for w in WORKLOADS:  # warm-up, not recorded: first connections, pools, caches
            for t in targets.values():
                if t.status == "ok":
                    _run_one(t, w, 1)
        round_started = time.monotonic()
        for rnd in range(rounds):
            order = [t for t in targets.values() if t.status == "ok"]
            if rnd % 2:
                order.reverse()
            for w in WORKLOADS:
                for t in order:
                    res = _run_one(t, w, duration)
                    if res is None:
                        continue
                    runs[w][t.name].append(res)
                    print(
                        f"round {rnd + 1}/{rounds} {w:6} {t.name:11} {res['rps']:>9.0f} req/s "
                        f"p50 {res['p50_ms']:.3f} ms p99 {res['p99_ms']:.3f} ms "
                        f"cpu {res['target_cpu_s_per_100k']:.3f} wrk "
                        f"{res['wrk_cpu_s_per_100k']:.3f} machine "
                        f"{res['machine_cpu_s_per_100k']:.3f} s/100k rss {res['rss_mb']:.1f} MB",
                        flush=True,
                    )
            done = rnd + 1
            per_round = (time.monotonic() - round_started) / done
            if time.monotonic() - started_at + per_round > args.budget and done < rounds:
                print(f"stopping after {done} of {rounds} rounds: --budget {args.budget:g} s")
                break
    settings = {
        "duration_s": duration,
        "rounds": rounds,
        "rounds_done": done,
        "connections": CONNECTIONS,
        "wrk_threads": 1,
        "elapsed_s": round(time.monotonic() - started_at, 1),
    }
    report = summarise(runs, targets, settings)
    save_results("http", report, markdown(report), args.out)
    failed = [n for n in REFERENCES if n in targets and targets[n].status != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
