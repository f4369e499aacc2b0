"""Outbound routes: decided once per route and snapshot, except where a service's endpoint is picked."""

from __future__ import annotations

import dataclasses
import itertools
from ipaddress import ip_address

from agent.hbone import SocketAddress
from agent.proxy.outbound import Routes
from agent.proxy.pool import PoolKey
from agent.proxy.sockets import Address
from agent.state import LoadBalanced, MeshConfig, Passthrough, Snapshot, Tunnel, build_snapshot
from tests.unit.state.factories import service, workload

SLEEP = workload("sleep", "10.1.0.2")
LOCAL = workload("local", "10.1.0.3")
ECHO_1 = workload("echo-1", "10.2.0.5", node="node-b", labels={"app": "echo"})
ECHO_2 = workload("echo-2", "10.2.0.6", node="node-b", labels={"app": "echo"})
PLAIN_1 = workload("plain-1", "10.2.0.7", node="node-b", labels={"app": "plain"}, enrolled=False)
PLAIN_2 = workload("plain-2", "10.2.0.8", node="node-b", labels={"app": "plain"}, enrolled=False)
CLIENT = Address("10.1.0.2", 40000)


def snapshot(version: int = 1, *workloads: object) -> Snapshot:
    return build_snapshot(
        version=version,
        created_at=float(version),
        workloads=workloads or (SLEEP, LOCAL, ECHO_1, ECHO_2, PLAIN_1, PLAIN_2),
        services=[
            service("echo", "10.96.0.5", (80, 8080)),
            service("plain", "10.96.0.7", (80, 8080)),
        ],
        mesh=MeshConfig(trust_domain="cluster.local", hbone_port=15008),
    )


def alternating() -> Routes:
    picks = itertools.cycle([0, 1])
    return Routes(lambda count: next(picks) % count)


def test_a_route_is_decided_once_per_snapshot_with_what_its_tunnel_needs() -> None:
    routes, current = alternating(), snapshot()
    route = routes.decide(current, CLIENT, Address("10.2.0.5", 8080))
    assert isinstance(route.decision, Tunnel)
    assert route.decision.destination is current.workload(ip_address("10.2.0.5"))
    assert route.tunnel is not None
    assert route.tunnel.pool_key == PoolKey(
        "spiffe://cluster.local/ns/default/sa/sleep",
        "spiffe://cluster.local/ns/default/sa/echo-1",
        Address("10.2.0.5", 15008),
    )
    assert route.tunnel.target == SocketAddress(ip_address("10.2.0.5"), 8080)
    # Another connection of the route (another client port): the same route, not decided again.
    assert routes.decide(current, Address("10.1.0.2", 40001), Address("10.2.0.5", 8080)) is route
    from_local = routes.decide(current, Address("10.1.0.3", 40000), Address("10.2.0.5", 8080)).decision
    assert isinstance(from_local, Tunnel)
    assert from_local.source.name == "local"
    other_port = routes.decide(current, CLIENT, Address("10.2.0.5", 9090)).tunnel
    assert other_port is not None
    assert other_port.target == SocketAddress(ip_address("10.2.0.5"), 9090)
    assert routes.decide(current, CLIENT, Address("10.2.0.6", 8080)).decision.destination is not (
        route.decision.destination
    )
    same_node = routes.decide(current, CLIENT, Address("10.1.0.3", 8080))
    assert isinstance(same_node.decision, Tunnel)
    assert same_node.decision.same_node
    assert same_node.tunnel is None


def test_a_new_snapshot_decides_the_route_again() -> None:
    routes = alternating()
    to_echo = Address("10.2.0.5", 8080)
    tunnelled = routes.decide(snapshot(1), CLIENT, to_echo)
    unenrolled = dataclasses.replace(ECHO_1, enrolled=False)
    passed = routes.decide(snapshot(2, SLEEP, LOCAL, unenrolled, ECHO_2), CLIENT, to_echo)
    assert isinstance(tunnelled.decision, Tunnel)
    assert isinstance(passed.decision, Passthrough)
    assert passed.tunnel is None


def test_a_load_balanced_route_picks_an_endpoint_for_every_connection() -> None:
    routes, current = alternating(), snapshot()
    tunnelled = [routes.decide(current, CLIENT, Address("10.96.0.5", 80)).decision for _ in range(2)]
    plain = [routes.decide(current, CLIENT, Address("10.96.0.7", 80)).decision for _ in range(2)]
    assert [d.destination.name for d in tunnelled if isinstance(d, Tunnel)] == ["echo-1", "echo-2"]
    assert [d.endpoint.workload.name for d in plain if isinstance(d, LoadBalanced)] == ["plain-1", "plain-2"]
