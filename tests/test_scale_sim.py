"""bench/scale_sim.py --quick: many instances of the real consistent_hash policy, no sockets."""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_bench_report import load_bench_module

scale_sim = load_bench_module("scale_sim")


def test_quick_run_writes_its_figures_table_and_plot(tmp_path: Path) -> None:
    assert scale_sim.main(["--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "scale_sim.json").read_text())
    agreed = doc["agreement"]
    # one table before the churn and after every instance has seen it all: every key agrees
    assert agreed["before"] == agreed["after"] == 1.0
    assert agreed["after_tables"] == 1
    # while instances see changes at different times they disagree on some keys, never most
    assert 0.5 < agreed["during_min"] < 1.0
    assert agreed["max_tables"] > 1
    assert agreed["digests_match_views"] is True
    rebuilt = agreed["independent_rebuilds"]
    assert rebuilt["checked"] > 0
    assert rebuilt["same"] == rebuilt["checked"]

    moves = doc["movement"]["moves"]
    for kind in ("leave", "join"):
        # a change moves at least the changed backend's share, and a bounded multiple of it
        assert moves[kind]["changes"] > 0
        assert 0.9 < moves[kind]["ratio_mean"] < 4.0
    spread = doc["movement"]["spread"]
    assert 1.0 <= spread["slots_max_over_mean"] < 1.05

    cases = list(doc["bounded"]["cases"].values())
    assert [c["factor"] for c in cases] == [0.0, 1.25, 0.0, 1.25]
    for off, on in (cases[0:2], cases[2:4]):
        assert off["spilled"] == 0.0 < on["spilled"]
        assert on["instance_max_over_mean_worst"] < off["instance_max_over_mean_worst"]
        assert on["instance_max_over_mean_worst"] < 2.0
    assert cases[2]["instance_max_over_mean"] > 3.0  # hot keys, unbounded

    text = (tmp_path / "scale_sim.md").read_text()
    assert "| when | keys on the same backend on all instances | distinct tables |" in text
    assert "](scale_sim.svg)" in text
    assert (tmp_path / "scale_sim.svg").read_text().startswith("<svg ")
