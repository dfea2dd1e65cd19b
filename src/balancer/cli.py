"""Command line: builds a Config (or hands off to the service/client tools), nothing else."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from balancer import __version__
from balancer.config.addresses import parse_address
from balancer.config.errors import ConfigError
from balancer.config.load import load_config
from balancer.config.model import Config, check_bound, parse_admin

log = logging.getLogger("balancer")

DEFAULT_CONFIG_FILES = ("balancer.toml", "config.toml", "config.txt", "config.json")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config_file", nargs="?", metavar="CONFIG", help="config file")
    parser.add_argument(
        "--config",
        dest="config_opt",
        metavar="FILE",
        help="config file: .toml, .json, or the tutorial's config.txt "
        f"(default: the first of {', '.join(DEFAULT_CONFIG_FILES)} found here)",
    )
    parser.add_argument(
        "-p", "--port", type=int, help="listen port of the service (a single-service config)"
    )
    parser.add_argument("--listen", metavar="HOST:PORT", help="listen address (single service)")
    parser.add_argument("--admin", metavar="HOST:PORT|off", help="admin endpoint address, or 'off'")
    parser.add_argument(
        "--access-log", action="store_true", help="log every request to stdout (buffered)"
    )
    parser.add_argument(
        "--refresh-rate",
        type=float,
        metavar="SECONDS",
        help="health check interval for every service",
    )
    parser.add_argument("--rise", type=int, help="good checks before a backend rejoins")
    parser.add_argument("--fall", type=int, help="failed checks before a backend is dropped")
    parser.add_argument("--drain-timeout", type=float, metavar="SECONDS")
    parser.add_argument(
        "--handover-socket",
        metavar="PATH",
        help="once ready, listen on this Unix socket (mode 0600) for a new balancer to take "
        "the listening sockets over (--takeover PATH); removed at exit",
    )
    takeover = parser.add_mutually_exclusive_group()
    takeover.add_argument(
        "--takeover",
        metavar="PATH",
        help="start on the listening sockets of the balancer whose --handover-socket is PATH; "
        "it drains and exits once this one serves (a restart that drops nothing)",
    )
    takeover.add_argument(
        "--takeover-if-running",
        metavar="PATH",
        help="as --takeover when a balancer answers on PATH, else start afresh",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="worker processes serving the same listeners, 1..64 (default: the file's "
        "`workers`, else 1: one process)",
    )
    parser.add_argument(
        "--worker-sockets",
        default="shared",
        choices=["shared", "reuseport"],
        help="with --workers: one listening socket all workers accept on (shared), or one "
        "per worker in a SO_REUSEPORT group (default: shared)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="log lines (and the access log) as text or as JSON objects (default: text)",
    )


def _bounded(value: float | int | None, key: str, option: str) -> None:
    """A command-line number within the bounds of the config key it stands for."""
    if value is not None:
        check_bound(key, value, source="command line", where=option)


def build_config(args: argparse.Namespace) -> Config:
    """The Config a `serve` command line asks for."""
    path = args.config_opt or args.config_file
    if path is None:
        for candidate in DEFAULT_CONFIG_FILES:
            if os.path.exists(candidate):
                path = candidate
                break
        else:
            raise ConfigError(
                "command line",
                "",
                f"no config file given and none of {', '.join(DEFAULT_CONFIG_FILES)} "
                "found in the working directory",
            )
    default_listen = "localhost:8080"
    if args.port is not None:
        default_listen = f"localhost:{args.port}"
    _bounded(args.refresh_rate, "health.interval", "--refresh-rate")
    _bounded(args.rise, "health.rise", "--rise")
    _bounded(args.fall, "health.fall", "--fall")
    _bounded(args.drain_timeout, "drain_timeout", "--drain-timeout")
    admin_listen = None
    if args.admin is not None:
        admin_listen = parse_admin(args.admin, where="--admin", source="command line")
    # the file's checks across listeners judge the admin listener the command line asks for
    config = load_config(path, default_listen=default_listen, admin_listen=admin_listen)
    services = list(config.services)
    if args.port is not None or args.listen is not None:
        if len(services) != 1:
            raise ConfigError(
                "command line",
                "--port/--listen",
                f"the config has {len(services)} services; set each one's listen in the file",
            )
        svc = services[0]
        host, port = svc.listen_host, svc.listen_port
        if args.listen is not None:
            host, port = parse_address(
                args.listen, where="--listen", source="command line", allow_port_zero=True
            )
        if args.port is not None:
            if not 0 <= args.port <= 65535:
                raise ConfigError(
                    "command line", "--port", f"expected a port 0..65535, got {args.port}"
                )
            port = args.port
        services[0] = dataclasses.replace(svc, listen_host=host, listen_port=port)
    health_changes: dict[str, object] = {}
    if args.refresh_rate is not None:
        health_changes["interval"] = args.refresh_rate
    if args.rise is not None:
        health_changes["rise"] = args.rise
    if args.fall is not None:
        health_changes["fall"] = args.fall
    if health_changes:
        services = [
            dataclasses.replace(s, health=dataclasses.replace(s.health, **health_changes))  # type: ignore[arg-type]
            for s in services
        ]
    changes: dict[str, object] = {"services": tuple(services)}
    if args.access_log:
        changes["access_log"] = True
    if args.drain_timeout is not None:
        changes["drain_timeout"] = args.drain_timeout
    return dataclasses.replace(config, **changes)  # type: ignore[arg-type]


def check_workers(args: argparse.Namespace, config: Config) -> int:
    """The worker processes to run: `--workers N` (1..64), else the file's `workers`; not
    over 1 with a hand-over (each worker would need its own)."""
    from balancer.runtime.workers import MAX_WORKERS

    if args.workers is not None and not 1 <= args.workers <= MAX_WORKERS:
        raise ConfigError(
            "command line", "--workers", f"expected 1..{MAX_WORKERS} processes, got {args.workers}"
        )
    workers: int = args.workers if args.workers is not None else config.workers
    restart = args.handover_socket or args.takeover or args.takeover_if_running
    if workers > 1 and restart:
        where = (
            ("command line", "--workers")
            if args.workers is not None
            else (config.source, "workers")
        )
        raise ConfigError(
            *where,
            "--handover-socket and --takeover serve one process: not with --workers over 1",
        )
    return workers


def run_server(
    config: Config,
    reader: Callable[[], Config] | None = None,
    args: argparse.Namespace | None = None,
) -> int:
    """Serve `config` until stopped (see `balancer.app.run`), with the restart options
    of a `serve` command line; the exit code."""
    from balancer.app import run, run_supervisor, run_worker
    from balancer.runtime.workers import WorkerSpec

    if args is None:
        return run(config, reader)
    spec = WorkerSpec.from_env()
    if spec is not None:
        return run_worker(config, reader, spec)
    if args.workers > 1:
        argv = [sys.executable, "-m", "balancer", *getattr(args, "argv", sys.argv[1:])]
        return run_supervisor(config, reader, args.workers, argv, args.worker_sockets)
    return run(
        config,
        reader,
        handover=args.handover_socket,
        takeover=args.takeover or args.takeover_if_running,
        takeover_if_running=args.takeover_if_running is not None,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from balancer.admin.security import check_admin_security
    from balancer.observe.logs import setup_logging

    setup_logging(args.log_level, args.log_format)
    try:
        config = build_config(args)
        args.workers = check_workers(args, config)
        check_admin_security(config.admin)
    except ConfigError as exc:
        log.error("invalid configuration: %s", exc)
        return 2
    return run_server(config, lambda: build_config(args), args)


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    for svc in config.services:
        print(
            f"service {svc.name}: listen {svc.listen}, mode {svc.mode}, algorithm "
            f"{svc.algorithm}, {len(svc.backends)} backend(s): "
            + ", ".join(b.address for b in svc.backends)
        )
    print(f"{args.file}: OK")
    return 0


class VersionAction(argparse.Action):
    """`--version`: the version, and which implementation of the hot path runs."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        from balancer.app import runtime_summary

        print(f"balancer {__version__}: {runtime_summary()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="balancer", description="A fast, fault-tolerant TCP load balancer."
    )
    parser.add_argument(
        "--version", action=VersionAction, help="show the version and what runs the hot path"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the balancer")
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(func=cmd_check_config)

    # the tools are imported here so that `serve` does not load them
    from balancer.tools import demo, service, status
    from balancer.tools.client import cli as client

    svc = sub.add_parser("service", help="run the sample backend service")
    service.add_arguments(svc)
    svc.set_defaults(func=service.run)

    cli = sub.add_parser("client", help="run the load-generating client")
    client.add_arguments(cli)
    cli.set_defaults(func=client.run)

    st = sub.add_parser("status", help="show a running balancer's services and backends")
    status.add_arguments(st)
    st.set_defaults(func=status.run)

    dem = sub.add_parser(
        "demo", help="the tutorial's scenario: 4 services, the balancer, the client, a report"
    )
    demo.add_arguments(dem)
    dem.set_defaults(func=demo.run)
    return parser


def quiet_interrupts() -> None:
    """Until the event loop takes SIGINT over, a Ctrl-C ends the process by the signal,
    without a traceback (imports, reading a large config)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_DFL)


def main(argv: Sequence[str] | None = None) -> int:
    quiet_interrupts()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        args.argv = list(argv) if argv is not None else sys.argv[1:]
        if args.func is not cmd_serve and threading.current_thread() is threading.main_thread():
            # the tools clean up on KeyboardInterrupt (the demo stops its children)
            signal.signal(signal.SIGINT, signal.default_int_handler)
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
