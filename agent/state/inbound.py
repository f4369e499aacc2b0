"""Inbound decisions: whether a connection to a local pod is allowed, by Istio's documented semantics.

`authorize` applies, in order: the pod's effective `PeerAuthentication` mode (STRICT refuses plaintext),
then `AuthorizationPolicy`s that apply to the pod (DENY first: any match denies; then, if any ALLOW
policy applies, one must match; otherwise the connection is allowed). The data plane calls it for
every new connection and again for open ones when the snapshot changes.

Rules with fields that cannot be enforced at L4 are read the way Istio's ztunnel reads them, erring on
the side of denying: in an ALLOW policy such a rule matches nothing; in a DENY policy the rule is
evaluated without those fields.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from agent.state.model import IPAddress, Workload, selector_matches
from agent.state.policy import (
    Action,
    AuthorizationPolicy,
    Condition,
    ConditionKey,
    IpCondition,
    MtlsMode,
    Operation,
    PeerAuthentication,
    PolicyRef,
    PortCondition,
    Rule,
    ServiceAccountRef,
    Source,
    StringCondition,
)
from agent.state.snapshot import Snapshot

_SPIFFE_SCHEME = "spiffe://"
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True, kw_only=True)
class InboundConnection:
    """What is known about an inbound connection when it is authorized."""

    source_ip: IPAddress
    """The client's IP (the pod IP behind the tunnel, or the plaintext client's)."""

    destination_ip: IPAddress
    """The local pod IP the client connected to."""

    destination_port: int
    """The local pod port the client connected to."""

    source_identity: str | None = None
    """The client's verified SPIFFE ID (`spiffe://<td>/ns/<ns>/sa/<sa>`); None for plaintext."""

    @property
    def principal(self) -> str | None:
        """The identity in Istio's principal form, `<td>/ns/<ns>/sa/<sa>`; None for plaintext."""
        if self.source_identity is None or not self.source_identity.startswith(_SPIFFE_SCHEME):
            return None
        return self.source_identity[len(_SPIFFE_SCHEME) :]

    @property
    def source_service_account(self) -> ServiceAccountRef | None:
        """The client's namespace and service account, from its identity; None without one."""
        parts = (self.principal or "").split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            return None
        return ServiceAccountRef(namespace=parts[2], name=parts[4])

    @property
    def source_namespace(self) -> str | None:
        """The client's namespace, from its identity; None without one."""
        account = self.source_service_account
        return None if account is None else account.namespace


class DenyReason(enum.StrEnum):
    """Why a connection is denied."""

    PLAINTEXT_REFUSED = "mutual TLS is required (PeerAuthentication STRICT) and the connection is plaintext"
    DENY_POLICY = "a DENY policy matched"
    NO_ALLOW_MATCH = "ALLOW policies apply to the destination and none matched"


@dataclass(frozen=True, slots=True)
class Allow:
    """The connection may proceed."""

    policy: PolicyRef | None = None
    """The ALLOW policy that matched; None when no ALLOW policy applies."""


@dataclass(frozen=True, slots=True)
class Deny:
    """The connection must be refused."""

    reason: DenyReason
    policy: PolicyRef | None = None
    """The policy that denied: the STRICT PeerAuthentication or the matching DENY policy."""

    def __str__(self) -> str:
        return self.reason if self.policy is None else f"{self.reason}: {self.policy}"


AuthorizationDecision = Allow | Deny


@dataclass(frozen=True, slots=True)
class MtlsResolution:
    """A workload port's effective mutual-TLS mode, and the policy that set it."""

    mode: MtlsMode
    """Never UNSET: with nothing set anywhere, PERMISSIVE."""

    policy: PolicyRef | None = None
    """The PeerAuthentication that decided, or None for the default."""


def authorize(
    snapshot: Snapshot, destination: Workload, connection: InboundConnection
) -> AuthorizationDecision:
    """Decides whether `connection` to the local pod `destination` is allowed."""
    if connection.source_identity is None:
        mtls = effective_mtls(snapshot, destination, connection.destination_port)
        if mtls.mode is MtlsMode.STRICT:
            return Deny(DenyReason.PLAINTEXT_REFUSED, mtls.policy)
    policies = applicable_policies(snapshot, destination)
    for policy in policies:
        if policy.action is Action.DENY and _policy_matches(policy, connection):
            return Deny(DenyReason.DENY_POLICY, policy.ref)
    allow_policies = [policy for policy in policies if policy.action is Action.ALLOW]
    if not allow_policies:
        return Allow()
    for policy in allow_policies:
        if _policy_matches(policy, connection):
            return Allow(policy.ref)
    return Deny(DenyReason.NO_ALLOW_MATCH)


def applicable_policies(snapshot: Snapshot, workload: Workload) -> tuple[AuthorizationPolicy, ...]:
    """The AuthorizationPolicies that apply to `workload`: the root namespace's, then its namespace's.

    In each, the policies without a selector and those whose selector matches the workload's labels.
    """
    namespaces = dict.fromkeys((snapshot.mesh.root_namespace, workload.namespace))
    return tuple(
        policy
        for namespace in namespaces
        for policy in snapshot.authorization_policies.get(namespace, ())
        if policy.selector is None or selector_matches(policy.selector, workload.labels)
    )


def effective_mtls(snapshot: Snapshot, workload: Workload, port: int) -> MtlsResolution:
    """The mutual-TLS mode for connections to `workload` on `port`.

    The most specific setting wins: a port of the workload-selecting policy, the workload-selecting
    policy, the namespace's policy, the root namespace's (mesh-wide) policy; UNSET defers to the next
    level out. Where several policies share a level, the oldest counts (as in Istio). Selecting policies
    in the root namespace are ignored, as Istio's ambient mode does.
    """
    root = snapshot.mesh.root_namespace
    in_root = snapshot.peer_authentications.get(root, ())
    in_namespace = (
        () if workload.namespace == root else snapshot.peer_authentications.get(workload.namespace, ())
    )
    mesh_wide = _oldest(policy for policy in in_root if policy.selector is None)
    namespace_wide = _oldest(policy for policy in in_namespace if policy.selector is None)
    selecting = _oldest(
        policy
        for policy in in_namespace
        if policy.selector is not None and selector_matches(policy.selector, workload.labels)
    )
    resolution = MtlsResolution(MtlsMode.PERMISSIVE)
    for policy in (mesh_wide, namespace_wide, selecting):
        if policy is not None and policy.mode is not MtlsMode.UNSET:
            resolution = MtlsResolution(policy.mode, policy.ref)
    if selecting is not None:
        port_mode = selecting.port_modes.get(port, MtlsMode.UNSET)
        if port_mode is not MtlsMode.UNSET:
            resolution = MtlsResolution(port_mode, selecting.ref)
    return resolution


_NEVER_CREATED = datetime.max.replace(tzinfo=UTC)


def _oldest(policies: Iterable[PeerAuthentication]) -> PeerAuthentication | None:
    # Policies without a creation time (built by hand) sort last; the name breaks ties.
    return min(policies, key=lambda policy: (policy.created or _NEVER_CREATED, policy.name), default=None)


def _policy_matches(policy: AuthorizationPolicy, connection: InboundConnection) -> bool:
    return any(_rule_matches(rule, policy.action, connection) for rule in policy.rules)


def _rule_matches(rule: Rule, action: Action, connection: InboundConnection) -> bool:
    if rule.unsupported_fields and action is Action.ALLOW:
        return False
    return (
        (not rule.sources or any(_source_matches(source, connection) for source in rule.sources))
        and (not rule.operations or any(_operation_matches(op, connection) for op in rule.operations))
        and all(_condition_matches(condition, connection) for condition in rule.conditions)
    )


def _source_matches(source: Source, connection: InboundConnection) -> bool:
    principal = connection.principal
    namespace = connection.source_namespace
    account = connection.source_service_account
    return (
        _included(source.principals, source.not_principals, lambda pattern: pattern.matches(principal))
        and _included(source.namespaces, source.not_namespaces, lambda pattern: pattern.matches(namespace))
        and _included(source.service_accounts, source.not_service_accounts, lambda ref: ref == account)
        and _included(source.ip_blocks, source.not_ip_blocks, lambda network: connection.source_ip in network)
    )


def _operation_matches(operation: Operation, connection: InboundConnection) -> bool:
    return _included(operation.ports, operation.not_ports, lambda port: port == connection.destination_port)


def _condition_matches(condition: Condition, connection: InboundConnection) -> bool:
    match condition:
        case StringCondition():
            value = (
                connection.principal
                if condition.key is ConditionKey.SOURCE_PRINCIPAL
                else connection.source_namespace
            )
            return _included(condition.values, condition.not_values, lambda pattern: pattern.matches(value))
        case IpCondition():
            ip = (
                connection.source_ip if condition.key is ConditionKey.SOURCE_IP else connection.destination_ip
            )
            return _included(condition.values, condition.not_values, lambda network: ip in network)
        case PortCondition():
            port = connection.destination_port
            return _included(condition.values, condition.not_values, lambda value: value == port)


def _included(positive: Sequence[_T], negative: Sequence[_T], test: Callable[[_T], bool]) -> bool:
    """Istio's field semantics: some positive value matches (if any are given) and no negative one does."""
    matches_positive = not positive or any(test(value) for value in positive)
    return matches_positive and not any(test(value) for value in negative)
