"""Inbound authorization and PeerAuthentication, one test (or table row) per Istio semantic."""

from __future__ import annotations

from ipaddress import ip_address, ip_network
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.state.inbound import (
    Allow,
    Deny,
    DenyReason,
    InboundConnection,
    MtlsResolution,
    applicable_policies,
    authorize,
    effective_mtls,
)
from agent.state.kube import parse_authorization_policy, parse_peer_authentication
from agent.state.model import Workload
from agent.state.policy import (
    Action,
    AuthorizationPolicy,
    MtlsMode,
    Operation,
    PeerAuthentication,
    PolicyKind,
    PolicyRef,
    Rule,
    Source,
    StringMatch,
)
from agent.state.snapshot import MeshConfig, build_snapshot
from tests.unit.state.factories import policy_dict, workload

SERVER = workload("server", "10.1.0.3", namespace="shop", labels={"app": "web", "tier": "front"})
CLIENT_ID = "spiffe://cluster.local/ns/shop/sa/client"


def connection(
    identity: str | None = CLIENT_ID,
    *,
    source: str = "10.1.0.2",
    port: int = 8080,
    destination: str = "10.1.0.3",
) -> InboundConnection:
    return InboundConnection(
        source_identity=identity,
        source_ip=ip_address(source),
        destination_ip=ip_address(destination),
        destination_port=port,
    )


def authz(spec: dict[str, Any], *, name: str = "policy", namespace: str = "shop") -> AuthorizationPolicy:
    parsed = parse_authorization_policy(
        policy_dict("AuthorizationPolicy", spec, name=name, namespace=namespace)
    )
    assert isinstance(parsed, AuthorizationPolicy), parsed
    return parsed


def peer_authn(
    spec: dict[str, Any], *, name: str = "peer", namespace: str = "shop", created: str | None = None
) -> PeerAuthentication:
    parsed = parse_peer_authentication(
        policy_dict("PeerAuthentication", spec, name=name, namespace=namespace, created=created)
    )
    assert isinstance(parsed, PeerAuthentication), parsed
    return parsed


def decide(
    *policies: AuthorizationPolicy | PeerAuthentication,
    conn: InboundConnection | None = None,
    destination: Workload = SERVER,
    mesh: MeshConfig | None = None,
) -> Allow | Deny:
    snapshot = build_snapshot(
        version=1,
        created_at=0.0,
        workloads=[destination],
        authorization_policies=[p for p in policies if isinstance(p, AuthorizationPolicy)],
        peer_authentications=[p for p in policies if isinstance(p, PeerAuthentication)],
        mesh=mesh,
    )
    return authorize(snapshot, destination, conn or connection())


def ref(name: str, namespace: str = "shop") -> PolicyRef:
    return PolicyRef(PolicyKind.AUTHORIZATION_POLICY, namespace, name)


DENY_ALL: dict[str, Any] = {"action": "DENY", "rules": [{}]}
ALLOW_ALL: dict[str, Any] = {"rules": [{}]}


# Connection facts.


@pytest.mark.parametrize(
    ("identity", "principal", "namespace"),
    [
        ("spiffe://cluster.local/ns/shop/sa/client", "cluster.local/ns/shop/sa/client", "shop"),
        ("spiffe://example.org/ns/a/sa/b", "example.org/ns/a/sa/b", "a"),
        ("spiffe://example.org/other/path", "example.org/other/path", None),
        ("cluster.local/ns/shop/sa/client", None, None),
        (None, None, None),
    ],
)
def test_principal_and_namespace_come_from_the_verified_identity(
    identity: str | None, principal: str | None, namespace: str | None
) -> None:
    facts = connection(identity)

    assert (facts.principal, facts.source_namespace) == (principal, namespace)


# Which policies apply.


def test_no_policy_allows() -> None:
    assert decide() == Allow()


@pytest.mark.parametrize(
    ("namespace", "selector", "applies"),
    [
        pytest.param("istio-system", None, True, id="root namespace, no selector: mesh-wide"),
        pytest.param("istio-system", {"app": "web"}, True, id="root namespace, matching selector"),
        pytest.param("istio-system", {"app": "db"}, False, id="root namespace, other selector"),
        pytest.param("shop", None, True, id="own namespace, no selector"),
        pytest.param("shop", {"app": "web"}, True, id="own namespace, matching selector"),
        pytest.param("shop", {"app": "web", "tier": "front"}, True, id="own namespace, all labels match"),
        pytest.param("shop", {"app": "web", "tier": "back"}, False, id="own namespace, one label differs"),
        pytest.param("shop", {"app": "db"}, False, id="own namespace, other selector"),
        pytest.param("other", None, False, id="another namespace, no selector"),
        pytest.param("other", {"app": "web"}, False, id="another namespace, matching labels"),
    ],
)
def test_policy_scope(namespace: str, selector: dict[str, str] | None, applies: bool) -> None:
    spec = dict(DENY_ALL, selector={"matchLabels": selector}) if selector else DENY_ALL
    policy = authz(spec, name="deny", namespace=namespace)

    decision = decide(policy)

    assert decision == (Deny(DenyReason.DENY_POLICY, policy.ref) if applies else Allow())


def test_root_namespace_is_the_meshs() -> None:
    policy = authz(DENY_ALL, name="deny", namespace="mesh-root")

    assert decide(policy) == Allow()
    assert decide(policy, mesh=MeshConfig(root_namespace="mesh-root")) == Deny(
        DenyReason.DENY_POLICY, policy.ref
    )


def test_applicable_policies_list_root_namespace_first_without_duplicates() -> None:
    root = authz(ALLOW_ALL, name="z-mesh", namespace="istio-system")
    local = authz(ALLOW_ALL, name="a-local")
    root_workload = workload("istiod", "10.1.0.50", namespace="istio-system")
    snapshot = build_snapshot(version=1, created_at=0.0, authorization_policies=[local, root])

    assert applicable_policies(snapshot, SERVER) == (root, local)
    assert applicable_policies(snapshot, root_workload) == (root,)


# How ALLOW and DENY combine.


def test_deny_is_evaluated_before_allow() -> None:
    allow = authz(ALLOW_ALL, name="allow")
    deny = authz(DENY_ALL, name="deny")

    assert decide(allow, deny) == Deny(DenyReason.DENY_POLICY, deny.ref)


def test_an_allow_policy_that_applies_denies_what_it_does_not_match() -> None:
    allow = authz({"rules": [{"to": [{"operation": {"ports": ["9090"]}}]}]}, name="allow-9090")

    assert decide(allow, conn=connection(port=9090)) == Allow(allow.ref)
    assert decide(allow, conn=connection(port=8080)) == Deny(DenyReason.NO_ALLOW_MATCH)


def test_any_matching_allow_policy_suffices() -> None:
    by_port = authz({"rules": [{"to": [{"operation": {"ports": ["9090"]}}]}]}, name="a-port")
    by_ns = authz({"rules": [{"from": [{"source": {"namespaces": ["shop"]}}]}]}, name="b-namespace")

    assert decide(by_port, by_ns, conn=connection(port=8080)) == Allow(by_ns.ref)


def test_deny_that_does_not_match_leaves_the_decision_to_allow_policies() -> None:
    deny = authz({"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["22"]}}]}]}, name="deny-22")

    assert decide(deny, conn=connection(port=8080)) == Allow()
    assert decide(deny, conn=connection(port=22)) == Deny(DenyReason.DENY_POLICY, deny.ref)


def test_allow_policy_without_rules_allows_nothing() -> None:
    nothing = authz({}, name="allow-nothing")

    assert decide(nothing) == Deny(DenyReason.NO_ALLOW_MATCH)


def test_deny_policy_without_rules_denies_nothing() -> None:
    assert decide(authz({"action": "DENY"})) == Allow()


def test_empty_rule_matches_everything() -> None:
    allow = authz(ALLOW_ALL, name="allow-all")

    assert decide(allow, conn=connection(None, source="192.0.2.1", port=1)) == Allow(allow.ref)
    assert decide(authz(DENY_ALL, name="deny-all"), conn=connection(port=1)) == Deny(
        DenyReason.DENY_POLICY, ref("deny-all")
    )


def test_a_policy_matches_when_any_rule_matches() -> None:
    allow = authz(
        {
            "rules": [
                {"to": [{"operation": {"ports": ["80"]}}]},
                {"from": [{"source": {"namespaces": ["shop"]}}]},
            ]
        }
    )

    assert decide(allow, conn=connection("spiffe://cluster.local/ns/other/sa/x", port=80)) == Allow(allow.ref)
    assert decide(allow, conn=connection("spiffe://cluster.local/ns/shop/sa/x", port=8080)) == Allow(
        allow.ref
    )
    assert decide(allow, conn=connection("spiffe://cluster.local/ns/other/sa/x", port=8080)) == Deny(
        DenyReason.NO_ALLOW_MATCH
    )


# Rule fields, one row per semantic: the rule sits in an ALLOW policy; does the connection match it?

OTHER_ID = "spiffe://cluster.local/ns/other/sa/api"


@pytest.mark.parametrize(
    ("rule", "conn", "matches"),
    [
        # principals: `<td>/ns/<ns>/sa/<sa>`, wildcards at either end, `*` for any authenticated peer.
        ({"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/client"]}}]}, connection(), True),
        (
            {"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/client"]}}]},
            connection(OTHER_ID),
            False,
        ),
        ({"from": [{"source": {"principals": ["cluster.local/ns/shop/*"]}}]}, connection(), True),
        ({"from": [{"source": {"principals": ["*/sa/client"]}}]}, connection(), True),
        ({"from": [{"source": {"principals": ["*/sa/client"]}}]}, connection(OTHER_ID), False),
        ({"from": [{"source": {"principals": ["*"]}}]}, connection(), True),
        ({"from": [{"source": {"principals": ["*"]}}]}, connection(None), False),
        (
            {"from": [{"source": {"principals": ["spiffe://cluster.local/ns/shop/sa/client"]}}]},
            connection(),
            False,
        ),
        (
            {"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/client"]}}]},
            connection(None),
            False,
        ),
        # notPrincipals: a plaintext peer has no principal, so it is not any listed one.
        ({"from": [{"source": {"notPrincipals": ["cluster.local/ns/shop/sa/client"]}}]}, connection(), False),
        (
            {"from": [{"source": {"notPrincipals": ["cluster.local/ns/shop/sa/client"]}}]},
            connection(OTHER_ID),
            True,
        ),
        (
            {"from": [{"source": {"notPrincipals": ["cluster.local/ns/shop/sa/client"]}}]},
            connection(None),
            True,
        ),
        ({"from": [{"source": {"notPrincipals": ["*"]}}]}, connection(None), True),
        (
            {"from": [{"source": {"notPrincipals": ["cluster.local/ns/x/sa/y", "*/sa/client"]}}]},
            connection(),
            False,
        ),
        ({"from": [{"source": {"notPrincipals": ["*"]}}]}, connection(), False),
        # namespaces: from the peer's identity; plaintext peers have none.
        ({"from": [{"source": {"namespaces": ["shop"]}}]}, connection(), True),
        ({"from": [{"source": {"namespaces": ["shop"]}}]}, connection(OTHER_ID), False),
        ({"from": [{"source": {"namespaces": ["sh*"]}}]}, connection(), True),
        ({"from": [{"source": {"namespaces": ["shop"]}}]}, connection(None), False),
        ({"from": [{"source": {"notNamespaces": ["other"]}}]}, connection(), True),
        ({"from": [{"source": {"notNamespaces": ["other"]}}]}, connection(OTHER_ID), False),
        ({"from": [{"source": {"notNamespaces": ["other"]}}]}, connection(None), True),
        # serviceAccounts: `<ns>/<sa>`, or `<sa>` in the policy's namespace.
        ({"from": [{"source": {"serviceAccounts": ["client"]}}]}, connection(), True),
        ({"from": [{"source": {"serviceAccounts": ["other/api"]}}]}, connection(OTHER_ID), True),
        ({"from": [{"source": {"serviceAccounts": ["api"]}}]}, connection(OTHER_ID), False),
        ({"from": [{"source": {"serviceAccounts": ["client"]}}]}, connection(None), False),
        ({"from": [{"source": {"notServiceAccounts": ["shop/client"]}}]}, connection(), False),
        ({"from": [{"source": {"notServiceAccounts": ["shop/client"]}}]}, connection(None), True),
        # ipBlocks: addresses and CIDR blocks of the source IP, for mutual TLS and plaintext alike.
        ({"from": [{"source": {"ipBlocks": ["10.1.0.0/16"]}}]}, connection(), True),
        ({"from": [{"source": {"ipBlocks": ["10.1.0.2"]}}]}, connection(None), True),
        ({"from": [{"source": {"ipBlocks": ["10.2.0.0/16"]}}]}, connection(), False),
        ({"from": [{"source": {"ipBlocks": ["fd00::/8"]}}]}, connection(), False),
        ({"from": [{"source": {"notIpBlocks": ["10.1.0.2"]}}]}, connection(), False),
        (
            {"from": [{"source": {"ipBlocks": ["10.1.0.0/16"], "notIpBlocks": ["10.1.0.2"]}}]},
            connection(),
            False,
        ),
        (
            {"from": [{"source": {"ipBlocks": ["10.1.0.0/16"], "notIpBlocks": ["10.1.0.9"]}}]},
            connection(),
            True,
        ),
        # One source: every field present must match.
        (
            {"from": [{"source": {"namespaces": ["shop"], "ipBlocks": ["10.2.0.0/16"]}}]},
            connection(),
            False,
        ),
        # Several sources: any one matching suffices.
        (
            {"from": [{"source": {"namespaces": ["other"]}}, {"source": {"ipBlocks": ["10.1.0.2"]}}]},
            connection(),
            True,
        ),
        # operation ports and notPorts, on the destination port.
        ({"to": [{"operation": {"ports": ["8080"]}}]}, connection(port=8080), True),
        ({"to": [{"operation": {"ports": ["80", "443"]}}]}, connection(port=8080), False),
        ({"to": [{"operation": {"notPorts": ["8080"]}}]}, connection(port=8080), False),
        ({"to": [{"operation": {"notPorts": ["8080"]}}]}, connection(port=9090), True),
        ({"to": [{"operation": {"notPorts": ["80", "8080"]}}]}, connection(port=8080), False),
        ({"to": [{"operation": {"ports": ["80"]}}, {"operation": {"ports": ["8080"]}}]}, connection(), True),
        # from and to in one rule: both must match.
        (
            {"from": [{"source": {"namespaces": ["shop"]}}], "to": [{"operation": {"ports": ["8080"]}}]},
            connection(port=8080),
            True,
        ),
        (
            {"from": [{"source": {"namespaces": ["shop"]}}], "to": [{"operation": {"ports": ["8080"]}}]},
            connection(OTHER_ID, port=8080),
            False,
        ),
        (
            {"from": [{"source": {"namespaces": ["shop"]}}], "to": [{"operation": {"ports": ["8080"]}}]},
            connection(port=9090),
            False,
        ),
        # when: every condition must match; values any-of, notValues none-of.
        ({"when": [{"key": "source.ip", "values": ["10.1.0.0/24"]}]}, connection(), True),
        (
            {"when": [{"key": "source.ip", "values": ["10.1.0.0/24"], "notValues": ["10.1.0.2"]}]},
            connection(),
            False,
        ),
        ({"when": [{"key": "source.ip", "notValues": ["10.9.0.0/16"]}]}, connection(), True),
        ({"when": [{"key": "source.ip", "notValues": ["10.9.0.0/16", "10.1.0.2"]}]}, connection(), False),
        ({"when": [{"key": "source.namespace", "values": ["other", "shop"]}]}, connection(), True),
        ({"when": [{"key": "source.namespace", "values": ["shop"]}]}, connection(None), False),
        ({"when": [{"key": "source.namespace", "notValues": ["shop"]}]}, connection(None), True),
        ({"when": [{"key": "source.principal", "values": ["cluster.local/ns/shop/*"]}]}, connection(), True),
        ({"when": [{"key": "source.principal", "notValues": ["*"]}]}, connection(), False),
        ({"when": [{"key": "destination.port", "values": ["8080"]}]}, connection(port=8080), True),
        ({"when": [{"key": "destination.port", "notValues": ["8080"]}]}, connection(port=8080), False),
        ({"when": [{"key": "destination.ip", "values": ["10.1.0.3"]}]}, connection(), True),
        ({"when": [{"key": "destination.ip", "values": ["10.1.0.4"]}]}, connection(), False),
        (
            {
                "when": [
                    {"key": "source.namespace", "values": ["shop"]},
                    {"key": "destination.port", "values": ["9090"]},
                ]
            },
            connection(port=8080),
            False,
        ),
        (
            {
                "from": [{"source": {"principals": ["*"]}}],
                "when": [
                    {"key": "source.namespace", "values": ["shop"]},
                    {"key": "destination.port", "values": ["8080"]},
                ],
            },
            connection(port=8080),
            True,
        ),
    ],
)
def test_rule_field_semantics(rule: dict[str, Any], conn: InboundConnection, matches: bool) -> None:
    policy = authz({"rules": [rule]}, name="allow")

    assert decide(policy, conn=conn) == (Allow(policy.ref) if matches else Deny(DenyReason.NO_ALLOW_MATCH))


def test_the_same_rule_in_a_deny_policy_denies_exactly_what_it_matches() -> None:
    rule = {"from": [{"source": {"namespaces": ["other"]}}], "to": [{"operation": {"ports": ["8080"]}}]}
    deny = authz({"action": "DENY", "rules": [rule]}, name="deny")

    assert decide(deny, conn=connection(OTHER_ID, port=8080)) == Deny(DenyReason.DENY_POLICY, deny.ref)
    assert decide(deny, conn=connection(OTHER_ID, port=9090)) == Allow()
    assert decide(deny, conn=connection(port=8080)) == Allow()


# Fields that need HTTP: an ALLOW rule with them matches nothing; a DENY rule is evaluated without them.


def test_allow_rule_with_http_fields_matches_nothing() -> None:
    allow = authz({"rules": [{"to": [{"operation": {"ports": ["8080"], "methods": ["GET"]}}]}]}, name="get")

    assert decide(allow, conn=connection(port=8080)) == Deny(DenyReason.NO_ALLOW_MATCH)


def test_other_rules_of_that_allow_policy_still_match() -> None:
    allow = authz(
        {
            "rules": [
                {"to": [{"operation": {"methods": ["GET"]}}]},
                {"from": [{"source": {"namespaces": ["shop"]}}]},
            ]
        }
    )

    assert decide(allow, conn=connection()) == Allow(allow.ref)
    assert decide(allow, conn=connection(OTHER_ID)) == Deny(DenyReason.NO_ALLOW_MATCH)


@pytest.mark.parametrize(
    ("rule", "conn", "denied"),
    [
        pytest.param(
            {"to": [{"operation": {"ports": ["8080"], "methods": ["POST"]}}]},
            connection(port=8080),
            True,
            id="ports",
        ),
        pytest.param(
            {"to": [{"operation": {"ports": ["8080"], "methods": ["POST"]}}]},
            connection(port=9090),
            False,
            id="ports, other port",
        ),
        pytest.param(
            {"to": [{"operation": {"paths": ["/admin"]}}]}, connection(port=1), True, id="only paths"
        ),
        pytest.param(
            {"from": [{"source": {"requestPrincipals": ["*"], "namespaces": ["other"]}}]},
            connection(),
            False,
            id="namespaces kept",
        ),
        pytest.param(
            {
                "when": [{"key": "request.headers[x-debug]", "values": ["1"]}],
                "to": [{"operation": {"ports": ["8080"]}}],
            },
            connection(),
            True,
            id="header condition",
        ),
    ],
)
def test_deny_rule_with_http_fields_is_enforced_without_them(
    rule: dict[str, Any], conn: InboundConnection, denied: bool
) -> None:
    deny = authz({"action": "DENY", "rules": [rule]}, name="deny")

    assert deny.warning is not None
    assert decide(deny, conn=conn) == (Deny(DenyReason.DENY_POLICY, deny.ref) if denied else Allow())


# PeerAuthentication.

MESH = "istio-system"


@pytest.mark.parametrize(
    ("policies", "port", "mode", "decided_by"),
    [
        pytest.param([], 8080, MtlsMode.PERMISSIVE, None, id="nothing set: PERMISSIVE"),
        pytest.param(
            [peer_authn({"mtls": {"mode": "STRICT"}}, name="mesh", namespace=MESH)],
            8080,
            MtlsMode.STRICT,
            "istio-system/mesh",
            id="mesh-wide",
        ),
        pytest.param(
            [peer_authn({"mtls": {"mode": "UNSET"}}, name="mesh", namespace=MESH)],
            8080,
            MtlsMode.PERMISSIVE,
            None,
            id="mesh-wide UNSET is PERMISSIVE",
        ),
        pytest.param(
            [
                peer_authn({"mtls": {"mode": "STRICT"}}, name="mesh", namespace=MESH),
                peer_authn({"mtls": {"mode": "PERMISSIVE"}}, name="ns"),
            ],
            8080,
            MtlsMode.PERMISSIVE,
            "shop/ns",
            id="namespace overrides mesh",
        ),
        pytest.param(
            [
                peer_authn({"mtls": {"mode": "STRICT"}}, name="mesh", namespace=MESH),
                peer_authn({}, name="ns"),
            ],
            8080,
            MtlsMode.STRICT,
            "istio-system/mesh",
            id="namespace UNSET inherits mesh",
        ),
        pytest.param(
            [
                peer_authn({"mtls": {"mode": "STRICT"}}, name="ns"),
                peer_authn(
                    {"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "DISABLE"}}, name="wl"
                ),
            ],
            8080,
            MtlsMode.DISABLE,
            "shop/wl",
            id="workload overrides namespace",
        ),
        pytest.param(
            [
                peer_authn({"mtls": {"mode": "STRICT"}}, name="ns"),
                peer_authn({"selector": {"matchLabels": {"app": "web"}}}, name="wl"),
            ],
            8080,
            MtlsMode.STRICT,
            "shop/ns",
            id="workload UNSET inherits namespace",
        ),
        pytest.param(
            [
                peer_authn({"mtls": {"mode": "STRICT"}}, name="ns"),
                peer_authn(
                    {"selector": {"matchLabels": {"app": "db"}}, "mtls": {"mode": "DISABLE"}}, name="wl"
                ),
            ],
            8080,
            MtlsMode.STRICT,
            "shop/ns",
            id="selector for other workloads",
        ),
        pytest.param(
            [
                peer_authn({"mtls": {"mode": "STRICT"}}, name="ns"),
                peer_authn(
                    {
                        "selector": {"matchLabels": {"app": "web"}},
                        "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}},
                    },
                    name="wl",
                ),
            ],
            8080,
            MtlsMode.PERMISSIVE,
            "shop/wl",
            id="port level overrides",
        ),
        pytest.param(
            [
                peer_authn({"mtls": {"mode": "STRICT"}}, name="ns"),
                peer_authn(
                    {
                        "selector": {"matchLabels": {"app": "web"}},
                        "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}},
                    },
                    name="wl",
                ),
            ],
            9090,
            MtlsMode.STRICT,
            "shop/ns",
            id="port level for another port",
        ),
        pytest.param(
            [
                peer_authn(
                    {
                        "selector": {"matchLabels": {"app": "web"}},
                        "mtls": {"mode": "STRICT"},
                        "portLevelMtls": {"8080": {"mode": "UNSET"}},
                    },
                    name="wl",
                ),
            ],
            8080,
            MtlsMode.STRICT,
            "shop/wl",
            id="port level UNSET inherits",
        ),
        pytest.param(
            [
                peer_authn(
                    {"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "STRICT"}}, namespace=MESH
                )
            ],
            8080,
            MtlsMode.PERMISSIVE,
            None,
            id="selector in the root namespace is ignored",
        ),
        pytest.param(
            [peer_authn({"mtls": {"mode": "STRICT"}}, name="ns", namespace="other")],
            8080,
            MtlsMode.PERMISSIVE,
            None,
            id="another namespace",
        ),
        pytest.param(
            [
                peer_authn({"mtls": {"mode": "STRICT"}}, name="b-old", created="2024-01-01T00:00:00Z"),
                peer_authn({"mtls": {"mode": "PERMISSIVE"}}, name="a-new", created="2024-06-01T00:00:00Z"),
            ],
            8080,
            MtlsMode.STRICT,
            "shop/b-old",
            id="oldest wins in one scope",
        ),
        pytest.param(
            [
                peer_authn({"mtls": {"mode": "STRICT"}}, name="b"),
                peer_authn({"mtls": {"mode": "PERMISSIVE"}}, name="a"),
            ],
            8080,
            MtlsMode.PERMISSIVE,
            "shop/a",
            id="then the name",
        ),
    ],
)
def test_effective_mtls_mode(
    policies: list[PeerAuthentication], port: int, mode: MtlsMode, decided_by: str | None
) -> None:
    snapshot = build_snapshot(version=1, created_at=0.0, peer_authentications=policies)

    resolution = effective_mtls(snapshot, SERVER, port)

    expected_ref = None
    if decided_by is not None:
        namespace, name = decided_by.split("/")
        expected_ref = PolicyRef(PolicyKind.PEER_AUTHENTICATION, namespace, name)
    assert resolution == MtlsResolution(mode, expected_ref)


def test_workload_in_the_root_namespace_takes_the_mesh_policy_as_its_namespace_policy() -> None:
    mesh = peer_authn({"mtls": {"mode": "STRICT"}}, name="mesh", namespace=MESH)
    snapshot = build_snapshot(version=1, created_at=0.0, peer_authentications=[mesh])
    gateway = workload("gateway", "10.1.0.60", namespace=MESH)

    assert effective_mtls(snapshot, gateway, 80) == MtlsResolution(MtlsMode.STRICT, mesh.ref)


@pytest.mark.parametrize(
    ("mode", "identity", "allowed"),
    [
        ("STRICT", None, False),
        ("STRICT", CLIENT_ID, True),
        ("PERMISSIVE", None, True),
        ("DISABLE", None, True),
        ("UNSET", None, True),
    ],
)
def test_strict_refuses_plaintext_only(mode: str, identity: str | None, allowed: bool) -> None:
    policy = peer_authn({"mtls": {"mode": mode}}, name="ns")

    decision = decide(policy, conn=connection(identity))

    assert decision == (Allow() if allowed else Deny(DenyReason.PLAINTEXT_REFUSED, policy.ref))


def test_strict_port_refuses_plaintext_only_on_that_port() -> None:
    policy = peer_authn(
        {"selector": {"matchLabels": {"app": "web"}}, "portLevelMtls": {"8080": {"mode": "STRICT"}}},
        name="wl",
    )

    assert decide(policy, conn=connection(None, port=8080)) == Deny(DenyReason.PLAINTEXT_REFUSED, policy.ref)
    assert decide(policy, conn=connection(None, port=9090)) == Allow()


def test_permissive_plaintext_still_meets_authorization_policies() -> None:
    allow = authz({"rules": [{"from": [{"source": {"principals": ["*"]}}]}]}, name="mtls-only")

    assert decide(allow, conn=connection(None)) == Deny(DenyReason.NO_ALLOW_MATCH)
    assert decide(allow, conn=connection()) == Allow(allow.ref)


def test_deny_explains_itself() -> None:
    assert (
        str(Deny(DenyReason.DENY_POLICY, ref("deny")))
        == "a DENY policy matched: AuthorizationPolicy shop/deny"
    )
    assert str(Deny(DenyReason.NO_ALLOW_MATCH)) == DenyReason.NO_ALLOW_MATCH


# Properties over generated policies and connections.

principals = st.sampled_from(
    [
        "cluster.local/ns/shop/sa/client",
        "cluster.local/ns/other/*",
        "*/sa/client",
        "*",
        "cluster.local/ns/x/sa/y",
    ]
)
networks = st.sampled_from(["10.1.0.0/16", "10.1.0.2/32", "192.0.2.0/24", "fd00::/8"]).map(ip_network)
ports = st.sampled_from([22, 80, 8080, 9090])
sources = st.builds(
    Source,
    principals=st.lists(principals.map(StringMatch.parse), max_size=2).map(tuple),
    not_principals=st.lists(principals.map(StringMatch.parse), max_size=1).map(tuple),
    namespaces=st.lists(st.sampled_from(["shop", "other", "s*"]).map(StringMatch.parse), max_size=2).map(
        tuple
    ),
    ip_blocks=st.lists(networks, max_size=2).map(tuple),
    not_ip_blocks=st.lists(networks, max_size=1).map(tuple),
)
operations = st.builds(
    Operation, ports=st.lists(ports, max_size=2).map(tuple), not_ports=st.lists(ports, max_size=1).map(tuple)
)
rules = st.builds(
    Rule,
    sources=st.lists(sources, max_size=2).map(tuple),
    operations=st.lists(operations, max_size=2).map(tuple),
    unsupported_fields=st.sampled_from([(), ("methods",)]),
)
policies = st.builds(
    AuthorizationPolicy,
    namespace=st.sampled_from(["shop", "istio-system", "other"]),
    name=st.text("abcdefgh", min_size=1, max_size=6),
    action=st.sampled_from(Action),
    selector=st.sampled_from([None, {"app": "web"}, {"app": "db"}]),
    rules=st.lists(rules, max_size=3).map(tuple),
)
connections = st.builds(
    connection,
    identity=st.sampled_from([None, CLIENT_ID, OTHER_ID]),
    source=st.sampled_from(["10.1.0.2", "192.0.2.7", "10.9.9.9"]),
    port=ports,
)


def _unique(policy_list: list[AuthorizationPolicy]) -> list[AuthorizationPolicy]:
    return list({(p.namespace, p.name): p for p in policy_list}.values())


@given(st.lists(policies, max_size=6).map(_unique), connections)
def test_a_matching_deny_policy_always_wins(
    others: list[AuthorizationPolicy], conn: InboundConnection
) -> None:
    deny = AuthorizationPolicy(namespace="shop", name="zz-deny", action=Action.DENY, rules=(Rule(),))

    decision = decide(*others, deny, conn=conn)

    assert isinstance(decision, Deny)
    assert decision.reason is DenyReason.DENY_POLICY


@given(st.lists(policies, max_size=6).map(_unique), connections)
def test_allow_policies_never_undo_a_denial(
    others: list[AuthorizationPolicy], conn: InboundConnection
) -> None:
    baseline = decide(*others, conn=conn)
    allow_all = AuthorizationPolicy(namespace="shop", name="zz-allow-all", rules=(Rule(),))

    with_allow = decide(*others, allow_all, conn=conn)

    if isinstance(baseline, Deny) and baseline.reason is DenyReason.DENY_POLICY:
        assert with_allow == baseline
    else:
        assert isinstance(with_allow, Allow)


@given(st.lists(policies, max_size=6).map(_unique), connections, st.randoms(use_true_random=False))
def test_decision_does_not_depend_on_input_order(
    policy_list: list[AuthorizationPolicy], conn: InboundConnection, random: Any
) -> None:
    shuffled = list(policy_list)
    random.shuffle(shuffled)

    assert decide(*policy_list, conn=conn) == decide(*shuffled, conn=conn)
