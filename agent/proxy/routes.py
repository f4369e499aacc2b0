"""What a connection's addresses mean under a snapshot, worked out once per route and snapshot.

Outbound, a route is a client IP and an original destination: its `decide_outbound` decision and,
for a tunnel to another node, its pool key and CONNECT target; a tunnel's metric labels are kept
per pair of workloads (`OutboundRoutes`). Inbound over HBONE, it is a CONNECT's peer (identity and
address), claimed client IP and target: which workload the client is (only a workload's own
identity may speak for its IP), which local workload is the destination and under which identity
it is served, what authorization is asked about, where the connection is delivered from, and its
metric labels (`InboundRoutes`). Authorization itself runs for every connection.

Both are pure functions of the snapshot and those values, and a node's connections mostly repeat a
few routes; working them out for every connection cost each agent more CPU per new connection than
looking them up (docs/benchmarks.md, session 8). Both are kept in a `SnapshotMemo`. A decision that
picked one of a service's endpoints is not kept: a load-balanced connection is decided anew.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.hbone import SocketAddress, TunnelRequested
from agent.observability.metrics import TcpLabels
from agent.proxy.labels import hbone_inbound_labels, tunnel_labels
from agent.proxy.memo import SnapshotMemo
from agent.proxy.pool import PoolKey
from agent.proxy.sockets import Address
from agent.state import Address as StateAddress
from agent.state import (
    EndpointPicker,
    InboundConnection,
    IPAddress,
    OutboundDecision,
    Snapshot,
    Tunnel,
    Workload,
    decide_outbound,
)

# Outbound


@dataclass(frozen=True, slots=True)
class TunnelRoute:
    """What tunnelling to another node needs beyond the decision."""

    pool_key: PoolKey
    """The pool of the destination's connections."""

    target: SocketAddress
    """The CONNECT's target."""


@dataclass(frozen=True, slots=True)
class OutboundRoute:
    """How connections from one client IP to one original destination proceed."""

    decision: OutboundDecision
    tunnel: TunnelRoute | None
    """For a tunnel to another node; None for any other decision."""


class OutboundRoutes:
    """`decide_outbound` for captured connections, kept per route and snapshot (see the module
    docstring)."""

    def __init__(self, pick: EndpointPicker) -> None:
        self._pick = pick
        self._routes: SnapshotMemo[tuple[str, str, int], OutboundRoute] = SnapshotMemo()
        self._labels: SnapshotMemo[tuple[int, int, int], TcpLabels] = SnapshotMemo()

    def decide(self, snapshot: Snapshot, client: Address, destination: Address) -> OutboundRoute:
        """The route of a connection from `client` to its original `destination`."""
        key = (client.ip, destination.ip, destination.port)
        route = self._routes.get(snapshot, key)
        if route is not None:
            return route
        picked = False

        def pick(count: int) -> int:
            nonlocal picked
            picked = True
            return self._pick(count)

        original = StateAddress(destination.ip_address, destination.port)
        decision = decide_outbound(snapshot, client.ip_address, original, pick=pick)
        route = OutboundRoute(decision, _tunnel_route(decision))
        return route if picked else self._routes.put(key, route)

    def labels(self, snapshot: Snapshot, tunnel: Tunnel) -> TcpLabels:
        """`tunnel_labels(tunnel)` for a tunnel `snapshot` decided, kept per pair of workloads (and
        service): a load-balanced route's tunnels, decided per connection, share them too. The key
        names the snapshot's objects by identity."""
        key = (id(tunnel.source), id(tunnel.destination), id(tunnel.service))
        labels = self._labels.get(snapshot, key)
        if labels is None:
            labels = self._labels.put(key, tunnel_labels(tunnel))
        return labels


def _tunnel_route(decision: OutboundDecision) -> TunnelRoute | None:
    if not isinstance(decision, Tunnel) or decision.same_node:
        return None
    gateway = Address(str(decision.gateway.ip), decision.gateway.port)
    return TunnelRoute(
        PoolKey(decision.source_identity, decision.destination_identity, gateway),
        SocketAddress(decision.target.ip, decision.target.port),
    )


# Inbound over HBONE


@dataclass(frozen=True, slots=True)
class InboundTunnel:
    """What a CONNECT means under one snapshot."""

    destination: Workload | None
    """The local enrolled workload at the target's IP, if any."""

    destination_identity: str
    """The SPIFFE ID `destination` is served as ("" without one)."""

    target: Address
    """Where to connect: the target pod's IP and port."""

    connection: InboundConnection
    """What authorization is asked about."""

    deliver_from: Address | None
    """The client's IP (port 0) when its workload is known and vouched for by the peer's identity;
    None: from the agent's own address."""

    labels: TcpLabels
    """The destination side's metric labels."""


def local_workload(snapshot: Snapshot, ip: IPAddress, node_name: str) -> Workload | None:
    """The enrolled workload of node `node_name` that has `ip`, if any."""
    workload = snapshot.workload(ip)
    if workload is None or workload.node != node_name or not workload.enrolled:
        return None
    return workload


class InboundRoutes:
    """What CONNECTs mean, kept per peer identity, peer address, claimed client IP and target, and
    snapshot (see the module docstring)."""

    def __init__(self, node_name: str) -> None:
        self._node_name = node_name
        self._tunnels: SnapshotMemo[tuple[str, str, IPAddress | None, IPAddress, int], InboundTunnel] = (
            SnapshotMemo()
        )

    def tunnel(
        self, snapshot: Snapshot, peer_identity: str, peer: Address, request: TunnelRequested
    ) -> InboundTunnel:
        """What `request`, from the peer at `peer` authenticated as `peer_identity`, means."""
        client, target = request.forwarded_for, request.target
        key = (peer_identity, peer.ip, client.ip if client is not None else None, target.ip, target.port)
        tunnel = self._tunnels.get(snapshot, key)
        if tunnel is not None:
            return tunnel
        trust_domain = snapshot.mesh.trust_domain
        claimed = snapshot.workload(client.ip) if client is not None else None
        # Only a workload's own identity may speak for its IP (see agent.proxy.inbound).
        source = claimed if claimed is not None and claimed.spiffe_id(trust_domain) == peer_identity else None
        source_ip = client.ip if source is not None and client is not None else peer.ip_address
        destination = local_workload(snapshot, target.ip, self._node_name)
        destination_identity = destination.spiffe_id(trust_domain) if destination is not None else ""
        tunnel = InboundTunnel(
            destination=destination,
            destination_identity=destination_identity,
            target=Address(str(target.ip), target.port),
            connection=InboundConnection(
                source_ip=source_ip,
                destination_ip=target.ip,
                destination_port=target.port,
                source_identity=peer_identity,
            ),
            deliver_from=Address(str(source_ip), 0) if source is not None else None,
            labels=hbone_inbound_labels(source, peer_identity, destination, destination_identity),
        )
        return self._tunnels.put(key, tunnel)
