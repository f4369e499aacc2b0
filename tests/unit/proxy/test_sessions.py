"""A connection that could not be opened is counted as failed with its flag, and logged with why."""

from __future__ import annotations

import time

from agent.observability.metrics import AgentMetrics, PeerLabels, TcpLabels
from agent.proxy.labels import ResponseFlag
from agent.proxy.sessions import Leg, Sessions
from tests.unit.proxy.mesh import recorded_access_log

CLIENT = PeerLabels(workload="sleep", namespace="shop", principal="spiffe://cluster.local/ns/shop/sa/sleep")
SERVER = PeerLabels(workload="echo", namespace="shop", principal="spiffe://cluster.local/ns/shop/sa/echo")


def failed_samples(metrics: AgentMetrics) -> list[tuple[dict[str, str], float]]:
    return [
        (sample.labels, sample.value)
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == "istio_tcp_connections_failed_total"
    ]


def test_a_refusal_counts_each_leg_as_failed_with_its_flag_and_logs_the_reason() -> None:
    metrics = AgentMetrics()
    access_log, access = recorded_access_log(f"sessions.{id(metrics)}")
    sessions = Sessions(metrics, access_log)
    labels = TcpLabels("source", CLIENT, SERVER, security_policy="mutual_tls")
    legs = [
        Leg("outbound", labels, "10.1.0.2:40000", "10.2.0.5:8080"),
        Leg(
            "inbound",
            TcpLabels("destination", CLIENT, SERVER, security_policy="mutual_tls"),
            "10.1.0.2:40000",
            "10.2.0.5:8080",
        ),
    ]

    sessions.refused(legs, ResponseFlag.DENIED, "denied by policy deny-sleep", time.monotonic())

    counted = failed_samples(metrics)
    assert sorted((sample["reporter"], sample["response_flags"], value) for sample, value in counted) == [
        ("destination", "UAEX", 1.0),
        ("source", "UAEX", 1.0),
    ]
    assert {sample["connection_security_policy"] for sample, _ in counted} == {"mutual_tls"}
    assert [(line["direction"], line["error"]) for line in access.lines] == [
        ("outbound", "denied by policy deny-sleep"),
        ("inbound", "denied by policy deny-sleep"),
    ]
    assert all(line["src.identity"] == CLIENT.principal for line in access.lines)
    assert len(sessions) == 0  # nothing was opened
