"""The immutable snapshot the data plane decides on, and the pure builder that makes it.

The control plane parses watched objects (`agent.state.kube`), hands the lists to `build_snapshot`
(or keeps them up to date in `agent.state.incremental.SnapshotBuilder`, which yields the same result
at the cost of each change), and swaps the result in atomically; nothing in a snapshot changes
afterwards. The builders read no clock: the version and creation time come from the caller.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from agent.state.model import (
    Address,
    IPAddress,
    PortProtocol,
    Service,
    ServicePort,
    Workload,
    selector_matches,
)
from agent.state.policy import AuthorizationPolicy, PeerAuthentication

_Policy = TypeVar("_Policy", AuthorizationPolicy, PeerAuthentication)


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshConfig:
    """Mesh-wide facts the decisions need besides the watched objects."""

    trust_domain: str = "cluster.local"
    """SPIFFE trust domain of workload identities."""

    root_namespace: str = "istio-system"
    """Policies in this namespace without a selector apply to the whole mesh."""

    hbone_port: int = 15008
    """The port every node agent accepts HBONE tunnels on."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A pod serving one service port: the pod and the address to reach it on."""

    workload: Workload
    address: Address
    """The pod's IP in the service IP's family, and the resolved target port."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceTarget:
    """What one service IP and port lead to."""

    service: Service
    port: ServicePort
    endpoints: tuple[Endpoint, ...] = ()
    """Endpoints ordered by address; only ready pods unless the service publishes not-ready ones."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """Workloads, services and policies at one moment, indexed for the data plane's decisions."""

    version: int
    """Increases with every snapshot the control plane publishes."""

    created_at: float
    """When the control plane built it (Unix time, seconds)."""

    mesh: MeshConfig = field(default_factory=MeshConfig)
    """Mesh-wide settings the snapshot was built for."""

    workloads_by_ip: Mapping[IPAddress, Workload] = field(default_factory=dict)
    """Pods by each of their IPs; host-network pods are not here (their IP is the node's)."""

    workloads_by_node: Mapping[str, tuple[Workload, ...]] = field(default_factory=dict)
    """The same pods grouped by node name, ordered by namespace and name."""

    services_by_address: Mapping[Address, ServiceTarget] = field(default_factory=dict)
    """TCP service ports by cluster IP and port."""

    authorization_policies: Mapping[str, tuple[AuthorizationPolicy, ...]] = field(default_factory=dict)
    """AuthorizationPolicies by namespace, ordered by name."""

    peer_authentications: Mapping[str, tuple[PeerAuthentication, ...]] = field(default_factory=dict)
    """PeerAuthentications by namespace, ordered by name."""

    def workload(self, ip: IPAddress) -> Workload | None:
        """The pod that has `ip`, if any."""
        return self.workloads_by_ip.get(ip)

    def service(self, address: Address) -> ServiceTarget | None:
        """The service port at `address` (a cluster IP and port), if any."""
        return self.services_by_address.get(address)

    def workloads_on_node(self, node: str) -> tuple[Workload, ...]:
        """The pods (with their own IPs) running on `node`."""
        return self.workloads_by_node.get(node, ())


def build_snapshot(
    *,
    version: int,
    created_at: float,
    workloads: Iterable[Workload] = (),
    services: Iterable[Service] = (),
    authorization_policies: Iterable[AuthorizationPolicy] = (),
    peer_authentications: Iterable[PeerAuthentication] = (),
    mesh: MeshConfig | None = None,
) -> Snapshot:
    """Indexes the given objects into a `Snapshot`.

    Two pods claiming one IP (a stale view while an IP is reused) resolve to the ready one, then to the
    one given later, which is the newer one when the watcher lists objects in arrival order.
    """
    all_workloads = list(workloads)
    by_ip: dict[IPAddress, Workload] = {}
    for workload in all_workloads:
        if workload.host_network:
            continue
        for ip in workload.ips:
            current = by_ip.get(ip)
            if current is None or workload.ready or not current.ready:
                by_ip[ip] = workload
    # Pods that hold at least one IP, plus host-network pods, which can still serve services.
    routable = {id(w): w for w in by_ip.values()} | {id(w): w for w in all_workloads if w.host_network}

    by_node: defaultdict[str, list[Workload]] = defaultdict(list)
    by_namespace: defaultdict[str, list[Workload]] = defaultdict(list)
    for workload in routable.values():
        by_namespace[workload.namespace].append(workload)
        if not workload.host_network:
            by_node[workload.node].append(workload)

    services_by_address: dict[Address, ServiceTarget] = {}
    for service in services:
        services_by_address.update(
            service_targets(service, _members(service, by_namespace[service.namespace]))
        )

    return Snapshot(
        version=version,
        created_at=created_at,
        mesh=mesh or MeshConfig(),
        workloads_by_ip=by_ip,
        workloads_by_node={node: tuple(sorted(pods, key=by_name)) for node, pods in by_node.items()},
        services_by_address=services_by_address,
        authorization_policies=_by_namespace(authorization_policies),
        peer_authentications=_by_namespace(peer_authentications),
    )


def by_name(workload: Workload) -> tuple[str, str]:
    """The order of workloads on a node: namespace, then name."""
    return (workload.namespace, workload.name)


def _members(service: Service, candidates: Iterable[Workload]) -> list[Workload]:
    return [workload for workload in candidates if serves(service, workload)]


def serves(service: Service, workload: Workload) -> bool:
    """Whether `workload` (a routable pod of the service's namespace) is one of `service`'s endpoints."""
    return (
        service.selector is not None
        and selector_matches(service.selector, workload.labels)
        and (workload.ready or service.publish_not_ready_addresses)
    )


def service_targets(service: Service, members: Iterable[Workload]) -> dict[Address, ServiceTarget]:
    """What each TCP cluster IP and port of `service` leads to, given its endpoint pods."""
    members = list(members)
    targets: dict[Address, ServiceTarget] = {}
    for port in service.ports:
        if port.protocol is not PortProtocol.TCP:
            continue
        for cluster_ip in service.cluster_ips:
            targets[Address(cluster_ip, port.port)] = ServiceTarget(
                service=service, port=port, endpoints=_endpoints(members, port, cluster_ip.version)
            )
    return targets


def _endpoints(members: Iterable[Workload], port: ServicePort, ip_version: int) -> tuple[Endpoint, ...]:
    endpoints = []
    for workload in members:
        ip = workload.ip_of_family(ip_version)
        target_port = (
            port.target_port
            if isinstance(port.target_port, int)
            else workload.named_ports.get(port.target_port)
        )
        if ip is not None and target_port is not None:
            endpoints.append(Endpoint(workload, Address(ip, target_port)))
    # Host-network pods on one node share an address: their names make the order total.
    return tuple(sorted(endpoints, key=_endpoint_order))


def _endpoint_order(endpoint: Endpoint) -> tuple[int, int, str, str]:
    return (int(endpoint.address.ip), endpoint.address.port, *by_name(endpoint.workload))


def _by_namespace(policies: Iterable[_Policy]) -> dict[str, tuple[_Policy, ...]]:
    grouped: defaultdict[str, list[_Policy]] = defaultdict(list)
    for policy in policies:
        grouped[policy.namespace].append(policy)
    return {namespace: by_policy_name(items) for namespace, items in grouped.items()}


def by_policy_name(policies: Iterable[_Policy]) -> tuple[_Policy, ...]:
    """One namespace's policies as a snapshot holds them: ordered by name."""
    return tuple(sorted(policies, key=lambda policy: policy.name))
