"""The local cluster is real: the API server validates, controllers and scheduler run, pods get
namespaces, addresses and processes, pods on different nodes reach each other, and deletion and
teardown leave nothing behind."""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path

import pytest
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from tests.e2e.cluster import Cluster, Layout, fabric, netns
from tests.e2e.cluster.controlplane import ETCD_URL
from tests.e2e.cluster.fabric import leftovers

ECHO_PORT = 8080


def echo_command(port: int = ECHO_PORT) -> list[str]:
    return ["python", "-m", "agent.testing.echo", "--port", str(port)]


def talk(cluster: Cluster, netns_name: str | None, host: str, text: str) -> list[str]:
    """Runs the test client in `netns_name` against host:ECHO_PORT; its output lines."""
    result = cluster.run_in(
        netns_name,
        ["python", "-m", "agent.testing.client", host, str(ECHO_PORT), "--send", text, "--retry-for", "10"],
    )
    return result.stdout.splitlines()


def test_nodes_are_ready_with_their_pod_cidrs(cluster: Cluster) -> None:
    nodes = {n.metadata.name: n for n in cluster.core.list_node().items}
    assert sorted(nodes) == sorted(h.name for h in cluster.nodes)
    for handle in cluster.nodes:
        node = nodes[handle.name]
        assert node.spec.pod_cidr == handle.pod_cidr
        assert {"type": "InternalIP", "address": handle.ip} in [a.to_dict() for a in node.status.addresses]
        ready = [c for c in node.status.conditions if c.type == "Ready"]
        assert [c.status for c in ready] == ["True"]
        assert not node.spec.taints


def test_api_server_rejects_invalid_objects(cluster: Cluster) -> None:
    bad_name = k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name="Not_A_Valid_Name"),
        spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="main", image="x", command=["true"])]),
    )
    with pytest.raises(ApiException) as rejected:
        cluster.core.create_namespaced_pod("default", bad_name)
    assert rejected.value.status == 422
    assert "Not_A_Valid_Name" in rejected.value.body

    bad_port = k8s.V1Service(
        metadata=k8s.V1ObjectMeta(name="bad-port"),
        spec=k8s.V1ServiceSpec(ports=[k8s.V1ServicePort(port=70000)]),
    )
    with pytest.raises(ApiException) as rejected:
        cluster.core.create_namespaced_service("default", bad_port)
    assert rejected.value.status == 422


_ETCD_HEALTH = """
import ssl, sys, urllib.request
url, ca, cert, key = sys.argv[1:]
context = ssl.create_default_context(cafile=ca)
if cert:
    context.load_cert_chain(cert, key)
try:
    print(urllib.request.urlopen(url, context=context, timeout=5).read().decode())
except OSError as error:
    print("refused:", error)
"""


def etcd_health(cluster: Cluster, client_stem: str | None) -> str:
    """GET /health on etcd from the control-plane namespace, checking etcd against its CA and
    presenting `<pki>/<client_stem>.crt` (None: no certificate); the answer, or why it was refused."""
    pki = cluster.layout.pki_dir
    cert, key = (str(pki / f"{client_stem}.{ext}") for ext in ("crt", "key")) if client_stem else ("", "")
    argv = ["python", "-c", _ETCD_HEALTH, f"{ETCD_URL}/health", str(pki / "etcd-ca.crt"), cert, key]
    return cluster.run_in(cluster.layout.control_plane_netns, argv).stdout.strip()


def test_etcd_admits_only_clients_with_a_certificate_of_its_own_ca(cluster: Cluster) -> None:
    assert '"health":"true"' in etcd_health(cluster, "apiserver-etcd-client")
    assert etcd_health(cluster, None).startswith("refused: [SSL")
    assert etcd_health(cluster, "admin").startswith("refused: [SSL")  # the cluster CA's system:masters


def test_pod_gets_an_address_from_its_node_and_runs(cluster: Cluster) -> None:
    node = cluster.nodes[0]
    pod = cluster.create_pod("echo-basic", node=node, command=echo_command())
    try:
        assert ipaddress.ip_address(pod.ip) in ipaddress.ip_network(node.pod_cidr)
        assert pod.netns is not None
        assert netns.exists(pod.netns)
        assert pod.pid in netns.pids_in(pod.netns)
        api_pod = cluster.core.read_namespaced_pod(pod.name, pod.namespace)
        assert api_pod.status.host_ip == node.ip
        assert {c.type: c.status for c in api_pod.status.conditions}["Ready"] == "True"

        # From the node's own namespace (as a kubelet probe would come): the pod sees the node's address.
        lines = talk(cluster, node.netns, pod.ip, "hello")
        assert lines[0].split()[:2] == ["peer", node.ip]
        assert lines[1:] == ["hello"]
    finally:
        cluster.delete_pod(pod)


def test_pod_on_one_node_reaches_a_pod_on_another_by_ip(cluster: Cluster) -> None:
    server = cluster.create_pod("echo-server", node=cluster.nodes[1], command=echo_command())
    client = cluster.create_pod("echo-client", node=cluster.nodes[0])
    try:
        assert server.node != client.node
        lines = talk(cluster, client.netns, server.ip, "across nodes")
        assert lines[0].split()[:2] == ["peer", client.ip]
        assert lines[1:] == ["across nodes"]
    finally:
        cluster.delete_pod(client)
        cluster.delete_pod(server)


def test_pod_reaches_the_api_server_in_cluster(cluster: Cluster) -> None:
    pod = cluster.create_pod("api-client", node=cluster.nodes[1])
    try:
        result = cluster.run_in(
            pod.netns,
            ["kubectl", "--kubeconfig", str(cluster.in_cluster_kubeconfig), "get", "--raw", "/readyz"],
        )
        assert result.stdout.strip() == "ok"
    finally:
        cluster.delete_pod(pod)


def test_deleting_a_pod_removes_its_namespace_and_process_and_frees_its_address(cluster: Cluster) -> None:
    node = cluster.nodes[1]
    pod = cluster.create_pod("short-lived", node=node, command=echo_command())
    assert pod.netns is not None
    assert netns.alive(pod.pid)

    cluster.core.delete_namespaced_pod(pod.name, pod.namespace)
    deadline = time.monotonic() + 30
    while netns.exists(pod.netns) or netns.alive(pod.pid):
        assert time.monotonic() < deadline, "the pod's namespace or process outlived its deletion"
        time.sleep(0.05)
    cluster.delete_pod(pod)  # waits for the object to go
    with pytest.raises(ApiException) as gone:
        cluster.core.read_namespaced_pod(pod.name, pod.namespace)
    assert gone.value.status == 404

    successor = cluster.create_pod("successor", node=node, command=echo_command())
    try:
        assert successor.ip == pod.ip
    finally:
        cluster.delete_pod(successor)


def test_host_network_pod_runs_in_its_node_namespace(cluster: Cluster) -> None:
    node = cluster.nodes[0]
    pod = cluster.create_pod("host-net", node=node, host_network=True, command=echo_command(18080))
    try:
        assert pod.netns is None
        assert pod.ip == node.ip
        assert pod.pid in netns.pids_in(node.netns)
    finally:
        cluster.delete_pod(pod)


def test_container_gets_downward_api_environment(cluster: Cluster) -> None:
    node = cluster.nodes[1]
    env = [
        k8s.V1EnvVar(
            name=name, value_from=k8s.V1EnvVarSource(field_ref=k8s.V1ObjectFieldSelector(field_path=path))
        )
        for name, path in [
            ("POD_NAME", "metadata.name"),
            ("POD_NAMESPACE", "metadata.namespace"),
            ("NODE_NAME", "spec.nodeName"),
            ("POD_IP", "status.podIP"),
            ("HOST_IP", "status.hostIP"),
            ("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        ]
    ]
    env.append(k8s.V1EnvVar(name="GREETING", value="hi $(POD_NAME)"))
    variables = "$POD_NAME $POD_NAMESPACE $NODE_NAME $POD_IP $HOST_IP $SERVICE_ACCOUNT $GREETING"
    script = f'echo "{variables}"; exec sleep 600'
    cluster.ensure_service_account("default", "default")
    spec = k8s.V1PodSpec(
        node_name=node.name,
        containers=[k8s.V1Container(name="main", image="x", command=["sh", "-c", script], env=env)],
    )
    cluster.core.create_namespaced_pod(
        "default", k8s.V1Pod(metadata=k8s.V1ObjectMeta(name="downward"), spec=spec)
    )
    pod = cluster.wait_pod_running("downward")
    try:
        deadline = time.monotonic() + 10
        while not cluster.pod_log(pod):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert cluster.pod_log(pod).split() == [
            "downward",
            "default",
            node.name,
            pod.ip,
            node.ip,
            "default",
            "hi",
            "downward",
        ]
    finally:
        cluster.delete_pod(pod)


def test_crashing_container_is_restarted_with_backoff(cluster: Cluster) -> None:
    pod = cluster.create_pod("crasher", node=cluster.nodes[0], command=["sh", "-c", "sleep 0.2; exit 3"])
    try:
        deadline = time.monotonic() + 30
        while True:
            status = cluster.core.read_namespaced_pod(pod.name, pod.namespace).status.container_statuses[0]
            if status.restart_count >= 2:
                break
            assert time.monotonic() < deadline, f"not restarted: {status}"
            time.sleep(0.1)
        assert status.last_state.terminated.exit_code == 3
    finally:
        cluster.delete_pod(pod)


def test_daemonset_gets_one_running_pod_per_node(cluster: Cluster) -> None:
    apps = k8s.AppsV1Api(cluster.api_client)
    labels = {"app": "per-node"}
    daemonset = k8s.V1DaemonSet(
        metadata=k8s.V1ObjectMeta(name="per-node"),
        spec=k8s.V1DaemonSetSpec(
            selector=k8s.V1LabelSelector(match_labels=labels),
            template=k8s.V1PodTemplateSpec(
                metadata=k8s.V1ObjectMeta(labels=labels),
                spec=k8s.V1PodSpec(
                    containers=[k8s.V1Container(name="main", image="x", command=echo_command())],
                    termination_grace_period_seconds=5,
                ),
            ),
        ),
    )
    apps.create_namespaced_daemon_set("default", daemonset)
    try:
        deadline = time.monotonic() + 60
        while True:
            pods = cluster.core.list_namespaced_pod("default", label_selector="app=per-node").items
            running = {p.spec.node_name: p.status.pod_ip for p in pods if p.status.phase == "Running"}
            if len(pods) == len(cluster.nodes) and len(running) == len(cluster.nodes):
                break
            assert time.monotonic() < deadline, (
                f"daemonset pods: {[(p.spec.node_name, p.status.phase) for p in pods]}"
            )
            time.sleep(0.2)
        for node in cluster.nodes:
            assert ipaddress.ip_address(running[node.name]) in ipaddress.ip_network(node.pod_cidr)
    finally:
        apps.delete_namespaced_daemon_set("per-node", "default", propagation_policy="Foreground")
        deadline = time.monotonic() + 60
        while cluster.core.list_namespaced_pod("default", label_selector="app=per-node").items:
            assert time.monotonic() < deadline, "daemonset pods were not removed"
            time.sleep(0.2)


def test_cluster_command_starts_a_usable_cluster_and_removes_everything(
    cluster: Cluster, tmp_path: Path
) -> None:
    """`make cluster-up` / `make cluster-down` (`python -m tests.e2e.cluster up|down`): a second,
    one-node cluster side by side with the session's. `up` prints a `kubectl get nodes` line that
    works as printed; `down`, given only the state directory, removes it with a pod still running.
    The session fixture's `Cluster.down` removes a cluster through the same `fabric.teardown`."""
    prefix = cluster.layout.prefix + "td"
    state_dir = tmp_path / "state"
    layout = Layout(prefix=prefix, state_dir=state_dir, node_count=1)
    command = ["python", "-m", "tests.e2e.cluster"]
    try:
        up = cluster.run_in(
            None,
            [*command, "up", "--state-dir", str(state_dir), "--prefix", prefix, "--nodes", "1"],
            timeout=180,
        )
        (usage,) = [line for line in up.stdout.splitlines() if line.endswith("kubectl get nodes")]
        assert usage == f"KUBECONFIG={layout.kubeconfig} kubectl get nodes"
        nodes = cluster.run_in(None, ["sh", "-c", usage]).stdout.splitlines()
        assert [line.split()[:2] for line in nodes[1:]] == [["node-1", "Ready"]]

        pod = Cluster.attach(state_dir).create_pod("left-running", node="node-1", command=echo_command())
        assert pod.netns is not None
        assert netns.alive(pod.pid)

        down = cluster.run_in(None, [*command, "down", "--state-dir", str(state_dir)], timeout=120)
        assert down.stdout.startswith(f"cluster {prefix!r} removed")
        assert leftovers(layout) == []
        assert not netns.alive(pod.pid)
        assert not state_dir.exists()
    finally:
        fabric.teardown(layout)
    assert netns.exists(cluster.nodes[0].netns)
    assert [n.metadata.name for n in cluster.core.list_node().items] == [n.name for n in cluster.nodes]
