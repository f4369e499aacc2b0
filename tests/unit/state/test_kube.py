"""Parsing Kubernetes-shaped dicts: pods, services and the security.istio.io policy kinds."""

from __future__ import annotations

from datetime import UTC, datetime
from ipaddress import ip_address, ip_network
from typing import Any

import pytest

from agent.state.kube import (
    ParseError,
    parse_authorization_policy,
    parse_peer_authentication,
    parse_pod,
    parse_service,
)
from agent.state.model import PortProtocol, Service, ServicePort, Workload
from agent.state.policy import (
    Action,
    AuthorizationPolicy,
    ConditionKey,
    IpCondition,
    MatchKind,
    MtlsMode,
    Operation,
    PeerAuthentication,
    PortCondition,
    Rule,
    ServiceAccountRef,
    Source,
    StringCondition,
    StringMatch,
)
from tests.unit.state.factories import pod_dict, policy_dict

AMBIENT_NAMESPACE = {"istio.io/dataplane-mode": "ambient"}


# Pods.


def test_running_pod_becomes_a_workload_with_every_routing_field() -> None:
    pod = pod_dict(
        "web-1",
        namespace="shop",
        labels={"app": "web"},
        containers=[
            {"name": "app", "ports": [{"name": "http", "containerPort": 8080}]},
            {"name": "side", "ports": [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]},
        ],
    )

    parsed = parse_pod(pod, namespace_labels=AMBIENT_NAMESPACE)

    assert parsed == Workload(
        uid="uid-web-1",
        name="web-1",
        namespace="shop",
        service_account="web",
        ips=(ip_address("10.1.0.5"),),
        node="node-a",
        node_ip=ip_address("10.0.0.1"),
        labels={"app": "web"},
        named_ports={"http": 8080, "metrics": 9090},
        enrolled=True,
        ready=True,
        host_network=False,
    )


@pytest.mark.parametrize(
    "pod",
    [
        pytest.param(pod_dict(ip=None), id="pending, no IP yet"),
        pytest.param(pod_dict(host_ip=None), id="no node IP yet"),
        pytest.param(
            {**pod_dict(), "status": {**pod_dict()["status"], "phase": "Succeeded"}}, id="succeeded"
        ),
        pytest.param({**pod_dict(), "status": {**pod_dict()["status"], "phase": "Failed"}}, id="failed"),
    ],
)
def test_pods_that_cannot_be_routed_to_are_skipped(pod: dict[str, Any]) -> None:
    assert parse_pod(pod, namespace_labels={}) is None


def test_only_pod_ip_without_pod_ips_list_is_read() -> None:
    pod = pod_dict()
    del pod["status"]["podIPs"]

    parsed = parse_pod(pod, namespace_labels={})

    assert isinstance(parsed, Workload)
    assert parsed.ips == (ip_address("10.1.0.5"),)


def test_dual_stack_pod_keeps_all_ips_primary_first() -> None:
    pod = pod_dict(ip="10.1.0.5")
    pod["status"]["podIPs"] = [{"ip": "10.1.0.5"}, {"ip": "fd00::5"}]

    parsed = parse_pod(pod, namespace_labels={})

    assert isinstance(parsed, Workload)
    assert parsed.ips == (ip_address("10.1.0.5"), ip_address("fd00::5"))
    assert parsed.ip == ip_address("10.1.0.5")
    assert parsed.ip_of_family(6) == ip_address("fd00::5")


@pytest.mark.parametrize(
    ("conditions", "ready"),
    [
        ([{"type": "Ready", "status": "True"}], True),
        ([{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False"}], False),
        ([{"type": "PodScheduled", "status": "True"}], False),
        (None, False),
    ],
)
def test_readiness_comes_from_the_ready_condition(
    conditions: list[dict[str, str]] | None, ready: bool
) -> None:
    pod = pod_dict()
    pod["status"]["conditions"] = conditions

    parsed = parse_pod(pod, namespace_labels={})

    assert isinstance(parsed, Workload)
    assert parsed.ready is ready


@pytest.mark.parametrize(
    ("spec", "service_account"),
    [
        ({"serviceAccountName": None}, "default"),
        ({"serviceAccountName": None, "serviceAccount": "legacy"}, "legacy"),
        ({"serviceAccountName": "api"}, "api"),
    ],
)
def test_service_account_defaults_like_kubernetes(spec: dict[str, Any], service_account: str) -> None:
    parsed = parse_pod(pod_dict(**spec), namespace_labels={})

    assert isinstance(parsed, Workload)
    assert parsed.service_account == service_account


def test_only_named_tcp_container_ports_are_kept() -> None:
    pod = pod_dict(
        containers=[
            {
                "name": "app",
                "ports": [
                    {"containerPort": 80},
                    {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                    {"name": "http", "containerPort": 8080},
                ],
            }
        ]
    )

    parsed = parse_pod(pod, namespace_labels={})

    assert isinstance(parsed, Workload)
    assert parsed.named_ports == {"http": 8080}


def test_host_network_pod_is_a_host_address_never_enrolled() -> None:
    pod = pod_dict(ip="10.0.0.1", labels={"istio.io/dataplane-mode": "ambient"}, hostNetwork=True)

    parsed = parse_pod(pod, namespace_labels=AMBIENT_NAMESPACE)

    assert isinstance(parsed, Workload)
    assert parsed.host_network
    assert not parsed.enrolled


@pytest.mark.parametrize(
    ("pod_labels", "namespace_labels", "exclude", "enrolled"),
    [
        ({}, AMBIENT_NAMESPACE, None, True),
        ({}, {}, None, False),
        ({"istio.io/dataplane-mode": "ambient"}, {}, None, True),
        ({"istio.io/dataplane-mode": "none"}, AMBIENT_NAMESPACE, None, False),
        ({"app": "ambient-agent"}, AMBIENT_NAMESPACE, {"app": "ambient-agent"}, False),
    ],
)
def test_enrolment_is_decided_while_parsing(
    pod_labels: dict[str, str],
    namespace_labels: dict[str, str],
    exclude: dict[str, str] | None,
    enrolled: bool,
) -> None:
    parsed = parse_pod(pod_dict(labels=pod_labels), namespace_labels=namespace_labels, exclude=exclude)

    assert isinstance(parsed, Workload)
    assert parsed.enrolled is enrolled


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        pytest.param(lambda pod: pod["metadata"].pop("name"), "metadata.name", id="no name"),
        pytest.param(lambda pod: pod.update(metadata=[]), "metadata", id="metadata not an object"),
        pytest.param(
            lambda pod: pod["status"].update(podIPs=[{"ip": "nope"}]), "status.podIPs[0].ip", id="bad ip"
        ),
        pytest.param(lambda pod: pod["status"].update(hostIP="300.1.1.1"), "status.hostIP", id="bad host ip"),
        pytest.param(
            lambda pod: pod["metadata"].update(labels={"app": 3}), "metadata.labels.app", id="label"
        ),
        pytest.param(lambda pod: pod["spec"].update(hostNetwork="yes"), "spec.hostNetwork", id="hostNetwork"),
        pytest.param(lambda pod: pod["spec"].pop("nodeName"), "spec.nodeName", id="no node"),
        pytest.param(
            lambda pod: pod["spec"].update(containers=[{"ports": [{"name": "http", "containerPort": "x"}]}]),
            "spec.containers[0].ports[0].containerPort",
            id="container port",
        ),
    ],
)
def test_malformed_pod_is_a_parse_error_naming_the_field(mutate: Any, field: str) -> None:
    pod = pod_dict("web-1", namespace="shop")
    mutate(pod)

    parsed = parse_pod(pod, namespace_labels={})

    assert isinstance(parsed, ParseError)
    assert parsed.kind == "Pod"
    assert parsed.message.startswith(f"{field}:")


def test_parse_error_names_the_object_when_it_can() -> None:
    pod = pod_dict("web-1", namespace="shop", ip="nope")

    parsed = parse_pod(pod, namespace_labels={})

    assert isinstance(parsed, ParseError)
    assert (parsed.namespace, parsed.name) == ("shop", "web-1")
    assert str(parsed).startswith("Pod shop/web-1: status.podIPs[0].ip:")


def test_parse_error_for_an_object_without_names() -> None:
    parsed = parse_pod({"metadata": "junk"}, namespace_labels={})

    assert isinstance(parsed, ParseError)
    assert (parsed.namespace, parsed.name) == ("?", "?")


# Services.


def service_dict(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "web"}, "ports": [{"port": 80}], **spec},
    }


def test_service_with_ports_and_selector() -> None:
    parsed = parse_service(
        service_dict(
            clusterIPs=["10.96.0.10"],
            ports=[
                {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                {"name": "grpc", "port": 9000, "targetPort": "grpc"},
                {"name": "dns", "port": 53, "protocol": "UDP"},
            ],
            publishNotReadyAddresses=True,
        )
    )

    assert parsed == Service(
        namespace="shop",
        name="web",
        cluster_ips=(ip_address("10.96.0.10"),),
        ports=(
            ServicePort(port=80, target_port=8080, name="http"),
            ServicePort(port=9000, target_port="grpc", name="grpc"),
            ServicePort(port=53, target_port=53, protocol=PortProtocol.UDP, name="dns"),
        ),
        selector={"app": "web"},
        publish_not_ready_addresses=True,
    )


@pytest.mark.parametrize(
    ("spec", "cluster_ips"),
    [
        pytest.param({"clusterIP": "None"}, (), id="headless"),
        pytest.param(
            {"type": "ExternalName", "clusterIP": None, "externalName": "x.example"}, (), id="external"
        ),
        pytest.param({"clusterIPs": ["10.96.0.10", "fd00:96::10"]}, ("10.96.0.10", "fd00:96::10"), id="dual"),
        pytest.param({"clusterIP": "10.96.0.11"}, ("10.96.0.11",), id="clusterIP only"),
    ],
)
def test_service_cluster_ips(spec: dict[str, Any], cluster_ips: tuple[str, ...]) -> None:
    parsed = parse_service(service_dict(**spec))

    assert isinstance(parsed, Service)
    assert parsed.cluster_ips == tuple(ip_address(ip) for ip in cluster_ips)


@pytest.mark.parametrize("selector", [None, {}])
def test_service_without_selector_has_none(selector: dict[str, str] | None) -> None:
    parsed = parse_service(service_dict(selector=selector))

    assert isinstance(parsed, Service)
    assert parsed.selector is None


def test_numeric_string_target_port_is_a_number() -> None:
    parsed = parse_service(service_dict(ports=[{"port": 80, "targetPort": "8080"}]))

    assert isinstance(parsed, Service)
    assert parsed.ports[0].target_port == 8080


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"ports": [{"port": 0}]}, "spec.ports[0].port"),
        ({"ports": [{"targetPort": 80}]}, "spec.ports[0].port"),
        ({"ports": [{"port": 80, "targetPort": 70000}]}, "spec.ports[0].targetPort"),
        ({"ports": [{"port": 80, "protocol": "HTTP"}]}, "spec.ports[0].protocol"),
        ({"ports": {"port": 80}}, "spec.ports"),
        ({"clusterIP": "10.96.0.300"}, "spec.clusterIPs"),
    ],
)
def test_malformed_service_is_a_parse_error(spec: dict[str, Any], field: str) -> None:
    parsed = parse_service(service_dict(**spec))

    assert isinstance(parsed, ParseError)
    assert parsed.message.startswith(f"{field}:")


# AuthorizationPolicy.


def authz(spec: dict[str, Any], **kwargs: Any) -> AuthorizationPolicy | ParseError:
    return parse_authorization_policy(policy_dict("AuthorizationPolicy", spec, **kwargs))


def test_l4_authorization_policy_is_read_completely() -> None:
    parsed = authz(
        {
            "selector": {"matchLabels": {"app": "web"}},
            "action": "DENY",
            "rules": [
                {
                    "from": [
                        {
                            "source": {
                                "principals": ["cluster.local/ns/shop/sa/*"],
                                "notPrincipals": ["*/sa/admin"],
                                "namespaces": ["shop"],
                                "notNamespaces": ["kube-*"],
                                "serviceAccounts": ["other/api", "local"],
                                "notServiceAccounts": ["other/root"],
                                "ipBlocks": ["10.1.0.0/16", "10.2.0.7"],
                                "notIpBlocks": ["10.1.0.1/8"],
                            }
                        },
                        {"source": {"principals": ["*"]}},
                    ],
                    "to": [{"operation": {"ports": ["80", "443"], "notPorts": ["8080"]}}],
                    "when": [
                        {"key": "source.ip", "values": ["10.1.0.0/16"], "notValues": ["10.1.0.9"]},
                        {"key": "source.namespace", "values": ["shop"]},
                        {"key": "source.principal", "notValues": ["cluster.local/ns/x/sa/y"]},
                        {"key": "destination.ip", "values": ["10.1.0.5"]},
                        {"key": "destination.port", "values": ["80"], "notValues": ["81"]},
                    ],
                },
                {},
            ],
        },
        name="deny-some",
        namespace="shop",
    )

    assert parsed == AuthorizationPolicy(
        namespace="shop",
        name="deny-some",
        action=Action.DENY,
        selector={"app": "web"},
        rules=(
            Rule(
                sources=(
                    Source(
                        principals=(StringMatch(MatchKind.PREFIX, "cluster.local/ns/shop/sa/"),),
                        not_principals=(StringMatch(MatchKind.SUFFIX, "/sa/admin"),),
                        namespaces=(StringMatch(MatchKind.EXACT, "shop"),),
                        not_namespaces=(StringMatch(MatchKind.PREFIX, "kube-"),),
                        service_accounts=(
                            ServiceAccountRef("other", "api"),
                            ServiceAccountRef("shop", "local"),
                        ),
                        not_service_accounts=(ServiceAccountRef("other", "root"),),
                        ip_blocks=(ip_network("10.1.0.0/16"), ip_network("10.2.0.7/32")),
                        not_ip_blocks=(ip_network("10.0.0.0/8"),),
                    ),
                    Source(principals=(StringMatch(MatchKind.PRESENCE),)),
                ),
                operations=(Operation(ports=(80, 443), not_ports=(8080,)),),
                conditions=(
                    IpCondition(
                        key=ConditionKey.SOURCE_IP,
                        values=(ip_network("10.1.0.0/16"),),
                        not_values=(ip_network("10.1.0.9/32"),),
                    ),
                    StringCondition(
                        key=ConditionKey.SOURCE_NAMESPACE, values=(StringMatch(MatchKind.EXACT, "shop"),)
                    ),
                    StringCondition(
                        key=ConditionKey.SOURCE_PRINCIPAL,
                        not_values=(StringMatch(MatchKind.EXACT, "cluster.local/ns/x/sa/y"),),
                    ),
                    IpCondition(key=ConditionKey.DESTINATION_IP, values=(ip_network("10.1.0.5/32"),)),
                    PortCondition(values=(80,), not_values=(81,)),
                ),
            ),
            Rule(),
        ),
    )
    assert isinstance(parsed, AuthorizationPolicy)
    assert parsed.warning is None


@pytest.mark.parametrize(
    ("spec", "action", "selector", "rules"),
    [
        pytest.param({}, Action.ALLOW, None, (), id="empty spec: ALLOW with no rules"),
        pytest.param({"action": "DENY"}, Action.DENY, None, (), id="DENY with no rules"),
        pytest.param({"rules": [{}]}, Action.ALLOW, None, (Rule(),), id="empty rule"),
        pytest.param({"selector": {"matchLabels": {}}}, Action.ALLOW, None, (), id="empty selector"),
        pytest.param({"selector": {"matchLabels": {"a": "b"}}}, Action.ALLOW, {"a": "b"}, (), id="selector"),
    ],
)
def test_policy_shapes(
    spec: dict[str, Any], action: Action, selector: dict[str, str] | None, rules: tuple[Rule, ...]
) -> None:
    parsed = authz(spec)

    assert isinstance(parsed, AuthorizationPolicy)
    assert (parsed.action, parsed.selector, parsed.rules) == (action, selector, rules)


@pytest.mark.parametrize("version", ["security.istio.io/v1", "security.istio.io/v1beta1", None])
def test_supported_api_versions(version: str | None) -> None:
    obj = policy_dict("AuthorizationPolicy", {})
    if version is None:
        del obj["apiVersion"]
    else:
        obj["apiVersion"] = version

    assert isinstance(parse_authorization_policy(obj), AuthorizationPolicy)


@pytest.mark.parametrize(
    ("rule", "rule_fields", "kept"),
    [
        pytest.param(
            {"to": [{"operation": {"methods": ["GET"], "ports": ["80"]}}]},
            ("methods",),
            Rule(operations=(Operation(ports=(80,)),)),
            id="methods next to ports",
        ),
        pytest.param(
            {"to": [{"operation": {"paths": ["/admin"], "hosts": ["a"], "notMethods": ["POST"]}}]},
            ("hosts", "notMethods", "paths"),
            Rule(operations=(Operation(),)),
            id="operation with only HTTP fields",
        ),
        pytest.param(
            {"from": [{"source": {"requestPrincipals": ["*"], "namespaces": ["a"]}}]},
            ("requestPrincipals",),
            Rule(sources=(Source(namespaces=(StringMatch(MatchKind.EXACT, "a"),)),)),
            id="requestPrincipals",
        ),
        pytest.param(
            {"from": [{"source": {"remoteIpBlocks": ["1.2.3.4"], "notRemoteIpBlocks": ["1.2.3.5"]}}]},
            ("notRemoteIpBlocks", "remoteIpBlocks"),
            Rule(sources=(Source(),)),
            id="remoteIpBlocks",
        ),
        pytest.param(
            {"when": [{"key": "request.headers[x-user]", "values": ["bob"]}]},
            ("request.headers[x-user]",),
            Rule(),
            id="when on a header",
        ),
        pytest.param(
            {"from": [{"source": {"futureField": ["x"]}}], "then": {}},
            ("futureField", "then"),
            Rule(sources=(Source(),)),
            id="fields this code does not know",
        ),
    ],
)
def test_fields_not_enforceable_at_l4_are_recorded_not_kept(
    rule: dict[str, Any], rule_fields: tuple[str, ...], kept: Rule
) -> None:
    parsed = authz({"rules": [rule]})

    assert isinstance(parsed, AuthorizationPolicy)
    assert parsed.rules == (
        Rule(sources=kept.sources, operations=kept.operations, unsupported_fields=rule_fields),
    )
    assert parsed.unsupported_fields == rule_fields


@pytest.mark.parametrize(
    ("action", "says"),
    [("ALLOW", "rules using them match nothing"), ("DENY", "denies more than written")],
)
def test_unsupported_fields_give_a_warning_for_an_event(action: str, says: str) -> None:
    parsed = authz(
        {
            "action": action,
            "rules": [
                {"to": [{"operation": {"methods": ["GET"]}}]},
                {"to": [{"operation": {"paths": ["/x"], "methods": ["PUT"]}}]},
            ],
        }
    )

    assert isinstance(parsed, AuthorizationPolicy)
    assert parsed.unsupported_fields == ("methods", "paths")
    assert parsed.warning is not None
    assert "cannot enforce: methods, paths" in parsed.warning
    assert says in parsed.warning


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        pytest.param({"action": "CUSTOM", "provider": {"name": "x"}}, "spec.action: CUSTOM", id="CUSTOM"),
        pytest.param({"action": "AUDIT"}, "spec.action: AUDIT", id="AUDIT"),
        pytest.param({"action": "BLOCK"}, "spec.action: expected one of ALLOW, DENY", id="unknown action"),
        pytest.param({"targetRefs": [{"kind": "Service", "name": "x"}]}, "spec.targetRef(s)", id="waypoint"),
        pytest.param(
            {"targetRef": {"kind": "Gateway", "name": "x"}}, "spec.targetRef(s)", id="waypoint, singular"
        ),
        pytest.param({"rules": {}}, "spec.rules:", id="rules not a list"),
        pytest.param(
            {"rules": [{"from": [{"source": {}}]}]}, "spec.rules[0].from[0].source: must not", id="source"
        ),
        pytest.param({"rules": [{"from": [{}]}]}, "spec.rules[0].from[0].source: must not", id="no source"),
        pytest.param(
            {"rules": [{"from": [{"source": {"principals": []}}]}]},
            "spec.rules[0].from[0].source: must not",
            id="source with empty lists",
        ),
        pytest.param(
            {"rules": [{"to": [{"operation": {"ports": [], "methods": None}}]}]},
            "spec.rules[0].to[0].operation: must",
            id="operation with empty lists",
        ),
        pytest.param(
            {"rules": [{"to": [{"operation": {}}]}]}, "spec.rules[0].to[0].operation: must", id="op"
        ),
        pytest.param(
            {"rules": [{"to": [{"operation": {"ports": ["80x"]}}]}]}, "ports: not a port", id="port"
        ),
        pytest.param({"rules": [{"to": [{"operation": {"ports": ["0"]}}]}]}, "out of range", id="port 0"),
        pytest.param({"rules": [{"to": [{"operation": {"notPorts": ["65536"]}}]}]}, "out of range", id="big"),
        pytest.param(
            {"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0/8"]}}]}]}, "ipBlocks: not", id="cidr"
        ),
        pytest.param({"rules": [{"from": [{"source": {"principals": [""]}}]}]}, "principals[0]", id="empty"),
        pytest.param(
            {"rules": [{"from": [{"source": {"serviceAccounts": ["a/b/c"]}}]}]},
            "serviceAccounts: not",
            id="sa",
        ),
        pytest.param({"rules": [{"when": [{"key": "source.ip"}]}]}, "needs values or notValues", id="when"),
        pytest.param({"rules": [{"when": [{"values": ["x"]}]}]}, "spec.rules[0].when[0].key", id="when key"),
        pytest.param(
            {"rules": [{"when": [{"key": "destination.port", "values": ["http"]}]}]},
            "values: not",
            id="when port",
        ),
    ],
)
def test_malformed_or_unenforceable_policy_is_a_parse_error(spec: dict[str, Any], message: str) -> None:
    parsed = authz(spec, name="bad", namespace="shop")

    assert isinstance(parsed, ParseError)
    assert (parsed.kind, parsed.namespace, parsed.name) == ("AuthorizationPolicy", "shop", "bad")
    assert message in parsed.message


def test_foreign_api_version_is_a_parse_error() -> None:
    parsed = authz({}, api_version="security.istio.io/v2")

    assert isinstance(parsed, ParseError)
    assert parsed.message.startswith("apiVersion:")


# PeerAuthentication.


def peer_authn(spec: dict[str, Any], **kwargs: Any) -> PeerAuthentication | ParseError:
    return parse_peer_authentication(policy_dict("PeerAuthentication", spec, **kwargs))


def test_peer_authentication_with_port_levels() -> None:
    parsed = peer_authn(
        {
            "selector": {"matchLabels": {"app": "web"}},
            "mtls": {"mode": "STRICT"},
            "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}, "9090": {"mode": "DISABLE"}},
        },
        name="web",
        namespace="shop",
        created="2024-05-01T10:00:00Z",
    )

    assert parsed == PeerAuthentication(
        namespace="shop",
        name="web",
        selector={"app": "web"},
        mode=MtlsMode.STRICT,
        port_modes={8080: MtlsMode.PERMISSIVE, 9090: MtlsMode.DISABLE},
        created=datetime(2024, 5, 1, 10, 0, tzinfo=UTC),
    )


@pytest.mark.parametrize(
    ("spec", "mode"),
    [
        ({}, MtlsMode.UNSET),
        ({"mtls": {}}, MtlsMode.UNSET),
        ({"mtls": {"mode": "PERMISSIVE"}}, MtlsMode.PERMISSIVE),
    ],
)
def test_peer_authentication_mode_defaults_to_unset(spec: dict[str, Any], mode: MtlsMode) -> None:
    parsed = peer_authn(spec)

    assert isinstance(parsed, PeerAuthentication)
    assert (parsed.mode, parsed.selector) == (mode, None)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"mtls": {"mode": "ON"}}, "spec.mtls.mode: expected one of UNSET, DISABLE, PERMISSIVE, STRICT"),
        ({"portLevelMtls": {"8080": {"mode": "STRICT"}}}, "spec.portLevelMtls: only allowed with a workload"),
        (
            {"selector": {"matchLabels": {"a": "b"}}, "portLevelMtls": {"http": {"mode": "STRICT"}}},
            "spec.portLevelMtls: not a port",
        ),
    ],
)
def test_malformed_peer_authentication_is_a_parse_error(spec: dict[str, Any], message: str) -> None:
    parsed = peer_authn(spec)

    assert isinstance(parsed, ParseError)
    assert parsed.message.startswith(message)


def test_bad_creation_timestamp_is_a_parse_error() -> None:
    parsed = peer_authn({}, created="yesterday")

    assert isinstance(parsed, ParseError)
    assert parsed.message.startswith("metadata.creationTimestamp:")
