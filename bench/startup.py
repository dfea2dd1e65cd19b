"""Start-up with many backends: time to ready, RSS, and how a stop is honoured meanwhile.

For each backend count, a one-service config whose backends are closed ports on
loopback (127.1.x.y:9, one address each: nothing listens there, a connect is refused
at once) is served by `balancer serve`, with health checks off and on. Measured:

- time from the spawn to `balancer ready` (not ready within `--timeout`: said so),
- RSS at ready (or when the timeout hit),
- time of a reload (`POST /api/reload`, after ready) to a file with half of the
  backends replaced by others,
- time from SIGTERM (after ready) to the exit, and the exit code,
- time from SIGINT sent as soon as `balancer starting` is logged (mid start-up) to the
  exit, and the exit code.

Every run is bounded by `--timeout` seconds per phase; a process still there after it
is killed. Results go to bench/results/startup.{json,md}.

    python bench/startup.py                    # 2,500, 5,000 and 10,000 backends
    python bench/startup.py --counts 10000 100000 --timeout 60
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from harness import rss_mb, save_results

STARTING_RE = re.compile(r"balancer starting")
READY_RE = re.compile(r"balancer ready")
ADMIN_RE = re.compile(r"admin listening on http://(\S+):(\d+)")
CLOSED_PORT = 9


def backend_host(i: int) -> str:
    """The i-th loopback address 127.1.x.y (y from 1 to 250)."""
    return f"127.{1 + i // 62500}.{(i // 250) % 250}.{i % 250 + 1}"


def write_config(path: Path, count: int, health: bool, replaced: int = 0) -> Path:
    """`count` backends; the first `replaced` of them swapped for addresses not listed before."""
    hosts = [backend_host(i + (count if i < replaced else 0)) for i in range(count)]
    lines = [
        "drain_timeout = 5",
        "[services.many]",
        'listen = "127.0.0.1:0"',
        "backends = [",
        *(f'  "{host}:{CLOSED_PORT}",' for host in hosts),
        "]",
        "[services.many.health]",
        f"enabled = {'true' if health else 'false'}",
    ]
    if health:
        lines += ["interval = 5", "timeout = 1", "send = false"]
    path.write_text("\n".join(lines) + "\n")
    return path


class Run:
    """`balancer serve CONFIG --admin off`, its stderr lines timestamped as they come."""

    def __init__(self, config: Path) -> None:
        self.started = time.monotonic()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "balancer", "serve", str(config), "--admin", "127.0.0.1:0"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.popen.stderr is not None
        for raw in iter(self.popen.stderr.readline, b""):
            with self._cond:
                self.lines.append((time.monotonic(), raw.decode("utf-8", "replace").rstrip()))
                self._cond.notify_all()

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> float | None:
        """When a line matching `pattern` came (monotonic), None if not within `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for at, line in self.lines:
                    if pattern.search(line):
                        return at
                left = deadline - time.monotonic()
                if left <= 0 or self.popen.poll() is not None:
                    return None
                self._cond.wait(min(left, 0.2))

    def stop(self, sig: int, timeout: float) -> tuple[float | None, int | None]:
        """Send `sig`; seconds until the exit and the exit code (None, None: killed)."""
        sent = time.monotonic()
        self.popen.send_signal(sig)
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None, None
        return time.monotonic() - sent, code

    def reload(self, timeout: float) -> float | None:
        """Seconds `POST /api/reload` took (None: it failed)."""
        port = next((m.group(2) for _, line in self.lines if (m := ADMIN_RE.search(line))), None)
        if port is None:
            return None
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/reload", method="POST")
        sent = time.monotonic()
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                resp.read()
        except OSError:
            return None
        return round(time.monotonic() - sent, 2)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=10)

    def close(self) -> None:
        self.kill()
        self._reader.join(timeout=10)
        if self.popen.stderr is not None:
            self.popen.stderr.close()

    def traceback(self) -> bool:
        return any("Traceback" in line for _, line in self.lines)


def measure(count: int, health: bool, timeout: float, tmp: Path) -> dict[str, Any]:
    config = write_config(tmp / f"many-{count}-{health}.toml", count, health)
    doc: dict[str, Any] = {"backends": count, "health_checks": health}
    run = Run(config)
    try:
        ready = run.wait_for(READY_RE, timeout)
        alive = run.popen.poll() is None
        doc["rss_mb"] = round(rss_mb(run.popen.pid), 1) if alive else None
        doc["ready_s"] = round(ready - run.started, 2) if ready is not None else None
        if alive and ready is not None:
            write_config(config, count, health, replaced=count // 2)
            doc["reload_half_replaced_s"] = run.reload(timeout)
            write_config(config, count, health)
        if alive:
            took, code = run.stop(signal.SIGTERM, timeout)
            doc["sigterm_exit_s"] = round(took, 2) if took is not None else None
            doc["sigterm_exit_code"] = code
        doc["traceback"] = run.traceback()
    finally:
        run.close()
    run = Run(config)
    try:
        starting = run.wait_for(STARTING_RE, timeout)
        if starting is not None and run.popen.poll() is None:
            took, code = run.stop(signal.SIGINT, timeout)
            doc["sigint_mid_start_exit_s"] = round(took, 2) if took is not None else None
            doc["sigint_mid_start_exit_code"] = code
            doc["sigint_mid_start_was_ready"] = any(READY_RE.search(line) for _, line in run.lines)
        doc["traceback"] = doc["traceback"] or run.traceback()
    finally:
        run.close()
    return doc


def table(rows: list[dict[str, Any]], timeout: float) -> str:
    def cell(value: Any, unit: str = "") -> str:
        if value is None:
            return f"> {timeout:g} s" if unit == " s" else "-"
        return f"{value:,}{unit}" if isinstance(value, int) else f"{value}{unit}"

    out = [
        "| backends | checks | ready | RSS at ready | reload, half replaced | SIGTERM -> exit "
        "| SIGINT mid-start -> exit |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    out.extend(
        f"| {r['backends']:,} | {'on' if r['health_checks'] else 'off'} "
        f"| {cell(r.get('ready_s'), ' s')} | {cell(r.get('rss_mb'), ' MB')} "
        f"| {cell(r.get('reload_half_replaced_s'), ' s') if r.get('ready_s') else '-'} "
        f"| {cell(r.get('sigterm_exit_s'), ' s')} (code {r.get('sigterm_exit_code')}) "
        f"| {cell(r.get('sigint_mid_start_exit_s'), ' s')} "
        f"(code {r.get('sigint_mid_start_exit_code')}) |"
        for r in rows
    )
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[2500, 5000, 10000])
    parser.add_argument("--checks", choices=["off", "on", "both"], default="both")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per phase")
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args()
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.checks]
    rows = []
    with tempfile.TemporaryDirectory(prefix="balancer-startup-") as tmp:
        for count in args.counts:
            for health in modes:
                row = measure(count, health, args.timeout, Path(tmp))
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    text = table(rows, args.timeout)
    doc = {"timeout_s": args.timeout, "runs": rows}
    if args.no_save:
        sys.stdout.write(text)
    else:
        save_results("startup", doc, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
