"""`balancer client` and the tutorial's `python client.py`: the command line of the load client."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from balancer.net.loops import loop_factory
from balancer.tools.client import fast
from balancer.tools.client.load import LoadSettings
from balancer.tools.client.run import print_report, run_load

MAX_SIZE = 1 << 20
"""The longest request --size makes (the sample service's longest line by default)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--requests_per_client",
        type=int,
        default=1000,
        metavar="N",
        help="requests each client sends (default: 1000)",
    )
    parser.add_argument(
        "--client_count", type=int, default=1, metavar="N", help="connections (default: 1)"
    )
    parser.add_argument(
        "--balancerPort", type=int, default=8080, metavar="PORT", help="default: 8080"
    )
    parser.add_argument(
        "--balancerIp", default="localhost", metavar="HOST", help="default: localhost"
    )
    parser.add_argument(
        "--pipeline",
        type=int,
        default=1,
        metavar="N",
        help="requests in flight per connection (default: 1, lockstep)",
    )
    parser.add_argument(
        "--raw",
        action="store_true",
        help="the tutorial's original framing: messages unterminated, one read per reply "
        "(lockstep: --pipeline 1 only)",
    )
    parser.add_argument(
        "--size",
        type=int,
        default=0,
        metavar="DIGITS",
        help="pad each request (a counter) with zeros to this many digits (default: 0, unpadded)",
    )
    parser.add_argument(
        "--engine",
        choices=("auto", "python", "compiled"),
        default="auto",
        help="compiled: the C engine (epoll, one thread) for closed-loop line loads; "
        "auto (default): compiled when it is built and the run needs neither --raw, --rate "
        "nor --report",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="SECONDS",
        help="send until this time is up instead of a fixed count",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        metavar="R",
        help="open loop: R requests/s in total; latency counts from the scheduled send time",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="a reply later than this is a timeout error (default: 5)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the report as one JSON object on the last line of stdout "
        "(the table then goes to stderr unless --quiet)",
    )
    parser.add_argument(
        "--admin",
        default="127.0.0.1:9100",
        metavar="HOST:PORT",
        help="balancer admin endpoint for the spread over backends, or 'off'",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--report",
        metavar="FILE.html",
        default=None,
        help="also write a self-contained HTML report (latency percentiles, throughput, spread)",
    )


def settings_from_args(args: argparse.Namespace) -> LoadSettings:
    checks = (
        (args.requests_per_client >= 0, "--requests_per_client must be >= 0"),
        (args.client_count >= 1, "--client_count must be >= 1"),
        (0 < args.balancerPort < 65536, "--balancerPort must be 1..65535"),
        (args.pipeline >= 1, "--pipeline must be >= 1"),
        (
            not args.raw or args.pipeline == 1,
            "--raw sends one message at a time and reads one reply: --pipeline must be 1",
        ),
        (args.duration is None or args.duration > 0, "--duration must be > 0"),
        (args.rate is None or args.rate > 0, "--rate must be > 0"),
        (args.timeout > 0, "--timeout must be > 0"),
        (0 <= args.size <= MAX_SIZE, f"--size must be 0..{MAX_SIZE}"),
        (
            args.engine != "compiled" or not (args.raw or args.rate is not None or args.report),
            "--engine compiled runs closed-loop line loads: no --raw, --rate or --report",
        ),
        (
            args.engine != "compiled" or fast.available(),
            "--engine compiled: the compiled engine is not built "
            "(or BALANCER_NO_EXTENSIONS is set)",
        ),
    )
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    return LoadSettings(
        host=args.balancerIp,
        port=args.balancerPort,
        clients=args.client_count,
        requests_per_client=args.requests_per_client,
        pipeline=args.pipeline,
        duration=args.duration,
        rate=args.rate,
        timeout=args.timeout,
        raw=args.raw,
        size=args.size,
        engine=args.engine,
    )


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    admin: str | None = None if args.admin == "off" else args.admin
    progress = not args.quiet and sys.stderr.isatty()
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        report = runner.run(run_load(settings, admin, progress=progress, report_path=args.report))
    if args.json:
        if not args.quiet:
            print_report(report, file=sys.stderr)
        print(json.dumps(report), flush=True)
    else:
        print_report(report)
    return 0 if report["error_total"] == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="balancer client", description="Load client for a message-mode balancer."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
