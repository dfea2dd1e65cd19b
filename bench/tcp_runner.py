"""Run one tcp-mode service in this process, on uvloop, with no admin or health checks.

    python bench/tcp_runner.py --listen 127.0.0.1:0 --backend 127.0.0.1:6379 [--backend ...]

Prints `service tcp listening on HOST:PORT (mode tcp, algorithm ALG)` then
`balancer ready` on stderr, and runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import sys

from balancer.config import BackendConfig, HealthConfig, ServiceConfig
from balancer.loops import loop_factory
from balancer.pool import BackendPool
from balancer.proxy.tcp import TcpService


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(args: argparse.Namespace) -> None:
    host, port = _hostport(args.listen)
    config = ServiceConfig(
        name="tcp",
        listen_host=host,
        listen_port=port,
        backends=tuple(BackendConfig(*_hostport(b)) for b in args.backend),
        mode="tcp",
        algorithm=args.algorithm,
        health=HealthConfig(enabled=False),
    )
    service = TcpService(config, BackendPool(config))
    bound_host, bound_port = await service.start()
    print(
        f"service tcp listening on {bound_host}:{bound_port} "
        f"(mode tcp, algorithm {args.algorithm})",
        file=sys.stderr,
    )
    print("balancer ready", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await service.drain(1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--backend", action="append", required=True)
    parser.add_argument("--algorithm", default="round_robin")
    args = parser.parse_args()
    raise_nofile()
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
