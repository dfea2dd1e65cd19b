"""One balancer's view of N workers, and the health states relayed between them (pure).

How it works:
- Documents (`/status`, `/api/services`, `/api/history`): the checking worker's (the
  lowest index given when it does not answer) is the base: backend states, weights,
  reasons, config revision and certificates are its own. Every counter is summed over
  the workers (numbers in nested objects too, keys that only some workers have
  included); latency percentiles and error rates in the rates are the worst worker's,
  and a one-second sample's error rate is recomputed from the summed requests and errors.
- Metrics are merged on the admin side (`balancer.admin.merged_metrics.merge_metrics`).
- `relay_plan`: which states to set in which worker, from every worker's report
  (`balancer.runtime.workers.backend_states`). A backend that any worker has ejected
  (outlier detection: down with ejection time left) goes down in every other worker with
  that time; otherwise every other worker takes the state of the checking worker.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from balancer.core.states import DOWN, UP

Doc = dict[str, Any]
States = Mapping[str, Mapping[str, Mapping[str, Any]]]

KEPT = frozenset(
    {"weight", "last_check", "last_check_age_s", "loaded_at", "days_left", "not_after", "t"}
)
"""Numbers that are not counters: the base worker's stand."""
WORST = frozenset({"p99_ms", "error_rate"})
"""Rates whose merged value is the worst worker's."""
EJECTION_TOLERANCE = 1.0
"""An ejection relayed is not sent again while the copy's time left is within this."""


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def add_into(base: Doc, other: Mapping[str, Any]) -> None:
    """Add the counters of `other` into `base`, in place (see the module docstring)."""
    for key, value in other.items():
        mine = base.get(key)
        if key not in base:
            if _number(value) or isinstance(value, dict):
                base[key] = copy.deepcopy(value)
        elif key in KEPT:
            continue
        elif key in WORST and _number(mine) and _number(value):
            base[key] = max(mine, value)
        elif _number(mine) and _number(value):
            base[key] = mine + value
        elif isinstance(mine, dict) and isinstance(value, dict):
            add_into(mine, value)


def _services(base: Doc, other: Mapping[str, Any]) -> None:
    for name, svc in base.get("services", {}).items():
        theirs = other.get("services", {}).get(name)
        if not isinstance(theirs, dict):
            continue
        by_address = {b["address"]: b for b in theirs.get("backends", [])}
        for backend in svc.get("backends", []):
            match = by_address.get(backend["address"])
            if match is not None:
                add_into(backend, match)
        add_into(svc, {k: v for k, v in theirs.items() if k not in ("backends", "hash_table")})


def merge_status(docs: Mapping[int, Doc], checker: int = 0) -> Doc:
    """`/status` or `/api/services` of each worker (by index) -> one balancer's, the
    checking worker's the base (the lowest index when it did not answer)."""
    order = sorted(docs, key=lambda i: (i != checker, i))
    base = copy.deepcopy(docs[order[0]])
    for index in order[1:]:
        _services(base, docs[index])
    return base


def merge_history(docs: Mapping[int, Doc]) -> Doc:
    """`/api/history` of each worker -> one: each sample of the base worker with the
    other workers' sample of the same second added."""
    order = sorted(docs)
    base = copy.deepcopy(docs[order[0]])
    for index in order[1:]:
        theirs = {round(s["t"]): s for s in docs[index].get("samples", [])}
        for sample in base.get("samples", []):
            match = theirs.get(round(sample["t"]))
            if match is not None:
                add_into(sample, match)
    for sample in base.get("samples", []):
        for svc in sample.get("services", {}).values():
            done, bad = svc.get("requests", 0), svc.get("errors", 0)
            if done + bad:
                svc["error_rate"] = round(bad / (done + bad), 4)
    return base


# -- health states relayed ---------------------------------------------------------------


def relay_plan(states: Mapping[int, States], source: int = 0) -> dict[int, Doc]:
    """What to set in each worker (index -> service -> address -> state), given each
    ready worker's states; `source` is the checking worker."""
    plan: dict[int, Doc] = {}
    keys: dict[tuple[str, str], None] = {}
    for report in states.values():
        for name, backends in report.items():
            for address in backends:
                keys[(name, address)] = None
    for name, address in keys:
        views = {
            i: report[name][address]
            for i, report in states.items()
            if address in report.get(name, {})
        }
        ejected = [
            (float(v.get("eject_left") or 0.0), i)
            for i, v in views.items()
            if v.get("state") == DOWN and float(v.get("eject_left") or 0.0) > 0
        ]
        if ejected:
            left, who = max(ejected)
            want = {"state": DOWN, "reason": str(views[who].get("reason", "")), "eject_left": left}
            for i, v in views.items():
                behind = float(v.get("eject_left") or 0.0) < left - EJECTION_TOLERANCE
                if i != who and (v.get("state") == UP or behind):
                    plan.setdefault(i, {}).setdefault(name, {})[address] = want
            continue
        src = views.get(source)
        if src is None:
            continue
        for i, v in views.items():
            if i != source and v.get("state") != src.get("state"):
                plan.setdefault(i, {}).setdefault(name, {})[address] = {
                    "state": src.get("state"),
                    "reason": f"worker {source}: {src.get('reason', '')}",
                    "last_check": src.get("last_check"),
                    "last_check_ok": src.get("last_check_ok"),
                }
    return plan
