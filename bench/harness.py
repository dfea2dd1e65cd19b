"""Processes a benchmark runs on 127.0.0.1: sample services, the balancer, the load client.

Each is started as `python -m balancer ...` and waited for by its readiness line; the load
client runs with `--json --quiet` and its summary is the last stdout line that is an object.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from balancer.tools.demo import KEEP_LINES
from balancer.tools.procs import ChildError, ChildProcess, ready_balancer_ports

RESULTS = Path(__file__).parent / "results"


@dataclass
class RunningBalancer:
    child: ChildProcess
    ports: dict[str, int]
    """The port of each service, by name."""
    admin_port: int | None

    @property
    def port(self) -> int:
        """The first service's port."""
        return next(iter(self.ports.values()))

    @property
    def pid(self) -> int:
        return self.child.popen.pid

    def stop(self) -> None:
        self.child.stop()


def start_balancer(
    config: Path, admin: str = "off", env: dict[str, str] | None = None
) -> RunningBalancer:
    """`balancer serve CONFIG --admin ADMIN` (`env`: added to the environment), once it has
    logged `balancer ready`."""
    args = [sys.executable, "-m", "balancer", "serve", str(config), "--admin", admin]
    child = ChildProcess(args, name="balancer", env=env, max_lines=KEEP_LINES)
    try:
        ports, admin_port = ready_balancer_ports(child)
        if not ports:
            raise ChildError(f"balancer did not report its ports:\n{child.tail()}")
    except BaseException:
        child.stop()
        raise
    return RunningBalancer(child, ports, admin_port)


def load_args(port: int, *args: str, admin_port: int | None = None) -> list[str]:
    """The load client's command line against 127.0.0.1:PORT (`--admin off` without a port)."""
    admin = f"127.0.0.1:{admin_port}" if admin_port is not None else "off"
    load = ["-m", "balancer", "client", "--json", "--quiet", "--balancerIp", "127.0.0.1"]
    return [sys.executable, *load, "--balancerPort", str(port), "--admin", admin, *args]


def start_load(port: int, *args: str, admin_port: int | None = None) -> subprocess.Popen[str]:
    """The load client running in the background (its stderr discarded); see `load_result`."""
    return subprocess.Popen(
        load_args(port, *args, admin_port=admin_port),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def load_result(proc: subprocess.Popen[str], timeout: float, check: bool = False) -> dict[str, Any]:
    """Wait for a client from `start_load`; its JSON summary (`check`: require exit status 0)."""
    out, _ = proc.communicate(timeout=timeout)
    return _summary(out, proc.returncode, "", check)


def run_load(
    port: int, *args: str, timeout: float, admin_port: int | None = None, check: bool = False
) -> dict[str, Any]:
    """Run the load client to its end; its JSON summary (`check`: require exit status 0).

    The client exits 1 when any request failed; without `check` such a run still counts.
    """
    result = subprocess.run(
        load_args(port, *args, admin_port=admin_port),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return _summary(result.stdout, result.returncode, result.stderr, check)


def _summary(stdout: str, code: int, stderr: str, check: bool) -> dict[str, Any]:
    docs = [line for line in stdout.splitlines() if line.startswith("{")]
    if not docs or (check and code != 0):
        raise RuntimeError(f"load client failed (exit {code}):\n{stdout[-2000:]}{stderr[-2000:]}")
    doc: dict[str, Any] = json.loads(docs[-1])
    return doc


def save_results(stem: str, doc: Any, text: str, directory: Path = RESULTS) -> None:
    """Write DIRECTORY/STEM.json and DIRECTORY/STEM.md (its table); print the table."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    (directory / f"{stem}.md").write_text(text, encoding="utf-8")
    sys.stdout.write(text)


def rss_mb(pid: int) -> float:
    """A process's resident memory in MB (10^6 bytes)."""
    rss: int = psutil.Process(pid).memory_info().rss
    return rss / 1e6


def sample_rss(pid: int, samples: list[tuple[float, float]], start: float, stop_at: float) -> None:
    """Append (seconds since `start`, RSS MB) of `pid` to `samples` every 2 s until `stop_at`
    (a soak runs it in a thread beside its load)."""
    while time.monotonic() < stop_at:
        samples.append((time.monotonic() - start, rss_mb(pid)))
        time.sleep(2.0)


def rss_summary(samples: list[tuple[float, float]], warm: float, end: float) -> dict[str, Any]:
    """A soak's RSS figures, MB: start, after warm-up, end, highest, end vs warm-up in %,
    and the (seconds, MB) samples themselves."""
    return {
        "rss_mb": {
            "start": round(samples[0][1], 1),
            "warm": round(warm, 1),
            "end": round(end, 1),
            "max": round(max(mb for _, mb in samples), 1),
            "end_vs_warm_percent": round((end / warm - 1) * 100, 1),
        },
        "rss_samples": [(round(t, 1), round(mb, 1)) for t, mb in samples],
    }
