"""The product installed as a user installs it (issue 8): manifests/ applied through the API server, the
CA Deployment and the node DaemonSet turned into pods by kube-controller-manager, and those pods run by
the harness kubelet with their downward-API env, their volumes (a projected service-account token bound
to the pod, the cluster CA, an emptyDir) in a private mount namespace, hostNetwork, and readiness probes
deciding Ready.

Proved here: the kubelet's pod runtime (volumes of every kind the chart uses, a token bound to the pod
with the projection's audience, mounts invisible to the host, readiness following an httpGet probe both
ways); the DaemonSet comes up with one Ready agent per node and the CA Deployment becomes available;
the scenarios shared with the kind suite (tests/e2e/scenarios.py: clients on the same node, on another
node and through a Service reach an enrolled server that sees their address; an AuthorizationPolicy
admits only the identity it names) pass; uninstalling as `helm uninstall` does runs the chart's
pre-delete hook for real (its Job's kubectl containers, run as the hook's service account, turn the
DaemonSet into pods whose init container runs `ambient-agent cleanup`, and wait for them), which alone
leaves every node without the agent's nftables table, ip rules and routes; then the release is deleted.

v1.20 serves PodDisruptionBudget only as policy/v1beta1: the budget is applied as its v1beta1
equivalent (tests/e2e/test_manifests.py `as_served_by_1_20`, which also proves the server refuses v1).
The module uninstalls at its end, namespace deletion included, so later modules start from a cluster
without agents.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chart import renderer
from tests.e2e.cluster import Cluster, NodeHandle
from tests.e2e.install import (
    INSTALL_TIMEOUT,
    NODE_COMPONENT,
    RELEASE_NAMESPACE,
    Object,
    apply,
    get,
    kubectl,
    release_pods,
    uninstall,
)
from tests.e2e.kube_mesh import KubeMesh, LocalBackend, start_mesh
from tests.e2e.mesh import READINESS_PORT, eventually, http_get
from tests.e2e.scenarios import SCENARIOS, Scenario

SCENARIO_NAMESPACE = "inst-scenarios"
RUNTIME = "inst-runtime"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
POD_MOUNTS = "/run/ambient-e2e-pod"
"""Where the test pod's other volumes go: the kubelet creates missing mount points on the host (empty),
so they stay under /run."""


def is_ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def jwt_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims


def capture_state(cluster: Cluster, node: NodeHandle) -> tuple[str, str, str]:
    """(nftables tables, ip rules, routes of table 100) in the node's namespace."""
    tables = cluster.run_in(node.netns, ["nft", "list", "tables"]).stdout
    rules = cluster.run_in(node.netns, ["ip", "rule", "show"]).stdout
    routes = cluster.run_in(node.netns, ["ip", "route", "show", "table", "100"], check=False).stdout
    return tables, rules, routes


@pytest.fixture(scope="module")
def installed(cluster: Cluster) -> Iterator[KubeMesh]:
    """manifests/ applied, the CA available and an agent Ready on every node; uninstalled after."""
    mesh = start_mesh(cluster)
    yield mesh
    mesh.stop()


# The kubelet's pod runtime


VOLUME_PROGRAM = """
import json, pathlib, sys, time
files = {path: pathlib.Path(path).read_text() for path in sys.argv[1:]}
print(json.dumps(files), flush=True)
time.sleep(3600)
"""

PROBED_PROGRAM = """
import http.server, os, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if os.path.exists(sys.argv[1]) else 503)
        self.end_headers()
http.server.HTTPServer(("", 8080), Handler).serve_forever()
"""


def test_a_pod_sees_its_volumes_and_a_token_bound_to_it_and_the_host_does_not(cluster: Cluster) -> None:
    cluster.ensure_service_account(RUNTIME, "reader")
    config = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "settings"},
        "data": {"mode": "on"},
    }
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "password"},
        "data": {"password": base64.b64encode(b"hunter2").decode()},
    }
    for path, body in (
        (f"/api/v1/namespaces/{RUNTIME}/configmaps", config),
        (f"/api/v1/namespaces/{RUNTIME}/secrets", secret),
    ):
        status, reply = cluster.api("POST", path, body)
        assert status in (201, 409), reply
    files = [
        f"{SERVICE_ACCOUNT_DIR}/token",
        f"{SERVICE_ACCOUNT_DIR}/ca.crt",
        f"{SERVICE_ACCOUNT_DIR}/namespace",
        f"{POD_MOUNTS}/settings/mode",
        f"{POD_MOUNTS}/password/password",
        f"{POD_MOUNTS}/about/pod-name",
    ]
    pod_body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "volumes"},
        "spec": {
            "nodeName": cluster.nodes[1].name,
            "serviceAccountName": "reader",
            "automountServiceAccountToken": False,
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": "none",
                    "command": ["python", "-c", VOLUME_PROGRAM, *files],
                    "volumeMounts": [
                        {"name": "api", "mountPath": SERVICE_ACCOUNT_DIR, "readOnly": True},
                        {"name": "settings", "mountPath": f"{POD_MOUNTS}/settings"},
                        {"name": "password", "mountPath": f"{POD_MOUNTS}/password"},
                        {"name": "about", "mountPath": f"{POD_MOUNTS}/about"},
                    ],
                }
            ],
            "volumes": [
                {
                    "name": "api",
                    "projected": {
                        "sources": [
                            {
                                "serviceAccountToken": {
                                    "path": "token",
                                    "audience": "e2e",
                                    "expirationSeconds": 600,
                                }
                            },
                            {
                                "configMap": {
                                    "name": "kube-root-ca.crt",
                                    "items": [{"key": "ca.crt", "path": "ca.crt"}],
                                }
                            },
                            {
                                "downwardAPI": {
                                    "items": [
                                        {"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}
                                    ]
                                }
                            },
                        ]
                    },
                },
                {"name": "settings", "configMap": {"name": "settings"}},
                {"name": "password", "secret": {"secretName": "password"}},
                {
                    "name": "about",
                    "downwardAPI": {
                        "items": [{"path": "pod-name", "fieldRef": {"fieldPath": "metadata.name"}}]
                    },
                },
            ],
        },
    }
    status, reply = cluster.api("POST", f"/api/v1/namespaces/{RUNTIME}/pods", pod_body)
    assert status == 201, reply
    pod = cluster.wait_pod_running("volumes", RUNTIME)
    try:
        assert eventually(lambda: cluster.pod_log(pod).startswith("{"), 20), cluster.pod_log(pod)
        seen = json.loads(cluster.pod_log(pod).splitlines()[0])
        claims = jwt_claims(seen[f"{SERVICE_ACCOUNT_DIR}/token"])
        assert claims["aud"] == ["e2e"]
        assert claims["sub"] == f"system:serviceaccount:{RUNTIME}:reader"
        assert claims["kubernetes.io"]["pod"] == {"name": "volumes", "uid": pod.uid}
        assert claims["exp"] - claims["iat"] == 600
        root_ca = get(cluster, f"/api/v1/namespaces/{RUNTIME}/configmaps/kube-root-ca.crt")["data"]["ca.crt"]
        assert seen[f"{SERVICE_ACCOUNT_DIR}/ca.crt"] == root_ca
        assert seen[f"{SERVICE_ACCOUNT_DIR}/namespace"] == RUNTIME
        assert seen[f"{POD_MOUNTS}/settings/mode"] == "on"
        assert seen[f"{POD_MOUNTS}/password/password"] == "hunter2"
        assert seen[f"{POD_MOUNTS}/about/pod-name"] == "volumes"
        # The mounts live in the pod's own mount namespace only.
        assert not Path(SERVICE_ACCOUNT_DIR, "token").exists()
        assert not Path(f"{POD_MOUNTS}/settings/mode").exists()
    finally:
        cluster.delete_pod(pod)


def test_a_readiness_probe_decides_ready_both_ways(cluster: Cluster, tmp_path: Path) -> None:
    healthy = tmp_path / "healthy"
    cluster.ensure_namespace(RUNTIME)
    pod_body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "probed"},
        "spec": {
            "nodeName": cluster.nodes[0].name,
            "automountServiceAccountToken": False,
            "containers": [
                {
                    "name": "main",
                    "image": "none",
                    "command": ["python", "-c", PROBED_PROGRAM, str(healthy)],
                    "ports": [{"name": "health", "containerPort": 8080}],
                    "readinessProbe": {
                        "httpGet": {"path": "/", "port": "health"},
                        "periodSeconds": 1,
                        "failureThreshold": 2,
                    },
                }
            ],
        },
    }
    status, reply = cluster.api("POST", f"/api/v1/namespaces/{RUNTIME}/pods", pod_body)
    assert status == 201, reply
    pod = cluster.wait_pod_running("probed", RUNTIME)
    path = f"/api/v1/namespaces/{RUNTIME}/pods/probed"
    try:
        # Running, serving 503: the probe runs every second, and Ready must stay false throughout.
        assert not eventually(lambda: is_ready(get(cluster, path)), 4), "Ready without a passing probe"
        healthy.touch()
        assert eventually(lambda: is_ready(get(cluster, path)), 10), "Ready did not follow a passing probe"
        healthy.unlink()
        assert eventually(lambda: not is_ready(get(cluster, path)), 10), "Ready outlived failing probes"
    finally:
        cluster.delete_pod(pod)


# The product, installed from manifests/


def test_the_daemonset_runs_one_ready_agent_on_every_node(cluster: Cluster, installed: KubeMesh) -> None:
    pods = release_pods(cluster, NODE_COMPONENT)
    assert sorted(pod["spec"]["nodeName"] for pod in pods) == sorted(node.name for node in cluster.nodes)
    for pod in pods:
        assert pod["spec"]["hostNetwork"] is True
        assert is_ready(pod), pod["status"]
        node = cluster.node(pod["spec"]["nodeName"])
        assert pod["status"]["podIP"] == node.ip
        # The probe the kubelet ran is the agent's own readiness endpoint on the node's address.
        assert http_get(node.netns, node.ip, READINESS_PORT, "/healthz/ready")[0] == 200
    # The CA ran with its token from the projected volume, so the trust bundle is published.
    bundle = get(cluster, f"/api/v1/namespaces/{RELEASE_NAMESPACE}/configmaps/ambient-agent-trust-bundle")
    assert "BEGIN CERTIFICATE" in "".join((bundle.get("data") or {}).values())


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda scenario: scenario.__name__)
def test_shared_scenario(installed: KubeMesh, scenario: Scenario) -> None:
    """The scenarios the kind suite runs too (tests/e2e/scenarios.py)."""
    scenario(LocalBackend(installed.cluster), SCENARIO_NAMESPACE)


def hook_objects(hook: str, name_prefix: str) -> list[Object]:
    """The chart's `hook` objects (`helm.sh/hook`) whose names start with `name_prefix`, in the order
    Helm creates them (by `helm.sh/hook-weight`, then as rendered)."""
    found = [
        obj
        for obj in renderer.render_objects()
        if renderer.is_hook(obj)
        and obj["metadata"]["annotations"]["helm.sh/hook"] == hook
        and obj["metadata"]["name"].startswith(name_prefix)
    ]
    return sorted(found, key=lambda obj: int(obj["metadata"]["annotations"].get("helm.sh/hook-weight", "0")))


def job_outcome(cluster: Cluster, name: str) -> str | None:
    """ "succeeded" or "failed" once the Job in the release namespace has finished, else None."""
    status = get(cluster, f"/apis/batch/v1/namespaces/{RELEASE_NAMESPACE}/jobs/{name}").get("status", {})
    for condition in status.get("conditions") or []:
        if condition["status"] == "True" and condition["type"] in ("Complete", "Failed"):
            return "succeeded" if condition["type"] == "Complete" else "failed"
    return None


def test_uninstall_runs_the_pre_delete_hook_which_leaves_every_node_clean(
    cluster: Cluster, installed: KubeMesh
) -> None:
    for node in cluster.nodes:
        tables, rules, routes = capture_state(cluster, node)
        assert "ambient_agent" in tables, tables
        assert "0x111" in rules, rules
        assert "local default" in routes, routes
    # `helm uninstall`: the pre-delete hooks by weight (the hook's service account and rights, then
    # its Job), waiting for the Job; then the hooks (hook-succeeded) and the release are deleted.
    hooks = hook_objects("pre-delete", "ambient-agent-uninstall")
    assert [obj["kind"] for obj in hooks] == ["ServiceAccount", "Role", "RoleBinding", "Job"]
    for obj in hooks:
        applied = apply(cluster, [obj])
        assert applied.returncode == 0, applied.stderr
    assert eventually(
        lambda: job_outcome(cluster, "ambient-agent-uninstall") is not None, INSTALL_TIMEOUT, 1.0
    )
    job_pods = release_pods(cluster, "job-name=ambient-agent-uninstall")
    logs = "\n".join(
        cluster.layout.pod_log(RELEASE_NAMESPACE, pod["metadata"]["name"]).read_text() for pod in job_pods
    )
    assert job_outcome(cluster, "ambient-agent-uninstall") == "succeeded", logs
    # The hook alone cleaned every node: the DaemonSet's pods ran `ambient-agent cleanup`.
    for node in cluster.nodes:
        tables, rules, routes = capture_state(cluster, node)
        assert "ambient_agent" not in tables, tables
        assert "0x111" not in rules, rules
        assert routes.strip() == "", routes
    for obj in reversed(hooks):
        kubectl(
            cluster,
            "delete",
            "--ignore-not-found",
            obj["kind"],
            obj["metadata"]["name"],
            "-n",
            RELEASE_NAMESPACE,
        )
    uninstall(cluster, installed.objects)
    for node in cluster.nodes:
        assert "ambient_agent" not in capture_state(cluster, node)[0]
