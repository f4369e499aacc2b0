"""The whole path on the local cluster (issue 6, "Proved by e2e tests"), on the product installed from
manifests/ as a user installs it (issue 8): the CA Deployment and the node DaemonSet rolled out by
kube-controller-manager and run by the harness kubelet, one `ambient-agent node` per node in
Kubernetes mode (tests/e2e/kube_mesh.py).

Proved here: labelling a namespace enrols its running pods (annotation, capture, tunnelled traffic with
the client's address kept) and removing the label releases them, without restarting them; a pod asking
for enrolment that cannot have it gets an Event; a Service's ClusterIP reaches an endpoint on another
node through the tunnel; AuthorizationPolicy ALLOW by principal and by namespace and DENY by port take
effect within seconds, closing an open connection the new policy denies; a policy with HTTP-only
fields gets one warning Event however many agents see it; STRICT PeerAuthentication refuses a non-mesh
client; a reused pod IP maps to its new pod's identity; a 30 s API server outage breaks neither open
nor new connections between known pods, and the agents catch up afterwards.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.cluster import Cluster, PodHandle, netns
from tests.e2e.cluster.controlplane import start_component, stop_component
from tests.e2e.kube_mesh import (
    AMBIENT,
    KubeMesh,
    agent_log_lines,
    events,
    label_namespace,
    peer_seen,
    redirection,
    start_mesh,
    talk,
    tcp_opened,
)
from tests.e2e.mesh import eventually, sockets_in

SHOP = "cp-shop"
"""Enrolled by its namespace label (most tests)."""
OTHER = "cp-other"
"""Not labelled; its pods enrol by their own label."""
PLAIN = "cp-plain"
"""Never enrolled."""
ECHO_PORT = 8080
MODE = "istio.io/dataplane-mode"
TRUST_DOMAIN = "cluster.local"
POLICIES = "/apis/security.istio.io/v1/namespaces/{namespace}/{plural}"


def principal(namespace: str, service_account: str) -> str:
    return f"{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"


class Pods:
    """The workloads: in cp-shop a server on node-2, a client, an intruder and a host-network pod on
    node-1; in cp-other an outsider (pod-labelled) on node-1; in cp-plain a non-mesh client on node-1."""

    def __init__(self, cluster: Cluster) -> None:
        node1, node2 = cluster.nodes[:2]
        echo = ["python", "-m", "agent.testing.echo", "--port", str(ECHO_PORT)]
        self.server = cluster.create_pod(
            "server", SHOP, node2, command=echo, labels={"app": "server"}, service_account="server"
        )
        self.client = cluster.create_pod(
            "client", SHOP, node1, labels={"app": "client"}, service_account="client"
        )
        self.intruder = cluster.create_pod("intruder", SHOP, node1, service_account="intruder")
        self.host_network = cluster.create_pod("hostnet", SHOP, node1, host_network=True)
        self.outsider = cluster.create_pod(
            "outsider", OTHER, node1, labels=AMBIENT, service_account="outsider"
        )
        self.plain = cluster.create_pod("plain-client", PLAIN, node1)

    def all(self) -> list[PodHandle]:
        return [self.server, self.client, self.intruder, self.host_network, self.outsider, self.plain]


@pytest.fixture(scope="module")
def mesh(cluster: Cluster) -> Iterator[KubeMesh]:
    running = start_mesh(cluster)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def pods(cluster: Cluster, mesh: KubeMesh) -> Iterator[Pods]:
    created = Pods(cluster)
    yield created
    for pod in created.all():
        cluster.delete_pod(pod, wait=False)


@pytest.fixture
def enrolled(mesh: KubeMesh, pods: Pods) -> Pods:
    """cp-shop labelled for ambient, its client and server served."""
    label_namespace(mesh.cluster, SHOP, AMBIENT)
    assert eventually(
        lambda: all(redirection(mesh.cluster, pod) == "enabled" for pod in (pods.client, pods.server)), 30
    ), "the shop's pods were not reported enrolled"
    return pods


def reaches(cluster: Cluster, client: PodHandle, host: str, port: int = ECHO_PORT) -> bool:
    """Whether `client` completes an echo exchange with host:port, the server seeing its own address."""
    return peer_seen(talk(cluster, client, host, port, "--send", "ping", check=False)) == client.ip


def mtls_opened(mesh: KubeMesh, client: PodHandle, server: PodHandle) -> float:
    """Connections from `client` the server's agent accepted over HBONE."""
    return tcp_opened(
        mesh.metrics(server.node),
        reporter="destination",
        source_workload=client.name,
        source_principal=f"spiffe://{principal(client.namespace, client.name)}",
        destination_workload=server.name,
        connection_security_policy="mutual_tls",
    )


def certificate_expiry(mesh: KubeMesh, pod: PodHandle) -> float:
    """The expiry its node's agent reports for the certificate of `pod`'s identity; 0 when none."""
    identity = f"spiffe://{principal(pod.namespace, pod.name)}"
    return sum(
        sample.value
        for family in text_string_to_metric_families(mesh.metrics(pod.node))
        if family.name == "ambient_agent_certificate_expiry_timestamp_seconds"
        for sample in family.samples
        if sample.labels.get("identity") == identity
    )


def seen_by_agents(mesh: KubeMesh, client: PodHandle) -> float:
    """Connections from `client` any agent handled, tunnelled or not."""
    return sum(tcp_opened(mesh.metrics(node), source_workload=client.name) for node in mesh.cluster.nodes)


def apply(cluster: Cluster, obj: dict[str, Any]) -> None:
    [(status, reply)] = cluster.apply([obj])
    assert status in (200, 201), reply


def delete_policy(cluster: Cluster, namespace: str, plural: str, name: str) -> None:
    status, reply = cluster.api("DELETE", f"{POLICIES.format(namespace=namespace, plural=plural)}/{name}")
    assert status in (200, 404), reply


def authorization_policy(name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def test_labelling_a_namespace_enrols_its_running_pods_and_removing_the_label_releases_them(
    mesh: KubeMesh, pods: Pods
) -> None:
    cluster = mesh.cluster
    client, server = pods.client, pods.server
    node1, node2 = client.node, server.node
    label_namespace(cluster, SHOP, {MODE: None})
    assert eventually(lambda: client.ip not in mesh.captured(node1) and server.ip not in mesh.captured(node2))
    assert reaches(cluster, client, server.ip)

    label_namespace(cluster, SHOP, AMBIENT)
    assert eventually(
        lambda: redirection(cluster, client) == "enabled" and redirection(cluster, server) == "enabled", 30
    )
    assert client.ip in mesh.captured(node1)
    assert server.ip in mesh.captured(node2)
    assert certificate_expiry(mesh, server) > time.time()
    tunnelled = mtls_opened(mesh, client, server)
    assert reaches(cluster, client, server.ip)
    assert eventually(lambda: mtls_opened(mesh, client, server) == tunnelled + 1, 5)
    # The destination's agent logs who talked to whom, by verified identity (once the connection's
    # report is due, a moment after it closed).
    client_identity, server_identity = (f"spiffe://{principal(SHOP, name)}" for name in ("client", "server"))

    def access() -> list[str]:
        return list(agent_log_lines(mesh.agent(node2), client_identity))

    assert eventually(lambda: any(server_identity in line for line in access()), 5), access()

    # A pod that asks for enrolment (by its namespace) but can never have it is told why.
    assert redirection(cluster, pods.host_network) is None
    assert eventually(
        lambda: any(
            e["reason"] == "NotEnrollable" and "uses the host network" in e["message"]
            for e in events(cluster, SHOP, "Pod", pods.host_network.name)
        )
    )

    label_namespace(cluster, SHOP, {MODE: None})
    assert eventually(lambda: redirection(cluster, client) is None and redirection(cluster, server) is None)
    assert eventually(lambda: certificate_expiry(mesh, server) == 0.0), "the identity was kept"
    assert eventually(lambda: client.ip not in mesh.captured(node1) and server.ip not in mesh.captured(node2))
    handled = seen_by_agents(mesh, client)
    assert reaches(cluster, client, server.ip)
    assert seen_by_agents(mesh, client) == handled, "a released pod's traffic still went through an agent"

    # Enrolled and released while running: the same pods, the same processes.
    for pod in (client, server):
        status, current = cluster.api("GET", f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}")
        assert status == 200
        assert current["metadata"]["uid"] == pod.uid
        assert netns.alive(pod.pid)


def test_a_service_cluster_ip_reaches_an_endpoint_on_another_node_through_the_tunnel(
    mesh: KubeMesh, enrolled: Pods
) -> None:
    cluster = mesh.cluster
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "server", "namespace": SHOP},
        "spec": {"selector": {"app": "server"}, "ports": [{"port": 80, "targetPort": ECHO_PORT}]},
    }
    [(status, reply)] = cluster.apply([service])
    assert status in (200, 201), reply
    cluster_ip = reply["spec"]["clusterIP"]
    try:

        def via_service() -> float:
            return tcp_opened(
                mesh.metrics(enrolled.client.node),
                reporter="source",
                source_workload="client",
                destination_workload="server",
                destination_service_name="server",
                connection_security_policy="mutual_tls",
            )

        before = via_service()
        # The agents learn the service from their watch: the first attempts may find no route yet.
        assert eventually(lambda: reaches(cluster, enrolled.client, cluster_ip, 80), 15, 0.5)
        assert eventually(lambda: via_service() >= before + 1, 5)
    finally:
        cluster.api("DELETE", f"/api/v1/namespaces/{SHOP}/services/server")


def test_authorization_policies_take_effect_within_seconds_and_close_denied_connections(
    mesh: KubeMesh, enrolled: Pods
) -> None:
    cluster = mesh.cluster
    client, intruder, outsider, server = (
        enrolled.client,
        enrolled.intruder,
        enrolled.outsider,
        enrolled.server,
    )
    assert eventually(lambda: redirection(cluster, intruder) == "enabled", 30)
    assert eventually(lambda: redirection(cluster, outsider) == "enabled", 30)
    assert all(reaches(cluster, pod, server.ip) for pod in (client, intruder, outsider))
    selector = {"matchLabels": {"app": "server"}}
    try:
        apply(
            cluster,
            authorization_policy(
                "allow",
                SHOP,
                {
                    "selector": selector,
                    "action": "ALLOW",
                    "rules": [{"from": [{"source": {"principals": [principal(SHOP, "client")]}}]}],
                },
            ),
        )
        assert eventually(lambda: not reaches(cluster, intruder, server.ip), 10), "ALLOW by principal"
        assert reaches(cluster, client, server.ip)
        assert not reaches(cluster, outsider, server.ip)

        apply(
            cluster,
            authorization_policy(
                "allow",
                SHOP,
                {
                    "selector": selector,
                    "action": "ALLOW",
                    "rules": [{"from": [{"source": {"namespaces": [OTHER]}}]}],
                },
            ),
        )
        assert eventually(lambda: reaches(cluster, outsider, server.ip), 10), "ALLOW by namespace"
        assert not reaches(cluster, client, server.ip)
        assert not reaches(cluster, intruder, server.ip)
        delete_policy(cluster, SHOP, "authorizationpolicies", "allow")
        assert eventually(lambda: reaches(cluster, client, server.ip), 10)

        (open_connection,) = sockets_in(client.netns or "")
        with open_connection:
            open_connection.settimeout(10)
            open_connection.connect((server.ip, ECHO_PORT))
            assert open_connection.recv(100).split()[:2] == [b"peer", client.ip.encode()]
            open_connection.sendall(b"still open\n")
            assert open_connection.recv(100) == b"still open\n"
            apply(
                cluster,
                authorization_policy(
                    "deny-echo",
                    SHOP,
                    {
                        "selector": selector,
                        "action": "DENY",
                        "rules": [{"to": [{"operation": {"ports": [str(ECHO_PORT)]}}]}],
                    },
                ),
            )
            assert closed_within(open_connection, 10), (
                "the open connection the DENY policy covers stayed open"
            )
        assert not reaches(cluster, client, server.ip)
        assert not reaches(cluster, outsider, server.ip)
    finally:
        delete_policy(cluster, SHOP, "authorizationpolicies", "allow")
        delete_policy(cluster, SHOP, "authorizationpolicies", "deny-echo")
    assert eventually(lambda: reaches(cluster, client, server.ip), 10)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the peer closes or resets `sock` within `seconds` (it keeps echoing until then)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            sock.sendall(b"x")
            if sock.recv(100) == b"":
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        time.sleep(0.2)
    return False


def test_a_policy_with_http_only_fields_gets_one_warning_event(mesh: KubeMesh, pods: Pods) -> None:
    cluster = mesh.cluster
    policy = authorization_policy(
        "get-only",
        OTHER,
        {
            "selector": {"matchLabels": {"app": "nothing-selected"}},
            "action": "ALLOW",
            "rules": [{"to": [{"operation": {"ports": ["8080"], "methods": ["GET"]}}]}],
        },
    )
    apply(cluster, policy)
    try:

        def warnings() -> list[dict[str, Any]]:
            return [
                e
                for e in events(cluster, OTHER, "AuthorizationPolicy", "get-only")
                if e["reason"] == "UnsupportedPolicyFields"
            ]

        assert eventually(lambda: len(warnings()) == 1)
        [warning] = warnings()
        assert "cannot enforce: methods" in warning["message"]
        assert warning["type"] == "Warning"
        # Both agents saw the policy; each reported it, and only one Event exists.
        assert eventually(
            lambda: all(
                any("get-only" in line for line in agent_log_lines(agent, "cannot enforce"))
                for agent in mesh.agents.values()
            )
        )
        assert len(warnings()) == 1
    finally:
        delete_policy(cluster, OTHER, "authorizationpolicies", "get-only")


def test_strict_peer_authentication_refuses_a_non_mesh_client(mesh: KubeMesh, enrolled: Pods) -> None:
    cluster = mesh.cluster
    assert reaches(cluster, enrolled.plain, enrolled.server.ip), "PERMISSIVE by default"
    apply(
        cluster,
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "PeerAuthentication",
            "metadata": {"name": "strict", "namespace": SHOP},
            "spec": {"mtls": {"mode": "STRICT"}},
        },
    )
    try:
        assert eventually(lambda: not reaches(cluster, enrolled.plain, enrolled.server.ip), 10)
        assert reaches(cluster, enrolled.client, enrolled.server.ip)
    finally:
        delete_policy(cluster, SHOP, "peerauthentications", "strict")
    assert eventually(lambda: reaches(cluster, enrolled.plain, enrolled.server.ip), 10)


def test_a_reused_pod_ip_maps_to_the_new_pods_identity(mesh: KubeMesh, enrolled: Pods) -> None:
    cluster = mesh.cluster
    node1, server = enrolled.client.node, enrolled.server
    first = cluster.create_pod("reuse-a", SHOP, node1, service_account="reuse-a")
    assert eventually(lambda: redirection(cluster, first) == "enabled", 30)
    assert reaches(cluster, first, server.ip)
    assert eventually(lambda: mtls_opened(mesh, first, server) == 1, 5)
    cluster.delete_pod(first)

    # The node hands out the lowest free address: fill lower gaps until a pod gets the freed one.
    fillers: list[PodHandle] = []
    second = None
    try:
        for attempt in range(10):
            pod = cluster.create_pod(
                f"reuse-b{attempt}", OTHER, node1, labels=AMBIENT, service_account=f"reuse-b{attempt}"
            )
            if pod.ip == first.ip:
                second = pod
                break
            fillers.append(pod)
        assert second is not None, f"no new pod got {first.ip}"
        assert eventually(lambda: redirection(cluster, second) == "enabled", 30)
        assert reaches(cluster, second, server.ip)
        assert eventually(lambda: mtls_opened(mesh, second, server) == 1, 5)
        assert mtls_opened(mesh, first, server) == 1
        identities = mesh.config_dump(node1)["identities"]
        assert f"spiffe://{principal(OTHER, second.name)}" in identities
        assert f"spiffe://{principal(SHOP, 'reuse-a')}" not in identities
    finally:
        for pod in [*fillers, *([second] if second else [])]:
            cluster.delete_pod(pod, wait=False)


def test_an_api_server_outage_breaks_neither_open_nor_new_connections(mesh: KubeMesh, enrolled: Pods) -> None:
    cluster = mesh.cluster
    client, server = enrolled.client, enrolled.server
    (open_connection,) = sockets_in(client.netns or "")
    with open_connection:
        open_connection.settimeout(10)
        open_connection.connect((server.ip, ECHO_PORT))
        assert open_connection.recv(100).split()[:2] == [b"peer", client.ip.encode()]
        tunnelled = mtls_opened(mesh, client, server)
        argv = stop_component(cluster.layout, "kube-apiserver")
        try:
            assert cluster.api("GET", "/readyz")[0] == 0, "the API server still answers"
            down_until = time.monotonic() + 30
            round_trips = 0
            while time.monotonic() < down_until:
                message = f"round trip {round_trips}\n".encode()
                open_connection.sendall(message)
                assert open_connection.recv(100) == message
                assert reaches(cluster, client, server.ip), "a new connection failed during the outage"
                assert all(agent.ready() for agent in mesh.agents.values())
                round_trips += 1
                time.sleep(3)
            assert eventually(lambda: mtls_opened(mesh, client, server) == tunnelled + round_trips, 5)
        finally:
            start_component(cluster.layout, "kube-apiserver", argv)
            assert eventually(lambda: cluster.api("GET", "/readyz")[0] == 200, 60)
        open_connection.sendall(b"after the outage\n")
        assert open_connection.recv(100) == b"after the outage\n"

    # The watchers caught up: a pod created now is enrolled and served. Each agent's watchers
    # reconnect after their own jittered backoff (up to 30 s), so the destination's agent may learn
    # the new pod, and accept its IP as the tunnel's client, a little after the source's does.
    late = cluster.create_pod("late", SHOP, client.node, service_account="late")
    try:
        assert eventually(lambda: redirection(cluster, late) == "enabled", 90)
        assert eventually(lambda: reaches(cluster, late, server.ip), 45)
    finally:
        cluster.delete_pod(late, wait=False)
