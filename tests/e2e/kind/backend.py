"""A kind cluster as the shared scenarios (tests/e2e/scenarios.py) see it: the `MeshBackend` whose
pods run the product image, reached through a kubeconfig, with the client run by exec into the pod
and Services reached by their DNS names.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.stream import stream

from tests.e2e.install import DAEMONSET, RELEASE_NAMESPACE
from tests.e2e.kube_mesh import AMBIENT, REDIRECTION
from tests.e2e.mesh import eventually
from tests.e2e.scenarios import SLEEP, TRUST_BUNDLE, AgentRollout, ClientResult

CONTROL_PLANE_ROLE = "node-role.kubernetes.io/control-plane"


@dataclass(frozen=True)
class KindPod:
    name: str
    namespace: str
    node: str
    ip: str


class KindCluster:
    """The cluster behind `kubeconfig`, whose pods run `image`."""

    def __init__(self, kubeconfig: Path, image: str) -> None:
        self.image = image
        api_client = k8s_config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig)
        )
        self.core = k8s.CoreV1Api(api_client)
        self.apps = k8s.AppsV1Api(api_client)
        self.custom = k8s.CustomObjectsApi(api_client)

    def _node_labels(self) -> dict[str, dict[str, str]]:
        """Each node's labels, by node name."""
        return {
            node.metadata.name: node.metadata.labels or {}
            for node in self.core.list_node().items
            if node.metadata is not None and node.metadata.name is not None
        }

    def node_names(self) -> list[str]:
        return sorted(self._node_labels())

    def workload_nodes(self) -> tuple[str, str]:
        """The first two workers (kind-config.yaml has two; the control plane is tainted)."""
        workers = sorted(
            name for name, labels in self._node_labels().items() if CONTROL_PLANE_ROLE not in labels
        )
        if len(workers) < 2:
            raise RuntimeError(f"the scenarios need two worker nodes, the cluster has {workers}")
        return workers[0], workers[1]

    def ensure_ambient_namespace(self, namespace: str) -> None:
        body = k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace, labels=dict(AMBIENT)))
        try:
            self.core.create_namespace(body)
        except k8s.ApiException as error:
            if error.status != 409:
                raise
            self.core.patch_namespace(namespace, {"metadata": {"labels": AMBIENT}})

    def delete_namespace(self, namespace: str, timeout: float = 120.0) -> None:
        self.core.delete_namespace(namespace)

        def gone() -> bool:
            names = {item.metadata.name for item in self.core.list_namespace().items if item.metadata}
            return namespace not in names

        if not eventually(gone, timeout, 1.0):
            raise TimeoutError(f"namespace {namespace} still exists {timeout} s after its deletion")

    def _ensure_service_account(self, namespace: str, name: str) -> None:
        try:
            self.core.create_namespaced_service_account(
                namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name=name))
            )
        except k8s.ApiException as error:
            if error.status != 409:
                raise

    def create_pod(
        self,
        name: str,
        namespace: str,
        *,
        node: str,
        service_account: str,
        command: Sequence[str] = SLEEP,
        labels: Mapping[str, str] | None = None,
        timeout: float = 120.0,
    ) -> KindPod:
        """Creates a pod of the product image on `node` and waits until it runs."""
        self._ensure_service_account(namespace, service_account)
        container = k8s.V1Container(
            name="main", image=self.image, image_pull_policy="Never", command=list(command)
        )
        spec = k8s.V1PodSpec(
            containers=[container],
            node_name=node,
            service_account_name=service_account,
            termination_grace_period_seconds=2,
        )
        pod = k8s.V1Pod(metadata=k8s.V1ObjectMeta(name=name, labels=dict(labels or {})), spec=spec)
        self.core.create_namespaced_pod(namespace, pod)

        placed: list[KindPod] = []

        def running() -> bool:
            current = self.core.read_namespaced_pod(name, namespace)
            status, spec = current.status, current.spec
            if status and status.phase == "Running" and status.pod_ip and spec and spec.node_name:
                placed.append(KindPod(name, namespace, spec.node_name, status.pod_ip))
            return bool(placed)

        if not eventually(running, timeout, 1.0):
            raise TimeoutError(f"pod {namespace}/{name} is not running after {timeout} s")
        return placed[0]

    def redirection(self, pod: KindPod) -> str | None:
        metadata = self.core.read_namespaced_pod(pod.name, pod.namespace).metadata
        return ((metadata and metadata.annotations) or {}).get(REDIRECTION)

    def run_client(self, pod: KindPod, host: str, port: int, text: str) -> ClientResult:
        return self._exec(
            pod, ["python", "-m", "agent.testing.client", host, str(port), "--send", text, "--timeout", "10"]
        )

    def _exec(self, pod: KindPod, argv: Sequence[str], timeout: float = 60.0) -> ClientResult:
        """Runs `argv` in the pod's container; its exit status and output."""
        response = stream(
            self.core.connect_get_namespaced_pod_exec,
            pod.name,
            pod.namespace,
            command=list(argv),
            stdout=True,
            stderr=True,
            stdin=False,
            tty=False,
            _preload_content=False,
        )
        output: list[str] = []
        deadline = time.monotonic() + timeout
        while response.is_open() and time.monotonic() < deadline:
            response.update(timeout=1)
            output.append(response.read_stdout())
            output.append(response.read_stderr())
        response.close()
        if response.returncode is None:
            raise TimeoutError(f"{argv} in {pod.namespace}/{pod.name} did not finish in {timeout} s")
        return ClientResult(int(response.returncode), "".join(output))

    def create_service(self, namespace: str, name: str, selector: Mapping[str, str], port: int) -> str:
        service = k8s.V1Service(
            metadata=k8s.V1ObjectMeta(name=name),
            spec=k8s.V1ServiceSpec(
                selector=dict(selector), ports=[k8s.V1ServicePort(port=port, target_port=port)]
            ),
        )
        self.core.create_namespaced_service(namespace, service)
        return f"{name}.{namespace}.svc"

    def create_authorization_policy(self, namespace: str, name: str, spec: Mapping[str, Any]) -> None:
        self.custom.create_namespaced_custom_object(
            "security.istio.io",
            "v1",
            namespace,
            "authorizationpolicies",
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": name},
                "spec": dict(spec),
            },
        )

    def agent_rollout(self) -> AgentRollout:
        status = self.apps.read_namespaced_daemon_set(DAEMONSET, RELEASE_NAMESPACE).status
        if status is None:
            return AgentRollout(desired=0, ready=0)
        return AgentRollout(desired=status.desired_number_scheduled, ready=status.number_ready)

    def trust_bundle(self) -> Mapping[str, str]:
        return self.core.read_namespaced_config_map(TRUST_BUNDLE, RELEASE_NAMESPACE).data or {}
