"""The snapshot builder: indexes, endpoint derivation and conflict resolution."""

from __future__ import annotations

import dataclasses
from ipaddress import ip_address

import pytest

from agent.state.model import Address, PortProtocol, Service, ServicePort
from agent.state.policy import AuthorizationPolicy, PeerAuthentication
from agent.state.snapshot import Endpoint, MeshConfig, build_snapshot
from tests.unit.state.factories import service, workload


def at(ip: str, port: int) -> Address:
    return Address(ip_address(ip), port)


def test_version_time_and_mesh_are_the_callers() -> None:
    mesh = MeshConfig(trust_domain="example.org", root_namespace="mesh-root", hbone_port=15009)

    snapshot = build_snapshot(version=7, created_at=1700000000.5, mesh=mesh)

    assert (snapshot.version, snapshot.created_at, snapshot.mesh) == (7, 1700000000.5, mesh)
    assert build_snapshot(version=1, created_at=0.0).mesh == MeshConfig()


def test_snapshot_is_frozen() -> None:
    snapshot = build_snapshot(version=1, created_at=0.0)

    with pytest.raises(dataclasses.FrozenInstanceError):
        snapshot.version = 2  # type: ignore[misc]


def test_workloads_are_indexed_by_every_ip_and_by_node() -> None:
    a = workload("a", "10.1.0.5", extra_ips=("fd00::5",))
    b = workload("b", "10.1.0.6", namespace="alpha")
    c = workload("c", "10.2.0.5", node="node-b")
    host = workload("host", "10.0.0.1", host_network=True)

    snapshot = build_snapshot(version=1, created_at=0.0, workloads=[a, b, c, host])

    assert snapshot.workload(ip_address("10.1.0.5")) is a
    assert snapshot.workload(ip_address("fd00::5")) is a
    assert snapshot.workload(ip_address("10.2.0.5")) is c
    assert snapshot.workload(ip_address("10.0.0.1")) is None
    assert snapshot.workloads_on_node("node-a") == (b, a)
    assert snapshot.workloads_on_node("node-b") == (c,)
    assert snapshot.workloads_on_node("node-z") == ()


@pytest.mark.parametrize(
    ("first_ready", "second_ready", "winner"),
    [
        (True, True, "second"),
        (False, False, "second"),
        (True, False, "first"),
        (False, True, "second"),
    ],
)
def test_ip_claimed_twice_goes_to_the_ready_pod_then_the_later_one(
    first_ready: bool, second_ready: bool, winner: str
) -> None:
    first = workload("first", "10.1.0.5", namespace="old", ready=first_ready)
    second = workload("second", "10.1.0.5", namespace="new", ready=second_ready)

    snapshot = build_snapshot(version=1, created_at=0.0, workloads=[first, second])

    resolved = snapshot.workload(ip_address("10.1.0.5"))
    assert resolved is not None
    assert resolved.name == winner
    assert snapshot.workloads_on_node("node-a") == (resolved,)


def test_service_endpoints_are_the_ready_selected_pods_of_its_namespace_in_address_order() -> None:
    pods = [
        workload("web-2", "10.1.0.9", labels={"app": "web"}),
        workload("web-1", "10.1.0.10", labels={"app": "web", "tier": "x"}, node="node-b"),
        workload("web-unready", "10.1.0.11", labels={"app": "web"}, ready=False),
        workload("web-elsewhere", "10.1.0.12", labels={"app": "web"}, namespace="other"),
        workload("db", "10.1.0.13", labels={"app": "db"}),
    ]
    web = service("web", "10.96.0.10", (80, 8080), (443, 8443))

    snapshot = build_snapshot(version=1, created_at=0.0, workloads=pods, services=[web])

    target = snapshot.service(at("10.96.0.10", 80))
    assert target is not None
    assert (target.service, target.port) == (web, web.ports[0])
    assert target.endpoints == (
        Endpoint(pods[0], at("10.1.0.9", 8080)),
        Endpoint(pods[1], at("10.1.0.10", 8080)),
    )
    tls = snapshot.service(at("10.96.0.10", 443))
    assert tls is not None
    assert [endpoint.address for endpoint in tls.endpoints] == [at("10.1.0.9", 8443), at("10.1.0.10", 8443)]
    assert snapshot.service(at("10.96.0.10", 8080)) is None


def test_publish_not_ready_addresses_includes_unready_pods() -> None:
    unready = workload("web", "10.1.0.9", ready=False)

    snapshot = build_snapshot(
        version=1,
        created_at=0.0,
        workloads=[unready],
        services=[service("web", "10.96.0.10", (80, 80), publish_not_ready=True)],
    )

    target = snapshot.service(at("10.96.0.10", 80))
    assert target is not None
    assert target.endpoints == (Endpoint(unready, at("10.1.0.9", 80)),)


def test_named_target_port_resolves_per_pod_and_skips_pods_without_it() -> None:
    new = workload("web-new", "10.1.0.9", labels={"app": "web"}, named_ports={"http": 8080})
    old = workload("web-old", "10.1.0.10", labels={"app": "web"}, named_ports={"http": 9080})
    other = workload("web-other", "10.1.0.11", labels={"app": "web"}, named_ports={"grpc": 9000})

    snapshot = build_snapshot(
        version=1,
        created_at=0.0,
        workloads=[new, old, other],
        services=[service("web", "10.96.0.10", (80, "http"))],
    )

    target = snapshot.service(at("10.96.0.10", 80))
    assert target is not None
    assert [endpoint.address for endpoint in target.endpoints] == [
        at("10.1.0.9", 8080),
        at("10.1.0.10", 9080),
    ]


def test_only_tcp_ports_are_indexed() -> None:
    dns = Service(
        namespace="kube-system",
        name="dns",
        cluster_ips=(ip_address("10.96.0.10"),),
        ports=(
            ServicePort(port=53, target_port=53, protocol=PortProtocol.UDP),
            ServicePort(port=53, target_port=5353, protocol=PortProtocol.TCP),
            ServicePort(port=54, target_port=54, protocol=PortProtocol.SCTP),
        ),
        selector={"app": "dns"},
    )
    pod = workload("dns", "10.1.0.9", namespace="kube-system")

    snapshot = build_snapshot(version=1, created_at=0.0, workloads=[pod], services=[dns])

    target = snapshot.service(at("10.96.0.10", 53))
    assert target is not None
    assert target.port.protocol is PortProtocol.TCP
    assert target.endpoints == (Endpoint(pod, at("10.1.0.9", 5353)),)
    assert snapshot.service(at("10.96.0.10", 54)) is None


def test_dual_stack_service_gets_endpoints_of_each_family() -> None:
    pod = workload("web", "10.1.0.9", extra_ips=("fd00::9",))
    v4_only = workload("web-v4", "10.1.0.10", labels={"app": "web"})
    web = dataclasses.replace(
        service("web", "10.96.0.10", (80, 8080)),
        cluster_ips=(ip_address("10.96.0.10"), ip_address("fd00:96::10")),
    )

    snapshot = build_snapshot(version=1, created_at=0.0, workloads=[pod, v4_only], services=[web])

    v4 = snapshot.service(at("10.96.0.10", 80))
    v6 = snapshot.service(at("fd00:96::10", 80))
    assert v4 is not None
    assert v6 is not None
    assert [endpoint.address for endpoint in v4.endpoints] == [at("10.1.0.9", 8080), at("10.1.0.10", 8080)]
    assert v6.endpoints == (Endpoint(pod, at("fd00::9", 8080)),)


def test_host_network_pods_serve_services_on_their_node_ip() -> None:
    exporter = workload("exporter", "10.0.0.2", node="node-b", host_network=True)

    snapshot = build_snapshot(
        version=1,
        created_at=0.0,
        workloads=[exporter],
        services=[service("exporter", "10.96.0.20", (9100, 9100))],
    )

    target = snapshot.service(at("10.96.0.20", 9100))
    assert target is not None
    assert target.endpoints == (Endpoint(exporter, at("10.0.0.2", 9100)),)
    assert snapshot.workloads_on_node("node-b") == ()


def test_pod_that_lost_its_ip_to_another_is_no_endpoint() -> None:
    stale = workload("web-stale", "10.1.0.9", labels={"app": "web"})
    current = workload("web-current", "10.1.0.9", labels={"app": "web"})

    snapshot = build_snapshot(
        version=1,
        created_at=0.0,
        workloads=[stale, current],
        services=[service("web", "10.96.0.10", (80, 80))],
    )

    target = snapshot.service(at("10.96.0.10", 80))
    assert target is not None
    assert target.endpoints == (Endpoint(current, at("10.1.0.9", 80)),)


def test_service_without_selector_is_indexed_without_endpoints() -> None:
    api = dataclasses.replace(service("kubernetes", "10.96.0.1", (443, 6443)), selector=None)

    snapshot = build_snapshot(
        version=1, created_at=0.0, workloads=[workload("kubernetes", "10.1.0.9")], services=[api]
    )

    target = snapshot.service(at("10.96.0.1", 443))
    assert target is not None
    assert target.service.selector is None
    assert target.endpoints == ()


def test_headless_service_is_not_indexed() -> None:
    headless = dataclasses.replace(service("db", "10.96.0.1", (5432, 5432)), cluster_ips=())

    snapshot = build_snapshot(version=1, created_at=0.0, services=[headless])

    assert snapshot.services_by_address == {}


def test_policies_are_grouped_by_namespace_and_ordered_by_name() -> None:
    b = AuthorizationPolicy(namespace="shop", name="b")
    a = AuthorizationPolicy(namespace="shop", name="a")
    root = AuthorizationPolicy(namespace="istio-system", name="mesh")
    strict = PeerAuthentication(namespace="shop", name="strict")

    snapshot = build_snapshot(
        version=1, created_at=0.0, authorization_policies=[b, root, a], peer_authentications=[strict]
    )

    assert snapshot.authorization_policies == {"shop": (a, b), "istio-system": (root,)}
    assert snapshot.peer_authentications == {"shop": (strict,)}
