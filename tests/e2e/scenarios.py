"""The end-to-end scenarios shared by the local suite (tests/e2e/test_install.py, the namespace
cluster) and the kind suite (tests/e2e/kind/test_scenarios.py, a real cluster through its kubeconfig),
written once against `MeshBackend`, the few things a scenario asks of a cluster with the product
installed.

Workloads run `python -m agent.testing.echo` / `agent.testing.client`; the echo server first writes
`peer <ip> <port>`, the address it saw, so a scenario knows what the server saw. Enrolment is by the
namespace label; a scenario waits for the agent's `ambient.istio.io/redirection: enabled` annotation
on both ends before it connects. Each scenario that needs workloads creates the namespace it is given,
labelled for ambient, and deletes it (waiting until it is gone) at its end.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from tests.e2e.mesh import eventually

ECHO_PORT = 8080
ECHO_LABELS = {"app": "echo"}
TRUST_DOMAIN = "cluster.local"
TRUST_BUNDLE = "ambient-agent-trust-bundle"
"""The ConfigMap, in the release's namespace, where the CA publishes the trust bundle."""
ENROLMENT_TIMEOUT = 60.0
SLEEP = ("sleep", "infinity")


class Pod(Protocol):
    """What a scenario reads of a running pod."""

    @property
    def name(self) -> str: ...

    @property
    def namespace(self) -> str: ...

    @property
    def ip(self) -> str: ...


PodT = TypeVar("PodT", bound=Pod)


@dataclass(frozen=True)
class ClientResult:
    """How one run of the test client ended."""

    returncode: int
    output: str
    """stdout, then (or interleaved with) stderr."""


@dataclass(frozen=True)
class AgentRollout:
    """The node DaemonSet's status."""

    desired: int
    ready: int


class MeshBackend(Protocol[PodT]):
    """A cluster with the product installed (the node DaemonSet and the CA running), as scenarios use it."""

    def node_names(self) -> Sequence[str]:
        """Every node of the cluster."""

    def workload_nodes(self) -> tuple[str, str]:
        """Two distinct nodes, each running an agent, to place workloads on."""

    def create_pod(
        self,
        name: str,
        namespace: str,
        *,
        node: str,
        service_account: str,
        command: Sequence[str] = ...,
        labels: Mapping[str, str] | None = ...,
    ) -> PodT:
        """Creates a pod on `node` running `command` (default: sleep) and waits until it runs with an IP."""

    def run_client(self, pod: PodT, host: str, port: int, text: str) -> ClientResult:
        """Runs `python -m agent.testing.client HOST PORT --send TEXT --timeout 10` in `pod`."""

    def redirection(self, pod: PodT) -> str | None:
        """The pod's `ambient.istio.io/redirection` annotation (None when absent)."""

    def create_service(self, namespace: str, name: str, selector: Mapping[str, str], port: int) -> str:
        """Creates a Service (`port` to the same target port); the host a client in the cluster uses
        to reach it (a DNS name where the cluster has DNS, else the ClusterIP)."""

    def create_authorization_policy(self, namespace: str, name: str, spec: Mapping[str, Any]) -> None:
        """Creates a `security.istio.io/v1` AuthorizationPolicy."""

    def ensure_ambient_namespace(self, namespace: str) -> None:
        """Creates the namespace (if needed) labelled `istio.io/dataplane-mode=ambient`."""

    def delete_namespace(self, namespace: str) -> None:
        """Deletes the namespace and waits until it is gone (its pods with it)."""

    def agent_rollout(self) -> AgentRollout:
        """The node DaemonSet's desired and ready counts."""

    def trust_bundle(self) -> Mapping[str, str]:
        """The data of the trust-bundle ConfigMap (`TRUST_BUNDLE`)."""


Scenario = Callable[[MeshBackend[Any], str], None]
"""A scenario: run against a backend, with the name of a namespace it may create and must delete."""


@contextlib.contextmanager
def ambient_namespace(backend: MeshBackend[PodT], namespace: str) -> Iterator[str]:
    """The namespace, enrolled by its label, for the duration of the block; deleted after."""
    backend.ensure_ambient_namespace(namespace)
    try:
        yield namespace
    finally:
        backend.delete_namespace(namespace)


def wait_enrolled(backend: MeshBackend[PodT], *pods: PodT) -> None:
    def unenrolled() -> list[str]:
        return [f"{pod.namespace}/{pod.name}" for pod in pods if backend.redirection(pod) != "enabled"]

    assert eventually(lambda: not unenrolled(), ENROLMENT_TIMEOUT, 0.5), (
        f"not reported enrolled by their agents: {unenrolled()}"
    )


def start_echo(backend: MeshBackend[PodT], namespace: str, node: str) -> PodT:
    """The enrolled echo server, labelled `ECHO_LABELS`, with service account `echo`."""
    server = backend.create_pod(
        "echo",
        namespace,
        node=node,
        command=["python", "-m", "agent.testing.echo", "--port", str(ECHO_PORT)],
        labels=ECHO_LABELS,
        service_account="echo",
    )
    wait_enrolled(backend, server)
    return server


def exchange(
    backend: MeshBackend[PodT], client: PodT, host: str, text: str, within: float = 15.0
) -> ClientResult:
    """The first echo exchange from `client` with host:ECHO_PORT that succeeds within `within` seconds,
    else the last failed one. An agent may learn a new pod or Service from its watch a moment after
    another agent has (or after the annotation was written)."""
    deadline = time.monotonic() + within
    while True:
        result = backend.run_client(client, host, ECHO_PORT, text)
        if result.returncode == 0 or time.monotonic() >= deadline:
            return result
        time.sleep(0.5)


def the_agent_is_ready_on_every_node(backend: MeshBackend[Any], namespace: str) -> None:
    nodes = backend.node_names()
    assert len(nodes) >= 2
    rollout = backend.agent_rollout()
    assert rollout.desired == len(nodes), rollout
    assert rollout.ready == len(nodes), rollout


def the_ca_published_its_trust_bundle(backend: MeshBackend[Any], namespace: str) -> None:
    bundle = backend.trust_bundle()
    assert any("-----BEGIN CERTIFICATE-----" in value for value in bundle.values()), bundle


def _client_reaches_echo(backend: MeshBackend[PodT], namespace: str, path: str) -> None:
    """An enrolled client on the server's node, on another node, or through a Service completes an
    exchange with the enrolled echo server, which sees the client pod's own address."""
    server_node, other_node = backend.workload_nodes()
    with ambient_namespace(backend, namespace):
        echo = start_echo(backend, namespace, server_node)
        host = echo.ip
        if path == "service":
            host = backend.create_service(namespace, "echo", ECHO_LABELS, ECHO_PORT)
        client_node = server_node if path == "same-node" else other_node
        client = backend.create_pod("client", namespace, node=client_node, service_account="client")
        wait_enrolled(backend, client)
        result = exchange(backend, client, host, "through the tunnel")
        assert result.returncode == 0, result.output
        assert result.output.startswith(f"peer {client.ip} "), result.output
        assert "through the tunnel" in result.output, result.output


def a_client_on_another_node_reaches_the_server_which_sees_its_address(
    backend: MeshBackend[Any], namespace: str
) -> None:
    _client_reaches_echo(backend, namespace, "other-node")


def a_client_on_the_same_node_reaches_the_server_which_sees_its_address(
    backend: MeshBackend[Any], namespace: str
) -> None:
    _client_reaches_echo(backend, namespace, "same-node")


def a_client_reaches_the_server_through_a_service_and_the_server_sees_its_address(
    backend: MeshBackend[Any], namespace: str
) -> None:
    _client_reaches_echo(backend, namespace, "service")


def an_authorization_policy_admits_only_the_identity_it_names(
    backend: MeshBackend[Any], namespace: str
) -> None:
    server_node, client_node = backend.workload_nodes()
    with ambient_namespace(backend, namespace):
        echo = start_echo(backend, namespace, server_node)
        backend.create_authorization_policy(
            namespace,
            "echo-allows-one",
            {
                "selector": {"matchLabels": ECHO_LABELS},
                "action": "ALLOW",
                "rules": [
                    {"from": [{"source": {"principals": [f"{TRUST_DOMAIN}/ns/{namespace}/sa/allowed"]}}]}
                ],
            },
        )
        allowed = backend.create_pod("allowed", namespace, node=client_node, service_account="allowed")
        other = backend.create_pod("other", namespace, node=client_node, service_account="other")
        wait_enrolled(backend, allowed, other)

        assert eventually(
            lambda: backend.run_client(other, echo.ip, ECHO_PORT, "not allowed").returncode != 0, 60, 1.0
        ), "the policy never refused service account 'other'"
        denial = backend.run_client(other, echo.ip, ECHO_PORT, "not allowed")
        assert denial.returncode != 0, denial.output
        # Captured by the client's agent, then closed when the server's agent refused the tunnel.
        assert "cannot connect" not in denial.output, (
            f"expected an accepted, then refused connection: {denial}"
        )
        admitted = exchange(backend, allowed, echo.ip, "allowed")
        assert admitted.returncode == 0, admitted.output
        assert admitted.output.startswith(f"peer {allowed.ip} "), admitted.output


SCENARIOS: tuple[Scenario, ...] = (
    the_agent_is_ready_on_every_node,
    the_ca_published_its_trust_bundle,
    a_client_on_another_node_reaches_the_server_which_sees_its_address,
    a_client_on_the_same_node_reaches_the_server_which_sees_its_address,
    a_client_reaches_the_server_through_a_service_and_the_server_sees_its_address,
    an_authorization_policy_admits_only_the_identity_it_names,
)
"""Every scenario, in the order the suites run them (test ids: the function names)."""
