"""The tutorial's scenario on built-in defaults.

Starts 4 sample services, a balancer in front of them (message mode, round
robin, admin endpoint on), runs the load client against the balancer in this
process and prints its report with the spread over the backends. Every child
is stopped on the way out, whatever happens.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import IO

from balancer.tools import client

BACKENDS = 4
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

INSTANCE_RE = re.compile(r"instance listening on (\S+):(\d+)")
SERVICE_RE = re.compile(r"service (\S+) listening on (\S+):(\d+)")
ADMIN_RE = re.compile(r"admin listening on http://(\S+):(\d+)")
READY_RE = re.compile(r"balancer ready")


class ChildError(Exception):
    """A child process failed to start or exited early."""


class Child:
    """A child process whose output lines are read by a thread, kept for waiting on."""

    def __init__(self, name: str, args: Sequence[str]) -> None:
        self.name = name
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.popen = subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.lines: collections.deque[str] = collections.deque(maxlen=200)
        self._seen = 0
        self._cond = threading.Condition()
        self._eof = False
        assert self.popen.stdout is not None
        self._reader = threading.Thread(target=self._pump, args=(self.popen.stdout,), daemon=True)
        self._reader.start()

    def _pump(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
                self._seen += 1
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_for(self, pattern: re.Pattern[str], timeout: float = READY_TIMEOUT) -> list[str]:
        """Wait for a line matching `pattern`; return every line read so far."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                lines = list(self.lines)
                if any(pattern.search(line) for line in lines):
                    return lines
                if self._eof:
                    code = self.popen.wait(timeout=STOP_TIMEOUT)
                    raise ChildError(f"{self.name} exited with code {code}:\n{self.tail()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ChildError(
                        f"{self.name} did not get ready within {timeout:.0f}s:\n{self.tail()}"
                    )
                self._cond.wait(min(remaining, 0.5))

    def tail(self, count: int = 20) -> str:
        return "\n".join(f"  {line}" for line in list(self.lines)[-count:])

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=STOP_TIMEOUT)
        self._reader.join(timeout=STOP_TIMEOUT)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


def start_service(*extra: str, port: int = 0, name: str = "") -> tuple[Child, int]:
    """A sample service (`extra`: its options, e.g. `--delay 0.02`) and the port it listens on."""
    args = [sys.executable, "-m", "balancer.tools.service", "-p", str(port), *extra]
    child = Child(name or f"service {port}", args)
    try:
        lines = child.wait_for(INSTANCE_RE)
    except BaseException:
        child.stop()
        raise
    port = next(int(m.group(2)) for m in map(INSTANCE_RE.search, lines) if m)
    return child, port


def write_config(path: Path, backend_ports: Sequence[int]) -> None:
    """One message service and the admin endpoint, both on free ports chosen at bind time."""
    backends = ", ".join(f'"127.0.0.1:{port}"' for port in backend_ports)
    path.write_text(
        "[admin]\n"
        'listen = "127.0.0.1:0"\n'
        "\n"
        "[services.demo]\n"
        'listen = "127.0.0.1:0"\n'
        'mode = "message"\n'
        'algorithm = "round_robin"\n'
        f"backends = [{backends}]\n",
        encoding="utf-8",
    )


def start_balancer(config: Path) -> tuple[Child, int, int]:
    """The balancer child, its service port and its admin port."""
    child = Child("balancer", [sys.executable, "-m", "balancer", "serve", str(config)])
    try:
        lines = child.wait_for(READY_RE)
        ports = [int(m.group(3)) for m in map(SERVICE_RE.search, lines) if m]
        admin = [int(m.group(2)) for m in map(ADMIN_RE.search, lines) if m]
        if not ports or not admin:
            raise ChildError(f"balancer did not report its listening ports:\n{child.tail()}")
    except BaseException:
        child.stop()
        raise
    return child, ports[0], admin[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--requests",
        type=int,
        default=1000,
        metavar="N",
        help="requests per client (default: 1000)",
    )
    parser.add_argument(
        "--clients", type=int, default=4, metavar="N", help="client connections (default: 4)"
    )
    parser.add_argument(
        "--pipeline",
        type=int,
        default=1,
        metavar="N",
        help="requests in flight per connection (default: 1)",
    )


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> int:
    if args.requests < 1 or args.clients < 1 or args.pipeline < 1:
        print("error: --requests, --clients and --pipeline must be >= 1", file=sys.stderr)
        return 2
    children: list[Child] = []
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        with tempfile.TemporaryDirectory(prefix="balancer-demo-") as tmp:
            ports: list[int] = []
            for i in range(BACKENDS):
                child, port = start_service(name=f"service {i + 1}")
                children.append(child)
                ports.append(port)
            config = Path(tmp) / "demo.toml"
            write_config(config, ports)
            balancer, port, admin_port = start_balancer(config)
            children.append(balancer)
            print(
                f"{BACKENDS} sample services on 127.0.0.1 ports {', '.join(map(str, ports))}; "
                f"balancer on 127.0.0.1:{port} (admin http://127.0.0.1:{admin_port}); "
                f"{args.clients} client(s) x {args.requests} requests, pipeline {args.pipeline}",
                flush=True,
            )
            client_parser = argparse.ArgumentParser(prog="balancer client")
            client.add_arguments(client_parser)
            client_args = client_parser.parse_args(
                [
                    "--requests_per_client",
                    str(args.requests),
                    "--client_count",
                    str(args.clients),
                    "--pipeline",
                    str(args.pipeline),
                    "--balancerIp",
                    "127.0.0.1",
                    "--balancerPort",
                    str(port),
                    "--admin",
                    f"127.0.0.1:{admin_port}",
                ]
            )
            return client.run(client_args)
    except ChildError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo interrupted", file=sys.stderr)
        return 130
    finally:
        for child in reversed(children):
            child.stop()
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="balancer demo",
        description="4 sample services, the balancer and the load client, with a report.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
