"""Http-mode soak: GET traffic through the proxy while its backends are killed.

Three echo backends (tests/http_echo_backend.py, each its own process) and `balancer
serve` (one http service, round robin, HTTP health checks every 0.5 s, admin on) run as
subprocesses on 127.0.0.1. For `--minutes`, `--clients` aiohttp workers send GETs on
kept-alive connections, each answer checked (status 200, the path it asked for, echoed).
Every `--kill-every` seconds one backend (in turn) is killed with SIGKILL and started again
on its port 1 s later.

Every fourth request is a POST with an id of its own, which the backends record. What must
hold (the goals): no POST reaches two backends (a POST a dying backend held is answered 502,
never sent elsewhere), no request fails otherwise (a GET a dying backend held is sent again,
on another backend or, after the keep-alive race, on a fresh connection), none is answered
with another request's answer, the balancer holds no client connection once the clients are
gone, its RSS after the run is within 10 % of its RSS after warm-up, and it exits 0 on
SIGTERM.

Usage: python bench/http_soak.py [--minutes 2] [--clients 16] [--kill-every 5]
Writes bench/results/http_soak.json and bench/results/http_soak.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.peers import HOST, free_port, wait_connectable  # noqa: E402

from balancer.net.loops import loop_name  # noqa: E402
from harness import rss_mb, rss_summary, sample_rss, save_results  # noqa: E402

OUTAGE = 1.0
ECHO = ROOT / "tests" / "http_echo_backend.py"


def start_echo(name: str, port: int, record: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, str(ECHO), name, str(port), str(record)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_connectable(port, proc, f"echo backend {name}")
    return proc


def config(port: int, admin_port: int, backends: list[int]) -> str:
    listed = ", ".join(f'"{HOST}:{p}"' for p in backends)
    return (
        f'[admin]\nlisten = "{HOST}:{admin_port}"\n'
        f'[services.web]\nlisten = "{HOST}:{port}"\nmode = "http"\nbackends = [{listed}]\n'
        "retries = 2\n"
        '[services.web.health]\ntype = "http"\npath = "/healthz"\ninterval = 0.5\n'
        "timeout = 0.5\nrise = 1\nfall = 1\n"
    )


class Tally:
    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self.posts_ok = 0
        self.posts_refused = 0
        """POSTs answered 502/503/504: not sent again, the backend having maybe acted."""
        self.posts_sent = 0
        self.mixed = 0
        """Answers that were another request's."""
        self.errors: dict[str, int] = {}


async def worker(n: int, port: int, stop_at: float, tally: Tally) -> None:
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        seq = 0
        while time.monotonic() < stop_at:
            seq += 1
            if seq % 4 == 0:
                await post(session, port, f"/rec/w{n}/{seq}", tally)
                continue
            path = f"/w{n}/{seq}"
            try:
                async with session.get(f"http://{HOST}:{port}{path}") as resp:
                    body = await resp.read()
                    if resp.status != 200:
                        tally.failed += 1
                        key = f"status {resp.status}"
                        tally.errors[key] = tally.errors.get(key, 0) + 1
                    elif json.loads(body)["path"] != path:
                        tally.mixed += 1
                    else:
                        tally.ok += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                tally.failed += 1
                key = type(exc).__name__
                tally.errors[key] = tally.errors.get(key, 0) + 1


async def post(session: aiohttp.ClientSession, port: int, path: str, tally: Tally) -> None:
    """A POST with an id of its own; the backends record every one they get."""
    tally.posts_sent += 1
    try:
        async with session.post(f"http://{HOST}:{port}{path}", data=path.encode() * 8) as resp:
            await resp.read()
            if resp.status == 200:
                tally.posts_ok += 1
            elif resp.status in (502, 503, 504):
                tally.posts_refused += 1
            else:
                tally.failed += 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.failed += 1
        key = f"POST {type(exc).__name__}"
        tally.errors[key] = tally.errors.get(key, 0) + 1


def recorded(records: list[Path]) -> dict[str, int]:
    """How many times each recorded POST reached a backend, by path."""
    seen: dict[str, int] = {}
    for record in records:
        if record.exists():
            for line in record.read_text().splitlines():
                path = json.loads(line)["path"]
                seen[path] = seen.get(path, 0) + 1
    return seen


async def kill_in_turn(
    procs: list[subprocess.Popen[bytes]],
    ports: list[int],
    records: list[Path],
    every: float,
    stop_at: float,
) -> int:
    kills = 0
    turn = 0
    while time.monotonic() + every + OUTAGE < stop_at:
        await asyncio.sleep(every)
        at = turn % len(procs)
        procs[at].kill()
        procs[at].wait(10)
        kills += 1
        await asyncio.sleep(OUTAGE)
        procs[at] = await asyncio.to_thread(start_echo, f"b{at}", ports[at], records[at])
        turn += 1
    return kills


def read_status(admin_port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{HOST}:{admin_port}/status", timeout=5) as resp:
        doc: dict[str, Any] = json.loads(resp.read())["services"]["web"]
        return doc


def run(minutes: float, clients: int, kill_every: float) -> dict[str, Any]:
    ports = [free_port() for _ in range(3)]
    port, admin_port = free_port(), free_port()
    tally = Tally()
    samples: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(prefix="balancer-http-soak-") as tmp:
        records = [Path(tmp) / f"b{i}.jsonl" for i in range(3)]
        echoes = [start_echo(f"b{i}", p, records[i]) for i, p in enumerate(ports)]
        cfg = Path(tmp) / "http.toml"
        cfg.write_text(config(port, admin_port, ports))
        env = {"PYTHONPATH": str(ROOT / "src")}
        bal = subprocess.Popen(
            [sys.executable, "-m", "balancer", "serve", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **env},
        )
        try:
            wait_connectable(port, bal, "balancer")
            wait_connectable(admin_port, bal, "balancer admin")
            start = time.monotonic()
            stop_at = start + minutes * 60

            async def soak() -> int:
                rss = asyncio.to_thread(sample_rss, bal.pid, samples, start, stop_at)
                killer = asyncio.ensure_future(
                    kill_in_turn(echoes, ports, records, kill_every, stop_at)
                )
                await asyncio.gather(
                    killer, rss, *(worker(n, port, stop_at, tally) for n in range(clients))
                )
                return killer.result()

            kills = asyncio.run(soak())
            deadline = time.monotonic() + 10
            status = read_status(admin_port)
            while time.monotonic() < deadline and status["client_connections"]:
                time.sleep(0.1)
                status = read_status(admin_port)
            end_rss = rss_mb(bal.pid)
            bal.terminate()
            exit_code = bal.wait(30)
        finally:
            if bal.poll() is None:
                bal.kill()
                bal.wait(10)
            for proc in echoes:
                proc.kill()
                proc.wait(10)
        reached = recorded(records)
    warm = next((mb for t, mb in samples if t >= 20), samples[0][1])
    http = status["http"]
    return {
        "minutes": minutes,
        "clients": clients,
        "kill_every": kill_every,
        "kills": kills,
        "gets_ok": tally.ok,
        "gets_failed": tally.failed,
        "answers_mixed_up": tally.mixed,
        "posts_sent": tally.posts_sent,
        "posts_ok": tally.posts_ok,
        "posts_refused": tally.posts_refused,
        "posts_reaching_two_backends": sum(1 for n in reached.values() if n > 1),
        "posts_ok_not_recorded": max(0, tally.posts_ok - len(reached)),
        "errors": tally.errors,
        "retries": http["retries"],
        "upstream_connections": http["upstream_connections"],
        "client_connections_after": status["client_connections"],
        **rss_summary(samples, warm, end_rss),
        "balancer_exit_code": exit_code,
        "python": platform.python_version(),
        "loop": loop_name(),
        "cpus": psutil.cpu_count(),
    }


def passed(doc: dict[str, Any]) -> bool:
    return bool(
        doc["gets_failed"] == 0
        and doc["answers_mixed_up"] == 0
        and doc["posts_reaching_two_backends"] == 0
        and doc["client_connections_after"] == 0
        and abs(doc["rss_mb"]["end_vs_warm_percent"]) <= 10
        and doc["balancer_exit_code"] == 0
    )


def markdown(doc: dict[str, Any]) -> str:
    rss = doc["rss_mb"]
    retries = doc["retries"]
    upstream = doc["upstream_connections"]
    return "\n".join(
        [
            f"Http-mode soak: {doc['minutes']:g} min of GETs through the proxy "
            f"(Python {doc['python']}, {doc['loop']}, {doc['cpus']} CPUs)",
            "",
            "| | value |",
            "|---|---:|",
            f"| GETs answered 200 with their own answer | {doc['gets_ok']:,} |",
            f"| requests failed otherwise (goal 0) | {doc['gets_failed']} {doc['errors'] or ''} |",
            f"| answers that were another request's (goal 0) | {doc['answers_mixed_up']} |",
            f"| POSTs sent / answered 200 / answered 502-504 (not sent again) | "
            f"{doc['posts_sent']:,} / {doc['posts_ok']:,} / {doc['posts_refused']} |",
            f"| POSTs that reached two backends (goal 0) | {doc['posts_reaching_two_backends']} |",
            f"| backend kills (SIGKILL, restart {OUTAGE:g} s later) | {doc['kills']} |",
            f"| retries: to another backend / keep-alive race | {retries['backend']} / "
            f"{retries['keepalive_race']} |",
            f"| upstream connections made / requests on kept-alive ones | {upstream['new']:,} / "
            f"{upstream['reused']:,} |",
            f"| client connections held after the clients left (goal 0) | "
            f"{doc['client_connections_after']} |",
            f"| balancer RSS at start / after warm-up / end / max, MB | {rss['start']} / "
            f"{rss['warm']} / {rss['end']} / {rss['max']} |",
            f"| end vs warm-up (goal within 10%) | {rss['end_vs_warm_percent']:+.1f}% |",
            f"| balancer exit code after SIGTERM | {doc['balancer_exit_code']} |",
            "",
            f"Load: {doc['clients']} aiohttp workers sending GETs (and every fourth request a "
            f"POST with an id of its own, recorded by the backend) on kept-alive connections, "
            f"each answer checked; one echo backend of three killed every "
            f"{doc['kill_every']:g} s, in turn. Goals {'met' if passed(doc) else 'MISSED'}.",
            "",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--kill-every", type=float, default=5.0, metavar="SECONDS")
    args = parser.parse_args()
    if args.minutes <= 0 or args.clients < 1 or args.kill_every <= 0:
        parser.error("--minutes, --clients and --kill-every must be positive")
    doc = run(args.minutes, args.clients, args.kill_every)
    save_results("http_soak", doc, markdown(doc))
    return 0 if passed(doc) else 1


if __name__ == "__main__":
    sys.exit(main())
