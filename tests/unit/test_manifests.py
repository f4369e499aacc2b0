"""The Helm chart (deploy/helm/ambient-agent) and the plain manifests (manifests/): equal, valid, and
holding the properties the product needs.

The chart is rendered by Helm's own template engine (helm-python-sdk binds the Helm SDK; no helm
binary), through scripts/render-manifests.py (tests/chart.py), the code that writes manifests/.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml

from tests.chart import renderer

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "ambient-agent"
MANIFESTS = REPO / "manifests"

Object = dict[str, Any]
Key = tuple[str, str, str]
"""(kind, namespace, name) of an object; namespace "" when cluster-scoped."""


def key(obj: Object) -> Key:
    metadata = obj["metadata"]
    return obj["kind"], metadata.get("namespace", ""), metadata["name"]


def by_key(documents: list[Object]) -> dict[Key, Object]:
    keyed: dict[Key, Object] = {}
    for obj in documents:
        assert key(obj) not in keyed, f"{key(obj)} appears twice"
        keyed[key(obj)] = obj
    return keyed


def parse(texts: list[str]) -> list[Object]:
    return [yaml.safe_load(text) for text in texts]


def default_values() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return loaded


def find(objects: list[Object], kind: str, name: str) -> Object:
    matches = [obj for obj in objects if obj["kind"] == kind and obj["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def pod_specs(objects: list[Object]) -> Iterator[tuple[str, Object]]:
    for obj in objects:
        if obj["kind"] == "Pod":
            yield obj["metadata"]["name"], obj["spec"]
        elif obj["kind"] in ("DaemonSet", "Deployment", "Job"):
            yield obj["metadata"]["name"], obj["spec"]["template"]["spec"]


# -- chart and manifests are the same install --------------------------------------------------------


def test_manifests_hold_exactly_the_charts_default_render() -> None:
    expected = {name: by_key(parse(texts)) for name, texts in renderer.manifest_files().items()}
    actual = {
        path.name: by_key([doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None])
        for path in sorted(MANIFESTS.glob("*.yaml"))
    }
    assert sorted(actual) == sorted(expected), (
        "manifests/*.yaml files and chart templates do not correspond (templates/rbac-X.yaml mirrors"
        " manifests/rbac-X.yaml; every other template goes to manifests/ambient-agent.yaml)"
    )
    for name, objects in expected.items():
        only_in_chart = sorted(set(objects) - set(actual[name]))
        only_in_manifests = sorted(set(actual[name]) - set(objects))
        assert not only_in_chart, f"in the chart but not in manifests/{name}: {only_in_chart}"
        assert not only_in_manifests, f"in manifests/{name} but not in the chart: {only_in_manifests}"
        for object_key, obj in objects.items():
            assert actual[name][object_key] == obj, (
                f"{object_key} differs between the chart and manifests/{name}"
                " (regenerate with `make manifests`, or align the chart's rbac templates)"
            )


def test_the_chart_ships_the_same_crds_as_manifests() -> None:
    chart_crds = {path.name: path.read_bytes() for path in (CHART / "crds").glob("*.yaml")}
    manifest_crds = {path.name: path.read_bytes() for path in (MANIFESTS / "crds").glob("*.yaml")}
    assert manifest_crds, "manifests/crds/ holds no CRD"
    assert chart_crds == manifest_crds, "copy manifests/crds/*.yaml to deploy/helm/ambient-agent/crds/"


def test_hooks_stay_out_of_the_plain_manifests() -> None:
    for path in MANIFESTS.glob("*.yaml"):
        for obj in yaml.safe_load_all(path.read_text()):
            assert obj is None or not renderer.is_hook(obj), f"{path.name} holds a Helm hook: {key(obj)}"


# -- the chart itself ---------------------------------------------------------------------------------


def test_helm_lint_finds_nothing_above_info() -> None:
    report = helm_python.lint(str(CHART), strict=True, namespace=renderer.NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_default_values_satisfy_the_schema() -> None:
    with helm_python.Chart.load(str(CHART)) as chart:
        chart.validate_schema()


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"node": {"maxUnavialable": 2}}, "/node"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"ca": {"replicas": 0}}, "/ca/replicas"),
        ({"ca": {"workloadCertificateLifetime": "one day"}}, "/ca/workloadCertificateLifetime"),
        (
            {"ca": {"podDisruptionBudget": {"enabled": True, "maxUnavailable": None}}},
            "/ca/podDisruptionBudget",
        ),
        ({"commands": {"node": []}}, "/commands/node"),
        ({"node": {"logLevel": "verbose"}}, "/node/logLevel"),
    ],
    ids=["typo", "pull-policy", "replicas", "lifetime", "pdb-without-bound", "empty-command", "log-level"],
)
def test_the_schema_rejects_invalid_values_naming_them(values: dict[str, Any], where: str) -> None:
    # Helm coalesces these user values with the defaults (a null removes a default) before checking.
    with (
        helm_python.Chart.load(str(CHART)) as chart,
        pytest.raises(helm_python.HelmError, match=f"'{where}'"),
    ):
        chart.validate_schema(values)


def test_every_values_knob_is_documented_in_docs_install() -> None:
    def paths(tree: dict[str, Any], prefix: str = "") -> Iterator[str]:
        for name, value in tree.items():
            path = f"{prefix}{name}"
            yield path
            # Free-form maps (resources, nodeSelector, ...) are documented as one knob.
            if isinstance(value, dict) and name not in ("resources", "nodeSelector", "affinity"):
                yield from paths(value, f"{path}.")

    docs = (REPO / "docs" / "install.md").read_text()
    undocumented = [path for path in paths(default_values()) if f"`{path}`" not in docs]
    assert undocumented == [], f"values.yaml knobs missing from docs/install.md: {undocumented}"


# -- what the rendered objects must hold -------------------------------------------------------------


def test_the_node_daemonset_is_a_host_network_agent_with_only_net_admin_and_net_raw() -> None:
    node = find(renderer.render_objects(), "DaemonSet", "ambient-agent-node")
    spec = node["spec"]["template"]["spec"]
    (agent,) = spec["containers"]
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert agent["command"] == default_values()["commands"]["node"]
    context = agent["securityContext"]
    assert context["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert context["privileged"] is False
    assert context["allowPrivilegeEscalation"] is False
    assert node["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    annotations = node["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "15020"
    assert {port["containerPort"] for port in agent["ports"]} == {15001, 15006, 15008, 15020, 15021}
    assert "resources" in agent
    assert agent["resources"]["requests"]


def test_pods_get_identity_from_the_downward_api_and_a_projected_token() -> None:
    objects = renderer.render_objects()
    for name, spec in pod_specs([obj for obj in objects if not renderer.is_hook(obj)]):
        assert spec["automountServiceAccountToken"] is False, name
        sources = [volume for volume in spec["volumes"] if volume["name"] == "kube-api-access"]
        assert sources, f"{name}: no projected service-account token"
        token = sources[0]["projected"]["sources"][0]["serviceAccountToken"]
        assert token["expirationSeconds"] <= 3607, name
        env = {item["name"]: item for item in spec["containers"][0]["env"]}
        assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName", name
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", name
        assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace", name


def test_every_container_but_the_node_agent_runs_unprivileged() -> None:
    for name, spec in pod_specs(renderer.render_objects()):
        for container in spec.get("initContainers", []) + spec["containers"]:
            if name == "ambient-agent-node":
                continue
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True, (name, container["name"])
            assert context["capabilities"] == {"drop": ["ALL"]}, (name, container["name"])
            assert context["allowPrivilegeEscalation"] is False, (name, container["name"])


def test_every_service_account_a_pod_uses_exists_and_bindings_name_real_accounts() -> None:
    objects = renderer.render_objects()
    accounts = {
        (o["metadata"]["namespace"], o["metadata"]["name"]) for o in objects if o["kind"] == "ServiceAccount"
    }
    for name, spec in pod_specs(objects):
        if "serviceAccountName" in spec:
            assert (renderer.NAMESPACE, spec["serviceAccountName"]) in accounts, name
    for binding in (o for o in objects if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        for subject in binding["subjects"]:
            assert (subject["namespace"], subject["name"]) in accounts, key(binding)
        role = find(objects, binding["roleRef"]["kind"], binding["roleRef"]["name"])
        assert role["metadata"].get("namespace") in (None, binding["metadata"].get("namespace")), key(binding)


def test_the_ca_disruption_budget_is_policy_v1_and_selects_the_ca_pods() -> None:
    objects = renderer.render_objects()
    budget = find(objects, "PodDisruptionBudget", "ambient-agent-ca")
    ca = find(objects, "Deployment", "ambient-agent-ca")
    assert budget["apiVersion"] == "policy/v1"
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"] == ca["spec"]["selector"]
    with_two = renderer.render_objects({"ca": {"replicas": 2, "podDisruptionBudget": {"minAvailable": 1}}})
    assert find(with_two, "PodDisruptionBudget", "ambient-agent-ca")["spec"] == {
        "minAvailable": 1,
        "selector": ca["spec"]["selector"],
    }
    assert not [
        o
        for o in renderer.render_objects({"ca": {"podDisruptionBudget": {"enabled": False}}})
        if o["kind"] == "PodDisruptionBudget"
    ]


def test_the_uninstall_hook_replaces_every_agent_by_cleanup_before_anything_is_deleted() -> None:
    objects = renderer.render_objects(
        {"node": {"extraEnv": [{"name": "AMBIENT_NFT_TABLE", "value": "custom"}]}}
    )
    job = find(objects, "Job", "ambient-agent-uninstall")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"
    spec = job["spec"]["template"]["spec"]
    (patch_container,) = spec["initContainers"]
    patch_flag = next(arg for arg in patch_container["args"] if arg.startswith("--patch="))
    patch = json.loads(patch_flag.removeprefix("--patch="))
    assert patch["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == "100%"
    (cleanup,) = patch["spec"]["template"]["spec"]["initContainers"]
    assert cleanup["command"] == default_values()["commands"]["cleanup"]
    assert cleanup["env"] == [{"name": "AMBIENT_NFT_TABLE", "value": "custom"}]
    assert cleanup["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]
    (agent,) = patch["spec"]["template"]["spec"]["containers"]
    assert agent == {"name": "agent", "command": ["sleep", "infinity"], "readinessProbe": None}
    assert spec["containers"][0]["args"][:3] == ["rollout", "status", "daemonset/ambient-agent-node"]
    role = find(objects, "Role", "ambient-agent-uninstall")
    assert role["rules"] == [
        {
            "apiGroups": ["apps"],
            "resources": ["daemonsets"],
            "resourceNames": ["ambient-agent-node"],
            "verbs": ["get", "list", "watch", "patch"],
        }
    ]
    without = renderer.render_objects({"uninstall": {"cleanupNodes": False}})
    assert not [o for o in without if o["metadata"]["name"] == "ambient-agent-uninstall"]


def test_helm_test_admits_only_the_enrolled_clients_identity() -> None:
    objects = renderer.render_objects({"trustDomain": "example.org"})
    policy = find(objects, "AuthorizationPolicy", "ambient-agent-test-echo")
    tunnel = find(objects, "Pod", "ambient-agent-test-tunnel")
    outsider = find(objects, "Pod", "ambient-agent-test-plaintext-denied")
    echo = find(objects, "Deployment", "ambient-agent-test-echo")
    account = tunnel["spec"]["serviceAccountName"]
    assert policy["spec"]["rules"] == [
        {"from": [{"source": {"principals": [f"example.org/ns/{renderer.NAMESPACE}/sa/{account}"]}}]}
    ]
    assert (
        policy["spec"]["selector"]["matchLabels"].items()
        <= echo["spec"]["template"]["metadata"]["labels"].items()
    )
    assert echo["spec"]["template"]["metadata"]["labels"]["istio.io/dataplane-mode"] == "ambient"
    assert tunnel["metadata"]["labels"]["istio.io/dataplane-mode"] == "ambient"
    assert outsider["metadata"]["labels"]["istio.io/dataplane-mode"] == "none"
    weights = [int(pod["metadata"]["annotations"]["helm.sh/hook-weight"]) for pod in (tunnel, outsider)]
    assert weights[0] < weights[1], "the plaintext check must run after the tunnel check succeeded"


def test_notes_tell_the_next_step_and_how_to_check() -> None:
    with helm_python.Chart.load(str(CHART)) as chart:
        rendered = chart.render(name=renderer.RELEASE, namespace=renderer.NAMESPACE, is_install=True)
    notes = rendered["ambient-agent/templates/NOTES.txt"]
    assert "kubectl label namespace <namespace> istio.io/dataplane-mode=ambient" in notes
    assert (
        "kubectl get pods -A -o custom-columns=NAME:.metadata.name,"
        r"REDIRECTION:.metadata.annotations.ambient\.istio\.io/redirection"
    ) in notes
