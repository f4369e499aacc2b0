"""Istio's metric labels and response flags for every outcome of a connection the data plane handles.

Pure functions of the decision and the snapshot's values, one per place a connection is reported:
outbound (reporter `source`) for each routing decision, and inbound (reporter `destination`) over
HBONE, in plaintext and for same-node deliveries; plus the response flag each kind of failure stands
for. Values follow Istio's semantics as ztunnel reports them:

- `connection_security_policy` is `mutual_tls` for every leg on the HBONE path (a tunnel, a same-node
  delivery, anything arriving on the HBONE port, whether it got through or not) and `unknown` for
  plain TCP (passthrough, Service endpoints outside the mesh, plaintext to 15006).
- `source_principal` is the identity the client presents over HBONE (on outbound tunnels the agent
  presents it for the source pod); plain TCP has none.
- `destination_principal` is the identity the destination is served as over HBONE: known on tunnels,
  and on the destination's own node, which serves its enrolled pods as that identity (for plaintext
  too, as ztunnel reports it). Outbound plain TCP names none.
- A workload is named only when the snapshot knows it; on the HBONE side a client's workload only
  when its authenticated identity vouches for the address it claims (the caller decides that).
- Whatever is not known is left empty here; `TcpLabels.values()` reports it as "unknown".
"""

from __future__ import annotations

import dataclasses
import enum
from typing import assert_never

from agent.hbone import RefusalReason, TunnelFailure
from agent.observability.metrics import PeerLabels, ServiceLabels, TcpLabels
from agent.state import (
    Address,
    IPAddress,
    LoadBalanced,
    OutboundDecision,
    Passthrough,
    Refuse,
    RefuseReason,
    ServiceTarget,
    Snapshot,
    Tunnel,
    Workload,
)

CLUSTER_DOMAIN = "cluster.local"
"""DNS domain of service host names in metrics (`name.namespace.svc.cluster.local`)."""


class ResponseFlag(enum.StrEnum):
    """Envoy-style response flags of connections that failed to open (label `response_flags`)."""

    DENIED = "UAEX"
    """Refused by authorization: an AuthorizationPolicy, or STRICT mutual TLS for plaintext."""

    NO_HEALTHY_UPSTREAM = "UH"
    """No workload to deliver to: no ready endpoint, or not a local enrolled workload."""

    UPSTREAM_FAILURE = "UF"
    """The upstream or tunnel could not be established (refused, unreachable, TLS, no certificate)."""

    NO_ROUTE = "NR"
    """The connection matches nothing that leads anywhere (its source is not a known pod)."""

    DOWNSTREAM_PROTOCOL_ERROR = "DPE"
    """The client sent a malformed tunnel request."""

    DOWNSTREAM_TERMINATED = "DC"
    """The client went away while its connection was being set up."""


def peer_labels(workload: Workload | None, principal: str = "") -> PeerLabels:
    """What the metrics know of one side: the workload's names and labels, and its identity if any."""
    if workload is None:
        return PeerLabels(principal=principal)
    labels = workload.labels
    return PeerLabels(
        workload=workload.name,
        namespace=workload.namespace,
        principal=principal,
        app=labels.get("app") or labels.get("app.kubernetes.io/name", ""),
        version=labels.get("version") or labels.get("app.kubernetes.io/version", ""),
        canonical_service=labels.get("service.istio.io/canonical-name", ""),
        canonical_revision=labels.get("service.istio.io/canonical-revision", ""),
    )


def service_labels(target: ServiceTarget | None) -> ServiceLabels:
    """The addressed service's labels, empty when a pod was addressed directly."""
    if target is None:
        return ServiceLabels()
    service = target.service
    return ServiceLabels(
        host=f"{service.name}.{service.namespace}.svc.{CLUSTER_DOMAIN}",
        name=service.name,
        namespace=service.namespace,
    )


# Outbound (reporter "source")


def outbound_labels(
    decision: OutboundDecision, snapshot: Snapshot, source_ip: IPAddress, destination: Address
) -> TcpLabels:
    """The labels of a connection from `source_ip` to `destination` (its original destination) that
    `decision` routes; a refused one still names what was addressed."""
    match decision:
        case Tunnel():
            return tunnel_labels(decision)
        case LoadBalanced():
            return TcpLabels(
                "source",
                peer_labels(snapshot.workload(source_ip)),
                peer_labels(decision.endpoint.workload),
                service_labels(decision.service),
            )
        case Passthrough() | Refuse():
            return TcpLabels(
                "source",
                peer_labels(snapshot.workload(source_ip)),
                peer_labels(snapshot.workload(destination.ip)),
                service_labels(snapshot.service(destination)),
            )
        case _:
            assert_never(decision)


def tunnel_labels(tunnel: Tunnel) -> TcpLabels:
    """The source side's labels of a connection carried over HBONE."""
    return TcpLabels(
        "source",
        peer_labels(tunnel.source, tunnel.source_identity),
        peer_labels(tunnel.destination, tunnel.destination_identity),
        service_labels(tunnel.service),
        security_policy="mutual_tls",
    )


_OUTBOUND_REFUSAL_FLAGS = {
    RefuseReason.UNKNOWN_SOURCE: ResponseFlag.NO_ROUTE,
    RefuseReason.NO_READY_ENDPOINTS: ResponseFlag.NO_HEALTHY_UPSTREAM,
}


def outbound_refusal_flag(reason: RefuseReason) -> ResponseFlag:
    """The flag of an outbound connection the decision refuses."""
    return _OUTBOUND_REFUSAL_FLAGS[reason]


def declined_tunnel_flag(failure: TunnelFailure | None) -> ResponseFlag:
    """The flag of a tunnel that did not open: `failure` is what the destination answered, None when
    it never answered (no connection, TLS failure, reset)."""
    return ResponseFlag.DENIED if failure is TunnelFailure.DENIED else ResponseFlag.UPSTREAM_FAILURE


# Inbound (reporter "destination")


def hbone_inbound_labels(
    source: Workload | None, source_identity: str, destination: Workload | None, destination_identity: str
) -> TcpLabels:
    """The labels of a connection arriving on the HBONE port: from the client authenticated as
    `source_identity` ("" before the handshake), whose claimed address is `source`'s if that identity
    vouches for it, to `destination` served as `destination_identity`."""
    return TcpLabels(
        "destination",
        peer_labels(source, source_identity),
        peer_labels(destination, destination_identity),
        security_policy="mutual_tls",
    )


def plaintext_inbound_labels(
    client: Workload | None, destination: Workload | None, destination_identity: str
) -> TcpLabels:
    """The labels of a plaintext connection from `client` (the snapshot's workload at the client's
    address, if any) to the local `destination`, which this node serves as `destination_identity`."""
    return TcpLabels("destination", peer_labels(client), peer_labels(destination, destination_identity))


def same_node_inbound_labels(outbound: TcpLabels) -> TcpLabels:
    """The destination's labels of a same-node tunnel: the source side's, as the destination reports."""
    return dataclasses.replace(outbound, reporter="destination")


_INBOUND_REFUSAL_FLAGS = {
    RefusalReason.MALFORMED_REQUEST: ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR,
    RefusalReason.DENIED_BY_POLICY: ResponseFlag.DENIED,
    RefusalReason.NO_LOCAL_WORKLOAD: ResponseFlag.NO_HEALTHY_UPSTREAM,
    RefusalReason.UPSTREAM_REFUSED: ResponseFlag.UPSTREAM_FAILURE,
    RefusalReason.UPSTREAM_UNREACHABLE: ResponseFlag.UPSTREAM_FAILURE,
}


def inbound_refusal_flag(reason: RefusalReason) -> ResponseFlag:
    """The flag of an inbound connection refused for `reason` (also when it came in plaintext or from
    this node, where no HTTP status is sent)."""
    return _INBOUND_REFUSAL_FLAGS[reason]


# Failures


def failed_labels(labels: TcpLabels, flag: ResponseFlag) -> TcpLabels:
    """`labels` of a connection that failed to open for the reason `flag` stands for."""
    return dataclasses.replace(labels, response_flags=flag.value)
