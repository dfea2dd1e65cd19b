"""`balancer status`: the services and backends of a running balancer, from its admin endpoint."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from balancer.tools.admin_http import TOKEN_ENV, AdminError, admin_token, admin_url, get_json

DEFAULT_ADMIN = "127.0.0.1:9100"
STATE_STYLES = {"up": "green", "down": "bold red", "ready": "green", "drain": "yellow"}


class AdminUnavailable(Exception):
    pass


def fetch(base: str, timeout: float = 3.0, token: str | None = None) -> dict[str, Any]:
    """The `/api/services` document (or `/status` from a balancer without the runtime API)."""
    last: str = ""
    for path in ("/api/services", "/status"):
        try:
            return get_json(base + path, token=token, timeout=timeout)
        except AdminError as exc:
            if exc.status is None:
                raise AdminUnavailable(f"the admin endpoint {base} does not answer: {exc}") from exc
            last = str(exc)
            if exc.status == 401:
                what = "refused the token" if token else "needs a token to read"
                raise AdminUnavailable(
                    f"the admin endpoint {base} {what} ({last}): pass --token or set {TOKEN_ENV}"
                ) from None
            if exc.status != 404:
                break
    raise AdminUnavailable(f"the admin endpoint {base} answered with an error: {last}")


def _age(value: object) -> str:
    return f"{value:.1f} s ago" if isinstance(value, int | float) else "never"


def _styled(text: str) -> Text:
    return Text(text, style=STATE_STYLES.get(text, "magenta"))


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{key} {n:,}" for key, n in counts.items()) or "none"


def http_line(http: dict[str, Any]) -> Text:
    """The counters of a service in http mode, on one line."""
    retries = http.get("retries", {})
    upstream = http.get("upstream_connections", {})
    parts = [
        f"{http.get('requests', 0):,} requests",
        f"responses {_counts(http.get('responses', {}))}",
        f"generated {_counts(http.get('generated', {}))}",
        f"retries {retries.get('backend', 0):,} to another backend, "
        f"{retries.get('keepalive_race', 0):,} keep-alive race",
        f"upstream {upstream.get('new', 0):,} new, {upstream.get('reused', 0):,} reused, "
        f"{http.get('idle_upstream_connections', 0):,} idle",
        f"{http.get('tunnels', 0):,} tunnels",
        f"{http.get('client_errors', 0):,} client errors",
        f"{http.get('bad_responses', 0):,} bad responses",
    ]
    return Text("http: " + " · ".join(parts))


def render(doc: dict[str, Any]) -> Group:
    tables: list[Table | Text] = []
    for name, svc in doc.get("services", {}).items():
        title = (
            f"{name}  {svc.get('listen', '')}  {svc.get('mode', '')} / {svc.get('algorithm', '')}"
        )
        if "rps" in svc:
            title += f"  {svc['rps']:.1f} req/s  p99 {svc.get('p99_ms', 0.0):.2f} ms"
        table = Table(title=title, title_justify="left")
        for column in ("service", "backend", "state", "admin state"):
            table.add_column(column)
        for column in ("weight", "in-flight", "requests", "failures"):
            table.add_column(column, justify="right")
        table.add_column("last check", justify="right")
        table.add_column("reason")
        for b in svc.get("backends", []):
            table.add_row(
                name,
                b["address"],
                _styled(b["state"]),
                _styled(b.get("admin_state", "ready")),
                str(b["weight"]),
                f"{b['in_flight']:,}",
                f"{b['requests']:,}",
                f"{b['failures']:,}",
                _age(b.get("last_check_age_s")),
                "" if b["state"] == "up" else str(b.get("reason") or ""),
            )
        tables.append(table)
        if isinstance(svc.get("http"), dict):
            tables.append(http_line(svc["http"]))
    return Group(*tables)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin",
        default=DEFAULT_ADMIN,
        metavar="HOST:PORT",
        help=f"the balancer's admin endpoint (default: {DEFAULT_ADMIN})",
    )
    parser.add_argument("--watch", action="store_true", help="refresh every second until Ctrl-C")
    parser.add_argument(
        "--count", type=int, default=None, metavar="N", help="with --watch: stop after N updates"
    )
    parser.add_argument(
        "--interval", type=float, default=1.0, metavar="SECONDS", help=argparse.SUPPRESS
    )
    parser.add_argument("--json", action="store_true", help="print the raw JSON document")
    parser.add_argument(
        "--token",
        default=None,
        help=f"bearer token, where reads need one (default: ${TOKEN_ENV})",
    )


def run(args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 1:
        print("error: --count must be >= 1", file=sys.stderr)
        return 2
    base = admin_url(args.admin)
    token = admin_token(args.token)
    console = Console(highlight=False)
    updates = args.count if args.watch else 1
    done = 0
    try:
        if args.watch and not args.json and console.is_terminal:
            return _live(console, base, args.interval, updates, token)
        while True:
            doc = fetch(base, token=token)
            if args.json:
                print(json.dumps(doc), flush=True)
            else:
                console.print(render(doc))
            done += 1
            if updates is not None and done >= updates:
                return 0
            time.sleep(args.interval)
    except AdminUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def _live(
    console: Console, base: str, interval: float, updates: int | None, token: str | None
) -> int:
    from rich.live import Live

    done = 0
    with Live(render(fetch(base, token=token)), console=console, auto_refresh=False) as live:
        done += 1
        with contextlib.suppress(KeyboardInterrupt):
            while updates is None or done < updates:
                time.sleep(interval)
                live.update(render(fetch(base, token=token)), refresh=True)
                done += 1
    return 0
