"""The L4 subset of Istio's `security.istio.io` policy kinds, as immutable values.

`AuthorizationPolicy` keeps what a node proxy can enforce on a TCP connection: source principals,
namespaces, service accounts and IP blocks, destination ports, and `when` conditions on those. Fields
that need HTTP (methods, paths, hosts, request principals, headers, ...) are not kept; each rule records
which of them it had, because they change how the rule is evaluated (see `agent.state.inbound`) and the
control plane tells the user about them. `PeerAuthentication` keeps the mutual-TLS mode per scope and
port. Evaluation lives in `agent.state.inbound`; parsing from Kubernetes objects in `agent.state.kube`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from ipaddress import IPv4Network, IPv6Network

IPNetwork = IPv4Network | IPv6Network


class PolicyKind(enum.StrEnum):
    """The policy kinds the agent reads."""

    AUTHORIZATION_POLICY = "AuthorizationPolicy"
    PEER_AUTHENTICATION = "PeerAuthentication"


@dataclass(frozen=True, slots=True)
class PolicyRef:
    """Names one policy object, for decisions, logs and Events."""

    kind: PolicyKind
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


class MatchKind(enum.StrEnum):
    """How a policy string is compared, from Istio's `*` wildcard forms."""

    EXACT = "exact"
    PREFIX = "prefix"
    """`abc*`"""
    SUFFIX = "suffix"
    """`*abc`"""
    PRESENCE = "presence"
    """`*`: any non-empty value."""


@dataclass(frozen=True, slots=True)
class StringMatch:
    """A policy string with Istio's wildcards: `*` alone, a leading `*` or a trailing `*`."""

    kind: MatchKind
    value: str = ""

    @classmethod
    def parse(cls, pattern: str) -> StringMatch:
        """Reads Istio's wildcard syntax; a `*` anywhere but at one end is a literal character."""
        if pattern == "*":
            return cls(MatchKind.PRESENCE)
        if pattern.startswith("*"):
            return cls(MatchKind.SUFFIX, pattern[1:])
        if pattern.endswith("*"):
            return cls(MatchKind.PREFIX, pattern[:-1])
        return cls(MatchKind.EXACT, pattern)

    def matches(self, candidate: str | None) -> bool:
        """Whether `candidate` matches; an absent value (None) matches nothing."""
        if candidate is None:
            return False
        match self.kind:
            case MatchKind.EXACT:
                return candidate == self.value
            case MatchKind.PREFIX:
                return candidate.startswith(self.value)
            case MatchKind.SUFFIX:
                return candidate.endswith(self.value)
            case MatchKind.PRESENCE:
                return candidate != ""

    def __str__(self) -> str:
        match self.kind:
            case MatchKind.EXACT:
                return self.value
            case MatchKind.PREFIX:
                return f"{self.value}*"
            case MatchKind.SUFFIX:
                return f"*{self.value}"
            case MatchKind.PRESENCE:
                return "*"


@dataclass(frozen=True, slots=True)
class ServiceAccountRef:
    """A service account named by a policy's `serviceAccounts` (`<ns>/<sa>`, or `<sa>` in its namespace)."""

    namespace: str
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Source:
    """One `from.source`: every field present must match (an empty `Source` matches any peer)."""

    principals: tuple[StringMatch, ...] = ()
    """Peer principals, `<td>/ns/<ns>/sa/<sa>` without `spiffe://`; never match plaintext peers."""

    not_principals: tuple[StringMatch, ...] = ()
    namespaces: tuple[StringMatch, ...] = ()
    """Peer namespaces, taken from the peer's verified identity; never match plaintext peers."""

    not_namespaces: tuple[StringMatch, ...] = ()
    service_accounts: tuple[ServiceAccountRef, ...] = ()
    """Peer service accounts, from the peer's verified identity."""

    not_service_accounts: tuple[ServiceAccountRef, ...] = ()
    ip_blocks: tuple[IPNetwork, ...] = ()
    """Networks the connection's source IP must be in."""

    not_ip_blocks: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Operation:
    """One `to.operation`, L4 part: destination ports (an empty `Operation` matches any port)."""

    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()


class ConditionKey(enum.StrEnum):
    """The `when` keys a node proxy can evaluate; every other key needs HTTP."""

    SOURCE_IP = "source.ip"
    SOURCE_NAMESPACE = "source.namespace"
    SOURCE_PRINCIPAL = "source.principal"
    DESTINATION_IP = "destination.ip"
    DESTINATION_PORT = "destination.port"


@dataclass(frozen=True, slots=True, kw_only=True)
class StringCondition:
    """`when` on `source.namespace` or `source.principal`."""

    key: ConditionKey
    values: tuple[StringMatch, ...] = ()
    not_values: tuple[StringMatch, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class IpCondition:
    """`when` on `source.ip` or `destination.ip`."""

    key: ConditionKey
    values: tuple[IPNetwork, ...] = ()
    not_values: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class PortCondition:
    """`when` on `destination.port`."""

    values: tuple[int, ...] = ()
    not_values: tuple[int, ...] = ()

    @property
    def key(self) -> ConditionKey:
        """Always `destination.port`."""
        return ConditionKey.DESTINATION_PORT


Condition = StringCondition | IpCondition | PortCondition


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """One rule: matches when any source, any operation and all conditions match.

    An absent `from`, `to` or `when` places no constraint, so `Rule()` matches every connection.
    """

    sources: tuple[Source, ...] = ()
    """`from`: any one must match; empty places no constraint."""

    operations: tuple[Operation, ...] = ()
    """`to`: any one must match; empty places no constraint."""

    conditions: tuple[Condition, ...] = ()
    """`when`: all must match."""

    unsupported_fields: tuple[str, ...] = ()
    """Fields and `when` keys the rule had that cannot be enforced at L4 (sorted): the HTTP-only ones
    (`methods`, `paths`, `hosts`, `requestPrincipals`, `request.headers[...]`, ...) and any this code does
    not know. They are not kept above; a rule with any of them never matches in an ALLOW policy and is
    evaluated without them in a DENY policy (ztunnel's fail-safe reading)."""


class Action(enum.StrEnum):
    """Authorization actions a node proxy enforces."""

    ALLOW = "ALLOW"
    DENY = "DENY"


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthorizationPolicy:
    """An `AuthorizationPolicy`, L4 part.

    It applies to workloads matched by `selector` in its namespace; without a selector, to every workload
    in its namespace, or in the whole mesh when it lives in the root namespace. A selector in the root
    namespace selects across all namespaces.
    """

    namespace: str
    name: str
    action: Action = Action.ALLOW
    selector: Mapping[str, str] | None = field(default=None, hash=False)
    """`selector.matchLabels`; None (or empty) for namespace- or mesh-wide policies."""

    rules: tuple[Rule, ...] = ()
    """No rules: an ALLOW policy then allows nothing, a DENY policy denies nothing."""

    @property
    def ref(self) -> PolicyRef:
        """This policy's name."""
        return PolicyRef(PolicyKind.AUTHORIZATION_POLICY, self.namespace, self.name)

    @property
    def unsupported_fields(self) -> tuple[str, ...]:
        """Every field any rule had that cannot be enforced at L4, sorted."""
        return tuple(sorted({name for rule in self.rules for name in rule.unsupported_fields}))

    @property
    def warning(self) -> str | None:
        """What the user should know about unsupported fields, for an Event; None when there are none."""
        fields = self.unsupported_fields
        if not fields:
            return None
        consequence = {
            Action.ALLOW: "Within an ALLOW policy, rules using them match nothing.",
            Action.DENY: "The DENY policy is enforced without them, so it denies more than written.",
        }[self.action]
        return (
            f"the node agent enforces L4 attributes only and cannot enforce: {', '.join(fields)}. "
            f"{consequence} HTTP rules need an L7 proxy (waypoint)."
        )


class MtlsMode(enum.StrEnum):
    """`PeerAuthentication` mutual-TLS modes."""

    UNSET = "UNSET"
    """Inherit from the enclosing scope (mesh-wide UNSET means PERMISSIVE)."""
    DISABLE = "DISABLE"
    """Plaintext accepted; mesh traffic still arrives over HBONE (mutual TLS), as in Istio ambient."""
    PERMISSIVE = "PERMISSIVE"
    """Plaintext and mutual TLS accepted."""
    STRICT = "STRICT"
    """Only mutual TLS: plaintext connections are refused."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerAuthentication:
    """A `PeerAuthentication`: mutual-TLS mode for a workload selection, a namespace, or the mesh."""

    namespace: str
    name: str
    selector: Mapping[str, str] | None = field(default=None, hash=False)
    """`selector.matchLabels`; None for namespace-wide, or mesh-wide in the root namespace."""

    mode: MtlsMode = MtlsMode.UNSET
    port_modes: Mapping[int, MtlsMode] = field(default_factory=dict, hash=False)
    """`portLevelMtls`, by the workload's (target) port; only with a selector."""

    created: datetime | None = None
    """Creation time: when several policies share a scope, the oldest wins (as in Istio)."""

    @property
    def ref(self) -> PolicyRef:
        """This policy's name."""
        return PolicyRef(PolicyKind.PEER_AUTHENTICATION, self.namespace, self.name)
