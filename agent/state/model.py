"""The routing model: workloads (pods), services and addresses, as immutable values.

These are what the discovery watcher's objects become after parsing (`agent.state.kube`) and what the
snapshot indexes. Collections are tuples; label maps are plain dicts typed `Mapping` (so the types stay
picklable for worker processes) and are never mutated after construction.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

IPAddress = IPv4Address | IPv6Address


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """The SPIFFE ID URI of a service account: `spiffe://<td>/ns/<ns>/sa/<sa>`."""
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Kubernetes `matchLabels` semantics: every selector label is present with the same value.

    An empty selector matches every label set.
    """
    return selector.items() <= labels.items()


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP socket address."""

    ip: IPAddress
    port: int

    def __str__(self) -> str:
        if isinstance(self.ip, IPv6Address):
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """A pod with an IP, as routing and policy see it."""

    name: str
    """Pod name."""

    namespace: str
    """Pod namespace."""

    service_account: str
    """The pod's service account: its identity is `spiffe://<td>/ns/<namespace>/sa/<service_account>`."""

    ips: tuple[IPAddress, ...]
    """Pod IPs, the primary (`status.podIP`) first; more than one on dual-stack clusters."""

    node: str
    """Name of the node the pod runs on."""

    node_ip: IPAddress
    """The node's IP (`status.hostIP`): where the node's agent accepts HBONE."""

    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    """Pod labels (matched by service and policy selectors)."""

    named_ports: Mapping[str, int] = field(default_factory=dict, hash=False)
    """Named TCP container ports, resolving services' named `targetPort`s."""

    enrolled: bool = False
    """Whether the pod's traffic is captured and carried over HBONE (see `agent.state.enrolment`)."""

    ready: bool = False
    """The pod's `Ready` condition: only ready pods are service endpoints."""

    host_network: bool = False
    """The pod shares its node's network: its IP is a host address, never in the mesh."""

    uid: str | None = None
    """Pod UID, when known."""

    @property
    def ip(self) -> IPAddress:
        """The primary pod IP."""
        return self.ips[0]

    def spiffe_id(self, trust_domain: str) -> str:
        """The workload's SPIFFE ID in `trust_domain`."""
        return spiffe_id(trust_domain, self.namespace, self.service_account)

    def ip_of_family(self, version: int) -> IPAddress | None:
        """The pod's first IP of IP version `version` (4 or 6), if it has one."""
        return next((ip for ip in self.ips if ip.version == version), None)


class PortProtocol(enum.StrEnum):
    """Service port protocols as Kubernetes spells them."""

    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


@dataclass(frozen=True, slots=True, kw_only=True)
class ServicePort:
    """One port of a service."""

    port: int
    """The port clients connect to on the service's cluster IPs."""

    target_port: int | str
    """The pod port: a number, or the name of a container port."""

    protocol: PortProtocol = PortProtocol.TCP
    """Only TCP ports are captured and routed by the agent."""

    name: str = ""
    """The port's name within the service, if any."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Service:
    """A Kubernetes Service with cluster IPs."""

    namespace: str
    """Service namespace."""

    name: str
    """Service name."""

    cluster_ips: tuple[IPAddress, ...] = ()
    """The service's virtual IPs; empty for headless and ExternalName services."""

    ports: tuple[ServicePort, ...] = ()
    """The service's ports."""

    selector: Mapping[str, str] | None = field(default=None, hash=False)
    """Pod selector; None when the service has none (its endpoints are managed outside Kubernetes)."""

    publish_not_ready_addresses: bool = False
    """Whether pods that are not ready are endpoints too (`spec.publishNotReadyAddresses`)."""

    @property
    def key(self) -> tuple[str, str]:
        """(namespace, name)."""
        return (self.namespace, self.name)
