"""The load client's compiled engine (`balancer.tools._loadgen`, C with epoll, one thread).

It runs closed-loop, line-framed loads (no `--raw`, no `--rate`) with the same requests, the
same checks of every reply and the same error kinds as the Python engine, at a fraction of
its CPU per request, so a benchmark measures what it targets, not its client. `available()`
says whether it is built (and not switched off by `BALANCER_NO_EXTENSIONS`).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from balancer import native
from balancer.tools.client.load import ERROR_KINDS, LoadSettings
from balancer.wire import INSTANCE_PREFIX


def _module() -> ModuleType | None:
    if native.disabled():
        return None
    try:
        from balancer.tools import _loadgen  # type: ignore[attr-defined]
    except ImportError:
        return None
    module: ModuleType = _loadgen
    return module


def available() -> bool:
    return _module() is not None


def covers(settings: LoadSettings) -> bool:
    """The compiled engine can run these settings."""
    return not settings.raw and settings.rate is None


def run(settings: LoadSettings, size: int = 0) -> dict[str, Any]:
    """One run to its end (blocking; call it in a thread); the report's fields that the run
    gives: requests, ok, errors, error_total, elapsed_s, throughput_rps, latency_ms.

    `size`: each request is its counter zero-padded to this many digits (0: unpadded).
    """
    module = _module()
    if module is None:
        raise RuntimeError("the compiled load engine is not available")
    result: dict[str, Any] = module.run(
        host=settings.host,
        port=settings.port,
        connections=settings.clients,
        pipeline=settings.pipeline,
        duration=settings.duration or 0.0,
        requests_per_client=settings.requests_per_client,
        timeout=settings.timeout,
        size=size,
        prefix=INSTANCE_PREFIX,
    )
    errors = {kind: int(result["errors"].get(kind, 0)) for kind in ERROR_KINDS}
    elapsed = float(result["elapsed_s"])
    ok = int(result["ok"])
    latency = {k: round(v / 1000.0, 3) for k, v in result["latency_us"].items()}
    return {
        "requests": int(result["requests"]),
        "ok": ok,
        "errors": errors,
        "error_total": sum(errors.values()),
        "elapsed_s": round(elapsed, 6),
        "throughput_rps": round(ok / elapsed, 1) if elapsed > 0 else 0.0,
        "latency_ms": latency,
    }
