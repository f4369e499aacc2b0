"""Metric names and labels are Istio's exactly; byte counters move while a connection is open."""

from __future__ import annotations

from dataclasses import fields, replace

from prometheus_client.parser import text_string_to_metric_families

from agent import __version__
from agent.observability.metrics import (
    LABEL_NAMES,
    AgentMetrics,
    PeerLabels,
    ServiceLabels,
    TcpLabels,
)

ISTIO_TCP_LABELS = {
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
}

CLIENT = PeerLabels(
    workload="sleep", namespace="demo", principal="spiffe://cluster.local/ns/demo/sa/sleep", app="sleep"
)
SERVER = PeerLabels(
    workload="echo",
    namespace="demo",
    principal="spiffe://cluster.local/ns/demo/sa/echo",
    app="echo",
    version="v1",
)
LABELS = TcpLabels(
    reporter="source",
    source=CLIENT,
    destination=SERVER,
    service=ServiceLabels(host="echo.demo.svc.cluster.local", name="echo", namespace="demo"),
    security_policy="mutual_tls",
)


def samples(metrics: AgentMetrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def test_label_names_are_istios_standard_set() -> None:
    assert set(LABEL_NAMES) == ISTIO_TCP_LABELS
    assert len(LABEL_NAMES) == len(ISTIO_TCP_LABELS)


def test_every_peer_field_has_a_label() -> None:
    assert len(LABEL_NAMES) == 1 + 2 * len(fields(PeerLabels)) + 3 + 3


def test_metric_names_match_istio() -> None:
    metrics = AgentMetrics()
    metrics.tcp.failed(LABELS)
    metrics.tcp.closed(metrics.tcp.opened(LABELS))
    metrics.tcp.opened(LABELS)
    tcp = {name: rows for name, rows in samples(metrics).items() if name.startswith("istio_")}
    assert set(tcp) == {
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_connections_failed_total",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
        "istio_open_sockets",
        "istio_build",
    }
    for name, rows in tcp.items():
        if name != "istio_build":
            assert all(labels.keys() == set(LABEL_NAMES) for labels, _ in rows), name


def test_build_and_the_agents_own_gauges_carry_their_labels() -> None:
    metrics = AgentMetrics()
    metrics.certificate_expiry.labels(SERVER.principal).set(1_900_000_000)
    metrics.snapshot_timestamp.set(1_800_000_000.5)
    metrics.reconcile_errors.labels("redirection").inc()
    found = samples(metrics)
    assert found["istio_build"] == [({"component": "ambient-agent", "tag": __version__}, 1.0)]
    assert found["ambient_agent_certificate_expiry_timestamp_seconds"] == [
        ({"identity": SERVER.principal}, 1_900_000_000.0)
    ]
    assert found["ambient_agent_snapshot_timestamp_seconds"] == [({}, 1_800_000_000.5)]
    assert found["ambient_agent_reconcile_errors_total"] == [({"reconciler": "redirection"}, 1.0)]
    metrics.certificate_expiry.remove(SERVER.principal)
    assert samples(metrics).get("ambient_agent_certificate_expiry_timestamp_seconds", []) == []


def test_missing_values_are_unknown_and_canonical_names_fall_back() -> None:
    labels = TcpLabels(reporter="destination", source=PeerLabels(), destination=SERVER)
    values = dict(zip(LABEL_NAMES, labels.values(), strict=True))
    assert values["source_workload"] == "unknown"
    assert values["source_principal"] == "unknown"
    assert values["source_canonical_revision"] == "latest"
    assert values["destination_canonical_service"] == "echo"
    assert values["destination_canonical_revision"] == "v1"
    assert values["destination_service"] == "unknown"
    assert values["request_protocol"] == "tcp"
    assert values["response_flags"] == "-"
    assert values["connection_security_policy"] == "unknown"


def test_bytes_are_visible_while_open_and_monotonic_after_close() -> None:
    metrics = AgentMetrics()
    connection = metrics.tcp.opened(LABELS)
    connection.sent += 1000
    connection.received += 10
    [(labels, sent_open)] = samples(metrics)["istio_tcp_sent_bytes_total"]
    assert sent_open == 1000
    assert labels["destination_principal"] == SERVER.principal
    assert labels["reporter"] == "source"
    connection.sent += 24
    metrics.tcp.closed(connection)
    metrics.tcp.closed(connection)
    after = samples(metrics)
    assert after["istio_tcp_sent_bytes_total"][0][1] == 1024
    assert after["istio_tcp_received_bytes_total"][0][1] == 10
    assert after["istio_tcp_connections_closed_total"][0][1] == 1
    assert "istio_open_sockets" not in after


def test_open_sockets_counts_live_connections_per_label_set() -> None:
    metrics = AgentMetrics()
    first, _second = metrics.tcp.opened(LABELS), metrics.tcp.opened(LABELS)
    assert samples(metrics)["istio_open_sockets"][0][1] == 2
    metrics.tcp.closed(first)
    assert samples(metrics)["istio_open_sockets"][0][1] == 1
    assert [c.id for c in metrics.tcp.live()] == [_second.id]


def test_failures_count_with_their_response_flag() -> None:
    metrics = AgentMetrics()
    denied = TcpLabels(reporter="destination", source=CLIENT, destination=SERVER, response_flags="DENY")
    metrics.tcp.failed(denied)
    [(labels, value)] = samples(metrics)["istio_tcp_connections_failed_total"]
    assert (labels["response_flags"], value) == ("DENY", 1)


def test_connections_with_equal_labels_share_one_label_instance() -> None:
    metrics = AgentMetrics()
    first = metrics.tcp.opened(replace(LABELS))
    second = metrics.tcp.opened(replace(LABELS))
    assert second.labels is first.labels


def test_labels_made_by_replacing_a_field_are_counted_apart() -> None:
    metrics = AgentMetrics()
    metrics.tcp.failed(replace(LABELS, response_flags="UF"))
    metrics.tcp.failed(replace(LABELS, response_flags="UH"))
    metrics.tcp.failed(replace(LABELS, response_flags="UF"))
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    failed = {s.labels["response_flags"]: s.value for s in families["istio_tcp_connections_failed"].samples}
    assert failed == {"UF": 2.0, "UH": 1.0}
