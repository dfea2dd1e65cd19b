"""A load run with its report: the spread over the backends read from the balancer's admin
endpoint (`GET /status`) before and after (an absent admin is fine), a progress bar, the
summary table and the HTML report."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

from balancer.tools.admin_http import AdminError, admin_token, admin_url, get_json
from balancer.tools.client import fast
from balancer.tools.client.load import ERROR_KINDS, LoadRun, LoadSettings, LoadStats
from balancer.tools.report import RateSampler, client_report_data, write_html_report


async def fetch_status(admin: str, patience: float = 1.0) -> dict[str, Any] | None:
    """GET /status from the admin endpoint ADMIN; None when it does not answer with JSON.

    Sends `Authorization: Bearer $BALANCER_ADMIN_TOKEN` when that is set (an admin
    endpoint whose reads need a token).
    """
    url = admin_url(admin) + "/status"
    try:
        async with asyncio.timeout(patience):
            return await asyncio.to_thread(get_json, url, token=admin_token(), timeout=patience)
    except (AdminError, TimeoutError):
        return None


def backend_counts(status: dict[str, Any] | None, port: int) -> dict[str, int] | None:
    """Requests per backend address of the service listening on `port` (or the only one)."""
    if status is None:
        return None
    services = status.get("services")
    if not isinstance(services, dict) or not services:
        return None
    chosen: Any = None
    for svc in services.values():
        if isinstance(svc, dict) and str(svc.get("listen", "")).rpartition(":")[2] == str(port):
            chosen = svc
            break
    if chosen is None:
        if len(services) != 1:
            return None
        chosen = next(iter(services.values()))
    backends = chosen.get("backends") if isinstance(chosen, dict) else None
    if not isinstance(backends, list):
        return None
    counts: dict[str, int] = {}
    for b in backends:
        if isinstance(b, dict) and "address" in b:
            counts[str(b["address"])] = int(b.get("requests", 0))
    return counts


def spread(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, int] | None:
    if before is None or after is None:
        return None
    return {addr: n - before.get(addr, 0) for addr, n in after.items()}


# -- report -----------------------------------------------------------------------------------


def build_report(
    stats: LoadStats, elapsed: float, backends: dict[str, int] | None
) -> dict[str, Any]:
    h = stats.histogram
    count = h.get_total_count()

    def ms(us: float) -> float:
        return round(us / 1000.0, 3) if count else 0.0

    report: dict[str, Any] = {
        "requests": stats.requests,
        "ok": stats.ok,
        "errors": dict(stats.errors),
        "error_total": stats.error_total,
        "elapsed_s": round(elapsed, 6),
        "throughput_rps": round(stats.ok / elapsed, 1) if elapsed > 0 else 0.0,
        "latency_ms": {
            "p50": ms(h.get_value_at_percentile(50)),
            "p90": ms(h.get_value_at_percentile(90)),
            "p99": ms(h.get_value_at_percentile(99)),
            "p999": ms(h.get_value_at_percentile(99.9)),
            "max": ms(h.get_max_value()),
        },
    }
    if backends is not None:
        report["backends"] = backends
    return report


def print_report(report: dict[str, Any], file: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout, highlight=False)
    table = Table(title="Load client summary", show_header=False, title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    table.add_row("requests", f"{report['requests']:,}")
    table.add_row("ok", f"{report['ok']:,}")
    errors = report["errors"]
    table.add_row("errors", f"{report['error_total']:,}")
    for kind in ERROR_KINDS:
        if errors.get(kind):
            table.add_row(f"  {kind}", f"{errors[kind]:,}", style="red")
    table.add_row("elapsed", f"{report['elapsed_s']:.3f} s")
    table.add_row("throughput", f"{report['throughput_rps']:,.1f} req/s")
    lat = report["latency_ms"]
    for key, label in (("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("p999", "p99.9")):
        table.add_row(f"latency {label}", f"{lat[key]:.3f} ms")
    table.add_row("latency max", f"{lat['max']:.3f} ms")
    console.print(table)
    backends: dict[str, int] | None = report.get("backends")
    if backends:
        total = sum(backends.values())
        spread_table = Table(title="Spread over backends", title_justify="left")
        spread_table.add_column("backend")
        spread_table.add_column("requests", justify="right")
        spread_table.add_column("share", justify="right")
        for addr, n in backends.items():
            share = f"{100.0 * n / total:.1f} %" if total else "-"
            spread_table.add_row(addr, f"{n:,}", share)
        console.print(spread_table)


async def _progress(load: LoadRun) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    duration = load.settings.duration
    total = load.total
    with Progress(
        TextColumn("[bold]load"),
        BarColumn(),
        TextColumn("{task.fields[done]:>10,} done  {task.fields[errors]:>6,} errors"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task("load", total=duration if duration else total, done=0, errors=0)
        while True:
            stats = load.stats
            completed = time.perf_counter() - load.started if duration else stats.done
            progress.update(task, completed=completed, done=stats.done, errors=stats.error_total)
            await asyncio.sleep(0.1)


async def run_load(
    settings: LoadSettings, admin: str | None, *, progress: bool, report_path: str | None
) -> dict[str, Any]:
    """Run the load; its report (`admin`: HOST:PORT to read the spread from, or None)."""
    before = None
    if admin is not None:
        before = backend_counts(await fetch_status(admin), settings.port)
    cpu_before = _cpu_seconds()
    html: Callable[[dict[str, Any]], None] | None = None
    if use_compiled(settings, report_path):
        report = await asyncio.to_thread(fast.run, settings, settings.size)
        report["engine"] = "compiled"
    else:
        report, html = await _python_run(settings, progress, report_path)
        report["engine"] = "python"
    report["client_cpu_s"] = round(_cpu_seconds() - cpu_before, 3)
    after = None
    if admin is not None and before is not None:
        after = backend_counts(await fetch_status(admin), settings.port)
    counts = spread(before, after)
    if counts is not None:
        report["backends"] = counts
    if html is not None:
        html(report)
    return report


def use_compiled(settings: LoadSettings, report_path: str | None) -> bool:
    """Whether the run goes to the compiled engine (`settings.engine`, `auto` resolved)."""
    if settings.engine == "python":
        return False
    if settings.engine == "compiled":
        return True
    return fast.available() and fast.covers(settings) and report_path is None


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _python_run(
    settings: LoadSettings, progress: bool, report_path: str | None
) -> tuple[dict[str, Any], Callable[[dict[str, Any]], None] | None]:
    """The Python engine's run: its report, and what writes the HTML report (or None)."""
    load = LoadRun(settings)
    bar = asyncio.create_task(_progress(load)) if progress else None
    sampler = None
    if report_path is not None:
        sampler = RateSampler(lambda: load.stats.ok)
        sampler.start()
    throughput: list[tuple[float, float]] = []
    try:
        stats = await load.run()
    finally:
        if bar is not None:
            bar.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await bar
        if sampler is not None:
            throughput = await sampler.stop()
    report = build_report(stats, load.finished - load.started, None)
    if report_path is None:
        return report, None
    path = report_path

    def html(final: dict[str, Any]) -> None:
        try:
            write_html_report(path, client_report_data(final, stats.histogram, throughput))
        except OSError as exc:
            print(f"cannot write the HTML report {path}: {exc}", file=sys.stderr)

    return report, html
