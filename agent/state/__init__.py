"""The immutable snapshot of workloads, services and policies, and pure decisions over it.

- `model`, `policy`: the values (workloads, services, the L4 subset of Istio's policy kinds);
- `kube`: parsing Kubernetes objects (plain JSON dicts) into them, with typed errors;
- `enrolment`: which pods are in the mesh;
- `snapshot`: the indexed, immutable `Snapshot` and its pure builder;
- `incremental`, `persistent`: the same snapshot kept up to date change by change, sharing what did
  not change with the previous one;
- `outbound`: where a captured connection goes (tunnel, load-balance, passthrough, refuse);
- `inbound`: PeerAuthentication and AuthorizationPolicy decisions for connections to local pods.

Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

from agent.state.enrolment import Enrolment, enrolment
from agent.state.inbound import (
    Allow,
    AuthorizationDecision,
    Deny,
    DenyReason,
    InboundConnection,
    MtlsResolution,
    applicable_policies,
    authorize,
    effective_mtls,
)
from agent.state.incremental import SnapshotBuilder
from agent.state.kube import (
    ParseError,
    parse_authorization_policy,
    parse_peer_authentication,
    parse_pod,
    parse_service,
)
from agent.state.model import Address, IPAddress, Service, ServicePort, Workload, spiffe_id
from agent.state.outbound import (
    EndpointPicker,
    LoadBalanced,
    OutboundDecision,
    Passthrough,
    PassthroughReason,
    Refuse,
    RefuseReason,
    Tunnel,
    decide_outbound,
)
from agent.state.policy import Action, AuthorizationPolicy, MtlsMode, PeerAuthentication, PolicyRef
from agent.state.snapshot import Endpoint, MeshConfig, ServiceTarget, Snapshot, build_snapshot

__all__ = [
    "Action",
    "Address",
    "Allow",
    "AuthorizationDecision",
    "AuthorizationPolicy",
    "Deny",
    "DenyReason",
    "Endpoint",
    "EndpointPicker",
    "Enrolment",
    "IPAddress",
    "InboundConnection",
    "LoadBalanced",
    "MeshConfig",
    "MtlsMode",
    "MtlsResolution",
    "OutboundDecision",
    "ParseError",
    "Passthrough",
    "PassthroughReason",
    "PeerAuthentication",
    "PolicyRef",
    "Refuse",
    "RefuseReason",
    "Service",
    "ServicePort",
    "ServiceTarget",
    "Snapshot",
    "SnapshotBuilder",
    "Tunnel",
    "Workload",
    "applicable_policies",
    "authorize",
    "build_snapshot",
    "decide_outbound",
    "effective_mtls",
    "enrolment",
    "parse_authorization_policy",
    "parse_peer_authentication",
    "parse_pod",
    "parse_service",
    "spiffe_id",
]
