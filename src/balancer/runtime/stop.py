"""How a stop drains: until done, `drain_timeout` or a second signal; then it cuts.

How it works: every service's proxy drains at once (`Proxy.drain(timeout)`), and so do
the services a reload retired that are still draining. The stop waits for all of them
until `drain_timeout` has passed or a second SIGINT/SIGTERM asks to hurry. Then the
proxies that are not done are asked to cut what is left at once (a second
`drain(0)` call), which they do and count (`DrainCut`); for a proxy that does not
count, what it still had open when the time was up is taken as cut. Whatever has
not ended by the end of the grace (`STOP_GRACE` after `drain_timeout`) is cancelled:
a stop never outlasts `drain_timeout` by more than that grace.
"""

from __future__ import annotations

import asyncio
import logging

from balancer.core.lifecycle import DrainCut
from balancer.runtime.services import ServiceRuntime

log = logging.getLogger("balancer")

STOP_GRACE = 1.0
"""Seconds a stop gives what is left after `drain_timeout` (cut connections closing,
health checks, the admin endpoint) before it stops waiting for it."""


async def drain_all(
    drains: dict[asyncio.Task[DrainCut | None], ServiceRuntime],
    retiring: dict[ServiceRuntime, asyncio.Task[None]],
    hurry: asyncio.Event,
    timeout: float,
    end: float,
) -> dict[ServiceRuntime, tuple[str, DrainCut]]:
    """Wait for the drains until done, `timeout` or a second signal, then cut what is
    left (by then at the latest: `end`); what each service's drain cut, and why."""
    loop = asyncio.get_running_loop()
    retired = {t: r for r, t in retiring.items()}
    hurried = loop.create_task(hurry.wait())
    if drains or retired:
        everything = loop.create_task(asyncio.wait({*drains, *retired}))
        try:
            await asyncio.wait(
                {hurried, everything}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            everything.cancel()
    why = "a second stop signal" if hurried.done() else f"drain_timeout ({timeout:g}s) reached"
    hurried.cancel()
    late = [t for t in drains if not t.done()]
    # what is open now is what gets cut, for a proxy that does not count it itself
    seen = {
        drains[t]: DrainCut(
            drains[t].proxy.client_connections,
            0 if drains[t].config.mode == "tcp" else sum(b.in_flight for b in drains[t].pool),
        )
        for t in late
    }
    cuts: dict[asyncio.Task[DrainCut | None], ServiceRuntime] = {}
    left = [drains[t] for t in late] + [r for t, r in retired.items() if not t.done()]
    if left:
        # a second drain call cuts at once (the proxies' own deadlines are passing too)
        for runtime in left:
            cuts[loop.create_task(runtime.proxy.drain(0), name="cut")] = runtime
        await asyncio.wait(
            {*cuts, *(t for t in retired if not t.done())},
            timeout=max(0.1, end - loop.time()),
        )
        await asyncio.wait(late, timeout=0.1)  # the first calls end once nothing is left
        stuck = [t for t in (*late, *cuts, *retired) if not t.done()]
        for task in stuck:
            task.cancel()
        if stuck:
            await asyncio.wait(stuck, timeout=0.1)
    counted: dict[ServiceRuntime, DrainCut] = {}
    for task, runtime in [*drains.items(), *cuts.items()]:
        result = _result(task)
        if result is not None:
            counted[runtime] = counted.get(runtime, DrainCut()) + result
    out: dict[ServiceRuntime, tuple[str, DrainCut]] = {}
    for runtime in drains.values():
        cut = counted[runtime] if runtime in counted else seen.get(runtime, DrainCut())
        if cut:
            out[runtime] = (why, cut)
    return out


def _result(task: asyncio.Task[DrainCut | None]) -> DrainCut | None:
    if not task.done() or task.cancelled():
        return None
    exc = task.exception()
    if exc is not None:
        log.error("draining failed: %r", exc)
        return None
    return task.result()


def log_cut(what: str, why: str, cut: DrainCut, by: str) -> None:
    log.warning(
        "%s: %s; cut %d client connection(s) with %d request(s) unanswered "
        "(cut by the %s, not a backend failure)",
        what,
        why,
        cut.connections,
        cut.requests,
        by,
    )
