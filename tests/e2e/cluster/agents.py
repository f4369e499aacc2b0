"""Real workload-identity credentials in the local cluster, as a DaemonSet and a Deployment would have them.

Each node's agent gets what a DaemonSet pod has: an agent Pod object on that node (hostNetwork,
namespace ambient-system, service account ambient-agent, a sleeping process standing in for the
agent) and a service-account token from the TokenRequest API bound to that pod, so the API server
authenticates CSRs from it with the `authentication.kubernetes.io/pod-name` extra. The CA gets its own
service account's token and runs as `python -m agent ca` in a node namespace, never as admin.
The RBAC comes from the project's own manifests under manifests/.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from tests.e2e.cluster.cluster import Cluster, NodeHandle, PodHandle
from tests.e2e.cluster.layout import API_PORT, CONTROL_PLANE_IP, REPO_ROOT

AGENT_NAMESPACE = "ambient-system"
AGENT_SERVICE_ACCOUNT = "ambient-agent"
CA_SERVICE_ACCOUNT = "ambient-agent-ca"
MANIFESTS = REPO_ROOT / "manifests"
TOKEN_SECONDS = 3600


def request_token(
    cluster: Cluster, namespace: str, service_account: str, bound_pod: PodHandle | None = None
) -> str:
    """A service-account token from the TokenRequest API, bound to `bound_pod` when given."""
    bound = (
        k8s.V1BoundObjectReference(api_version="v1", kind="Pod", name=bound_pod.name, uid=bound_pod.uid)
        if bound_pod
        else None
    )
    request = k8s.AuthenticationV1TokenRequest(
        spec=k8s.V1TokenRequestSpec(audiences=[], expiration_seconds=TOKEN_SECONDS, bound_object_ref=bound)
    )
    response = cluster.core.create_namespaced_service_account_token(service_account, namespace, request)
    return str(response.status.token)


def write_token_kubeconfig(path: Path, server: str, ca_cert: Path, token: str) -> Path:
    """A kubeconfig authenticating with a bearer token, the cluster CA embedded."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "ambient-e2e",
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca_cert.read_bytes()).decode(),
                },
            }
        ],
        "users": [{"name": "token", "user": {"token": token}}],
        "contexts": [{"name": "ambient-e2e", "context": {"cluster": "ambient-e2e", "user": "token"}}],
        "current-context": "ambient-e2e",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


def _kubeconfigs(cluster: Cluster, stem: str, token: str) -> tuple[Path, Path]:
    """(for the root namespace, for node and pod namespaces) kubeconfigs carrying `token`."""
    ca_cert = cluster.layout.pki_dir / "ca.crt"
    local = write_token_kubeconfig(
        cluster.layout.state_dir / f"{stem}.kubeconfig", cluster.api_server, ca_cert, token
    )
    inside = write_token_kubeconfig(
        cluster.layout.state_dir / f"{stem}-in-cluster.kubeconfig",
        f"https://{CONTROL_PLANE_IP}:{API_PORT}",
        ca_cert,
        token,
    )
    return local, inside


def install_identity_rbac(cluster: Cluster) -> None:
    """The agent namespace and the project's RBAC manifests for the agents and the CA."""
    cluster.ensure_namespace(AGENT_NAMESPACE)
    for manifest in ("rbac-agent.yaml", "rbac-ca.yaml"):
        refused = [
            (status, reply)
            for status, reply in cluster.apply(MANIFESTS / manifest)
            if status not in (200, 201)
        ]
        if refused:
            raise RuntimeError(f"the API server refused objects of manifests/{manifest}: {refused}")


@dataclass(frozen=True)
class AgentCredentials:
    """What one node's agent authenticates with, like its DaemonSet pod would."""

    node: NodeHandle
    pod: PodHandle
    """The agent Pod object on the node (its process only sleeps: the test drives the agent's code)."""

    kubeconfig: Path
    """Kubeconfig with a service-account token bound to `pod`, for the test process (root namespace)."""

    in_cluster_kubeconfig: Path
    """The same token, for processes in node or pod namespaces (the node agent's own process)."""


def agent_credentials(cluster: Cluster, node: NodeHandle) -> AgentCredentials:
    """Creates the agent pod on `node` (if absent) and a token bound to it."""
    name = f"ambient-agent-{node.name}"
    try:
        cluster.core.read_namespaced_pod(name, AGENT_NAMESPACE)
    except ApiException as error:
        if error.status != 404:
            raise
        cluster.create_pod(
            name,
            namespace=AGENT_NAMESPACE,
            node=node,
            command=["sleep", "infinity"],
            labels={"app.kubernetes.io/name": "ambient-agent", "app.kubernetes.io/component": "node"},
            host_network=True,
            service_account=AGENT_SERVICE_ACCOUNT,
        )
    pod = cluster.wait_pod_running(name, AGENT_NAMESPACE)
    token = request_token(cluster, AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT, bound_pod=pod)
    local, inside = _kubeconfigs(cluster, name, token)
    return AgentCredentials(node, pod, local, inside)


class CaProcess:
    """`python -m agent ca` in a node namespace with the CA service account's own token."""

    def __init__(self, cluster: Cluster, node: NodeHandle, args: Sequence[str] = ()) -> None:
        self._cluster = cluster
        self._node = node
        self._args = list(args)
        token = request_token(cluster, AGENT_NAMESPACE, CA_SERVICE_ACCOUNT)
        self.kubeconfig, self._in_cluster_kubeconfig = _kubeconfigs(cluster, "ambient-agent-ca", token)
        """The CA's own credentials, for the test process (root namespace)."""
        self.log_path = cluster.layout.log_dir / "ambient-agent-ca.log"
        self._process: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 60.0) -> None:
        """Starts the CA and waits until it has loaded its root and published the bundle."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("a") as log:
            self._process = self._cluster.spawn_in(
                self._node.netns,
                [
                    "python",
                    "-m",
                    "agent",
                    "ca",
                    "--namespace",
                    AGENT_NAMESPACE,
                    "--kubeconfig",
                    str(self._in_cluster_kubeconfig),
                    *self._args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                # Checking the bundle ConfigMap every second lets a test see a deleted one restored.
                env={**os.environ, "POD_NAME": "ambient-agent-ca-e2e", "AMBIENT_BUNDLE_CHECK_INTERVAL": "1"},
            )
        deadline = time.monotonic() + timeout
        while "CA root sha256:" not in self.log(offset):
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the CA did not start; its log:\n{self.log(offset)}")
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM, then waits for a graceful exit."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def log(self, offset: int = 0) -> str:
        """What the CA wrote so far (from byte `offset`)."""
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")
