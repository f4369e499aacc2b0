"""A kind cluster as the scenarios see it: pods from the product image, reached through a kubeconfig.

It speaks the vocabulary of the local cluster harness (`create_pod`, `delete_pod`, `pod_log`,
`ensure_namespace`, `nodes`), so scenario code written against those names runs on both; what only a
real cluster has (exec into a container, pod annotations written by the agent) is added here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.stream import stream

AGENT_NAMESPACE = "ambient-system"


@dataclass(frozen=True)
class KindPod:
    name: str
    namespace: str
    node: str
    ip: str


@dataclass(frozen=True)
class ExecResult:
    returncode: int
    output: str
    """stdout and stderr, interleaved as written."""


class KindCluster:
    """The cluster behind `kubeconfig`, whose pods run `image`."""

    def __init__(self, kubeconfig: Path, image: str) -> None:
        self.image = image
        api_client = k8s_config.new_client_from_config(config_file=str(kubeconfig))
        self.core = k8s.CoreV1Api(api_client)
        self.apps = k8s.AppsV1Api(api_client)
        self.custom = k8s.CustomObjectsApi(api_client)

    @property
    def nodes(self) -> list[str]:
        return sorted(node.metadata.name for node in self.core.list_node().items)

    @property
    def workers(self) -> list[str]:
        return [
            node.metadata.name
            for node in self.core.list_node().items
            if "node-role.kubernetes.io/control-plane" not in (node.metadata.labels or {})
        ]

    def ensure_namespace(self, namespace: str, labels: Mapping[str, str] | None = None) -> None:
        body = k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace, labels=dict(labels or {})))
        try:
            self.core.create_namespace(body)
        except k8s.ApiException as error:
            if error.status != 409:
                raise
            self.core.patch_namespace(namespace, {"metadata": {"labels": dict(labels or {})}})

    def delete_namespace(self, namespace: str) -> None:
        self.core.delete_namespace(namespace)

    def namespaces(self) -> set[str]:
        return {namespace.metadata.name for namespace in self.core.list_namespace().items}

    def ensure_service_account(self, namespace: str, name: str) -> None:
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
        namespace: str = "default",
        *,
        node: str | None = None,
        command: Sequence[str] = ("sleep", "infinity"),
        labels: Mapping[str, str] | None = None,
        service_account: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 120.0,
    ) -> KindPod:
        """Creates a pod of the product image (on `node`, else where the scheduler puts it) and waits
        until it runs."""
        if service_account is not None:
            self.ensure_service_account(namespace, service_account)
        container = k8s.V1Container(
            name="main",
            image=self.image,
            image_pull_policy="Never",
            command=list(command),
            env=[k8s.V1EnvVar(name=k, value=v) for k, v in (env or {}).items()],
        )
        spec = k8s.V1PodSpec(
            containers=[container],
            node_name=node,
            service_account_name=service_account,
            termination_grace_period_seconds=2,
        )
        pod = k8s.V1Pod(metadata=k8s.V1ObjectMeta(name=name, labels=dict(labels or {})), spec=spec)
        self.core.create_namespaced_pod(namespace, pod)
        running = self.wait_for(
            lambda: self._running(name, namespace), timeout, f"pod {namespace}/{name} running"
        )
        return KindPod(name, namespace, running.spec.node_name, running.status.pod_ip)

    def _running(self, name: str, namespace: str) -> Any:
        pod = self.core.read_namespaced_pod(name, namespace)
        return pod if pod.status.phase == "Running" and pod.status.pod_ip else None

    def delete_pod(self, pod: KindPod) -> None:
        self.core.delete_namespaced_pod(pod.name, pod.namespace, grace_period_seconds=0)

    def pod_log(self, pod: KindPod) -> str:
        log: str = self.core.read_namespaced_pod_log(pod.name, pod.namespace)
        return log

    def annotations(self, pod: KindPod) -> dict[str, str]:
        return dict(self.core.read_namespaced_pod(pod.name, pod.namespace).metadata.annotations or {})

    def exec(self, pod: KindPod, argv: Sequence[str], timeout: float = 60.0) -> ExecResult:
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
        return ExecResult(int(response.returncode), "".join(output))

    @staticmethod
    def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = condition()
            if result:
                return result
            time.sleep(1)
        raise TimeoutError(f"waited {timeout} s for {what}")
