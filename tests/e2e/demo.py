"""`make demo`: the product on a local cluster, shown step by step, and left running to explore.

Starts a fresh local cluster (as `make cluster-up`; a previous one with the same prefix is removed),
installs the product from manifests/ as a user would (`kubectl apply`: the CA Deployment and the node
DaemonSet become pods that the local kubelet runs, one agent per node), then: a client and an echo
server in namespace `demo` on different nodes talk directly; the namespace is labelled for ambient and
the same connection goes through the HBONE tunnel (the server still sees the client's address, the
agents log both identities); a DENY policy refuses it. It ends with how to explore and how to tear
everything down.

    python -m tests.e2e.demo --state-dir /run/ambient-agent/cluster    (root)
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from tests.e2e.cluster import Cluster, ClusterError, Layout, PodHandle, prefix_from_env
from tests.e2e.cluster.layout import venv_python
from tests.e2e.kube_mesh import (
    AMBIENT,
    KubeMesh,
    agent_log_lines,
    label_namespace,
    peer_seen,
    redirection,
    start_mesh,
    talk,
    tcp_opened,
)
from tests.e2e.mesh import ADMIN_PORT, METRICS_PORT, eventually

NAMESPACE = "demo"
ECHO_PORT = 8080


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def show(text: str) -> None:
    print(f"   {text}", flush=True)


def exchange(cluster: Cluster, client: PodHandle, server: PodHandle) -> str | None:
    """One client -> server exchange, shown; the address the server saw (None: refused)."""
    result = talk(cluster, client, server.ip, ECHO_PORT, "--send", "hello from the demo", check=False)
    seen = peer_seen(result)
    if seen is None:
        show(f"refused: {(result.stderr or result.stdout).strip().splitlines()[-1]}")
    else:
        show(f"the server saw the connection come from {seen} (the client pod is {client.ip})")
    return seen


def run(state_dir: Path) -> int:
    layout = Layout(prefix=prefix_from_env(), state_dir=state_dir)
    step(f"Starting the local cluster {layout.prefix!r} (state in {state_dir})")
    cluster = Cluster.up(layout)
    node1, node2 = cluster.nodes[:2]
    show(f"nodes: {node1.name} ({node1.ip}), {node2.name} ({node2.ip})")

    step("Installing manifests/ (kubectl apply): the CA Deployment and the node DaemonSet roll out")
    mesh: KubeMesh = start_mesh(cluster)
    for name, agent in mesh.agents.items():
        show(f"agent on {name}: ready, log {agent.log_path}")
    show(f"CA log {mesh.ca_log_path()}")

    step(f"Namespace {NAMESPACE!r}: an echo server on {node2.name}, a client on {node1.name}")
    echo = ["python", "-m", "agent.testing.echo", "--port", str(ECHO_PORT)]
    server = cluster.create_pod(
        "server", NAMESPACE, node2, command=echo, labels={"app": "server"}, service_account="server"
    )
    client = cluster.create_pod(
        "client", NAMESPACE, node1, labels={"app": "client"}, service_account="client"
    )
    show(f"server {server.ip}, client {client.ip}")

    step("Before enrolment the client talks to the server directly")
    exchange(cluster, client, server)

    step(f"kubectl label namespace {NAMESPACE} {next(iter(AMBIENT))}={next(iter(AMBIENT.values()))}")
    label_namespace(cluster, NAMESPACE, AMBIENT)
    if not eventually(lambda: all(redirection(cluster, pod) == "enabled" for pod in (client, server)), 30):
        raise ClusterError("the demo pods were not enrolled within 30 s; see the agents' logs")
    show("the agents report both pods: ambient.istio.io/redirection=enabled (no restart)")

    step("The same connection now goes through the mutual-TLS HBONE tunnel")
    if exchange(cluster, client, server) != client.ip:
        raise ClusterError("the tunnelled connection failed; see the agents' logs")
    identity = f"src.identity=spiffe://cluster.local/ns/{NAMESPACE}/sa/client"
    eventually(lambda: any(agent_log_lines(mesh.agent(node2), identity)), 5)
    for line in list(agent_log_lines(mesh.agent(node2), identity))[-1:]:
        show(f"{node2.name}'s agent logged: {line.split(' ambient_agent.access: ')[-1]}")
    tunnelled = tcp_opened(
        mesh.metrics(node2), source_workload="client", connection_security_policy="mutual_tls"
    )
    series = (
        'istio_tcp_connections_opened_total{source_workload="client",connection_security_policy="mutual_tls"}'
    )
    show(f"{node2.name} metrics: {series} {tunnelled:g}")

    step("A DENY policy for port 8080 on the server")
    policy = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-echo", "namespace": NAMESPACE},
        "spec": {
            "selector": {"matchLabels": {"app": "server"}},
            "action": "DENY",
            "rules": [{"to": [{"operation": {"ports": [str(ECHO_PORT)]}}]}],
        },
    }
    [(status, reply)] = cluster.apply([policy])
    if status not in (200, 201):
        raise ClusterError(f"the policy was refused: {reply}")
    time.sleep(1)  # the agents see it within a fraction of a second
    exchange(cluster, client, server)
    denied = 'error="a DENY policy matched'
    eventually(lambda: any(agent_log_lines(mesh.agent(node2), denied)), 5)
    for line in list(agent_log_lines(mesh.agent(node2), denied))[-1:]:
        show(f"{node2.name}'s agent logged: {line.split(' ambient_agent.access: ')[-1]}")

    explore(cluster, mesh, client, server)
    return 0


def explore(cluster: Cluster, mesh: KubeMesh, client: PodHandle, server: PodHandle) -> None:
    node1, node2 = client.node, server.node
    python = venv_python()
    step("Explore (everything keeps running)")
    lines = [
        f"export KUBECONFIG={cluster.kubeconfig}",
        f"kubectl get pods -n {NAMESPACE} -o wide",
        "kubectl get daemonsets,deployments,pods -n ambient-system -o wide    # the installed product",
        f"kubectl get pod -n {NAMESPACE} client -o jsonpath='{{.metadata.annotations}}'",
        f"kubectl get events -n {NAMESPACE}",
        f"kubectl delete authorizationpolicy -n {NAMESPACE} deny-echo    # and talk again:",
        f"ip netns exec {client.netns} {python} -m agent.testing.client {server.ip} {ECHO_PORT} --send hi",
        f"ip netns exec {node2.netns} curl -s {node2.ip}:{METRICS_PORT}/metrics | grep istio_tcp",
        f"ip netns exec {node1.netns} curl -s 127.0.0.1:{ADMIN_PORT}/config_dump    # admin: loopback only",
        f"ip netns exec {node1.netns} curl -s 127.0.0.1:{ADMIN_PORT}/connections",
        f"less {mesh.agent(node1).log_path} {mesh.agent(node2).log_path}    # agents, with access logs",
        f"ls {cluster.layout.log_dir} {cluster.layout.pod_log_dir}    # control plane, CA, pods",
    ]
    for line in lines:
        show(line)
    step(f"Tear down: make cluster-down    (or {shlex.join(tear_down_command(cluster))})")


def tear_down_command(cluster: Cluster) -> list[str]:
    return [venv_python(), "-m", "tests.e2e.cluster", "down", "--state-dir", str(cluster.layout.state_dir)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--state-dir", type=Path, required=True, help="certificates, kubeconfig, logs")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the demo needs root (network namespaces, nftables)", file=sys.stderr)
        return 1
    try:
        return run(args.state_dir.resolve())
    except ClusterError as error:
        print(f"demo failed: {error}\n(tear down with: make cluster-down)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
