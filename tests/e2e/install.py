"""Installing and uninstalling the product on the local cluster the way a user does: `kubectl apply` of
manifests/ (the chart's default render) through the real API server, then waiting for the node
DaemonSet and the CA Deployment to roll out (kube-controller-manager makes their pods, the harness
kubelet runs them); uninstalling deletes what was applied but the CRDs, as `helm uninstall` does.

v1.20 serves PodDisruptionBudget only as `policy/v1beta1`: `as_served_by_1_20` converts that one object
(see tests/e2e/test_manifests.py, which proves the server refuses `policy/v1`).
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any

import pytest
import yaml

from tests.e2e.cluster import Cluster
from tests.e2e.cluster.layout import REPO_ROOT
from tests.e2e.mesh import eventually

MANIFESTS = REPO_ROOT / "manifests"
RELEASE_NAMESPACE = "ambient-system"
DAEMONSET = "ambient-agent-node"
CA_DEPLOYMENT = "ambient-agent-ca"
NODE_COMPONENT = "app.kubernetes.io/component=node"
CA_COMPONENT = "app.kubernetes.io/component=ca"
INSTALL_TIMEOUT = 120.0

Object = dict[str, Any]


def manifest_objects() -> list[Object]:
    """Every object of manifests/, CRDs first: the order of `kubectl apply -f crds/ -f manifests/`."""
    paths = sorted((MANIFESTS / "crds").glob("*.yaml")) + sorted(MANIFESTS.glob("*.yaml"))
    return [obj for path in paths for obj in yaml.safe_load_all(path.read_text()) if obj is not None]


def as_served_by_1_20(obj: Object) -> Object:
    if obj["apiVersion"] == "policy/v1" and obj["kind"] == "PodDisruptionBudget":
        assert obj["spec"]["selector"]["matchLabels"], "an empty selector means different things in v1beta1"
        return {**copy.deepcopy(obj), "apiVersion": "policy/v1beta1"}
    return obj


def kubectl(cluster: Cluster, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("kubectl")
    if binary is None:
        pytest.fail("kubectl is missing: `make setup` installs it (Debian package kubernetes-client)")
    return subprocess.run(
        [binary, "--kubeconfig", str(cluster.kubeconfig), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def apply(cluster: Cluster, objects: Sequence[Object], *flags: str) -> subprocess.CompletedProcess[str]:
    return kubectl(cluster, "apply", *flags, "-f", "-", stdin=yaml.safe_dump_all(objects, sort_keys=False))


def install(cluster: Cluster) -> list[Object]:
    """Applies manifests/ as `kubectl apply -f manifests/crds/ -f manifests/` would; what was applied."""
    objects = [as_served_by_1_20(obj) for obj in manifest_objects()]
    result = apply(cluster, objects)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl apply refused manifests/:\n{result.stderr}")
    return objects


def get(cluster: Cluster, path: str) -> dict[str, Any]:
    status, body = cluster.api("GET", path)
    assert status == 200, body
    found: dict[str, Any] = body
    return found


def wait_rolled_out(cluster: Cluster, timeout: float = INSTALL_TIMEOUT) -> None:
    """Waits until the DaemonSet has a Ready agent on every node and the CA Deployment is available."""

    def rolled_out() -> bool:
        daemon_set = get(cluster, f"/apis/apps/v1/namespaces/{RELEASE_NAMESPACE}/daemonsets/{DAEMONSET}")
        deployment = get(cluster, f"/apis/apps/v1/namespaces/{RELEASE_NAMESPACE}/deployments/{CA_DEPLOYMENT}")
        ds, deploy = daemon_set.get("status", {}), deployment.get("status", {})
        return bool(
            ds.get("desiredNumberScheduled") == len(cluster.nodes)
            and ds.get("numberReady") == len(cluster.nodes)
            and ds.get("updatedNumberScheduled") == len(cluster.nodes)
            and deploy.get("availableReplicas") == 1
        )

    if not eventually(rolled_out, timeout, 1.0):
        listing = kubectl(
            cluster, "get", "pods,daemonsets,deployments", "-o", "wide", "-n", RELEASE_NAMESPACE
        )
        raise RuntimeError(f"the DaemonSet or the CA Deployment did not become ready:\n{listing.stdout}")


def release_pods(cluster: Cluster, selector: str) -> list[dict[str, Any]]:
    """The release's pods matching the label `selector` (`NODE_COMPONENT`: the agents, `CA_COMPONENT`)."""
    found: list[dict[str, Any]] = get(
        cluster, f"/api/v1/namespaces/{RELEASE_NAMESPACE}/pods?labelSelector={selector}"
    )["items"]
    return found


def namespace_gone(cluster: Cluster, namespace: str) -> bool:
    """Whether the namespace no longer exists (deleted, its objects with it)."""
    status, _ = cluster.api("GET", f"/api/v1/namespaces/{namespace}")
    return status == 404


def uninstall(cluster: Cluster, objects: list[Object]) -> None:
    """Deletes what was installed but the CRDs (Helm keeps those too) and waits until the release's
    namespace is gone, so its pods have stopped. The capture stays on the nodes: removing it is
    `ambient-agent cleanup`'s job (the chart's uninstall hook)."""
    installed = [obj for obj in objects if obj["kind"] != "CustomResourceDefinition"]
    for obj in reversed(installed):
        kubectl(
            cluster,
            "delete",
            "--ignore-not-found",
            "--wait=false",
            obj["kind"],
            obj["metadata"]["name"],
            *(["-n", obj["metadata"]["namespace"]] if "namespace" in obj["metadata"] else []),
        )

    if not eventually(lambda: namespace_gone(cluster, RELEASE_NAMESPACE), INSTALL_TIMEOUT, 0.5):
        raise RuntimeError("the release namespace was not deleted")
