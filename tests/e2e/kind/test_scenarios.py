"""The end-to-end scenarios on kind, against agents installed by the Helm chart.

Workloads run the product image's `python -m agent.testing.echo` / `agent.testing.client`; the echo
server first writes `peer <ip> <port>`, the address it saw, so a test knows what the server saw.
Enrolment is by the namespace label; a test waits for the agent's `ambient.istio.io/redirection:
enabled` annotation on both ends before it connects.
"""

from __future__ import annotations

import pytest

from tests.e2e.kind.backend import AGENT_NAMESPACE, ExecResult, KindCluster, KindPod

ECHO_PORT = 8080
ECHO_LABELS = {"app": "echo"}
REDIRECTION = "ambient.istio.io/redirection"
TRUST_DOMAIN = "cluster.local"


def wait_enrolled(kind: KindCluster, pod: KindPod) -> None:
    kind.wait_for(
        lambda: kind.annotations(pod).get(REDIRECTION) == "enabled", 60, f"{pod.name} enrolled by its agent"
    )


def connect(kind: KindCluster, client: KindPod, host: str, text: str) -> ExecResult:
    return kind.exec(
        client,
        ["python", "-m", "agent.testing.client", host, str(ECHO_PORT), "--send", text, "--timeout", "10"],
    )


@pytest.fixture
def echo(kind: KindCluster, mesh_namespace: str) -> KindPod:
    server = kind.create_pod(
        "echo",
        mesh_namespace,
        node=kind.workers[0],
        command=["python", "-m", "agent.testing.echo", "--port", str(ECHO_PORT)],
        labels=ECHO_LABELS,
        service_account="echo",
    )
    wait_enrolled(kind, server)
    return server


def test_the_agent_is_ready_on_every_node(kind: KindCluster) -> None:
    status = kind.apps.read_namespaced_daemon_set("ambient-agent-node", AGENT_NAMESPACE).status
    assert len(kind.nodes) == 3
    assert status.desired_number_scheduled == 3
    assert status.number_ready == 3


def test_the_ca_published_its_trust_bundle(kind: KindCluster) -> None:
    bundle = kind.core.read_namespaced_config_map("ambient-agent-trust-bundle", AGENT_NAMESPACE)
    assert any("-----BEGIN CERTIFICATE-----" in value for value in (bundle.data or {}).values())


@pytest.mark.parametrize("path", ["other-node", "same-node", "service"])
def test_an_enrolled_client_reaches_an_enrolled_server_which_sees_the_clients_address(
    kind: KindCluster, mesh_namespace: str, echo: KindPod, path: str
) -> None:
    host = echo.ip
    if path == "service":
        kind.core.create_namespaced_service(
            mesh_namespace,
            {
                "metadata": {"name": "echo"},
                "spec": {"selector": ECHO_LABELS, "ports": [{"port": ECHO_PORT, "targetPort": ECHO_PORT}]},
            },
        )
        host = f"echo.{mesh_namespace}.svc"
    node = echo.node if path == "same-node" else kind.workers[1]
    client = kind.create_pod("client", mesh_namespace, node=node, service_account="client")
    wait_enrolled(kind, client)
    result = connect(kind, client, host, "through the tunnel")
    assert result.returncode == 0, result.output
    assert result.output.startswith(f"peer {client.ip} "), result.output
    assert "through the tunnel" in result.output


def test_an_authorization_policy_admits_only_the_identity_it_names(
    kind: KindCluster, mesh_namespace: str, echo: KindPod
) -> None:
    kind.custom.create_namespaced_custom_object(
        "security.istio.io",
        "v1",
        mesh_namespace,
        "authorizationpolicies",
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "echo-allows-one"},
            "spec": {
                "selector": {"matchLabels": ECHO_LABELS},
                "action": "ALLOW",
                "rules": [
                    {"from": [{"source": {"principals": [f"{TRUST_DOMAIN}/ns/{mesh_namespace}/sa/allowed"]}}]}
                ],
            },
        },
    )
    allowed = kind.create_pod("allowed", mesh_namespace, node=kind.workers[1], service_account="allowed")
    other = kind.create_pod("other", mesh_namespace, node=kind.workers[1], service_account="other")
    for pod in (allowed, other):
        wait_enrolled(kind, pod)

    def refused() -> ExecResult | None:
        result = connect(kind, other, echo.ip, "not allowed")
        return result if result.returncode != 0 else None

    denial = kind.wait_for(refused, 60, "the policy to refuse service account 'other'")
    assert "cannot connect" not in denial.output, (
        f"expected an accepted, then refused connection: {denial.output}"
    )
    admitted = connect(kind, allowed, echo.ip, "allowed")
    assert admitted.returncode == 0, admitted.output
