"""A connection that could not be opened is counted as failed with its flag, and logged with why."""

from __future__ import annotations

import asyncio
import time

from agent.observability.metrics import AgentMetrics, PeerLabels, TcpLabels
from agent.proxy.labels import ResponseFlag
from agent.proxy.sessions import REPORT_DELAY_S, Leg, Sessions
from tests.unit.proxy.mesh import RecordingHandler, recorded_access_log

CLIENT = PeerLabels(workload="sleep", namespace="shop", principal="spiffe://cluster.local/ns/shop/sa/sleep")
SERVER = PeerLabels(workload="echo", namespace="shop", principal="spiffe://cluster.local/ns/shop/sa/echo")


def samples(metrics: AgentMetrics, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (sample.labels, sample.value)
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == name
    ]


def failed_samples(metrics: AgentMetrics) -> list[tuple[dict[str, str], float]]:
    return samples(metrics, "istio_tcp_connections_failed_total")


def closed_count(metrics: AgentMetrics) -> float:
    return sum(value for _, value in samples(metrics, "istio_tcp_connections_closed_total"))


def sessions_under_test() -> tuple[Sessions, AgentMetrics, RecordingHandler]:
    metrics = AgentMetrics()
    access_log, access = recorded_access_log(f"sessions.{id(metrics)}")
    return Sessions(metrics, access_log), metrics, access


async def test_a_refusal_counts_each_leg_as_failed_with_its_flag_and_logs_the_reason() -> None:
    sessions, metrics, access = sessions_under_test()
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
    assert failed_samples(metrics) == []  # reported a moment later
    sessions.report_pending()

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


async def test_finished_connections_are_reported_together_a_moment_later_with_their_end_time() -> None:
    sessions, metrics, access = sessions_under_test()
    labels = TcpLabels("source", CLIENT, SERVER, security_policy="mutual_tls")
    legs = [Leg("outbound", labels, f"10.1.0.2:{port}", "10.2.0.5:8080") for port in (1, 2)]
    relays = [sessions.begin([leg]) for leg in legs]
    for relay in relays:
        relay.closed(downstream=True, error="client left")
    ended = time.monotonic()
    assert len(sessions) == 0  # a drain waiting on them is released at once
    assert (closed_count(metrics), access.lines) == (0, [])

    await asyncio.sleep(REPORT_DELAY_S * 5)
    assert closed_count(metrics) == 2
    assert [line["src.addr"] for line in access.lines] == ["10.1.0.2:1", "10.1.0.2:2"]
    assert all(line["error"] == "client left" for line in access.lines)
    # The duration ends when the connection did, not when the line is written.
    for line, relay in zip(access.lines, relays, strict=True):
        assert line["duration_ms"] <= (ended - relay.counters[0].started) * 1000


async def test_the_last_reports_go_out_at_once_when_asked() -> None:
    sessions, metrics, access = sessions_under_test()
    labels = TcpLabels("source", CLIENT, SERVER)
    sessions.begin([Leg("outbound", labels, "10.1.0.2:1", "10.2.0.5:8080")]).closed(downstream=True)
    sessions.report_pending()
    assert closed_count(metrics) == 1
    assert len(access.lines) == 1
    await asyncio.sleep(REPORT_DELAY_S * 5)
    assert len(access.lines) == 1  # reported once


async def test_reports_keep_the_order_in_which_connections_ended() -> None:
    sessions, _, access = sessions_under_test()
    labels = TcpLabels("destination", CLIENT, SERVER)
    relay = sessions.begin([Leg("inbound", labels, "10.1.0.2:1", "10.2.0.5:8080")])
    relay.closed(downstream=True)
    sessions.refused([Leg("inbound", labels, "10.1.0.2:2", "10.2.0.5:8080")], ResponseFlag.DENIED, "no", 0.0)
    await asyncio.sleep(REPORT_DELAY_S * 5)
    assert [line["src.addr"] for line in access.lines] == ["10.1.0.2:1", "10.1.0.2:2"]
