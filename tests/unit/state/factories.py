"""Builders for the state tests: workloads, services and Kubernetes-shaped dicts with sensible defaults."""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import ip_address
from typing import Any

from agent.state.model import Service, ServicePort, Workload

NODE_IPS = {"node-a": "10.0.0.1", "node-b": "10.0.0.2"}


def workload(
    name: str,
    ip: str,
    *,
    namespace: str = "default",
    service_account: str | None = None,
    node: str = "node-a",
    labels: Mapping[str, str] | None = None,
    named_ports: Mapping[str, int] | None = None,
    enrolled: bool = True,
    ready: bool = True,
    host_network: bool = False,
    extra_ips: tuple[str, ...] = (),
) -> Workload:
    """A workload whose service account defaults to its name and whose node IP follows NODE_IPS."""
    return Workload(
        name=name,
        namespace=namespace,
        service_account=service_account or name,
        ips=tuple(ip_address(value) for value in (ip, *extra_ips)),
        node=node,
        node_ip=ip_address(NODE_IPS[node]),
        labels=dict(labels or {"app": name}),
        named_ports=dict(named_ports or {}),
        enrolled=enrolled,
        ready=ready,
        host_network=host_network,
    )


def service(
    name: str,
    cluster_ip: str,
    *ports: tuple[int, int | str],
    namespace: str = "default",
    selector: Mapping[str, str] | None = None,
    publish_not_ready: bool = False,
) -> Service:
    """A service selecting `app=<name>` unless told otherwise; ports as (port, target port) pairs."""
    return Service(
        namespace=namespace,
        name=name,
        cluster_ips=(ip_address(cluster_ip),),
        ports=tuple(ServicePort(port=port, target_port=target) for port, target in ports),
        selector=dict(selector) if selector is not None else {"app": name},
        publish_not_ready_addresses=publish_not_ready,
    )


def pod_dict(
    name: str = "web-1",
    *,
    namespace: str = "default",
    ip: str | None = "10.1.0.5",
    host_ip: str | None = "10.0.0.1",
    labels: Mapping[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A running, ready pod as the API server returns it; `spec` entries override the pod spec."""
    status: dict[str, Any] = {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True"}],
    }
    if ip is not None:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    if host_ip is not None:
        status["hostIP"] = host_ip
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{name}",
            "labels": dict(labels or {}),
        },
        "spec": {"nodeName": "node-a", "serviceAccountName": "web", "containers": [{"name": "app"}], **spec},
        "status": status,
    }


def policy_dict(
    kind: str,
    spec: Mapping[str, Any],
    *,
    name: str = "policy",
    namespace: str = "default",
    api_version: str = "security.istio.io/v1",
    created: str | None = None,
) -> dict[str, Any]:
    """A security.istio.io object."""
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if created is not None:
        metadata["creationTimestamp"] = created
    return {"apiVersion": api_version, "kind": kind, "metadata": metadata, "spec": dict(spec)}
