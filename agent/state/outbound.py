"""The outbound decision: where a connection captured from a local pod goes, and how.

A pure function over the snapshot (the shape of ztunnel's `build_request`): the data plane calls it with
the captured connection's source IP and original destination and acts on the typed result. Service IPs
are load-balanced here, since capture happens before kube-proxy's DNAT.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from agent.state.model import Address, IPAddress, Workload
from agent.state.snapshot import Endpoint, ServiceTarget, Snapshot

EndpointPicker = Callable[[int], int]
"""Given how many endpoints there are (at least one), returns the index of the one to use;
`random.randrange` is one, a fixed function makes the choice reproducible in tests."""


class PassthroughReason(enum.StrEnum):
    """Why a connection goes out as plain TCP to its original destination."""

    UNKNOWN_ADDRESS = "the destination is neither a known pod nor a service port"
    DESTINATION_NOT_IN_MESH = "the destination pod is not enrolled"
    SOURCE_NOT_IN_MESH = "the source pod is not enrolled"
    SERVICE_WITHOUT_SELECTOR = "the service's endpoints are managed outside Kubernetes"


class RefuseReason(enum.StrEnum):
    """Why a connection is refused."""

    UNKNOWN_SOURCE = "the source address is not a known pod"
    NO_READY_ENDPOINTS = "the service has no ready endpoints"


@dataclass(frozen=True, slots=True, kw_only=True)
class Tunnel:
    """Carry the connection over HBONE to an enrolled destination pod."""

    source: Workload
    source_identity: str
    """SPIFFE ID the client side presents."""

    destination: Workload
    destination_identity: str
    """SPIFFE ID the server's certificate must carry."""

    target: Address
    """The pod address to ask for in the CONNECT request (`:authority`)."""

    gateway: Address
    """Where to dial: the destination pod's IP at the HBONE port (15008). The destination node's agent
    captures it there (TPROXY) and answers with that pod's identity, which a node IP could not name."""

    same_node: bool
    """The destination runs on the source's node: hand it to the local inbound path instead of dialing."""

    service: ServiceTarget | None = None
    """The service port the client addressed, when it addressed a service."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadBalanced:
    """Connect as plain TCP to an endpoint outside the mesh, chosen for the service port addressed."""

    service: ServiceTarget
    endpoint: Endpoint

    @property
    def target(self) -> Address:
        """Where to connect."""
        return self.endpoint.address


@dataclass(frozen=True, slots=True, kw_only=True)
class Passthrough:
    """Connect as plain TCP to the original destination."""

    target: Address
    reason: PassthroughReason


@dataclass(frozen=True, slots=True, kw_only=True)
class Refuse:
    """Refuse the connection."""

    reason: RefuseReason


OutboundDecision = Tunnel | LoadBalanced | Passthrough | Refuse


def decide_outbound(
    snapshot: Snapshot, source_ip: IPAddress, destination: Address, *, pick: EndpointPicker
) -> OutboundDecision:
    """Decides how a connection from the pod at `source_ip` to `destination` proceeds."""
    source = snapshot.workload(source_ip)
    if source is None:
        return Refuse(reason=RefuseReason.UNKNOWN_SOURCE)
    if not source.enrolled:
        return Passthrough(target=destination, reason=PassthroughReason.SOURCE_NOT_IN_MESH)

    service = snapshot.service(destination)
    if service is not None:
        if service.service.selector is None:
            return Passthrough(target=destination, reason=PassthroughReason.SERVICE_WITHOUT_SELECTOR)
        if not service.endpoints:
            return Refuse(reason=RefuseReason.NO_READY_ENDPOINTS)
        endpoint = service.endpoints[pick(len(service.endpoints))]
        if endpoint.workload.enrolled:
            return _tunnel(snapshot, source, endpoint.workload, endpoint.address, service)
        return LoadBalanced(service=service, endpoint=endpoint)

    workload = snapshot.workload(destination.ip)
    if workload is None:
        return Passthrough(target=destination, reason=PassthroughReason.UNKNOWN_ADDRESS)
    if not workload.enrolled:
        return Passthrough(target=destination, reason=PassthroughReason.DESTINATION_NOT_IN_MESH)
    return _tunnel(snapshot, source, workload, destination, None)


def _tunnel(
    snapshot: Snapshot,
    source: Workload,
    destination: Workload,
    target: Address,
    service: ServiceTarget | None,
) -> Tunnel:
    trust_domain = snapshot.mesh.trust_domain
    return Tunnel(
        source=source,
        source_identity=source.spiffe_id(trust_domain),
        destination=destination,
        destination_identity=destination.spiffe_id(trust_domain),
        target=target,
        gateway=Address(target.ip, snapshot.mesh.hbone_port),
        same_node=destination.node == source.node,
        service=service,
    )
