"""The tutorial's scenario on built-in defaults.

Starts 4 sample services, a balancer in front of them (message mode, round
robin, admin endpoint on), runs the load client against the balancer in this
process and prints its report with the spread over the backends. Every child
is stopped on the way out, whatever happens.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from balancer.tools.client import cli as client
from balancer.tools.procs import (
    ChildError,
    ChildProcess,
    ready_balancer_ports,
    ready_service_port,
)

BACKENDS = 4
KEEP_LINES = 200
"""Output lines kept of each child, for the error message when one fails."""
STOP_TIMEOUT = 10.0


def start_service(*extra: str, port: int = 0, name: str = "") -> tuple[ChildProcess, int]:
    """A sample service (`extra`: its options, e.g. `--delay 0.02`) and the port it listens on."""
    args = [sys.executable, "-m", "balancer.tools.service", "-p", str(port), *extra]
    child = ChildProcess(args, name=name or f"service {port}", max_lines=KEEP_LINES)
    try:
        port = ready_service_port(child)
    except BaseException:
        child.stop(timeout=STOP_TIMEOUT)
        raise
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


def start_balancer(config: Path) -> tuple[ChildProcess, int, int]:
    """The balancer child, its service port and its admin port."""
    args = [sys.executable, "-m", "balancer", "serve", str(config)]
    child = ChildProcess(args, name="balancer", max_lines=KEEP_LINES)
    try:
        ports, admin = ready_balancer_ports(child)
        if not ports or admin is None:
            raise ChildError(f"balancer did not report its listening ports:\n{child.tail()}")
    except BaseException:
        child.stop(timeout=STOP_TIMEOUT)
        raise
    return child, next(iter(ports.values())), admin


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
    children: list[ChildProcess] = []
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
            child.stop(timeout=STOP_TIMEOUT)
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
