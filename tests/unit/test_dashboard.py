"""The Grafana dashboard only queries metrics that the operator and the trainer really export."""

from __future__ import annotations

import json
import re
from pathlib import Path

from finetune_operator.metrics import OperatorMetrics
from finetune_trainer.reporting import PrometheusMetrics

DASHBOARD = (
    Path(__file__).resolve().parents[2]
    / "helm"
    / "finetune-operator"
    / "dashboards"
    / "finetune-operator.json"
)


def _exported(registry: object) -> set[str]:
    names: set[str] = set()
    for family in registry.collect():  # type: ignore[attr-defined]
        # Labelled metrics have no samples until first used: derive the series names from the type.
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(
            family.type, ("",)
        )
        names.update(family.name + suffix for suffix in suffixes)
    return names


def test_every_dashboard_query_uses_an_exported_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bfinetune_(?:operator|trainer)_[a-z_]+", e)}
    assert used, "the dashboard queries none of our metrics"
    exported = _exported(OperatorMetrics().registry) | _exported(PrometheusMetrics(port=0).registry)
    assert used - exported == set()
