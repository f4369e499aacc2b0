"""The outbound decision, as a table in the style of ztunnel's `build_request` tests."""

from __future__ import annotations

import dataclasses
from ipaddress import ip_address

import pytest

from agent.state.model import Address, Workload
from agent.state.outbound import (
    LoadBalanced,
    OutboundDecision,
    Passthrough,
    PassthroughReason,
    Refuse,
    RefuseReason,
    Tunnel,
    decide_outbound,
)
from agent.state.snapshot import MeshConfig, ServiceTarget, build_snapshot
from tests.unit.state.factories import service, workload

CLIENT = workload("client", "10.1.0.2", namespace="shop")
OUTSIDER = workload("outsider", "10.1.0.9", namespace="shop", enrolled=False)
LOCAL_SERVER = workload(
    "server-a", "10.1.0.3", namespace="shop", service_account="web", labels={"app": "web"}
)
REMOTE_SERVER = workload(
    "server-b", "10.2.0.3", namespace="shop", service_account="web", labels={"app": "web"}, node="node-b"
)
LEGACY = workload("legacy", "10.2.0.4", namespace="shop", node="node-b", enrolled=False)
WEB = service("web", "10.96.0.10", (80, 8080), namespace="shop")
LEGACY_SERVICE = service("legacy", "10.96.0.11", (80, 8080), namespace="shop")
EMPTY = service("empty", "10.96.0.12", (80, 8080), namespace="shop")
API = dataclasses.replace(service("kubernetes", "10.96.0.1", (443, 6443)), selector=None)

SNAPSHOT = build_snapshot(
    version=1,
    created_at=0.0,
    workloads=[CLIENT, OUTSIDER, LOCAL_SERVER, REMOTE_SERVER, LEGACY],
    services=[WEB, LEGACY_SERVICE, EMPTY, API],
)


def at(ip: str, port: int) -> Address:
    return Address(ip_address(ip), port)


def target_at(ip: str, port: int) -> ServiceTarget:
    target = SNAPSHOT.service(at(ip, port))
    assert target is not None
    return target


def tunnel_to(
    server: Workload, target: Address, *, same_node: bool, via: ServiceTarget | None = None
) -> Tunnel:
    return Tunnel(
        source=CLIENT,
        source_identity="spiffe://cluster.local/ns/shop/sa/client",
        destination=server,
        destination_identity="spiffe://cluster.local/ns/shop/sa/web",
        target=target,
        gateway=Address(server.ip, 15008),
        same_node=same_node,
        service=via,
    )


@pytest.mark.parametrize(
    ("source", "destination", "pick", "expected"),
    [
        pytest.param(
            "10.1.0.2",
            at("10.2.0.3", 8080),
            0,
            tunnel_to(REMOTE_SERVER, at("10.2.0.3", 8080), same_node=False),
            id="enrolled pod on another node: tunnel to its node's agent",
        ),
        pytest.param(
            "10.1.0.2",
            at("10.1.0.3", 8080),
            0,
            tunnel_to(LOCAL_SERVER, at("10.1.0.3", 8080), same_node=True),
            id="enrolled pod on the same node: local inbound path",
        ),
        pytest.param(
            "10.1.0.2",
            at("10.96.0.10", 80),
            0,
            tunnel_to(LOCAL_SERVER, at("10.1.0.3", 8080), same_node=True, via=target_at("10.96.0.10", 80)),
            id="service: first endpoint, service port mapped to target port",
        ),
        pytest.param(
            "10.1.0.2",
            at("10.96.0.10", 80),
            1,
            tunnel_to(REMOTE_SERVER, at("10.2.0.3", 8080), same_node=False, via=target_at("10.96.0.10", 80)),
            id="service: second endpoint",
        ),
        pytest.param(
            "10.1.0.2",
            at("10.96.0.11", 80),
            0,
            LoadBalanced(
                service=target_at("10.96.0.11", 80), endpoint=target_at("10.96.0.11", 80).endpoints[0]
            ),
            id="service whose endpoint is outside the mesh: plain TCP to the endpoint",
        ),
        pytest.param(
            "10.1.0.2",
            at("10.96.0.12", 80),
            0,
            Refuse(reason=RefuseReason.NO_READY_ENDPOINTS),
            id="service without ready endpoints: refuse",
        ),
        pytest.param(
            "10.1.0.2",
            at("10.96.0.1", 443),
            0,
            Passthrough(target=at("10.96.0.1", 443), reason=PassthroughReason.SERVICE_WITHOUT_SELECTOR),
            id="service without selector (the API server): passthrough to kube-proxy",
        ),
        pytest.param(
            "10.1.0.2",
            at("10.96.0.10", 81),
            0,
            Passthrough(target=at("10.96.0.10", 81), reason=PassthroughReason.UNKNOWN_ADDRESS),
            id="service IP on a port it does not serve: unknown",
        ),
        pytest.param(
            "10.1.0.2",
            at("10.2.0.4", 8080),
            0,
            Passthrough(target=at("10.2.0.4", 8080), reason=PassthroughReason.DESTINATION_NOT_IN_MESH),
            id="pod outside the mesh: passthrough",
        ),
        pytest.param(
            "10.1.0.2",
            at("93.184.216.34", 443),
            0,
            Passthrough(target=at("93.184.216.34", 443), reason=PassthroughReason.UNKNOWN_ADDRESS),
            id="address outside the cluster: passthrough",
        ),
        pytest.param(
            "10.1.0.2",
            at("10.0.0.2", 10250),
            0,
            Passthrough(target=at("10.0.0.2", 10250), reason=PassthroughReason.UNKNOWN_ADDRESS),
            id="node address: passthrough",
        ),
        pytest.param(
            "10.1.0.9",
            at("10.96.0.10", 80),
            0,
            Passthrough(target=at("10.96.0.10", 80), reason=PassthroughReason.SOURCE_NOT_IN_MESH),
            id="source not enrolled: passthrough untouched",
        ),
        pytest.param(
            "10.1.0.99",
            at("10.2.0.3", 8080),
            0,
            Refuse(reason=RefuseReason.UNKNOWN_SOURCE),
            id="unknown source: refuse",
        ),
    ],
)
def test_outbound_decision(source: str, destination: Address, pick: int, expected: OutboundDecision) -> None:
    def picker(count: int) -> int:
        assert 0 <= pick < count
        return pick

    assert decide_outbound(SNAPSHOT, ip_address(source), destination, pick=picker) == expected


def test_picker_is_asked_with_the_number_of_endpoints_and_its_index_is_used() -> None:
    servers = [workload(f"web-{i}", f"10.1.0.{10 + i}", labels={"app": "web"}) for i in range(5)]
    snapshot = build_snapshot(
        version=1,
        created_at=0.0,
        workloads=[CLIENT, *servers],
        services=[service("web", "10.96.0.10", (80, 80))],
    )
    asked: list[int] = []

    chosen = []
    for index in range(5):

        def picker(count: int, index: int = index) -> int:
            asked.append(count)
            return index

        decision = decide_outbound(snapshot, CLIENT.ip, at("10.96.0.10", 80), pick=picker)
        assert isinstance(decision, Tunnel)
        chosen.append(decision.destination)

    assert asked == [5] * 5
    assert chosen == servers


def test_mesh_settings_shape_identities_and_gateway() -> None:
    snapshot = build_snapshot(
        version=1,
        created_at=0.0,
        workloads=[CLIENT, REMOTE_SERVER],
        mesh=MeshConfig(trust_domain="example.org", hbone_port=15108),
    )

    decision = decide_outbound(snapshot, CLIENT.ip, at("10.2.0.3", 8080), pick=lambda count: 0)

    assert isinstance(decision, Tunnel)
    assert decision.source_identity == "spiffe://example.org/ns/shop/sa/client"
    assert decision.destination_identity == "spiffe://example.org/ns/shop/sa/web"
    assert decision.gateway == at("10.2.0.3", 15108)


def test_ipv6_destination() -> None:
    client = workload("client", "fd00::2", namespace="shop")
    server = workload("server", "fd00::3", namespace="shop", node="node-b")
    snapshot = build_snapshot(version=1, created_at=0.0, workloads=[client, server])

    decision = decide_outbound(snapshot, client.ip, at("fd00::3", 8080), pick=lambda count: 0)

    assert isinstance(decision, Tunnel)
    assert str(decision.target) == "[fd00::3]:8080"
    assert str(decision.gateway) == "[fd00::3]:15008"


def test_load_balanced_target_is_the_endpoint_address() -> None:
    decision = decide_outbound(SNAPSHOT, CLIENT.ip, at("10.96.0.11", 80), pick=lambda count: 0)

    assert isinstance(decision, LoadBalanced)
    assert decision.target == at("10.2.0.4", 8080)
    assert decision.endpoint.workload == LEGACY
