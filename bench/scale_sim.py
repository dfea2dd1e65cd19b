"""Scale-out simulation of consistent_hash: many balancer instances, no coordination.

No sockets: the real `ConsistentHash` policy (`balancer.core.policies.consistent_hash`) over
simple targets. By default 100 balancer instances share 1,000 backends; 10 % of them leave,
each at a random time in a 600 s window, and come back 30-120 s later. Every instance
learns of every change after its own delay (uniform in 0-10 s: health checks, discovery),
so instances see the changes in different orders and at different times. Measured:

- **agreement**: every 5 s, the share of the sampled keys (20,000 client keys) that land
  on the same backend on every instance, and how many distinct tables (digests) exist;
- **keys moved per change**: one instance applying each change in turn; the share of the
  table's slots (one probe key per slot, so exact) and of the sampled keys that move,
  against Maglev's 1/N (only the leaving or joining backend's share need move);
- **load spread** (max/mean): slots per backend, sampled keys per backend;
- **bounded load**: a few instances, each with its own in-flight counts, under a simple
  arrival model (a fixed number of requests per step, each held for an exponential
  number of steps, mean 8; keys uniform or Zipf 1.0 over the sample): max/mean in flight
  per backend on each instance and summed over the instances (the backends' real load),
  with `hash_balance_factor` off and 1.25, and the share of requests sent elsewhere than
  their key's own backend.

Instances that see the same backends build identical tables (that is what the digest in
/status and /metrics shows), so instances with the same view share one policy object here:
a table of 65,537 slots costs about 30 ms to build, and 100 instances x 200 changes would
be 20,000 builds. A few shared views are rebuilt independently (targets in another order)
and their digests compared, to check the sharing changes nothing.

Usage: python bench/scale_sim.py [--quick] [--out bench/results]
Writes OUT/scale_sim.json, OUT/scale_sim.md and the plot OUT/scale_sim.svg (linked from the
.md; bench/report.py has no place for plots).
"""

from __future__ import annotations

import argparse
import html
import math
import platform
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from zlib import crc32

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

from balancer.core.policies.consistent_hash import ConsistentHash  # noqa: E402
from balancer.native import implementation  # noqa: E402
from harness import RESULTS, save_results  # noqa: E402

STEM = "scale_sim"


@dataclass(frozen=True)
class Params:
    instances: int = 100
    backends: int = 1000
    churn: float = 0.10
    """Share of the backends that leave and come back."""
    keys: int = 20_000
    table_size: int = 65537
    window: float = 600.0
    """Seconds over which the churned backends leave (each at a uniform random time)."""
    down_min: float = 30.0
    down_max: float = 120.0
    """Each churned backend is away for a uniform random time in this range."""
    max_lag: float = 10.0
    """Each instance learns of each change after a uniform random delay up to this."""
    step: float = 5.0
    """Seconds between two agreement snapshots."""
    verify: int = 5
    """Shared views rebuilt independently to check their digests."""
    larger_table: int = 524287
    """Keys moved per change measured again with this many slots (the most table_size
    allows; 0: not), for the changes of `larger_table_backends` of the churned backends."""
    larger_table_backends: int = 10
    bounded_instances: int = 10
    load_per_backend: float = 8.0
    """Mean requests in flight per backend on each instance."""
    hold: float = 8.0
    """Mean steps a request is held."""
    warmup_steps: int = 20
    load_steps: int = 30
    factor: float = 1.25
    zipf: float = 1.0
    seed: int = 1


QUICK = Params(
    instances=6,
    backends=60,
    keys=2000,
    table_size=4099,
    window=60.0,
    down_min=8.0,
    down_max=20.0,
    max_lag=4.0,
    step=2.0,
    verify=2,
    larger_table=16381,
    larger_table_backends=3,
    bounded_instances=2,
    load_per_backend=4.0,
    hold=4.0,
    warmup_steps=8,
    load_steps=8,
)


@dataclass(eq=False)
class Target:
    """What the policy reads of a backend (its `Target` protocol)."""

    address: str
    in_flight: int = 0
    effective_weight: float = 1.0


@dataclass(frozen=True)
class Change:
    at: float
    backend: int
    up: bool


@dataclass
class View:
    """The backends one or more instances see up: its policy and where each key goes."""

    policy: ConsistentHash
    picks: list[int] = field(default_factory=list)


class Fleet:
    """The backends, the changes, and a policy per distinct view (built once each)."""

    def __init__(self, p: Params, rng: random.Random) -> None:
        self.p = p
        self.rng = rng
        self.targets = [Target(address_of(i)) for i in range(p.backends)]
        self.index = {t.address: i for i, t in enumerate(self.targets)}
        self.keys = [
            f"198.51.{i // 250 % 256}.{i % 250 + 1}:{40000 + i}".encode() for i in range(p.keys)
        ]
        self.views: dict[frozenset[int], View] = {}
        self.build_s: list[float] = []

    def policy(self, down: frozenset[int], factor: float = 0.0) -> ConsistentHash:
        """A policy over every backend but `down`, handed them in a random order."""
        up = [t for i, t in enumerate(self.targets) if i not in down]
        self.rng.shuffle(up)
        policy = ConsistentHash(self.p.table_size, factor)
        start = time.perf_counter()
        policy.update(up)
        self.build_s.append(time.perf_counter() - start)
        return policy

    def view(self, down: frozenset[int]) -> View:
        view = self.views.get(down)
        if view is None:
            view = self.views[down] = View(self.policy(down))
            view.picks = picks_of(view.policy, self.keys, self.index)
        return view


def address_of(i: int) -> str:
    return f"10.{i // 250 // 256}.{i // 250 % 256}.{i % 250 + 1}:8080"


def picks_of(policy: ConsistentHash, keys: Sequence[bytes], index: dict[str, int]) -> list[int]:
    """The backend (by index) each key goes to."""
    out = []
    for key in keys:
        target = policy.pick(key)
        assert target is not None
        out.append(index[target.address])
    return out


def slot_probes(size: int) -> list[bytes]:
    """One key per table slot: keys hash to slots by CRC-32 mod the table size (as
    `ConsistentHash.pick` documents), so picking these reads the whole table."""
    probes: list[bytes | None] = [None] * size
    missing = size
    n = 0
    while missing:
        key = b"probe-%d" % n
        n += 1
        slot = crc32(key) % size
        if probes[slot] is None:
            probes[slot] = key
            missing -= 1
    return [k for k in probes if k is not None]


def churn_changes(p: Params, rng: random.Random) -> list[Change]:
    leaving = rng.sample(range(p.backends), round(p.backends * p.churn))
    changes = []
    for b in leaving:
        gone = rng.uniform(0.0, p.window)
        changes.append(Change(gone, b, False))
        changes.append(Change(gone + rng.uniform(p.down_min, p.down_max), b, True))
    return sorted(changes, key=lambda c: (c.at, c.backend))


def ratio(values: Sequence[int] | Sequence[float]) -> float:
    """max / mean."""
    mean = sum(values) / len(values)
    return max(values) / mean if mean else 0.0


# -- agreement across instances --------------------------------------------------------------


def agreement(fleet: Fleet, changes: list[Change]) -> dict[str, Any]:
    p = fleet.p
    rng = fleet.rng
    # seen[i][c]: when instance i learns of change c; per instance, the changes of each
    # backend in the order that instance learns them
    seen = [[c.at + rng.uniform(0.0, p.max_lag) for c in changes] for _ in range(p.instances)]
    by_backend: dict[int, list[int]] = {}
    for n, c in enumerate(changes):
        by_backend.setdefault(c.backend, []).append(n)
    end = max(c.at for c in changes) + p.max_lag + 2 * p.step
    snapshots: list[dict[str, Any]] = []
    t = -p.step
    while t <= end:
        counts: Counter[frozenset[int]] = Counter()
        for i in range(p.instances):
            down = set()
            for b, ns in by_backend.items():
                known = [n for n in ns if seen[i][n] <= t]
                if known and not changes[max(known, key=lambda n: seen[i][n])].up:
                    down.add(b)
            counts[frozenset(down)] += 1
        views = [fleet.view(d) for d in counts]
        base = views[0].picks
        split: set[int] = set()
        for other in views[1:]:
            split.update(
                k for k, (a, b) in enumerate(zip(base, other.picks, strict=True)) if a != b
            )
        digests = {v.policy.digest for v in views}
        snapshots.append(
            {
                "t": round(t, 1),
                "agreed": 1.0 - len(split) / len(base),
                "tables": len(counts),
                "digests": len(digests),
                "majority_instances": max(counts.values()) / p.instances,
            }
        )
        t += p.step
    verified = 0
    for shared in list(fleet.views)[: p.verify]:
        verified += fleet.policy(shared).digest == fleet.views[shared].policy.digest
    during = [s for s in snapshots if 0.0 <= s["t"] <= end - 2 * p.step] or snapshots
    return {
        "snapshots": snapshots,
        "before": snapshots[0]["agreed"],
        "after": snapshots[-1]["agreed"],
        "after_tables": snapshots[-1]["tables"],
        "during_mean": sum(s["agreed"] for s in during) / len(during),
        "during_min": min(s["agreed"] for s in during),
        "all_agreed_share": sum(s["tables"] == 1 for s in during) / len(during),
        "max_tables": max(s["tables"] for s in snapshots),
        "digests_match_views": all(s["digests"] == s["tables"] for s in snapshots),
        "min_majority_instances": min(s["majority_instances"] for s in snapshots),
        "distinct_views": len(fleet.views),
        "independent_rebuilds": {"checked": min(p.verify, len(fleet.views)), "same": verified},
    }


# -- keys moved per change, and the spread --------------------------------------------------


def movement(fleet: Fleet, changes: list[Change], size: int) -> dict[str, Any]:
    """One instance applying every change in the order they happen, with `size` slots."""
    p = fleet.p
    probes = slot_probes(size)
    down: set[int] = set()
    policy = ConsistentHash(size)
    policy.update(fleet.targets)
    slots = picks_of(policy, probes, fleet.index)
    keys = picks_of(policy, fleet.keys, fleet.index)
    spread = {
        "slots_max_over_mean": ratio(list(Counter(slots).values())),
        "slots_min_over_mean": min(Counter(slots).values()) / (size / p.backends),
        "keys_max_over_mean": ratio([Counter(keys).get(i, 0) for i in range(p.backends)]),
        "keys_per_backend_mean": p.keys / p.backends,
    }
    rows: dict[str, list[dict[str, float]]] = {"leave": [], "join": []}
    worst_spread = spread["slots_max_over_mean"]
    for c in changes:
        (down.add if not c.up else down.discard)(c.backend)
        policy.update([t for i, t in enumerate(fleet.targets) if i not in down])
        now_slots = picks_of(policy, probes, fleet.index)
        now_keys = picks_of(policy, fleet.keys, fleet.index)
        moved = sum(a != b for a, b in zip(slots, now_slots, strict=True)) / size
        own = (slots if not c.up else now_slots).count(c.backend)
        members = p.backends - len(down) + (0 if c.up else 1)  # N before a leave, after a join
        rows["join" if c.up else "leave"].append(
            {
                "moved": moved,
                "ideal": 1.0 / members,
                "ratio": moved * members,
                "extra": moved - own / size,
                "keys_moved": sum(a != b for a, b in zip(keys, now_keys, strict=True)) / p.keys,
            }
        )
        worst_spread = max(worst_spread, ratio(list(Counter(now_slots).values())))
        slots, keys = now_slots, now_keys
    summary = {}
    for kind, items in rows.items():
        summary[kind] = {
            "changes": len(items),
            "moved_mean": mean(r["moved"] for r in items),
            "ideal_mean": mean(r["ideal"] for r in items),
            "ratio_mean": mean(r["ratio"] for r in items),
            "ratio_max": max(r["ratio"] for r in items),
            "extra_mean": mean(r["extra"] for r in items),
            "keys_moved_mean": mean(r["keys_moved"] for r in items),
        }
    spread["slots_max_over_mean_during_churn"] = worst_spread
    return {"table_size": size, "moves": summary, "spread": spread}


def some_backends(changes: list[Change], count: int) -> list[Change]:
    """The changes of the first `count` backends to leave, in time order."""
    chosen: list[int] = []
    for c in changes:
        if c.backend not in chosen and len(chosen) < count:
            chosen.append(c.backend)
    return [c for c in changes if c.backend in chosen]


def mean(values: Any) -> float:
    items = list(values)
    return sum(items) / len(items) if items else 0.0


# -- bounded load ----------------------------------------------------------------------------


def bounded_load(fleet: Fleet) -> dict[str, Any]:
    p = fleet.p
    n_keys = len(fleet.keys)
    cumulative: list[float] = []
    total = 0.0
    for rank in range(1, n_keys + 1):
        total += rank**-p.zipf
        cumulative.append(total)
    home = fleet.view(frozenset()).picks
    arrivals = round(p.load_per_backend * p.backends / p.hold)
    out: dict[str, Any] = {}
    for popularity in ("uniform", f"zipf {p.zipf:g}"):
        for factor in (0.0, p.factor):
            instances = []
            for _ in range(p.bounded_instances):
                targets = [Target(t.address) for t in fleet.targets]
                policy = ConsistentHash(p.table_size, factor)
                policy.update(targets)
                instances.append((targets, policy, {t.address: t for t in targets}))
            per_instance: list[float] = []
            fleet_ratio: list[float] = []
            spilled = 0
            counted = 0
            finish: list[dict[int, list[Target]]] = [{} for _ in instances]
            for step in range(p.warmup_steps + p.load_steps):
                measured = step >= p.warmup_steps
                for n, (targets, policy, own) in enumerate(instances):
                    rng = random.Random(f"{p.seed}-{popularity}-{n}-{step}")
                    for target in finish[n].pop(step, ()):
                        target.in_flight -= 1
                    if popularity == "uniform":
                        chosen = [rng.randrange(n_keys) for _ in range(arrivals)]
                    else:
                        chosen = rng.choices(range(n_keys), cum_weights=cumulative, k=arrivals)
                    for k in chosen:
                        picked = policy.pick(fleet.keys[k])
                        assert picked is not None
                        got = own[picked.address]
                        got.in_flight += 1
                        until = step + max(1, math.ceil(rng.expovariate(1.0 / p.hold)))
                        finish[n].setdefault(until, []).append(got)
                        if measured:
                            counted += 1
                            spilled += fleet.index[got.address] != home[k]
                    if measured:
                        per_instance.append(ratio([t.in_flight for t in targets]))
                if measured:
                    sums = [
                        sum(ts[i].in_flight for ts, _, _ in instances) for i in range(p.backends)
                    ]
                    fleet_ratio.append(ratio(sums))
            label = f"{popularity}, hash_balance_factor {'off' if not factor else f'{factor:g}'}"
            out[label] = {
                "popularity": popularity,
                "factor": factor,
                "instance_max_over_mean": mean(per_instance),
                "instance_max_over_mean_worst": max(per_instance),
                "fleet_max_over_mean": mean(fleet_ratio),
                "fleet_max_over_mean_worst": max(fleet_ratio),
                "spilled": spilled / counted if counted else 0.0,
            }
    return {
        "arrivals_per_step": arrivals,
        "in_flight_per_instance": round(p.load_per_backend * p.backends),
        "cases": out,
    }


# -- output ----------------------------------------------------------------------------------


def pct(x: float, digits: int = 2) -> str:
    return f"{100 * x:.{digits}f} %"


def markdown(doc: dict[str, Any]) -> str:
    p = Params(**doc["params"])
    a = doc["agreement"]
    m = doc["movement"]
    s = m["spread"]
    b = doc["bounded"]
    c = doc["costs"]
    lines = [
        "# consistent_hash at scale: many instances, no coordination",
        "",
        f"{p.instances} balancer instances, {p.backends:,} backends, "
        f"{pct(p.churn, 0)} of them leave (over {p.window:g} s) and come back "
        f"({p.down_min:g}-{p.down_max:g} s later); each instance learns of each change "
        f"0-{p.max_lag:g} s late, so in its own order. {p.keys:,} sampled keys, "
        f"Maglev table of {p.table_size:,} slots. `python bench/scale_sim.py"
        f"{' --quick' if doc['quick'] else ''}`, {doc['implementation']}, "
        f"Python {doc['python']}.",
        "",
        "## Same key, same backend, on every instance",
        "",
        "| when | keys on the same backend on all instances | distinct tables |",
        "| --- | --- | --- |",
        f"| before the churn | {pct(a['before'])} | 1 |",
        f"| during it, mean of snapshots every {p.step:g} s | {pct(a['during_mean'])} | "
        f"up to {a['max_tables']} |",
        f"| during it, worst snapshot | {pct(a['during_min'])} | |",
        f"| after every instance has seen every change | {pct(a['after'])} | {a['after_tables']} |",
        "",
        f"During the churn all {p.instances} instances had the same table in "
        f"{pct(a['all_agreed_share'], 1)} of the snapshots; the most common view was held "
        f"by at least {pct(a['min_majority_instances'], 0)} of the instances. Distinct "
        f"digests = distinct views in every snapshot: {a['digests_match_views']}. "
        f"{a['distinct_views']} distinct views were built once each and shared by the "
        f"instances holding them; {a['independent_rebuilds']['same']} of "
        f"{a['independent_rebuilds']['checked']} rebuilt independently (targets in another "
        "order) gave the same digest.",
        "",
        "![share of keys on the same backend on every instance, and distinct tables, "
        "over time](scale_sim.svg)",
        "",
        "## Keys moved per change (one instance, changes in turn)",
        "",
        "| change | count | slots moved (mean) | 1/N | moved / (1/N), mean | max | "
        "moved between other backends | sampled keys moved |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for table in (m, doc["movement_larger_table"]):
        if table is None:
            continue
        for kind, r in table["moves"].items():
            lines.append(
                f"| {kind}, {table['table_size']:,} slots | {r['changes']} | "
                f"{pct(r['moved_mean'], 3)} | {pct(r['ideal_mean'], 3)} | {r['ratio_mean']:.3f} "
                f"| {r['ratio_max']:.3f} | {pct(r['extra_mean'], 3)} | "
                f"{pct(r['keys_moved_mean'], 3)} |"
            )
    lines += [
        "",
        "Slots are read with one probe key per slot, so they are exact; 1/N is the share of "
        "the backend that leaves (or joins), the least any scheme must move. Maglev does not "
        "reach it: when a backend leaves, the others' turns at the free slots shift and some "
        "slots change hands between backends that stay; the fewer slots per backend, the "
        "more. The larger table's rows are the changes of "
        f"{p.larger_table_backends} of the churned backends.",
        "",
        "## Load spread (max / mean)",
        "",
        "| what | max / mean |",
        "| --- | --- |",
        f"| table slots per backend, all up | {s['slots_max_over_mean']:.4f} "
        f"(min / mean {s['slots_min_over_mean']:.4f}) |",
        f"| table slots per backend, worst during the churn | "
        f"{s['slots_max_over_mean_during_churn']:.4f} |",
        f"| sampled keys per backend ({s['keys_per_backend_mean']:.1f} on average: "
        f"mostly sampling noise) | {s['keys_max_over_mean']:.3f} |",
        "",
        f"## Bounded load ({p.bounded_instances} instances, {b['in_flight_per_instance']:,} "
        f"in flight on each, {b['arrivals_per_step']:,} arrivals per step, held {p.hold:g} "
        "steps on average)",
        "",
        "| keys, factor | in flight max / mean, per instance (worst) | "
        "summed over instances (worst) | sent past the key's own backend |",
        "| --- | --- | --- | --- |",
    ]
    for label, r in b["cases"].items():
        lines.append(
            f"| {label} | {r['instance_max_over_mean']:.2f} "
            f"({r['instance_max_over_mean_worst']:.2f}) | {r['fleet_max_over_mean']:.2f} "
            f"({r['fleet_max_over_mean_worst']:.2f}) | {pct(r['spilled'], 1)} |"
        )
    lines += [
        "",
        "## Cost",
        "",
        f"{c['builds']} table builds, {c['build_ms_mean']:.1f} ms each on average "
        f"({c['build_ms_max']:.1f} ms max); the whole run {c['total_s']:.1f} s "
        f"(agreement {c['agreement_s']:.1f} s, moves {c['movement_s']:.1f} s, "
        f"bounded load {c['bounded_s']:.1f} s).",
        "",
    ]
    return "\n".join(lines)


def svg(snapshots: Sequence[dict[str, Any]]) -> str:
    """Two panels over time: agreed share (%), distinct tables."""
    width, height, left, right, top, gap = 720, 420, 56, 16, 24, 40
    panel = (height - top - gap - 30) / 2
    t0, t1 = float(snapshots[0]["t"]), float(snapshots[-1]["t"])
    low = float(min(s["agreed"] for s in snapshots))
    floor = max(0.0, math.floor(low * 1000 - 1) / 1000) if low < 1 else 0.99
    tables = max(s["tables"] for s in snapshots)

    def x(t: float) -> float:
        return left + (width - left - right) * (t - t0) / ((t1 - t0) or 1)

    def line(points: list[tuple[float, float]], color: str) -> str:
        coords = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
        return f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.5"/>'

    y1 = [top + panel * (1 - (s["agreed"] - floor) / (1 - floor)) for s in snapshots]
    y2 = [top + panel + gap + panel * (1 - s["tables"] / tables) for s in snapshots]
    body = [
        f'<text x="{left}" y="{top - 8}">keys on the same backend on every instance '
        f"({100 * floor:.1f}-100 %)</text>",
        f'<text x="{left}" y="{top + panel + gap - 8}">distinct tables among the instances '
        f"(0-{tables})</text>",
    ]
    body += [
        f'<rect x="{left}" y="{y0:.1f}" width="{width - left - right}" height="{panel:.1f}" '
        'fill="none" stroke="#e3e6eb"/>'
        for y0 in (top, top + panel + gap)
    ]
    for i in range(5):
        t = t0 + (t1 - t0) * i / 4
        body.append(f'<text x="{x(t):.1f}" y="{height - 10}" text-anchor="middle">{t:.0f} s</text>')
    body.append(line([(x(s["t"]), y) for s, y in zip(snapshots, y1, strict=True)], "#2563eb"))
    body.append(line([(x(s["t"]), y) for s, y in zip(snapshots, y2, strict=True)], "#dc2626"))
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'font-family="sans-serif" font-size="11" role="img" '
        f'aria-label="{html.escape("agreement over time")}">' + "".join(body) + "</svg>\n"
    )


def run(p: Params, quick: bool) -> dict[str, Any]:
    started = time.perf_counter()
    rng = random.Random(p.seed)
    fleet = Fleet(p, rng)
    changes = churn_changes(p, rng)
    agreed = agreement(fleet, changes)
    t_agreement = time.perf_counter() - started
    moved = movement(fleet, changes, p.table_size)
    larger = None
    if p.larger_table:
        larger = movement(fleet, some_backends(changes, p.larger_table_backends), p.larger_table)
    t_movement = time.perf_counter() - started - t_agreement
    bounded = bounded_load(fleet)
    total = time.perf_counter() - started
    builds = fleet.build_s
    return {
        "quick": quick,
        "params": asdict(p),
        "implementation": implementation(),
        "python": platform.python_version(),
        "agreement": agreed,
        "movement": moved,
        "movement_larger_table": larger,
        "bounded": bounded,
        "costs": {
            "builds": len(builds),
            "build_ms_mean": 1000 * mean(builds),
            "build_ms_max": 1000 * max(builds),
            "agreement_s": t_agreement,
            "movement_s": t_movement,
            "bounded_s": total - t_agreement - t_movement,
            "total_s": total,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--instances", type=int)
    parser.add_argument("--backends", type=int)
    parser.add_argument("--keys", type=int)
    parser.add_argument("--seed", type=int)
    args = parser.parse_args(argv)
    p = QUICK if args.quick else Params()
    for name in ("instances", "backends", "keys", "seed"):
        if getattr(args, name) is not None:
            p = replace(p, **{name: getattr(args, name)})
    doc = run(p, args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{STEM}.svg").write_text(svg(doc["agreement"]["snapshots"]), encoding="utf-8")
    save_results(STEM, doc, markdown(doc), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
