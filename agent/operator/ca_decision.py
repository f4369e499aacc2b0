"""The CA's decision on one CertificateSigningRequest: approve (what to sign, for how long) or deny (why).

Pure functions over the objects the API server returned: the CSR, the agent pod its requester's token
is bound to, and whether that pod's node runs a pod with the requested service account. The CA signs
only what the requesting node may hold (ARCHITECTURE.md section 4), so a compromised node can never
obtain an identity it does not host. A denial's reason is the exact sentence written into the CSR's
Denied condition and its Event.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from typing import Any

from agent.identity.certificates import PublicKey
from agent.identity.csr import CsrAccepted, validate_csr
from agent.identity.spiffe import SpiffeId, trust_domain_problem
from agent.settings import SettingsError

SIGNER_NAME = "ambient-agent.dev/spiffe"
"""The `spec.signerName` of the CSRs this CA answers; all others are left alone."""

POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
"""User extra set by the API server for a service-account token bound to a pod."""

POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
"""User extra carrying the UID of the pod the token is bound to."""

GRANTED_USAGES = frozenset({"digital signature", "key encipherment", "server auth", "client auth"})
"""Key usages a workload certificate may carry (it is a TLS client and server certificate)."""

JsonObject = dict[str, Any]


@dataclass(frozen=True)
class SigningPolicy:
    """Who may ask for workload certificates, in which trust domain, and how long they live."""

    trust_domain: str
    """SPIFFE trust domain of every issued identity."""

    agent_namespace: str
    """Namespace of the node agents' pods and service account."""

    agent_service_account: str
    """The node agents' service account; only its pod-bound tokens may request certificates."""

    leaf_lifetime: timedelta = timedelta(hours=24)
    """Lifetime of an issued certificate when the request does not ask for one (`expirationSeconds`)."""

    max_lifetime: timedelta = timedelta(hours=24)
    """No certificate lives longer, whatever the request asks for."""

    def __post_init__(self) -> None:
        if problem := trust_domain_problem(self.trust_domain):
            raise SettingsError(f"trust_domain: {problem}")
        if not self.agent_namespace or not self.agent_service_account:
            raise SettingsError(
                "agent_service_account: needs a namespace and a name, got"
                f" {self.agent_namespace!r}/{self.agent_service_account!r}"
            )
        if self.leaf_lifetime <= timedelta(0):
            raise SettingsError(f"leaf_lifetime: must be positive, got {self.leaf_lifetime}")
        if self.max_lifetime < self.leaf_lifetime:
            raise SettingsError(
                f"max_lifetime: {self.max_lifetime} is shorter than leaf_lifetime {self.leaf_lifetime}"
            )

    @property
    def agent_username(self) -> str:
        """The Kubernetes user name of the agents' service account."""
        return f"system:serviceaccount:{self.agent_namespace}:{self.agent_service_account}"


@dataclass(frozen=True)
class Approve:
    """Sign: the request is well formed and the requesting node hosts the identity."""

    spiffe_id: SpiffeId
    """The identity to certify."""

    public_key: PublicKey
    """The requester's key."""

    node: str
    """The node whose agent asked (for the event and the logs)."""

    lifetime: timedelta
    """How long the certificate lives."""

    @property
    def message(self) -> str:
        """One sentence for the Approved condition and the Event."""
        return f"issued {self.spiffe_id} to the agent on node {self.node}, valid for {self.lifetime}"


@dataclass(frozen=True)
class Deny:
    """Refuse, saying exactly why."""

    reason: str
    """One sentence for the Denied condition, the Event and the logs."""


Decision = Approve | Deny


class CsrStage(Enum):
    """Where a CSR stands, as far as this CA is concerned."""

    NOT_OURS = "not ours"
    """Another signer's request: never touched."""

    PENDING = "pending"
    """Neither approved nor denied: decide."""

    APPROVED = "approved"
    """Approved but not yet issued (e.g. the CA stopped between the two steps): decide again, then sign."""

    FINISHED = "finished"
    """Issued, denied or failed: nothing left to do."""


def conditions(csr: JsonObject) -> dict[str, JsonObject]:
    """The CSR's status conditions by type."""
    return {c.get("type", ""): c for c in (csr.get("status") or {}).get("conditions") or []}


def csr_stage(csr: JsonObject) -> CsrStage:
    """Where `csr` stands."""
    if (csr.get("spec") or {}).get("signerName") != SIGNER_NAME:
        return CsrStage.NOT_OURS
    present = conditions(csr)
    if (csr.get("status") or {}).get("certificate") or "Denied" in present or "Failed" in present:
        return CsrStage.FINISHED
    return CsrStage.APPROVED if "Approved" in present else CsrStage.PENDING


def _single_extra(spec: JsonObject, key: str) -> str | None:
    values = (spec.get("extra") or {}).get(key) or []
    return values[0] if len(values) == 1 and values[0] else None


def requesting_pod_name(csr: JsonObject, policy: SigningPolicy) -> str | None:
    """The agent pod (in the agent namespace) the requester's token is bound to, if the requester is
    the agents' service account at all: the pod the CA must look up."""
    spec = csr.get("spec") or {}
    if spec.get("username") != policy.agent_username:
        return None
    return _single_extra(spec, POD_NAME_EXTRA)


def _request_pem(spec: JsonObject) -> bytes | None:
    try:
        return base64.b64decode(spec.get("request") or "", validate=True)
    except (binascii.Error, ValueError):
        return None


def requested_identity(csr: JsonObject, policy: SigningPolicy) -> SpiffeId | None:
    """The identity a well-formed request asks for: the service account the CA must find on the node."""
    pem = _request_pem(csr.get("spec") or {})
    validation = validate_csr(pem, policy.trust_domain) if pem else None
    return validation.spiffe_id if isinstance(validation, CsrAccepted) else None


def _requesting_node(spec: JsonObject, pod: JsonObject | None, policy: SigningPolicy) -> str | Deny:
    """The node of the agent pod that asked, or why the requester may not ask at all."""
    username = spec.get("username")
    if username != policy.agent_username:
        return Deny(
            f"requested by {username!r}; only the node agents' service account {policy.agent_username}"
            " may request workload certificates"
        )
    pod_name = _single_extra(spec, POD_NAME_EXTRA)
    if pod_name is None:
        return Deny(
            f"the requester's token is not bound to a pod (no user extra {POD_NAME_EXTRA}); agents must"
            " use a pod-bound service account token"
        )
    where = f"agent pod {policy.agent_namespace}/{pod_name}"
    if pod is None:
        return Deny(f"{where}, to which the requester's token is bound, does not exist")
    metadata, pod_spec = pod.get("metadata") or {}, pod.get("spec") or {}
    token_uid, pod_uid = _single_extra(spec, POD_UID_EXTRA), metadata.get("uid")
    if token_uid is None or token_uid != pod_uid:
        return Deny(
            f"the requester's token is bound to pod uid {token_uid!r}, but {where} has uid {pod_uid!r}"
        )
    service_account = pod_spec.get("serviceAccountName")
    if service_account != policy.agent_service_account:
        return Deny(
            f"{where} runs as service account {service_account!r}, not the agents'"
            f" {policy.agent_service_account!r}"
        )
    phase = (pod.get("status") or {}).get("phase")
    if phase != "Running":
        return Deny(f"{where} is {phase or 'in no phase'}, not Running")
    node = pod_spec.get("nodeName")
    if not node:
        return Deny(f"{where} is not scheduled on a node")
    return str(node)


def _lifetime(spec: JsonObject, policy: SigningPolicy) -> timedelta | str:
    requested = spec.get("expirationSeconds")
    if requested is None:
        return policy.leaf_lifetime
    if not isinstance(requested, int) or isinstance(requested, bool) or requested <= 0:
        return f"spec.expirationSeconds must be a positive number of seconds, got {requested!r}"
    return min(timedelta(seconds=requested), policy.max_lifetime)


def decide(
    csr: JsonObject,
    requesting_pod: JsonObject | None,
    node_hosts_service_account: bool,
    policy: SigningPolicy,
) -> Decision:
    """Approves or denies `csr` (a pending request of this signer).

    `requesting_pod` is the pod named by the requester's `authentication.kubernetes.io/pod-name` extra,
    read from the agent namespace (None if absent or not looked up); `node_hosts_service_account`
    says whether a pod with the requested service account is scheduled on that pod's node.
    """
    spec = csr.get("spec") or {}
    node = _requesting_node(spec, requesting_pod, policy)
    if isinstance(node, Deny):
        return node
    usages = set(spec.get("usages") or [])
    if extra_usages := usages - GRANTED_USAGES:
        return Deny(
            f"request asks for key usages {sorted(extra_usages)};"
            f" this signer grants only {sorted(GRANTED_USAGES)}"
        )
    pem = _request_pem(spec)
    if pem is None:
        return Deny("spec.request is not base64")
    validation = validate_csr(pem, policy.trust_domain)
    if not isinstance(validation, CsrAccepted):
        return Deny(validation.reason)
    lifetime = _lifetime(spec, policy)
    if isinstance(lifetime, str):
        return Deny(lifetime)
    spiffe_id = validation.spiffe_id
    if not node_hosts_service_account:
        return Deny(
            f"no pod with service account {spiffe_id.namespace}/{spiffe_id.service_account} is scheduled on"
            f" node {node}, so its agent may not hold {spiffe_id}"
        )
    return Approve(spiffe_id, validation.public_key, node, lifetime)
