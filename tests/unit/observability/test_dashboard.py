"""The Grafana dashboard only queries metrics the agent exports, with labels those metrics carry."""

from __future__ import annotations

import json
import re
from pathlib import Path

from agent.observability.metrics import LABEL_NAMES, AgentMetrics, PeerLabels, TcpLabels

DASHBOARD = Path(__file__).parents[3] / "deploy" / "grafana" / "ambient-agent-dashboard.json"


def exported_metrics() -> dict[str, set[str]]:
    """Metric sample names the agent exposes, with their label names."""
    metrics = AgentMetrics()
    labels = TcpLabels("source", PeerLabels(), PeerLabels())
    metrics.tcp.failed(labels)
    metrics.tcp.opened(labels)
    metrics.certificate_expiry.labels("spiffe://cluster.local/ns/a/sa/b").set(1)
    metrics.snapshot_timestamp.set(1)
    metrics.reconcile_errors.labels("redirect").inc()
    exported: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            exported.setdefault(sample.name, set()).update(sample.labels)
    return exported


def expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_every_queried_metric_is_exported() -> None:
    exported = exported_metrics()
    for expr in expressions():
        without_labels = re.sub(r"\{[^}]*\}|\([^()]*\)\s*\(", " ", expr)
        names = set(re.findall(r"\b(istio_[a-z_]+|ambient_agent_[a-z_]+)\b", without_labels))
        assert names, expr
        assert names <= exported.keys(), f"{expr}: {names - exported.keys()} not exported"


def test_every_label_used_exists_on_its_metric() -> None:
    exported = exported_metrics()
    tcp_labels = set(LABEL_NAMES)
    for expr in expressions():
        for name, selector in re.findall(r"(\w+)\{([^}]*)\}", expr):
            used = set(re.findall(r"(\w+)\s*=~?", selector))
            assert used <= exported[name], f"{expr}: {used - exported[name]}"
        for grouping in re.findall(r"by \(([^)]*)\)", expr):
            used = {label.strip() for label in grouping.split(",")}
            known = tcp_labels | {"identity", "reconciler", "tag", "instance"}
            assert used <= known, expr
