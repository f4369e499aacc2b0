"""The whole product on the e2e cluster, installed as a user installs it: manifests/ applied through the
API server, the node DaemonSet and the CA Deployment rolled out by kube-controller-manager, their pods
run by the harness kubelet (container command, downward-API env, projected service-account token bound
to the pod, hostNetwork, readiness probe). Tests see the agents from outside only: their endpoints on
the node, their pods' logs.

Shared by tests/e2e/test_control_plane.py, tests/e2e/test_install.py and the demo (tests/e2e/demo.py,
`make demo`).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.cluster import Cluster, NodeHandle, PodHandle
from tests.e2e.install import (
    CA_COMPONENT,
    DAEMONSET,
    NODE_COMPONENT,
    RELEASE_NAMESPACE,
    Object,
    get,
    install,
    namespace_gone,
    release_pods,
    uninstall,
    wait_rolled_out,
)
from tests.e2e.mesh import ADMIN_PORT, METRICS_PORT, READINESS_PORT, eventually, http_get, remove_capture
from tests.e2e.scenarios import SLEEP, TRUST_BUNDLE, AgentRollout, ClientResult

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
REDIRECTION = "ambient.istio.io/redirection"
NAMESPACE_DELETION_TIMEOUT = 60.0


@dataclass(frozen=True)
class InstalledAgent:
    """The agent the DaemonSet runs on one node."""

    cluster: Cluster
    node: NodeHandle
    pod_name: str

    @property
    def log_path(self) -> Path:
        """The kubelet's log of the agent pod's container."""
        return self.cluster.layout.pod_log(RELEASE_NAMESPACE, self.pod_name)

    def ready(self) -> bool:
        """Whether the agent's readiness endpoint (the DaemonSet's probe) answers 200."""
        status, _ = http_get(self.node.netns, self.node.ip, READINESS_PORT, "/healthz/ready")
        return status == 200


@dataclass
class KubeMesh:
    """The installed product: an agent on every node and the CA, all talking to the cluster's API server."""

    cluster: Cluster
    objects: list[Object]
    agents: dict[str, InstalledAgent]

    def agent(self, node: NodeHandle | str) -> InstalledAgent:
        return self.agents[node if isinstance(node, str) else node.name]

    def ca_log_path(self) -> Path:
        """The log of the CA Deployment's (first) pod."""
        first = release_pods(self.cluster, CA_COMPONENT)[0]
        return self.cluster.layout.pod_log(RELEASE_NAMESPACE, first["metadata"]["name"])

    def metrics(self, node: NodeHandle) -> str:
        status, text = http_get(node.netns, node.ip, METRICS_PORT, "/metrics")
        assert status == 200, text
        return text

    def config_dump(self, node: NodeHandle) -> dict[str, Any]:
        status, body = http_get(node.netns, "127.0.0.1", ADMIN_PORT, "/config_dump")
        assert status == 200, body
        dump: dict[str, Any] = json.loads(body)
        return dump

    def captured(self, node: NodeHandle) -> set[str]:
        """The pod addresses the node's capture rules cover now."""
        return set(self.config_dump(node)["redirect"]["synced_pods"] or ())

    def stop(self) -> None:
        """Uninstalls, then removes the capture from every node (what the chart's uninstall hook runs)."""
        try:
            uninstall(self.cluster, self.objects)
        finally:
            for node in self.cluster.nodes:
                remove_capture(self.cluster, node)


def start_mesh(cluster: Cluster) -> KubeMesh:
    """Installs manifests/ and waits for the rollout: an agent Ready on every node (listeners bound,
    first sync done, capture installed) and the CA available."""
    objects = install(cluster)
    mesh = KubeMesh(cluster, objects, {})
    try:
        wait_rolled_out(cluster)
        for pod in release_pods(cluster, NODE_COMPONENT):
            node = cluster.node(pod["spec"]["nodeName"])
            mesh.agents[node.name] = InstalledAgent(cluster, node, pod["metadata"]["name"])
    except BaseException:
        mesh.stop()
        raise
    return mesh


class LocalBackend:
    """The shared scenarios' `MeshBackend` (tests/e2e/scenarios.py) on the local cluster: pods run by
    the harness kubelet, the client run in the pod's network namespace. The local cluster has no DNS
    and no kube-proxy: a client reaches a Service by its ClusterIP, which the agents resolve for
    enrolled clients."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def node_names(self) -> list[str]:
        return [node.name for node in self.cluster.nodes]

    def workload_nodes(self) -> tuple[str, str]:
        first, second = self.cluster.nodes[:2]
        return first.name, second.name

    def create_pod(
        self,
        name: str,
        namespace: str,
        *,
        node: str,
        service_account: str,
        command: Sequence[str] = SLEEP,
        labels: Mapping[str, str] | None = None,
    ) -> PodHandle:
        return self.cluster.create_pod(
            name, namespace, node, command=command, labels=labels, service_account=service_account
        )

    def run_client(self, pod: PodHandle, host: str, port: int, text: str) -> ClientResult:
        result = talk(self.cluster, pod, host, port, "--send", text, check=False)
        return ClientResult(result.returncode, result.stdout + result.stderr)

    def redirection(self, pod: PodHandle) -> str | None:
        return redirection(self.cluster, pod)

    def create_service(self, namespace: str, name: str, selector: Mapping[str, str], port: int) -> str:
        service = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"selector": dict(selector), "ports": [{"port": port, "targetPort": port}]},
        }
        [(status, reply)] = self.cluster.apply([service])
        assert status == 201, reply
        cluster_ip: str = reply["spec"]["clusterIP"]
        return cluster_ip

    def create_authorization_policy(self, namespace: str, name: str, spec: Mapping[str, Any]) -> None:
        policy = {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": dict(spec),
        }
        [(status, reply)] = self.cluster.apply([policy])
        assert status == 201, reply

    def ensure_ambient_namespace(self, namespace: str) -> None:
        self.cluster.ensure_namespace(namespace)
        label_namespace(self.cluster, namespace, AMBIENT)

    def delete_namespace(self, namespace: str) -> None:
        status, reply = self.cluster.api("DELETE", f"/api/v1/namespaces/{namespace}")
        assert status in (200, 202), reply
        assert eventually(lambda: namespace_gone(self.cluster, namespace), NAMESPACE_DELETION_TIMEOUT, 0.5), (
            f"namespace {namespace} still exists {NAMESPACE_DELETION_TIMEOUT} s after its deletion"
        )

    def agent_rollout(self) -> AgentRollout:
        status = get(self.cluster, f"/apis/apps/v1/namespaces/{RELEASE_NAMESPACE}/daemonsets/{DAEMONSET}")[
            "status"
        ]
        return AgentRollout(
            desired=status.get("desiredNumberScheduled", 0), ready=status.get("numberReady", 0)
        )

    def trust_bundle(self) -> Mapping[str, str]:
        data: dict[str, str] = (
            get(self.cluster, f"/api/v1/namespaces/{RELEASE_NAMESPACE}/configmaps/{TRUST_BUNDLE}").get("data")
            or {}
        )
        return data


def tcp_opened(metrics_text: str, **labels: str) -> float:
    """Sum of `istio_tcp_connections_opened_total` over the series carrying all of `labels`."""
    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        if family.name != "istio_tcp_connections_opened":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def redirection(cluster: Cluster, pod: PodHandle) -> str | None:
    """The pod's `ambient.istio.io/redirection` annotation (None when absent)."""
    status, body = cluster.api("GET", f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}")
    assert status == 200, body
    annotations = body["metadata"].get("annotations") or {}
    return annotations.get(REDIRECTION)


def label_namespace(cluster: Cluster, namespace: str, labels: Mapping[str, str | None]) -> None:
    """Merges `labels` into the namespace's labels (None removes one)."""
    status, reply = cluster.api("PATCH", f"/api/v1/namespaces/{namespace}", {"metadata": {"labels": labels}})
    assert status == 200, reply


def events(cluster: Cluster, namespace: str, kind: str, name: str) -> list[dict[str, Any]]:
    """The Events in `namespace` about the object `kind`/`name`."""
    selector = f"involvedObject.kind={kind},involvedObject.name={name}"
    status, body = cluster.api("GET", f"/api/v1/namespaces/{namespace}/events?fieldSelector={selector}")
    assert status == 200, body
    found: list[dict[str, Any]] = body["items"]
    return found


def talk(
    cluster: Cluster, client: PodHandle, host: str, port: int, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Runs the test client in `client`'s network namespace against host:port."""
    assert client.netns is not None
    return cluster.run_in(
        client.netns,
        ["python", "-m", "agent.testing.client", host, str(port), "--timeout", "10", *args],
        timeout=30,
        check=check,
    )


def peer_seen(result: subprocess.CompletedProcess[str]) -> str | None:
    """The client address the echo server reported, or None when the exchange failed."""
    if result.returncode != 0 or not result.stdout.startswith("peer "):
        return None
    return result.stdout.split()[1]


def agent_log_lines(agent: InstalledAgent, needle: str) -> Iterator[str]:
    """The agent's log lines containing `needle`."""
    return (line for line in agent.log_path.read_text(errors="replace").splitlines() if needle in line)
