"""The whole product on the e2e cluster: CRDs and RBAC from manifests/, `ambient-agent ca`, and one
`ambient-agent node` per node in Kubernetes mode, each run as its DaemonSet pod would (an agent Pod
object on the node, a token bound to it, the node's network namespace, the downward-API variables).

Shared by tests/e2e/test_control_plane.py and the demo (tests/e2e/demo.py, `make demo`).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.cluster import Cluster, NodeHandle, PodHandle
from tests.e2e.cluster.agents import (
    AGENT_NAMESPACE,
    MANIFESTS,
    AgentCredentials,
    CaProcess,
    agent_credentials,
    install_identity_rbac,
)
from tests.e2e.mesh import ADMIN_PORT, METRICS_PORT, Agent, http_get, remove_capture

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
REDIRECTION = "ambient.istio.io/redirection"
AGENT_ENV = {"AMBIENT_DRAIN_DEADLINE": "5"}
"""A short drain keeps stopping the agents short."""

_starts = itertools.count(1)


def install_product(cluster: Cluster) -> None:
    """The policy CRDs, the agent namespace and the agents' and CA's RBAC, from manifests/."""
    for crd in sorted((MANIFESTS / "crds").glob("*.yaml")):
        refused = [(status, reply) for status, reply in cluster.apply(crd) if status not in (200, 201)]
        if refused:
            raise RuntimeError(f"the API server refused {crd.name}: {refused}")
    install_identity_rbac(cluster)


def start_node_agent(
    cluster: Cluster, credentials: AgentCredentials, env: Mapping[str, str] | None = None
) -> Agent:
    """`ambient-agent node` in Kubernetes mode in the node's namespace, with its agent pod's token;
    its log goes to `<logs>/agent-<node>-k<n>.log`."""
    node = credentials.node
    log_path = cluster.layout.log_dir / f"agent-{node.name}-k{next(_starts)}.log"
    downward_api = {
        "NODE_NAME": node.name,
        "POD_NAME": credentials.pod.name,
        "POD_NAMESPACE": AGENT_NAMESPACE,
    }
    with open(log_path, "w") as log_file:
        process = cluster.spawn_in(
            node.netns,
            ["python", "-m", "agent", "node", "--kubeconfig", str(credentials.in_cluster_kubeconfig)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **downward_api, **AGENT_ENV, **(env or {})},
        )
    return Agent(node, process, log_path)


@dataclass
class KubeMesh:
    """The CA and a node agent on every node, all talking to the cluster's API server."""

    cluster: Cluster
    ca: CaProcess
    credentials: dict[str, AgentCredentials]
    agents: dict[str, Agent] = field(default_factory=dict)

    def agent(self, node: NodeHandle | str) -> Agent:
        return self.agents[node if isinstance(node, str) else node.name]

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
        """Stops the agents (their capture is removed) and the CA; deletes the agent pods."""
        for agent in self.agents.values():
            agent.stop()
            remove_capture(self.cluster, agent.node)
        self.agents.clear()
        self.ca.stop()
        for credentials in self.credentials.values():
            self.cluster.delete_pod(credentials.pod, wait=False)


def start_mesh(cluster: Cluster, *, env: Mapping[str, str] | None = None, timeout: float = 60.0) -> KubeMesh:
    """Installs the product and starts the CA (in the first node) and one agent per node; returns once
    every agent is ready (listeners bound, first sync done, capture installed)."""
    install_product(cluster)
    ca = CaProcess(cluster, cluster.nodes[0])
    ca.start()
    mesh = KubeMesh(cluster, ca, {node.name: agent_credentials(cluster, node) for node in cluster.nodes})
    try:
        for node in cluster.nodes:
            mesh.agents[node.name] = start_node_agent(cluster, mesh.credentials[node.name], env)
        for agent in mesh.agents.values():
            agent.wait_ready(timeout)
    except BaseException:
        mesh.stop()
        raise
    return mesh


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


def agent_log_lines(agent: Agent, needle: str) -> Iterator[str]:
    """The agent's log lines containing `needle`."""
    return (line for line in agent.log_path.read_text(errors="replace").splitlines() if needle in line)
