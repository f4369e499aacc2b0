"""The HTTP endpoints serve metrics, readiness, config dump, live connections, levels and drain."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from agent.observability.metrics import AgentMetrics, PeerLabels, TcpLabels
from agent.observability.servers import AdminProviders, Readiness, admin_app, metrics_app, readiness_app

LABELS = TcpLabels(
    reporter="destination",
    source=PeerLabels(workload="sleep", principal="spiffe://cluster.local/ns/demo/sa/sleep"),
    destination=PeerLabels(workload="echo", principal="spiffe://cluster.local/ns/demo/sa/echo"),
    security_policy="mutual_tls",
)


@asynccontextmanager
async def client(app: web.Application) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


async def test_metrics_endpoint_serves_the_exposition() -> None:
    metrics = AgentMetrics()
    metrics.tcp.opened(LABELS).sent = 77
    async with client(metrics_app(metrics)) as http:
        response = await http.get("/metrics")
        text = await response.text()
    assert response.status == 200
    assert "istio_tcp_sent_bytes_total{" in text
    assert 'connection_security_policy="mutual_tls"' in text


async def test_readiness_waits_for_every_condition_and_flips_on_drain() -> None:
    readiness = Readiness()
    readiness.require("first-sync", "listeners-bound")
    async with client(readiness_app(readiness)) as http:
        first = await http.get("/healthz/ready")
        assert (first.status, await first.text()) == (503, "waiting for: first-sync, listeners-bound\n")
        readiness.satisfy("first-sync")
        readiness.satisfy("listeners-bound")
        assert (await http.get("/healthz/ready")).status == 200
        readiness.draining = True
        draining = await http.get("/healthz/ready")
        assert (draining.status, await draining.text()) == (503, "draining\n")


def admin(metrics: AgentMetrics, on_drain: Callable[[], None] = lambda: None) -> web.Application:
    async def drain() -> None:
        on_drain()

    return admin_app(
        metrics, AdminProviders(config_dump=lambda: {"workloads": [{"ip": "10.244.1.5"}]}, drain=drain)
    )


async def test_config_dump_and_connections_are_json() -> None:
    metrics = AgentMetrics()
    connection = metrics.tcp.opened(LABELS)
    connection.received = 5
    async with client(admin(metrics)) as http:
        dump = await (await http.get("/config_dump")).json()
        table = await (await http.get("/connections")).json()
    assert dump == {"workloads": [{"ip": "10.244.1.5"}]}
    [row] = table["connections"]
    assert row["id"] == connection.id
    assert row["source_principal"] == LABELS.source.principal
    assert row["bytes_received"] == 5


async def test_logging_level_is_settable_and_validated() -> None:
    root = logging.getLogger()
    before = root.level
    try:
        async with client(admin(AgentMetrics())) as http:
            assert (await (await http.post("/logging?level=debug")).json()) == {"level": "DEBUG"}
            assert root.level == logging.DEBUG
            bad = await http.post("/logging?level=loud")
            assert bad.status == 400
            assert root.level == logging.DEBUG
    finally:
        root.setLevel(before)


async def test_quitquitquit_starts_the_drain() -> None:
    drained: list[bool] = []
    async with client(admin(AgentMetrics(), lambda: drained.append(True))) as http:
        response = await http.post("/quitquitquit")
    assert response.status == 200
    assert drained == [True]
