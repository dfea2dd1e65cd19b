"""`balancer status`: the services and backends of a running balancer, from its admin endpoint."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

DEFAULT_ADMIN = "127.0.0.1:9100"
TOKEN_ENV = "BALANCER_ADMIN_TOKEN"
STATE_STYLES = {"up": "green", "down": "bold red", "ready": "green", "drain": "yellow"}


class AdminUnavailable(Exception):
    pass


def admin_url(admin: str) -> str:
    admin = admin.strip()
    if admin.startswith(("http://", "https://")):
        return admin.rstrip("/")
    if admin.isdigit():
        admin = f"127.0.0.1:{admin}"
    return f"http://{admin}"


def _error_of(exc: urllib.error.HTTPError) -> str:
    try:
        message = json.loads(exc.read())["error"]
    except (OSError, ValueError, KeyError, TypeError):
        return str(exc)
    return f"{exc.code} {message}"


def fetch(base: str, timeout: float = 3.0, token: str | None = None) -> dict[str, Any]:
    """The `/api/services` document (or `/status` from a balancer without the runtime API)."""
    last: str = ""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    for path in ("/api/services", "/status"):
        try:
            request = urllib.request.Request(base + path, headers=headers)
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                doc: dict[str, Any] = json.loads(resp.read())
                return doc
        except urllib.error.HTTPError as exc:
            last = _error_of(exc)
            if exc.code == 401:
                what = "refused the token" if token else "needs a token to read"
                raise AdminUnavailable(
                    f"the admin endpoint {base} {what} ({last}): pass --token or set {TOKEN_ENV}"
                ) from None
            if exc.code != 404:
                break
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise AdminUnavailable(f"the admin endpoint {base} does not answer: {reason}") from exc
    raise AdminUnavailable(f"the admin endpoint {base} answered with an error: {last}")


def _age(value: object) -> str:
    return f"{value:.1f} s ago" if isinstance(value, int | float) else "never"


def _styled(text: str) -> Text:
    return Text(text, style=STATE_STYLES.get(text, "magenta"))


def render(doc: dict[str, Any]) -> Group:
    tables: list[Table] = []
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
    token = args.token or os.environ.get(TOKEN_ENV) or None
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
