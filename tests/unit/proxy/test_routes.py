"""Routes: what a connection's addresses mean, worked out once per route and snapshot.

Outbound, except where a service's endpoint is picked; inbound over HBONE, keyed by everything the
meaning depends on (the peer's identity and address, the claimed client IP, the target).
"""

from __future__ import annotations

import dataclasses
import itertools
from ipaddress import ip_address

from agent.hbone import SocketAddress, TunnelRequested
from agent.proxy.labels import hbone_inbound_labels, outbound_labels
from agent.proxy.pool import PoolKey
from agent.proxy.routes import InboundRoutes, OutboundRoutes
from agent.proxy.sockets import Address
from agent.state import Address as StateAddress
from agent.state import LoadBalanced, MeshConfig, Passthrough, Snapshot, Tunnel, Workload, build_snapshot
from tests.unit.state.factories import service, workload

SLEEP = workload("sleep", "10.1.0.2")
LOCAL = workload("local", "10.1.0.3")
ECHO_1 = workload("echo-1", "10.2.0.5", node="node-b", labels={"app": "echo"})
ECHO_2 = workload("echo-2", "10.2.0.6", node="node-b", labels={"app": "echo"})
PLAIN_1 = workload("plain-1", "10.2.0.7", node="node-b", labels={"app": "plain"}, enrolled=False)
PLAIN_2 = workload("plain-2", "10.2.0.8", node="node-b", labels={"app": "plain"}, enrolled=False)
CLIENT = Address("10.1.0.2", 40000)


def snapshot(version: int = 1, *workloads: Workload) -> Snapshot:
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


def alternating() -> OutboundRoutes:
    picks = itertools.cycle([0, 1])
    return OutboundRoutes(lambda count: next(picks) % count)


def spiffe(service_account: str) -> str:
    return f"spiffe://cluster.local/ns/default/sa/{service_account}"


def test_a_route_is_decided_once_per_snapshot_with_what_its_tunnel_needs() -> None:
    routes, current = alternating(), snapshot()
    route = routes.decide(current, CLIENT, Address("10.2.0.5", 8080))
    assert isinstance(route.decision, Tunnel)
    assert route.decision.destination is current.workload(ip_address("10.2.0.5"))
    assert route.tunnel is not None
    assert route.tunnel.pool_key == PoolKey(spiffe("sleep"), spiffe("echo-1"), Address("10.2.0.5", 15008))
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


def test_a_tunnels_labels_are_built_once_per_pair_of_workloads_and_service() -> None:
    routes, current = alternating(), snapshot()
    direct = routes.decide(current, CLIENT, Address("10.2.0.5", 8080)).decision
    assert isinstance(direct, Tunnel)
    labels = routes.labels(current, direct)
    original = StateAddress(ip_address("10.2.0.5"), 8080)
    assert labels == outbound_labels(direct, current, SLEEP.ip, original)
    # The load-balanced route is decided per connection; its tunnel to echo-1 shares a label set.
    via_service = [routes.decide(current, CLIENT, Address("10.96.0.5", 80)).decision for _ in range(3)]
    assert isinstance(via_service[0], Tunnel)
    assert isinstance(via_service[2], Tunnel)
    assert via_service[0] is not via_service[2]
    assert routes.labels(current, via_service[0]) is routes.labels(current, via_service[2])
    assert routes.labels(current, via_service[0]).service.name == "echo"
    assert isinstance(via_service[1], Tunnel)
    assert routes.labels(current, via_service[1]).destination.workload == "echo-2"
    assert labels.service.name == ""
    assert routes.labels(current, direct) is labels
    from_local = routes.decide(current, Address("10.1.0.3", 40000), Address("10.2.0.5", 8080)).decision
    assert isinstance(from_local, Tunnel)
    assert routes.labels(current, from_local).source.workload == "local"


def test_a_tunnels_labels_follow_a_new_snapshot() -> None:
    routes, before = alternating(), snapshot(1)
    to_echo = Address("10.2.0.5", 8080)
    old = routes.decide(before, CLIENT, to_echo).decision
    assert isinstance(old, Tunnel)
    assert routes.labels(before, old).destination.version == ""
    relabelled = dataclasses.replace(ECHO_1, labels={"app": "echo", "version": "v2"})
    after = snapshot(2, SLEEP, LOCAL, relabelled, ECHO_2)
    new = routes.decide(after, CLIENT, to_echo).decision
    assert isinstance(new, Tunnel)
    assert routes.labels(after, new).destination.version == "v2"


NODE_A_IP = Address("10.0.0.1", 50000)
"""The peer of the HBONE connections: node-a's agent."""


def connect_request(
    target: str = "10.2.0.5", port: int = 8080, client: str | None = "10.1.0.2"
) -> TunnelRequested:
    forwarded_for = SocketAddress(ip_address(client), 40000) if client is not None else None
    return TunnelRequested(1, SocketAddress(ip_address(target), port), forwarded_for)


def test_a_tunnel_from_the_clients_own_identity_is_delivered_from_the_clients_ip() -> None:
    routes, current = InboundRoutes("node-b"), snapshot()
    tunnel = routes.tunnel(current, spiffe("sleep"), NODE_A_IP, connect_request())
    assert (tunnel.destination, tunnel.destination_identity) == (ECHO_1, spiffe("echo-1"))
    assert tunnel.target == Address("10.2.0.5", 8080)
    assert tunnel.deliver_from == Address("10.1.0.2", 0)
    assert tunnel.connection.source_ip == ip_address("10.1.0.2")
    assert (tunnel.connection.destination_ip, tunnel.connection.destination_port) == (
        ip_address("10.2.0.5"),
        8080,
    )
    assert tunnel.connection.source_identity == spiffe("sleep")
    assert tunnel.labels == hbone_inbound_labels(SLEEP, spiffe("sleep"), ECHO_1, spiffe("echo-1"))
    # The client's next connection (another port): the same meaning, not worked out again.
    assert routes.tunnel(current, spiffe("sleep"), NODE_A_IP, connect_request()) is tunnel


def test_an_identity_cannot_speak_for_another_workloads_ip() -> None:
    routes, current = InboundRoutes("node-b"), snapshot()
    routes.tunnel(current, spiffe("sleep"), NODE_A_IP, connect_request())  # kept: must not be reused
    spoofed = routes.tunnel(current, spiffe("local"), NODE_A_IP, connect_request())
    assert spoofed.deliver_from is None
    assert spoofed.connection.source_ip == ip_address("10.0.0.1")
    assert spoofed.labels == hbone_inbound_labels(None, spiffe("local"), ECHO_1, spiffe("echo-1"))
    other_peer = routes.tunnel(current, spiffe("local"), Address("10.0.0.9", 50000), connect_request())
    assert other_peer.connection.source_ip == ip_address("10.0.0.9")
    unnamed = routes.tunnel(current, spiffe("sleep"), NODE_A_IP, connect_request(client=None))
    assert (unnamed.deliver_from, unnamed.connection.source_ip) == (None, ip_address("10.0.0.1"))
    named_other = routes.tunnel(current, spiffe("local"), NODE_A_IP, connect_request(client="10.1.0.3"))
    assert named_other.deliver_from == Address("10.1.0.3", 0)


def test_a_tunnels_target_is_a_local_enrolled_workload_or_none() -> None:
    routes, current = InboundRoutes("node-b"), snapshot()
    routes.tunnel(current, spiffe("sleep"), NODE_A_IP, connect_request(port=8080))
    other_port = routes.tunnel(current, spiffe("sleep"), NODE_A_IP, connect_request(port=9090))
    assert (other_port.target.port, other_port.connection.destination_port) == (9090, 9090)
    other_pod = routes.tunnel(current, spiffe("sleep"), NODE_A_IP, connect_request(target="10.2.0.6"))
    assert other_pod.destination == ECHO_2
    for target in ("10.2.0.7", "10.1.0.3", "10.9.9.9"):  # not enrolled, another node's, no pod
        tunnel = routes.tunnel(current, spiffe("sleep"), NODE_A_IP, connect_request(target=target))
        assert (tunnel.destination, tunnel.destination_identity) == (None, "")


def test_a_new_snapshot_works_a_tunnel_out_again() -> None:
    routes = InboundRoutes("node-b")
    before = routes.tunnel(snapshot(1), spiffe("sleep"), NODE_A_IP, connect_request())
    renamed = dataclasses.replace(ECHO_1, service_account="echo-v2")
    after = routes.tunnel(
        snapshot(2, SLEEP, LOCAL, renamed, ECHO_2), spiffe("sleep"), NODE_A_IP, connect_request()
    )
    assert (before.destination_identity, after.destination_identity) == (spiffe("echo-1"), spiffe("echo-v2"))
