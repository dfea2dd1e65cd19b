"""TLS termination in tcp mode against HAProxy (`ssl crt`) and redis's own TLS, in one run.

    .venv/bin/python bench/tls_bench.py [--seconds 2] [--rounds 3] [--quick]
        [--keys ec,rsa] [--targets ours,haproxy,direct] [--budget 170] [--out bench/results]

Certificates are made at run time by the openssl command line in a temporary directory (a
CA, then an ECDSA P-256 and an RSA 2048 leaf for localhost and 127.0.0.1; HAProxy gets each
leaf and its key in one PEM) and removed at the end. Two plain redis-servers are the
backends; each also listens for TLS itself (`--tls-port`, one with the ECDSA certificate,
the other with the RSA one): that is "direct", TLS with no proxy. The balancer (`balancer
serve`, two tcp services with `tls = { cert, key }`, uvloop) and HAProxy (mode tcp,
nbthread 1, one `bind ... ssl crt` per certificate) go round robin over both plain redis.

The load is redis-benchmark --tls (verifying against the CA, SNI localhost), -c 50:

- kept-alive P1 / P16: SET and GET of 3-byte values, 1 or 16 in flight per connection,
  on 50 connections kept open (one handshake each, then only records);
- new handshake: `-k 0`, each PING on a new connection, so a full handshake per request
  (redis-benchmark's client keeps no TLS session: nothing is resumed).

Each run is sized from the previous one of its kind to last about --seconds (a short
warm-up run first sizes it), bounded in count and in time. Targets alternate in order
from one round to the next. Per certificate, workload and target, medians over rounds:
requests (or handshakes) per second, p50/p99, and CPU in microseconds per request of the
target (the proxy process; for direct, the redis serving TLS), of the load generator
(redis-benchmark, from this process's children's rusage) and of the whole machine
(/proc/stat), with how many cores each kept busy: a load generator near one core (it is
single-threaded) or a machine near all its cores caps what a run can show, and then the
target's CPU per request is the figure to compare. What each target negotiated (version,
cipher, key exchange) is read once with `openssl s_client -brief`. Writes
bench/results/tls.json and tls.md.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from tests.peers import HOST, Peer, free_port, need, running, wait_connectable  # noqa: E402
from tests.tls_support import OPENSSL, Pair, make_ca, make_cert  # noqa: E402

from balancer.tools.procs import ChildError  # noqa: E402
from harness import RESULTS, RunningBalancer, save_results, start_balancer  # noqa: E402
from http_bench import machine_busy_seconds, process_cpu_seconds, process_tree  # noqa: E402
from http_peers import short_reason  # noqa: E402

KEYS = {"ec": "ECDSA P-256", "rsa": "RSA 2048"}
TARGETS = ("ours", "haproxy", "direct")
CLIENTS = 50
SERVER_NAME = "localhost"
VALUE_BYTES = 3
KEPT_ALIVE_TARGET = 0.9
"""The issue's goal: ours at least this share of HAProxy's kept-alive throughput."""


@dataclass(frozen=True)
class Workload:
    pipeline: int
    keepalive: bool
    tests: str
    """redis-benchmark -t."""
    warm: int
    """Requests of the warm-up run that sizes the first measured one."""
    quick: int
    """Requests of a --quick run."""
    most: int
    """At most this many requests in one run."""


WORKLOADS = {
    "kept-alive P1": Workload(1, True, "set,get", warm=5_000, quick=2_000, most=2_000_000),
    "kept-alive P16": Workload(16, True, "set,get", warm=50_000, quick=20_000, most=20_000_000),
    "new handshake": Workload(1, False, "ping_mbulk", warm=300, quick=200, most=100_000),
}
METRICS = (
    "rps",
    "p50_ms",
    "p99_ms",
    "target_cpu_us",
    "target_cores",
    "loadgen_cpu_us",
    "loadgen_cores",
    "machine_cpu_us",
    "machine_cores",
)
RATIO_KEYS = {
    "rps": "rps",
    "cpu_per_request": "target_cpu_us",
    "machine_cpu_per_request": "machine_cpu_us",
    "p99": "p99_ms",
}
RATIOS = (("ours/haproxy", "ours", "haproxy"), ("haproxy/direct", "haproxy", "direct"))


class RunFailed(Exception):
    """A redis-benchmark run that did not measure anything usable."""


@dataclass(frozen=True)
class Certs:
    ca: Path
    leaf: dict[str, Pair]
    """By key kind (ec, rsa)."""
    combined: dict[str, Path]
    """Certificate then key in one PEM, for HAProxy's `ssl crt`."""


@dataclass
class Target:
    name: str
    ports: dict[str, int] = field(default_factory=dict)
    """The TLS port serving each key kind's certificate."""
    pids: dict[str, int] = field(default_factory=dict)
    """The process whose CPU counts, by key kind (its children count with it)."""
    status: str = "ok"
    """ok, absent (did not come up) or failed (a run failed)."""
    reason: str = ""


def make_certs(dir: Path, kinds: Sequence[str]) -> Certs:
    """A CA and one leaf per key kind for localhost and 127.0.0.1, keys 0600 in `dir`."""
    ca = make_ca(dir, "Bench CA")
    leaf: dict[str, Pair] = {}
    combined: dict[str, Path] = {}
    for kind in kinds:
        pair = make_cert(ca, dir, [SERVER_NAME], key="rsa" if kind == "rsa" else "ec", cn=kind)
        leaf[kind] = pair
        pem = dir / f"{kind}-haproxy.pem"
        pem.touch(mode=0o600)
        os.chmod(pem, 0o600)
        pem.write_text(pair.cert_path.read_text() + pair.key_path.read_text())
        combined[kind] = pem
    return Certs(ca.cert_path, leaf, combined)


def ours_config(ports_of: dict[str, str], backends: Sequence[str], certs: Certs) -> str:
    """`balancer serve`: one tcp service per key kind (named `ports_of[kind]`), TLS
    terminated with its certificate, round robin over `backends`, no health checks."""
    listed = ", ".join(f'"{b}"' for b in backends)
    parts = []
    for kind, name in ports_of.items():
        pair = certs.leaf[kind]
        parts.append(
            f"[services.{name}]\n"
            f'listen = "{HOST}:0"\n'
            'mode = "tcp"\n'
            'algorithm = "round_robin"\n'
            f"backends = [{listed}]\n"
            f'tls = {{ cert = "{pair.cert_path}", key = "{pair.key_path}" }}\n'
            f"[services.{name}.health]\n"
            "enabled = false\n"
        )
    return "\n".join(parts)


def haproxy_config(ports: dict[str, int], backends: Sequence[str], certs: Certs) -> str:
    """HAProxy in tcp mode, one thread, a frontend per key kind terminating TLS with
    `ssl crt` (its own defaults otherwise), round robin over `backends`."""
    fronts = "".join(
        f"frontend tls_{kind}\n"
        f"    bind {HOST}:{port} ssl crt {certs.combined[kind]}\n"
        "    default_backend back\n"
        for kind, port in ports.items()
    )
    servers = "".join(f"    server s{i} {addr}\n" for i, addr in enumerate(backends))
    return f"""\
global
    nbthread 1
    maxconn 8000
    tune.ssl.default-dh-param 2048
defaults
    mode tcp
    timeout connect 2s
    timeout client 120s
    timeout server 120s
{fronts}backend back
    balance roundrobin
{servers}"""


@contextmanager
def redis_tls(pair: Pair, ca: Path, logdir: Path) -> Iterator[tuple[Peer, int]]:
    """A redis-server on a plain port (a backend) that also serves TLS itself on another
    port with `pair` (direct): the peer, on its plain port, and the TLS port."""
    port, tls_port = free_port(), free_port()
    args = [
        need("redis-server"),
        "--bind", HOST,
        "--port", str(port),
        "--tls-port", str(tls_port),
        "--tls-cert-file", str(pair.cert_path),
        "--tls-key-file", str(pair.key_path),
        "--tls-ca-cert-file", str(ca),
        "--tls-auth-clients", "no",
        "--save", "",
        "--appendonly", "no",
        "--protected-mode", "no",
        "--maxclients", "10000",
        "--loglevel", "warning",
        # A handshake cut by the load generator's exit is logged: not into an unread pipe.
        "--logfile", str(logdir / f"redis-{port}.log"),
    ]  # fmt: skip
    with running("redis-server", args, port) as peer:
        wait_connectable(tls_port, peer.proc, "redis-server (TLS port)")
        yield peer, tls_port


@contextmanager
def haproxy_tls(
    backends: Sequence[str], certs: Certs, kinds: Sequence[str]
) -> Iterator[tuple[Peer, dict[str, int]]]:
    """HAProxy (see `haproxy_config`): the peer and its TLS port for each key kind."""
    binary = need("haproxy")
    ports = {kind: free_port() for kind in kinds}
    with tempfile.TemporaryDirectory(prefix="balancer-tls-haproxy-") as tmp:
        cfg = Path(tmp) / "haproxy.cfg"
        cfg.write_text(haproxy_config(ports, backends, certs))
        with running("haproxy", [binary, "-db", "-f", str(cfg)], ports[kinds[0]]) as peer:
            for port in ports.values():
                wait_connectable(port, peer.proc, "haproxy")
            yield peer, ports


@contextmanager
def ours_tls(
    backends: Sequence[str], certs: Certs, kinds: Sequence[str], tmp: Path
) -> Iterator[RunningBalancer]:
    """`balancer serve` with a TLS-terminating tcp service per key kind (`tls_KIND`)."""
    cfg = tmp / "tls.toml"
    cfg.write_text(ours_config({k: f"tls_{k}" for k in kinds}, backends, certs))
    running_balancer = start_balancer(cfg)
    try:
        for kind in kinds:
            if f"tls_{kind}" not in running_balancer.ports:
                raise ChildError(f"balancer did not report service tls_{kind}")
        yield running_balancer
    finally:
        running_balancer.stop()


def negotiated(port: int, ca: Path) -> dict[str, str]:
    """What `openssl s_client -brief` reports of a handshake with 127.0.0.1:PORT: protocol,
    cipher, key exchange and signature ({"error": ...} when it fails)."""
    cmd = [
        OPENSSL, "s_client", "-brief", "-connect", f"{HOST}:{port}",
        "-servername", SERVER_NAME, "-CAfile", str(ca),
    ]  # fmt: skip
    try:
        done = subprocess.run(cmd, input="", capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return {"error": "openssl s_client did not end within 10 s"}
    fields = {
        "Protocol version": "protocol",
        "Ciphersuite": "cipher",
        "Server Temp Key": "key_exchange",
        "Signature type": "signature",
        "Verification": "verification",
    }
    out: dict[str, str] = {}
    for line in (done.stdout + done.stderr).splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() in fields:
            out[fields[name.strip()]] = value.strip()
    if "protocol" not in out:
        out["error"] = (done.stderr.strip().splitlines() or ["no handshake"])[-1][:200]
    return out


def bench_command(port: int, ca: Path, workload: Workload, requests: int) -> list[str]:
    return [
        need("redis-benchmark"), "--tls", "--cacert", str(ca), "--sni", SERVER_NAME,
        "-h", HOST, "-p", str(port), "-c", str(CLIENTS), "-n", str(requests),
        "-P", str(workload.pipeline), "-k", "1" if workload.keepalive else "0",
        "-t", workload.tests, "-d", str(VALUE_BYTES), "-r", "10000", "--csv",
    ]  # fmt: skip


def parse_csv(out: str, requests: int, tests: int) -> dict[str, float]:
    """requests, rps, p50_ms and p99_ms of `redis-benchmark --csv` over its `tests` tests of
    `requests` requests each: the rate over their total time, the mean p50, the worst p99."""
    rows = []
    for line in out.splitlines():
        cells = [c.strip('"') for c in line.strip().split(",")]
        if len(cells) < 7 or cells[0] == "test":
            continue
        try:
            rows.append([float(c) for c in cells[1:]])
        except ValueError:
            continue
    if len(rows) != tests or any(r[0] <= 0 for r in rows):
        raise RunFailed(f"redis-benchmark output not understood: {out[-500:]!r}")
    total_time = sum(requests / r[0] for r in rows)
    return {
        "requests": float(requests * tests),
        "rps": requests * tests / total_time,
        "p50_ms": statistics.mean(r[3] for r in rows),
        "p99_ms": max(r[5] for r in rows),
    }


def run_benchmark(cmd: list[str], requests: int, tests: int, timeout: float) -> dict[str, float]:
    """One redis-benchmark run: its figures, its CPU seconds (rusage of the children waited
    for meanwhile: redis-benchmark alone) and its wall time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RunFailed(f"redis-benchmark did not end within {timeout:.0f} s") from exc
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RunFailed(
            f"redis-benchmark exited with {done.returncode}: "
            f"{(done.stderr or done.stdout).strip()[-300:]}"
        )
    res = parse_csv(done.stdout, requests, tests)
    res["loadgen_cpu_s"] = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    res["wall_s"] = wall
    return res


def measure(
    target: Target, kind: str, workload: Workload, requests: int, ca: Path, seconds: float
) -> dict[str, float]:
    pids = process_tree(target.pids[kind])
    cpu0 = sum(process_cpu_seconds(p) for p in pids)
    busy0 = machine_busy_seconds()
    tests = len(workload.tests.split(","))
    cmd = bench_command(target.ports[kind], ca, workload, requests)
    res = run_benchmark(cmd, requests, tests, timeout=max(30.0, 10 * seconds))
    busy = machine_busy_seconds() - busy0
    cpu = sum(process_cpu_seconds(p) for p in pids) - cpu0
    per_request = 1e6 / res["requests"]
    wall = res["wall_s"]
    res["target_cpu_us"] = cpu * per_request
    res["loadgen_cpu_us"] = res["loadgen_cpu_s"] * per_request
    res["machine_cpu_us"] = busy * per_request
    res["target_cores"] = cpu / wall
    res["loadgen_cores"] = res["loadgen_cpu_s"] / wall
    res["machine_cores"] = busy / wall
    return res


def ratios(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, float | None] | None:
    if not a or not b:
        return None
    return {name: round(a[k] / b[k], 3) if b[k] else None for name, k in RATIO_KEYS.items()}


def summarise(
    runs: dict[str, dict[str, dict[str, list[dict[str, float]]]]],
    targets: dict[str, Target],
    handshakes: dict[str, dict[str, dict[str, str]]],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """Medians over rounds per key kind, workload and target (targets that are ok), ratios."""
    out: dict[str, Any] = {}
    for kind, per_workload in runs.items():
        out[kind] = {}
        for workload, per_target in per_workload.items():
            entry: dict[str, Any] = {}
            for name, rs in per_target.items():
                if rs and targets[name].status == "ok":
                    entry[name] = {
                        k: round(statistics.median(r[k] for r in rs), 3) for k in METRICS
                    }
                    entry[name]["rounds"] = len(rs)
                    entry[name]["requests"] = int(sum(r["requests"] for r in rs))
            entry["ratios"] = {label: ratios(entry.get(a), entry.get(b)) for label, a, b in RATIOS}
            out[kind][workload] = entry
    return {
        "environment": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": psutil.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        },
        "settings": settings,
        "targets": {n: {"status": t.status, "reason": t.reason} for n, t in targets.items()},
        "negotiated": handshakes,
        "results": out,
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
        "# TLS termination, tcp mode: balancer vs HAProxy (`ssl crt`) and redis's own TLS",
        "",
        f"Medians of {s['rounds_done']} alternating round(s) of about {s['seconds']} s per run "
        f"on {env['cpus']} CPUs. redis-benchmark --tls -c {s['clients']} (verifying against "
        "the run's CA, SNI localhost): kept-alive = SET+GET of 3-byte values on 50 open "
        "connections, -P 1 / -P 16; new handshake = `-k 0`, a PING per new connection, a full "
        "handshake each (no session resumed). Ours and HAProxy (nbthread 1) terminate TLS and "
        "relay to two plain redis-servers; direct = one redis-server terminating TLS itself. "
        "CPU in µs per request (per handshake for new handshake): target = the proxy process "
        "(for direct, that redis); load gen = redis-benchmark (one thread: near 1.00 core it "
        "is the limit); machine = every CPU's busy time (load generator, backends, proxy, "
        "kernel); cores = CPU seconds per second of the run.",
        "",
        f"Targets: {status}.",
        "",
        "| certificate | target | protocol | cipher | key exchange | signature |",
        "|---|---|---|---|---|---|",
    ]
    for kind, per_target in report["negotiated"].items():
        for name, n in per_target.items():
            if "error" in n:
                lines.append(f"| {KEYS[kind]} | {name} | failed: {n['error']} | | | |")
                continue
            lines.append(
                f"| {KEYS[kind]} | {name} | {n.get('protocol', '-')} | {n.get('cipher', '-')} | "
                f"{n.get('key_exchange', '-')} | {n.get('signature', '-')} |"
            )
    lines += [
        "",
        "| certificate | workload | target | req/s | p50 ms | p99 ms | target CPU µs/req | "
        "target cores | load gen CPU µs/req | load gen cores | machine CPU µs/req | "
        "machine cores |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = list(report["targets"])
    for kind, per_workload in report["results"].items():
        for workload, entry in per_workload.items():
            for name in names:
                m = entry.get(name)
                if m is None:
                    lines.append(f"| {KEYS[kind]} | {workload} | {name} |" + " - |" * 9)
                    continue
                lines.append(
                    f"| {KEYS[kind]} | {workload} | {name} | {m['rps']:.0f} | "
                    f"{m['p50_ms']:.3f} | {m['p99_ms']:.3f} | {m['target_cpu_us']:.1f} | "
                    f"{m['target_cores']:.2f} | {m['loadgen_cpu_us']:.1f} | "
                    f"{m['loadgen_cores']:.2f} | {m['machine_cpu_us']:.1f} | "
                    f"{m['machine_cores']:.2f} |"
                )
    lines += [
        "",
        "| certificate | workload | ratio | req/s | target CPU per req | machine CPU per req "
        "| p99 |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for kind, per_workload in report["results"].items():
        for workload, entry in per_workload.items():
            for label, r in entry["ratios"].items():
                cells = [_cell(r[k] if r else None, ".2f") for k in RATIO_KEYS]
                lines.append(f"| {KEYS[kind]} | {workload} | {label} | " + " | ".join(cells) + " |")
    goal = [
        f"{KEYS[kind]} {w} {r['rps']:.2f}"
        for kind, per_workload in report["results"].items()
        for w, entry in per_workload.items()
        if w.startswith("kept-alive") and (r := entry["ratios"]["ours/haproxy"])
    ]
    if goal:
        lines += [
            "",
            f"Goal ours >= {KEPT_ALIVE_TARGET}x HAProxy on kept-alive throughput: "
            + ", ".join(goal)
            + ".",
        ]
    return "\n".join(lines) + "\n"


def _next_requests(rate: float, seconds: float, workload: Workload) -> int:
    """Requests per test (`-n`) for a run of about `seconds` at `rate` (over all its
    tests), within the workload's bounds."""
    per_test = rate * seconds / len(workload.tests.split(","))
    return max(workload.warm, min(workload.most, math.ceil(per_test)))


def _run_one(
    target: Target,
    kind: str,
    name: str,
    requests: int,
    ca: Path,
    seconds: float,
) -> dict[str, float] | None:
    try:
        return measure(target, kind, WORKLOADS[name], requests, ca, seconds)
    except RunFailed as exc:
        target.status, target.reason = "failed", f"{KEYS[kind]} {name}: {short_reason(exc)}"
        print(f"{target.name}: failed: {target.reason}", flush=True)
        return None


def _start_targets(
    stack: ExitStack, chosen: Sequence[str], kinds: Sequence[str], certs: Certs, tmp: Path
) -> dict[str, Target]:
    targets = {name: Target(name) for name in chosen}
    redis: dict[str, tuple[Peer, int]] = {}
    for kind in KEYS:
        # Two backends whatever the kinds: each one's TLS port serves its own kind.
        pair = certs.leaf.get(kind) or certs.leaf[kinds[0]]
        redis[kind] = stack.enter_context(redis_tls(pair, certs.ca, tmp))
    backends = [peer.address for peer, _ in redis.values()]
    for name, target in targets.items():
        try:
            if name == "direct":
                for kind in kinds:
                    peer, tls_port = redis[kind]
                    target.ports[kind], target.pids[kind] = tls_port, peer.proc.pid
            elif name == "haproxy":
                hap, ports = stack.enter_context(haproxy_tls(backends, certs, kinds))
                for kind in kinds:
                    target.ports[kind], target.pids[kind] = ports[kind], hap.proc.pid
            else:
                ours = stack.enter_context(ours_tls(backends, certs, kinds, tmp))
                for kind in kinds:
                    target.ports[kind], target.pids[kind] = ours.ports[f"tls_{kind}"], ours.pid
        except (ChildError, RuntimeError, OSError) as exc:
            target.status, target.reason = "absent", short_reason(exc)
            print(f"{name}: absent: {target.reason}", flush=True)
    return targets


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per run (2)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    parser.add_argument(
        "--quick", action="store_true", help="1 round of small fixed-size runs, no warm-up"
    )
    parser.add_argument("--keys", default=",".join(KEYS), help="ec, rsa or both (ec,rsa)")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset")
    parser.add_argument("--budget", type=float, default=170.0, help="seconds for all rounds")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    kinds = [k for k in KEYS if k in args.keys.split(",")]
    chosen = [t for t in TARGETS if t in args.targets.split(",")]
    if not 0.2 <= args.seconds <= 60 or not 1 <= rounds <= 20 or not kinds or not chosen:
        parser.error(
            "--seconds must be 0.2 to 60, --rounds 1 to 20, --keys and --targets known names"
        )
    started_at = time.monotonic()
    runs: dict[str, dict[str, dict[str, list[dict[str, float]]]]] = {
        k: {w: {t: [] for t in chosen} for w in WORKLOADS} for k in kinds
    }
    handshakes: dict[str, dict[str, dict[str, str]]] = {k: {} for k in kinds}
    done = 0
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="balancer-tls-bench-")))
        certs = make_certs(tmp, kinds)
        targets = _start_targets(stack, chosen, kinds, certs, tmp)
        live = [t for t in targets.values() if t.status == "ok"]
        for kind in kinds:
            for t in live:
                handshakes[kind][t.name] = negotiated(t.ports[kind], certs.ca)
        size: dict[tuple[str, str, str], int] = {}
        for kind in kinds:
            for w, workload in WORKLOADS.items():
                for t in live:
                    if args.quick:
                        size[kind, w, t.name] = workload.quick
                        continue
                    res = _run_one(t, kind, w, workload.warm, certs.ca, args.seconds)
                    if res is not None:
                        size[kind, w, t.name] = _next_requests(res["rps"], args.seconds, workload)
        round_started = time.monotonic()
        for rnd in range(rounds):
            order = [t for t in targets.values() if t.status == "ok"]
            if rnd % 2:
                order.reverse()
            for kind in kinds:
                for w, workload in WORKLOADS.items():
                    for t in order:
                        if t.status != "ok":
                            continue
                        res = _run_one(t, kind, w, size[kind, w, t.name], certs.ca, args.seconds)
                        if res is None:
                            continue
                        runs[kind][w][t.name].append(res)
                        if not args.quick:
                            size[kind, w, t.name] = _next_requests(
                                res["rps"], args.seconds, workload
                            )
                        print(
                            f"round {rnd + 1}/{rounds} {kind:3} {w:14} {t.name:7} "
                            f"{res['rps']:>9.0f} req/s p50 {res['p50_ms']:.3f} p99 "
                            f"{res['p99_ms']:.3f} ms cpu {res['target_cpu_us']:.1f} "
                            f"load gen {res['loadgen_cpu_us']:.1f} ({res['loadgen_cores']:.2f} "
                            f"cores) machine {res['machine_cpu_us']:.1f} µs/req "
                            f"({res['machine_cores']:.2f} cores) {res['wall_s']:.1f} s",
                            flush=True,
                        )
            done = rnd + 1
            per_round = (time.monotonic() - round_started) / done
            if time.monotonic() - started_at + per_round > args.budget and done < rounds:
                print(f"stopping after {done} of {rounds} rounds: --budget {args.budget:g} s")
                break
    settings = {
        "seconds": args.seconds,
        "rounds": rounds,
        "rounds_done": done,
        "clients": CLIENTS,
        "value_bytes": VALUE_BYTES,
        "quick": args.quick,
        "elapsed_s": round(time.monotonic() - started_at, 1),
    }
    report = summarise(runs, targets, handshakes, settings)
    save_results("tls", report, markdown(report), args.out)
    failed = [t for t in targets.values() if t.status != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
