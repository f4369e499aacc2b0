"""Parsing Kubernetes objects (the JSON dicts the API server returns) into the state model.

Each parser returns the model value or a `ParseError` naming the object and the offending field; it
never raises on bad input, so one malformed object cannot stop a watcher. Policy fields that the agent
cannot enforce at L4 (HTTP-only fields, and fields newer than this code) are recorded on the rule rather
than rejected: `agent.state.inbound` evaluates such rules the fail-safe way Istio's ztunnel does.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from ipaddress import ip_address, ip_network
from typing import TypeVar

from agent.state.enrolment import enrolment
from agent.state.model import IPAddress, PortProtocol, Service, ServicePort, Workload
from agent.state.policy import (
    Action,
    AuthorizationPolicy,
    Condition,
    ConditionKey,
    IpCondition,
    IPNetwork,
    MtlsMode,
    Operation,
    PeerAuthentication,
    PolicyKind,
    PortCondition,
    Rule,
    ServiceAccountRef,
    Source,
    StringCondition,
    StringMatch,
)

SECURITY_API_VERSIONS = frozenset({"security.istio.io/v1", "security.istio.io/v1beta1"})
"""The `security.istio.io` versions whose L4 schema the parsers read."""

_TERMINAL_POD_PHASES = frozenset({"Succeeded", "Failed"})
_SOURCE_FIELDS = frozenset(
    {
        "principals",
        "notPrincipals",
        "namespaces",
        "notNamespaces",
        "serviceAccounts",
        "notServiceAccounts",
        "ipBlocks",
        "notIpBlocks",
    }
)
_OPERATION_FIELDS = frozenset({"ports", "notPorts"})
_RULE_FIELDS = frozenset({"from", "to", "when"})
_CONDITION_KEYS = {key.value: key for key in ConditionKey}
_T = TypeVar("_T")
_E = TypeVar("_E", bound=enum.StrEnum)


@dataclass(frozen=True, slots=True)
class ParseError:
    """An object that could not be read; the message names the field and what was wrong."""

    kind: str
    namespace: str
    name: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}: {self.message}"


class _Malformed(Exception):
    """Internal: raised while reading one object, turned into a `ParseError` at the parser's edge."""


def parse_pod(
    obj: Mapping[str, object],
    *,
    namespace_labels: Mapping[str, str],
    exclude: Mapping[str, str] | None = None,
) -> Workload | ParseError | None:
    """A pod as a `Workload`; None while it has no IP or node IP, or once it has terminated.

    `namespace_labels` are the labels of the pod's namespace and `exclude` selects the agent's own pods,
    both for the enrolment rule (`agent.state.enrolment`).
    """
    try:
        return _pod(obj, namespace_labels, exclude)
    except _Malformed as error:
        return _error("Pod", obj, error)


def parse_service(obj: Mapping[str, object]) -> Service | ParseError:
    """A Service; headless and ExternalName services have no cluster IPs."""
    try:
        return _service(obj)
    except _Malformed as error:
        return _error("Service", obj, error)


def parse_authorization_policy(obj: Mapping[str, object]) -> AuthorizationPolicy | ParseError:
    """A `security.istio.io` AuthorizationPolicy, L4 part (see `AuthorizationPolicy.warning`).

    Policies a node proxy cannot enforce at all (CUSTOM and AUDIT actions, policies attached to a
    waypoint through `targetRef(s)`) are errors, so that the user hears of them.
    """
    try:
        return _authorization_policy(obj)
    except _Malformed as error:
        return _error(PolicyKind.AUTHORIZATION_POLICY, obj, error)


def parse_peer_authentication(obj: Mapping[str, object]) -> PeerAuthentication | ParseError:
    """A `security.istio.io` PeerAuthentication."""
    try:
        return _peer_authentication(obj)
    except _Malformed as error:
        return _error(PolicyKind.PEER_AUTHENTICATION, obj, error)


def _error(kind: str, obj: Mapping[str, object], error: _Malformed) -> ParseError:
    metadata = obj.get("metadata")
    names = metadata if isinstance(metadata, Mapping) else {}
    namespace, name = names.get("namespace"), names.get("name")
    return ParseError(
        kind=kind,
        namespace=namespace if isinstance(namespace, str) else "?",
        name=name if isinstance(name, str) else "?",
        message=str(error),
    )


# Readers for JSON values: each names the field it reads in the error.


def _mapping(value: object, path: str) -> Mapping[str, object]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _Malformed(f"{path}: expected an object, got {type(value).__name__}")
    return value


def _list(value: object, path: str) -> list[object]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Malformed(f"{path}: expected a list, got {type(value).__name__}")
    return value


def _str(value: object, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise _Malformed(f"{path}: expected a non-empty string, got {value!r}")
    return value


def _optional_str(value: object, path: str) -> str | None:
    return None if value is None else _str(value, path)


def _bool(value: object, path: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _Malformed(f"{path}: expected a boolean, got {value!r}")
    return value


def _str_list(value: object, path: str) -> list[str]:
    return [_str(item, f"{path}[{index}]") for index, item in enumerate(_list(value, path))]


def _labels(value: object, path: str) -> dict[str, str]:
    return {
        _str(key, path): _string_value(item, f"{path}.{key}") for key, item in _mapping(value, path).items()
    }


def _string_value(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise _Malformed(f"{path}: expected a string, got {value!r}")
    return value


def _choice(value: object, choices: type[_E], path: str) -> _E:
    if isinstance(value, str) and value in choices.__members__:
        return choices[value]
    raise _Malformed(f"{path}: expected one of {', '.join(choices)}, got {value!r}")


def _ip(value: object, path: str) -> IPAddress:
    try:
        return ip_address(_str(value, path))
    except ValueError:
        raise _Malformed(f"{path}: not an IP address: {value!r}") from None


def _network(value: object, path: str) -> IPNetwork:
    try:
        return ip_network(_str(value, path), strict=False)
    except ValueError:
        raise _Malformed(f"{path}: not an IP address or CIDR block: {value!r}") from None


def _port(value: object, path: str) -> int:
    """A port given as a JSON number or (as policies spell them) a string of digits."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise _Malformed(f"{path}: not a port number: {value!r}")
    if not 1 <= number <= 65535:
        raise _Malformed(f"{path}: port out of range 1-65535: {value!r}")
    return number


def _match_labels(spec: Mapping[str, object], path: str) -> dict[str, str] | None:
    """`selector.matchLabels`; None when absent or empty (the policy then applies namespace-wide)."""
    selector = _mapping(spec.get("selector"), f"{path}.selector")
    labels = _labels(selector.get("matchLabels"), f"{path}.selector.matchLabels")
    return labels or None


def _metadata(obj: Mapping[str, object]) -> tuple[Mapping[str, object], str, str]:
    metadata = _mapping(obj.get("metadata"), "metadata")
    return (
        metadata,
        _str(metadata.get("namespace"), "metadata.namespace"),
        _str(metadata.get("name"), "metadata.name"),
    )


def _check_security_api_version(obj: Mapping[str, object]) -> None:
    # Items of a LIST response may omit apiVersion; only a present, foreign version is wrong.
    version = obj.get("apiVersion")
    if version is not None and version not in SECURITY_API_VERSIONS:
        raise _Malformed(f"apiVersion: expected one of {sorted(SECURITY_API_VERSIONS)}, got {version!r}")


# Pods and services.


def _pod(
    obj: Mapping[str, object], namespace_labels: Mapping[str, str], exclude: Mapping[str, str] | None
) -> Workload | None:
    metadata, namespace, name = _metadata(obj)
    spec = _mapping(obj.get("spec"), "spec")
    status = _mapping(obj.get("status"), "status")
    if status.get("phase") in _TERMINAL_POD_PHASES:
        # A finished pod keeps its IP in status, but the IP already belongs to someone else.
        return None
    ips = _pod_ips(status)
    host_ip = status.get("hostIP")
    if not ips or host_ip is None:
        return None
    labels = _labels(metadata.get("labels"), "metadata.labels")
    host_network = _bool(spec.get("hostNetwork"), "spec.hostNetwork")
    service_account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    return Workload(
        uid=_optional_str(metadata.get("uid"), "metadata.uid"),
        name=name,
        namespace=namespace,
        service_account=_str(service_account, "spec.serviceAccountName"),
        ips=ips,
        node=_str(spec.get("nodeName"), "spec.nodeName"),
        node_ip=_ip(host_ip, "status.hostIP"),
        labels=labels,
        named_ports=_named_ports(spec),
        enrolled=enrolment(
            pod_labels=labels, namespace_labels=namespace_labels, host_network=host_network, exclude=exclude
        ).enrolled,
        ready=_pod_ready(status),
        host_network=host_network,
    )


def _pod_ips(status: Mapping[str, object]) -> tuple[IPAddress, ...]:
    entries = _list(status.get("podIPs"), "status.podIPs")
    if entries:
        return tuple(
            _ip(_mapping(entry, f"status.podIPs[{index}]").get("ip"), f"status.podIPs[{index}].ip")
            for index, entry in enumerate(entries)
        )
    pod_ip = status.get("podIP")
    return () if pod_ip is None else (_ip(pod_ip, "status.podIP"),)


def _pod_ready(status: Mapping[str, object]) -> bool:
    for index, entry in enumerate(_list(status.get("conditions"), "status.conditions")):
        condition = _mapping(entry, f"status.conditions[{index}]")
        if condition.get("type") == "Ready":
            return condition.get("status") == "True"
    return False


def _named_ports(spec: Mapping[str, object]) -> dict[str, int]:
    named: dict[str, int] = {}
    for c_index, entry in enumerate(_list(spec.get("containers"), "spec.containers")):
        container = _mapping(entry, f"spec.containers[{c_index}]")
        for p_index, port_entry in enumerate(
            _list(container.get("ports"), f"spec.containers[{c_index}].ports")
        ):
            path = f"spec.containers[{c_index}].ports[{p_index}]"
            port = _mapping(port_entry, path)
            if port.get("name") is None or port.get("protocol", "TCP") != "TCP":
                continue
            named[_str(port.get("name"), f"{path}.name")] = _port(
                port.get("containerPort"), f"{path}.containerPort"
            )
    return named


def _service(obj: Mapping[str, object]) -> Service:
    _, namespace, name = _metadata(obj)
    spec = _mapping(obj.get("spec"), "spec")
    selector = _labels(spec.get("selector"), "spec.selector")
    return Service(
        namespace=namespace,
        name=name,
        cluster_ips=_cluster_ips(spec),
        ports=tuple(
            _service_port(entry, f"spec.ports[{i}]")
            for i, entry in enumerate(_list(spec.get("ports"), "spec.ports"))
        ),
        # An empty selector means the same as none: endpoints are managed outside Kubernetes.
        selector=selector or None,
        publish_not_ready_addresses=_bool(
            spec.get("publishNotReadyAddresses"), "spec.publishNotReadyAddresses"
        ),
    )


def _cluster_ips(spec: Mapping[str, object]) -> tuple[IPAddress, ...]:
    if spec.get("type") == "ExternalName":
        return ()
    raw = _str_list(spec.get("clusterIPs"), "spec.clusterIPs")
    if not raw and spec.get("clusterIP") is not None:
        raw = [_string_value(spec.get("clusterIP"), "spec.clusterIP")]
    return tuple(_ip(value, "spec.clusterIPs") for value in raw if value not in ("", "None"))


def _service_port(entry: object, path: str) -> ServicePort:
    port_spec = _mapping(entry, path)
    port = _port(port_spec.get("port"), f"{path}.port")
    raw_target = port_spec.get("targetPort")
    target: int | str
    if raw_target is None:
        target = port
    elif isinstance(raw_target, str) and not raw_target.isdigit():
        target = raw_target
    else:
        target = _port(raw_target, f"{path}.targetPort")
    return ServicePort(
        port=port,
        target_port=target,
        protocol=_choice(port_spec.get("protocol", PortProtocol.TCP), PortProtocol, f"{path}.protocol"),
        name=_string_value(port_spec.get("name", ""), f"{path}.name"),
    )


# security.istio.io policies.


def _authorization_policy(obj: Mapping[str, object]) -> AuthorizationPolicy:
    _check_security_api_version(obj)
    _, namespace, name = _metadata(obj)
    spec = _mapping(obj.get("spec"), "spec")
    if spec.get("targetRef") is not None or spec.get("targetRefs"):
        raise _Malformed(
            "spec.targetRef(s): the policy is attached to a waypoint; the node agent does not enforce it"
        )
    if spec.get("action") in ("AUDIT", "CUSTOM"):
        raise _Malformed(f"spec.action: {spec.get('action')} is not enforced by the node agent")
    return AuthorizationPolicy(
        namespace=namespace,
        name=name,
        action=_choice(spec.get("action", Action.ALLOW), Action, "spec.action"),
        selector=_match_labels(spec, "spec"),
        rules=tuple(
            _rule(entry, f"spec.rules[{i}]", namespace)
            for i, entry in enumerate(_list(spec.get("rules"), "spec.rules"))
        ),
    )


def _rule(entry: object, path: str, policy_namespace: str) -> Rule:
    rule = _mapping(entry, path)
    unsupported = {key for key in rule if key not in _RULE_FIELDS}
    sources = []
    for index, item in enumerate(_list(rule.get("from"), f"{path}.from")):
        source_path = f"{path}.from[{index}].source"
        source_spec = _mapping(_mapping(item, f"{path}.from[{index}]").get("source"), source_path)
        sources.append(_source(source_spec, source_path, policy_namespace, unsupported))
    operations = []
    for index, item in enumerate(_list(rule.get("to"), f"{path}.to")):
        operation_path = f"{path}.to[{index}].operation"
        operation_spec = _mapping(_mapping(item, f"{path}.to[{index}]").get("operation"), operation_path)
        operations.append(_operation(operation_spec, operation_path, unsupported))
    conditions = []
    for index, item in enumerate(_list(rule.get("when"), f"{path}.when")):
        condition = _condition(_mapping(item, f"{path}.when[{index}]"), f"{path}.when[{index}]")
        if isinstance(condition, str):
            unsupported.add(condition)
        else:
            conditions.append(condition)
    return Rule(
        sources=tuple(sources),
        operations=tuple(operations),
        conditions=tuple(conditions),
        unsupported_fields=tuple(sorted(unsupported)),
    )


def _source(spec: Mapping[str, object], path: str, policy_namespace: str, unsupported: set[str]) -> Source:
    if not any(spec.values()):
        raise _Malformed(f"{path}: must not be empty")
    unsupported.update(key for key in spec if key not in _SOURCE_FIELDS)

    def strings(key: str) -> tuple[StringMatch, ...]:
        return tuple(StringMatch.parse(value) for value in _str_list(spec.get(key), f"{path}.{key}"))

    def networks(key: str) -> tuple[IPNetwork, ...]:
        return tuple(_network(value, f"{path}.{key}") for value in _list(spec.get(key), f"{path}.{key}"))

    def accounts(key: str) -> tuple[ServiceAccountRef, ...]:
        return tuple(
            _service_account(value, f"{path}.{key}", policy_namespace)
            for value in _str_list(spec.get(key), f"{path}.{key}")
        )

    return Source(
        principals=strings("principals"),
        not_principals=strings("notPrincipals"),
        namespaces=strings("namespaces"),
        not_namespaces=strings("notNamespaces"),
        service_accounts=accounts("serviceAccounts"),
        not_service_accounts=accounts("notServiceAccounts"),
        ip_blocks=networks("ipBlocks"),
        not_ip_blocks=networks("notIpBlocks"),
    )


def _service_account(value: str, path: str, policy_namespace: str) -> ServiceAccountRef:
    namespace, _, name = value.rpartition("/")
    if not name or "/" in namespace:
        raise _Malformed(f"{path}: not a service account `<namespace>/<name>` or `<name>`: {value!r}")
    # A bare name is a service account in the policy's own namespace.
    return ServiceAccountRef(namespace=namespace or policy_namespace, name=name)


def _operation(spec: Mapping[str, object], path: str, unsupported: set[str]) -> Operation:
    if not any(spec.values()):
        raise _Malformed(f"{path}: must not be empty")
    unsupported.update(key for key in spec if key not in _OPERATION_FIELDS)
    return Operation(
        ports=tuple(_port(value, f"{path}.ports") for value in _list(spec.get("ports"), f"{path}.ports")),
        not_ports=tuple(
            _port(value, f"{path}.notPorts") for value in _list(spec.get("notPorts"), f"{path}.notPorts")
        ),
    )


def _condition(spec: Mapping[str, object], path: str) -> Condition | str:
    """A `when` condition, or its key when the key is not evaluable at L4."""
    key = _str(spec.get("key"), f"{path}.key")
    raw_values = _list(spec.get("values"), f"{path}.values")
    raw_not_values = _list(spec.get("notValues"), f"{path}.notValues")
    if not raw_values and not raw_not_values:
        raise _Malformed(f"{path}: needs values or notValues")
    condition_key = _CONDITION_KEYS.get(key)
    if condition_key is None:
        return key

    def each(read: Callable[[object, str], _T]) -> tuple[tuple[_T, ...], tuple[_T, ...]]:
        return (
            tuple(read(value, f"{path}.values") for value in raw_values),
            tuple(read(value, f"{path}.notValues") for value in raw_not_values),
        )

    match condition_key:
        case ConditionKey.SOURCE_IP | ConditionKey.DESTINATION_IP:
            values, not_values = each(_network)
            return IpCondition(key=condition_key, values=values, not_values=not_values)
        case ConditionKey.DESTINATION_PORT:
            ports, not_ports = each(_port)
            return PortCondition(values=ports, not_values=not_ports)
        case ConditionKey.SOURCE_NAMESPACE | ConditionKey.SOURCE_PRINCIPAL:
            patterns, not_patterns = each(lambda value, where: StringMatch.parse(_str(value, where)))
            return StringCondition(key=condition_key, values=patterns, not_values=not_patterns)


def _peer_authentication(obj: Mapping[str, object]) -> PeerAuthentication:
    _check_security_api_version(obj)
    metadata, namespace, name = _metadata(obj)
    spec = _mapping(obj.get("spec"), "spec")
    selector = _match_labels(spec, "spec")
    port_modes = {
        _port(port, "spec.portLevelMtls"): _mtls_mode(setting, f"spec.portLevelMtls.{port}")
        for port, setting in _mapping(spec.get("portLevelMtls"), "spec.portLevelMtls").items()
    }
    if port_modes and selector is None:
        raise _Malformed("spec.portLevelMtls: only allowed with a workload selector")
    return PeerAuthentication(
        namespace=namespace,
        name=name,
        selector=selector,
        mode=_mtls_mode(spec.get("mtls"), "spec.mtls"),
        port_modes=port_modes,
        created=_timestamp(metadata.get("creationTimestamp"), "metadata.creationTimestamp"),
    )


def _mtls_mode(value: object, path: str) -> MtlsMode:
    return _choice(_mapping(value, path).get("mode", MtlsMode.UNSET), MtlsMode, f"{path}.mode")


def _timestamp(value: object, path: str) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(_str(value, path))
    except ValueError:
        raise _Malformed(f"{path}: not an RFC 3339 time: {value!r}") from None
