"""The tutorial's balancer: `python server.py -p 8080 -refreshRate 60`.

Reads config.txt (or config.json) from the working directory, balances
round-robin over the healthy services, checks them every `refreshRate`
seconds (one failed check drops a service, one good check takes it back)
and prints every forwarded request to stdout.
"""

from __future__ import annotations

import signal

# First of all: a Ctrl-C while the modules load ends the process quietly, by the signal.
signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from balancer.admin.security import check_admin_security  # noqa: E402
from balancer.cli import run_server  # noqa: E402
from balancer.config.errors import ConfigError  # noqa: E402
from balancer.config.load import load_config  # noqa: E402
from balancer.config.model import AdminConfig, Config, check_bound, parse_admin  # noqa: E402
from balancer.observe.logs import setup_logging  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Round-robin load balancer (tutorial entry point)")
    parser.add_argument("-p", type=int, default=8080, help="port to listen on (default 8080)")
    parser.add_argument(
        "-refreshRate",
        type=float,
        default=10.0,
        help="seconds between health checks of the services (default 10)",
    )
    parser.add_argument(
        "-config", default=None, help="config file (default config.txt, else config.json)"
    )
    parser.add_argument("-admin", default=None, help="admin endpoint HOST:PORT or off")
    args = parser.parse_args(argv)
    setup_logging()
    log = logging.getLogger("balancer")
    path = args.config
    if path is None:
        path = (
            "config.txt"
            if os.path.exists("config.txt") or not os.path.exists("config.json")
            else "config.json"
        )
    admin: AdminConfig | None = None
    try:
        rate = args.refreshRate
        check_bound("health.interval", rate, source="command line", where="-refreshRate")
        if args.admin is not None:
            admin = parse_admin(args.admin, where="-admin", source="command line")
    except ConfigError as exc:
        log.error("invalid command line: %s", exc)
        return 2

    def read() -> Config:
        """The config file, with the tutorial's health settings and the access log on."""
        config = load_config(path, default_listen=f"localhost:{args.p}", admin_listen=admin)
        services = tuple(
            dataclasses.replace(
                s,
                health=dataclasses.replace(s.health, interval=args.refreshRate, rise=1, fall=1),
            )
            for s in config.services
        )
        return dataclasses.replace(config, services=services, access_log=True)

    try:
        config = read()
        check_admin_security(config.admin)
    except ConfigError as exc:
        log.error("invalid configuration: %s", exc)
        return 2
    return run_server(config, read)


if __name__ == "__main__":
    sys.exit(main())
