"""`kubectl apply --dry-run=server` of manifests/ against the local cluster's real kube-apiserver v1.20.

The API server decodes, defaults, validates and admits every object (RBAC escalation checks included)
without storing it. One version gap is handled explicitly, not hidden: v1.20 serves
PodDisruptionBudget only as `policy/v1beta1` (`policy/v1` came in 1.21), so the `policy/v1` object is
checked as its `policy/v1beta1` equivalent: the fields the chart uses (`selector` and `minAvailable`
or `maxUnavailable`) mean the same in both, and a non-empty selector avoids the one semantic difference
(an empty selector). A test shows the server really refuses `policy/v1`, so this conversion goes when
the local server is upgraded. manifests/ holds no `discovery.k8s.io` object, the other v1.20 gap.
The namespace is created for real first: a dry-run Namespace is not stored, so the objects inside it
would be refused as being in a namespace that does not exist.

The chart's hooks, which manifests/ leaves out, are checked here too: the `helm test` objects by dry
run (with the CRDs installed for real, since they include an AuthorizationPolicy), and the uninstall
hook by running its two kubectl commands for real as the hook's service account, against a copy of
the node DaemonSet in a namespace of its own whose node selector matches no node.
"""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Sequence

import pytest

from tests.chart import renderer
from tests.e2e.cluster import Cluster
from tests.e2e.install import MANIFESTS, Object, apply, as_served_by_1_20, kubectl, manifest_objects


def dry_run_apply(cluster: Cluster, objects: Sequence[Object]) -> subprocess.CompletedProcess[str]:
    return apply(cluster, objects, "--dry-run=server")


def in_namespace(obj: Object, namespace: str) -> Object:
    moved = copy.deepcopy(obj)
    moved["metadata"]["namespace"] = namespace
    for subject in moved.get("subjects", []):
        subject["namespace"] = namespace
    return moved


@pytest.fixture
def release_namespace(cluster: Cluster) -> str:
    cluster.ensure_namespace(renderer.NAMESPACE)
    return str(renderer.NAMESPACE)


def test_the_api_server_accepts_every_object_of_manifests(cluster: Cluster, release_namespace: str) -> None:
    objects = [as_served_by_1_20(obj) for obj in manifest_objects()]
    result = dry_run_apply(cluster, objects)
    assert result.returncode == 0, f"kubectl apply --dry-run=server refused manifests/:\n{result.stderr}"
    applied = result.stdout.splitlines()
    assert len(applied) == len(objects), result.stdout
    for obj in objects:
        name = obj["metadata"]["name"]
        assert any(f"/{name} " in line and line.endswith("(server dry run)") for line in applied), (
            f"{obj['kind']} {name} not in kubectl's answer:\n{result.stdout}"
        )
    kinds = {obj["kind"] for obj in objects}
    assert {
        "DaemonSet",
        "Deployment",
        "PodDisruptionBudget",
        "ClusterRole",
        "CustomResourceDefinition",
    } <= kinds


def test_this_server_refuses_policy_v1_which_is_why_the_budget_is_checked_as_v1beta1(
    cluster: Cluster, release_namespace: str
) -> None:
    budgets = [obj for obj in manifest_objects() if obj["kind"] == "PodDisruptionBudget"]
    assert [budget["apiVersion"] for budget in budgets] == ["policy/v1"]
    result = dry_run_apply(cluster, budgets)
    assert result.returncode != 0
    assert 'no matches for kind "PodDisruptionBudget" in version "policy/v1"' in result.stderr


def test_the_dry_run_really_validates(cluster: Cluster, release_namespace: str) -> None:
    daemonset = next(obj for obj in manifest_objects() if obj["kind"] == "DaemonSet")
    broken = copy.deepcopy(daemonset)
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = 70000
    result = dry_run_apply(cluster, [broken])
    assert result.returncode != 0
    assert "containerPort: Invalid value: 70000" in result.stderr


def test_the_api_server_accepts_the_helm_test_objects(cluster: Cluster, release_namespace: str) -> None:
    crds = kubectl(cluster, "apply", "-f", str(MANIFESTS / "crds"))
    assert crds.returncode == 0, crds.stderr
    established = kubectl(
        cluster, "wait", "--for=condition=Established", "--timeout=60s", "-f", str(MANIFESTS / "crds")
    )
    assert established.returncode == 0, established.stderr
    tests = [
        obj
        for obj in renderer.render_objects()
        if (obj["metadata"].get("annotations") or {}).get("helm.sh/hook") == "test"
    ]
    kinds = {obj["kind"] for obj in tests}
    assert kinds == {"ServiceAccount", "AuthorizationPolicy", "Service", "Deployment", "Pod"}
    # Helm creates the client's ServiceAccount before the pods (hook weights); a dry-run one is not
    # stored, and the ServiceAccount admission plugin refuses pods naming a missing account.
    for account in (obj for obj in tests if obj["kind"] == "ServiceAccount"):
        cluster.ensure_service_account(release_namespace, account["metadata"]["name"])
    result = dry_run_apply(cluster, tests)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == len(tests), result.stdout


def test_the_uninstall_hook_turns_the_daemonset_into_cleanup_with_only_its_own_rights(
    cluster: Cluster,
) -> None:
    namespace = "ambient-e2e-uninstall"
    cluster.ensure_namespace(namespace)
    try:
        objects = renderer.render_objects()
        daemonset = in_namespace(next(obj for obj in objects if obj["kind"] == "DaemonSet"), namespace)
        # No node matches, so the controller starts no agent: only the objects are exercised.
        daemonset["spec"]["template"]["spec"]["nodeSelector"] = {"ambient-agent.dev/e2e": "no-such-node"}
        hook = [
            in_namespace(obj, namespace)
            for obj in objects
            if renderer.is_hook(obj) and obj["metadata"]["name"] == "ambient-agent-uninstall"
        ]
        job = next(obj for obj in hook if obj["kind"] == "Job")
        created = apply(cluster, [daemonset, *(obj for obj in hook if obj["kind"] != "Job")])
        assert created.returncode == 0, created.stderr
        job_dry_run = dry_run_apply(cluster, [job])
        assert job_dry_run.returncode == 0, job_dry_run.stderr

        as_hook = f"--as=system:serviceaccount:{namespace}:ambient-agent-uninstall"
        spec = job["spec"]["template"]["spec"]
        for container in (*spec["initContainers"], *spec["containers"]):
            args = [
                arg.replace(f"--namespace={renderer.NAMESPACE}", f"--namespace={namespace}")
                for arg in container["args"]
            ]
            result = kubectl(cluster, as_hook, *args)
            assert result.returncode == 0, f"{container['name']}: kubectl {args[:2]} failed: {result.stderr}"
        refused = kubectl(
            cluster, as_hook, "delete", "daemonset/ambient-agent-node", f"--namespace={namespace}"
        )
        assert refused.returncode != 0
        assert "forbidden" in refused.stderr

        read = kubectl(
            cluster, "get", "daemonset/ambient-agent-node", f"--namespace={namespace}", "-o", "json"
        )
        patched = json.loads(read.stdout)
        template = patched["spec"]["template"]["spec"]
        assert patched["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == "100%"
        assert [c["command"] for c in template["initContainers"]] == [["ambient-agent", "cleanup"]]
        (agent,) = template["containers"]
        assert agent["command"] == ["sleep", "infinity"]
        assert "readinessProbe" not in agent
        assert agent["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]
        assert template["hostNetwork"] is True
    finally:
        kubectl(cluster, "delete", "namespace", namespace, "--wait=false")
