"""Self-contained HTML reports of a load run: inline SVG charts and tables, no external assets.

`write_html_report(path, data)` takes a mapping with any of these keys:

- `title` (str) and `summary` (label -> value, shown as a table first);
- `percentiles`: (percentile, latency_ms) points, e.g. from `percentile_points(hdr)`,
  drawn as an HdrHistogram percentile distribution (x axis 1/(1-p), log scale);
- `throughput`: (seconds since start, requests/s) points, drawn as a line;
- `backends`: backend address -> requests, drawn as bars with shares;
- `comparisons`: tables of rows with `name`, `rps`, `p50`, `p99`, `ratio` (bench harness);
  each is `{"title": str, "rows": [...]}`.
"""

from __future__ import annotations

import asyncio
import html
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypedDict

PERCENTILES: tuple[float, ...] = (
    0.0,
    10.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    70.0,
    75.0,
    80.0,
    85.0,
    90.0,
    92.5,
    95.0,
    97.5,
    99.0,
    99.5,
    99.9,
    99.95,
    99.99,
    99.999,
    100.0,
)

WIDTH = 720
HEIGHT = 300
MARGIN = (48, 16, 20, 40)  # left, right, top, bottom
INK = "#1d2330"
MUTED = "#6b7280"
GRID = "#e3e6eb"
ACCENT = "#2563eb"


class ComparisonTable(TypedDict):
    title: str
    rows: list[dict[str, Any]]


class ReportData(TypedDict, total=False):
    title: str
    summary: Mapping[str, object]
    percentiles: Sequence[tuple[float, float]]
    throughput: Sequence[tuple[float, float]]
    backends: Mapping[str, int]
    comparisons: Sequence[ComparisonTable]


class PercentileSource(Protocol):
    def get_total_count(self) -> int: ...

    def get_value_at_percentile(self, percentile: float) -> int: ...


def percentile_points(
    histogram: PercentileSource, *, unit_per_ms: float = 1000.0
) -> list[tuple[float, float]]:
    """(percentile, latency in ms) from an HdrHistogram recording in 1/`unit_per_ms` ms units."""
    if histogram.get_total_count() == 0:
        return []
    return [(p, round(histogram.get_value_at_percentile(p) / unit_per_ms, 3)) for p in PERCENTILES]


class RateSampler:
    """Samples a growing counter every `interval` seconds into (t, rate) points."""

    def __init__(self, count: Callable[[], int], interval: float = 1.0) -> None:
        self.count = count
        self.interval = interval
        self.points: list[tuple[float, float]] = []
        self._task: asyncio.Task[None] | None = None
        self._started = 0.0
        self._last = (0.0, 0)

    def start(self) -> None:
        self._started = time.perf_counter()
        self._last = (self._started, self.count())
        self._task = asyncio.create_task(self._run())

    def _take(self) -> None:
        now, n = time.perf_counter(), self.count()
        then, before = self._last
        if now > then:
            self.points.append(
                (round(now - self._started, 3), round((n - before) / (now - then), 1))
            )
        self._last = (now, n)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self._take()

    async def stop(self) -> list[tuple[float, float]]:
        """Stop sampling; the last partial interval counts when it is long enough to mean much."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
            if time.perf_counter() - self._last[0] >= self.interval / 4 or not self.points:
                self._take()
        return self.points


# -- SVG --------------------------------------------------------------------------------------


def _num(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    exp = 10.0 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exp:
            return step * exp
    return 10 * exp


def _svg(body: Iterable[str], label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'role="img" aria-label="{html.escape(label)}" class="chart">' + "".join(body) + "</svg>"
    )


def _axes(
    y_max: float, y_label: str, x_ticks: Sequence[tuple[float, str]], x_of: Callable[[float], float]
) -> list[str]:
    left, right, top, bottom = MARGIN
    out: list[str] = []
    for i in range(5):
        v = y_max * i / 4
        y = top + (HEIGHT - top - bottom) * (1 - i / 4)
        out.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{WIDTH - right}" y2="{y:.1f}" stroke="{GRID}"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_num(v)}</text>'
        )
    for xv, text in x_ticks:
        x = x_of(xv)
        out.append(
            f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{HEIGHT - bottom}" stroke="{GRID}"/>'
            f'<text x="{x:.1f}" y="{HEIGHT - bottom + 16}" text-anchor="middle">'
            f"{html.escape(text)}</text>"
        )
    out.append(
        f'<text x="{left}" y="{top - 6}" fill="{MUTED}">{html.escape(y_label)}</text>'
        if top > 6
        else f'<text x="{left + 6}" y="{top + 12}" fill="{MUTED}">{html.escape(y_label)}</text>'
    )
    return out


def _polyline(points: Sequence[tuple[float, float]]) -> str:
    coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    return f'<polyline points="{coords}" fill="none" stroke="{ACCENT}" stroke-width="2"/>'


def percentile_svg(points: Sequence[tuple[float, float]]) -> str:
    """Latency by percentile, x = log10(1 / (1 - p)) as in HdrHistogram's plots."""
    left, right, top, bottom = MARGIN
    finite = [(p, ms) for p, ms in points if p < 100.0]
    max_x = max((math.log10(100.0 / (100.0 - p)) for p, _ in finite), default=1.0)
    max_x = max(math.ceil(max_x), 1)
    y_max = _nice_max(max((ms for _, ms in points), default=0.0))

    def x_of(xv: float) -> float:
        return left + (WIDTH - left - right) * xv / max_x

    def y_of(ms: float) -> float:
        return top + (HEIGHT - top - bottom) * (1 - ms / y_max)

    labels = ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%", "99.9999%"]
    ticks = [(float(i), labels[i] if i < len(labels) else f"{i} nines") for i in range(max_x + 1)]
    body = _axes(y_max, "latency (ms)", ticks, x_of)
    line = [(x_of(math.log10(100.0 / (100.0 - p))), y_of(ms)) for p, ms in finite]
    body.append(_polyline(line))
    for (p, ms), (x, y) in zip(finite, line, strict=True):
        body.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{ACCENT}">'
            f"<title>p{p:g}: {ms:g} ms</title></circle>"
        )
    return _svg(body, "latency by percentile")


def throughput_svg(points: Sequence[tuple[float, float]]) -> str:
    left, right, top, bottom = MARGIN
    t_max = max((t for t, _ in points), default=1.0) or 1.0
    y_max = _nice_max(max((r for _, r in points), default=0.0))

    def x_of(t: float) -> float:
        return left + (WIDTH - left - right) * t / t_max

    def y_of(r: float) -> float:
        return top + (HEIGHT - top - bottom) * (1 - r / y_max)

    ticks = [(t_max * i / 4, f"{t_max * i / 4:.1f} s") for i in range(5)]
    body = _axes(y_max, "requests/s", ticks, x_of)
    body.append(_polyline([(x_of(t), y_of(r)) for t, r in points]))
    return _svg(body, "throughput over time")


def backends_svg(counts: Mapping[str, int]) -> str:
    total = sum(counts.values()) or 1
    peak = max(counts.values(), default=0) or 1
    row = 26
    height = 12 + row * len(counts)
    label_w = 190
    bar_w = WIDTH - label_w - 110
    body: list[str] = []
    for i, (addr, n) in enumerate(counts.items()):
        y = 8 + i * row
        w = bar_w * n / peak
        body.append(
            f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end">{html.escape(addr)}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row - 8}" fill="{ACCENT}">'
            f"<title>{html.escape(addr)}: {n:,}</title></rect>"
            f'<text x="{label_w + w + 6:.1f}" y="{y + 15}">{n:,} ({100 * n / total:.1f} %)</text>'
        )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" role="img" '
        f'aria-label="spread over backends" class="chart">' + "".join(body) + "</svg>"
    )


# -- HTML -------------------------------------------------------------------------------------

STYLE = f"""
body {{ font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: {INK};
       max-width: 780px; margin: 2rem auto; padding: 0 1rem; }}
h1 {{ font-size: 1.4rem; }} h2 {{ font-size: 1.1rem; margin-top: 2rem; }}
table {{ border-collapse: collapse; font-variant-numeric: tabular-nums; margin: .5rem 0; }}
th, td {{ padding: .25rem .8rem; border-bottom: 1px solid {GRID}; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
th {{ color: {MUTED}; font-size: .8rem; text-transform: uppercase; }}
svg.chart {{ width: 100%; height: auto; font-size: 11px; fill: {INK}; }}
footer {{ color: {MUTED}; font-size: .8rem; margin-top: 2rem; }}
"""


def _cell(value: object) -> str:
    if isinstance(value, float):
        return html.escape(_num(value))
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return html.escape("" if value is None else str(value))


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(data: ReportData | Mapping[str, Any]) -> str:
    title = str(data.get("title") or "Load report")
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    summary = data.get("summary")
    if summary:
        parts.append(_table(("metric", "value"), summary.items()))
    percentiles = data.get("percentiles")
    if percentiles:
        parts.append("<h2>Latency by percentile</h2>")
        parts.append(percentile_svg(percentiles))
        parts.append(
            _table(
                ("percentile", "latency (ms)"), ((f"{p:g}%", float(ms)) for p, ms in percentiles)
            )
        )
    throughput = data.get("throughput")
    if throughput:
        parts.append("<h2>Throughput over time</h2>")
        parts.append(throughput_svg(throughput))
        parts.append(
            _table(("time (s)", "requests/s"), ((f"{t:g}", float(r)) for t, r in throughput))
        )
    backends = data.get("backends")
    if backends:
        total = sum(backends.values())
        parts.append("<h2>Spread over backends</h2>")
        parts.append(backends_svg(backends))
        parts.append(
            _table(
                ("backend", "requests", "share"),
                (
                    (addr, n, f"{100 * n / total:.1f} %" if total else "-")
                    for addr, n in backends.items()
                ),
            )
        )
    for comparison in data.get("comparisons") or ():
        parts.append(f"<h2>{html.escape(str(comparison.get('title', 'Comparison')))}</h2>")
        columns = ("name", "rps", "p50", "p99", "ratio")
        header = ("name", "requests/s", "p50 (ms)", "p99 (ms)", "ratio")
        parts.append(_table(header, ([r.get(c) for c in columns] for r in comparison["rows"])))
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    parts.append(f"<footer>Written by balancer at {stamp}.</footer></body></html>\n")
    return "\n".join(parts)


def write_html_report(path: str | os.PathLike[str], data: ReportData | Mapping[str, Any]) -> None:
    """Write one self-contained HTML file (atomically: a temporary file, then a rename)."""
    text = render_html(data)
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def client_report_data(
    report: Mapping[str, Any],
    histogram: PercentileSource,
    throughput: Sequence[tuple[float, float]],
) -> ReportData:
    """What `balancer client --report` writes: its summary, latency percentiles, rates, spread."""
    latency = report.get("latency_ms", {})
    summary: dict[str, object] = {
        "requests": report.get("requests", 0),
        "ok": report.get("ok", 0),
        "errors": report.get("error_total", 0),
        "elapsed (s)": report.get("elapsed_s", 0.0),
        "throughput (req/s)": report.get("throughput_rps", 0.0),
    }
    for key in ("p50", "p90", "p99", "p999", "max"):
        if key in latency:
            summary[f"latency {key} (ms)"] = float(latency[key])
    data: ReportData = {
        "title": "Load client report",
        "summary": summary,
        "percentiles": percentile_points(histogram),
        "throughput": list(throughput),
    }
    if report.get("backends"):
        data["backends"] = dict(report["backends"])
    return data
