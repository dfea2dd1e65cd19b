"""One balancer's `/metrics` from its workers' (`balancer serve --workers N`): every
sample summed by name and labels, the gauges that describe state rather than count
(STATE_METRICS) taken from one worker, then each worker's own samples with a `worker`
label."""

from __future__ import annotations

import math
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

STATE_METRICS = frozenset(
    {
        "balancer_backend_up",
        "balancer_backend_weight",
        "balancer_config_info",
        "balancer_hash_table_info",
        "balancer_fd_limit",
        "balancer_discovery_up",
        "balancer_discovery_view_age_seconds",
    }
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def merge_metrics(texts: Mapping[int, str]) -> str:
    """The Prometheus text of each worker -> every sample summed by name and labels (a
    histogram's buckets, counts and sums merge so), except those that describe state
    rather than count (STATE_METRICS), the lowest index's; then each worker's own
    samples with a `worker` label."""
    families: dict[str, tuple[str, str]] = {}
    summed: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    own: dict[str, list[str]] = {}
    base = min(texts) if texts else 0
    for index in sorted(texts):
        for family in text_string_to_metric_families(texts[index]):
            families.setdefault(family.name, (family.type, family.documentation))
            sums = summed.setdefault(family.name, {})
            lines = own.setdefault(family.name, [])
            for sample in family.samples:
                key = (sample.name, tuple(sample.labels.items()))
                if family.name in STATE_METRICS or sample.name.endswith("_created"):
                    if index == base:
                        sums[key] = sample.value
                    else:
                        sums.setdefault(key, sample.value)
                else:
                    sums[key] = sums.get(key, 0.0) + sample.value
                labelled = {**sample.labels, "worker": str(index)}
                lines.append(f"{sample.name}{_labels(labelled)} {_value(sample.value)}")
    out: list[str] = []
    for name, (kind, documentation) in families.items():
        help_text = documentation.replace("\\", "\\\\").replace("\n", "\\n")
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for (sample_name, labels), value in summed[name].items():
            out.append(f"{sample_name}{_labels(dict(labels))} {_value(value)}")
        out.extend(own[name])
    return "\n".join(out) + "\n"
