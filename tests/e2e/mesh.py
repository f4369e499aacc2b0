"""The data plane on the e2e cluster: static configurations per node, agents in node namespaces, and
sockets opened inside any namespace from the test process.

Agents run as the DaemonSet would: `ambient-agent node` inside the node's network namespace, with
the node's name, capturing that node's enrolled pods. Shared by tests/e2e/test_dataplane.py and
benchmarks/bench_dataplane.py.
"""

from __future__ import annotations

import ctypes
import http.client
import itertools
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.identity.certificates import TrustBundle, WorkloadCertificate
from tests.e2e.cluster import Cluster, NodeHandle, PodHandle
from tests.e2e.cluster.netns import NETNS_DIR

TRUST_DOMAIN = "cluster.local"
READINESS_PORT = 15021
METRICS_PORT = 15020
ADMIN_PORT = 15000
HBONE_PORT = 15008

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def sockets_in(
    netns: str,
    count: int = 1,
    family: socket.AddressFamily = socket.AF_INET,
    kind: socket.SocketKind = socket.SOCK_STREAM,
    proto: int = 0,
) -> list[socket.socket]:
    """`count` new sockets that live in `netns`, for use from this process.

    A socket belongs to the namespace its creating thread was in; a short-lived thread enters
    `netns` (setns affects only the calling thread), makes them, and exits.
    """
    made: list[socket.socket] = []
    failures: list[BaseException] = []

    def make() -> None:
        try:
            with open(NETNS_DIR / netns) as handle:
                if _libc.setns(handle.fileno(), _CLONE_NEWNET) != 0:
                    error = ctypes.get_errno()
                    raise OSError(error, f"setns {netns}: {os.strerror(error)}")
            made.extend(socket.socket(family, kind, proto) for _ in range(count))
        except BaseException as error:
            failures.append(error)

    worker = threading.Thread(target=make, name=f"netns-{netns}")
    worker.start()
    worker.join()
    if failures:
        raise failures[0]
    return made


def http_get(
    netns: str, host: str, port: int, path: str, *, timeout: float = 5.0, method: str = "GET"
) -> tuple[int, str]:
    """GET (or `method`) `path` from host:port as seen from inside `netns`: (status, body)."""
    (sock,) = sockets_in(netns)
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
    except OSError:
        sock.close()
        raise
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    connection.sock = sock
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


@dataclass(frozen=True)
class MeshWorkload:
    """A pod as one node's static configuration describes it."""

    pod: PodHandle
    service_account: str
    enrolled: bool

    def entry(self) -> dict[str, Any]:
        return {
            "name": self.pod.name,
            "namespace": self.pod.namespace,
            "serviceAccount": self.service_account,
            "ip": self.pod.ip,
            "node": self.pod.node.name,
            "nodeIP": self.pod.node.ip,
            "enrolled": self.enrolled,
        }


def spiffe_id(namespace: str, service_account: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"


def write_static_config(
    directory: Path,
    *,
    node: NodeHandle,
    bundle: TrustBundle,
    certificates: Iterable[WorkloadCertificate],
    workloads: Iterable[MeshWorkload],
    policies: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Writes one node's configuration file, its bundle and its certificate files into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bundle.pem").write_bytes(bundle.to_pem())
    entries = []
    for certificate in certificates:
        name = f"{certificate.spiffe_id.namespace}.{certificate.spiffe_id.service_account}"
        (directory / f"{name}.pem").write_bytes(certificate.chain_pem())
        key = directory / f"{name}-key.pem"
        key.write_bytes(certificate.key_pem())
        key.chmod(0o600)
        entries.append({"chain": f"{name}.pem", "key": f"{name}-key.pem"})
    config = {
        "trustDomain": TRUST_DOMAIN,
        "nodeName": node.name,
        "trustBundle": "bundle.pem",
        "certificates": entries,
        "workloads": [workload.entry() for workload in workloads],
        "policies": list(policies),
    }
    path = directory / "mesh.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_starts = itertools.count(1)


class AgentFailed(RuntimeError):
    """An agent exited or did not become ready; the message holds the end of its log."""


@dataclass
class Agent:
    """An `ambient-agent node` process in a node's namespace."""

    node: NodeHandle
    process: subprocess.Popen[str]
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def ready(self) -> bool:
        try:
            status, _ = http_get(self.node.netns, self.node.ip, READINESS_PORT, "/healthz/ready", timeout=1)
        except OSError:
            return False
        return status == 200

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process.poll() is not None:
                raise AgentFailed(
                    f"agent on {self.node.name} exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise AgentFailed(f"agent on {self.node.name} not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then the exit status (SIGKILL and AgentFailed after `timeout`)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AgentFailed(
                f"agent on {self.node.name} ignored SIGTERM for {timeout}s:\n{self.log_tail()}"
            ) from None


def start_agent(
    cluster: Cluster,
    node: NodeHandle,
    config: Path,
    *,
    env: Mapping[str, str] | None = None,
    python: str = "python",
) -> Agent:
    """Runs `ambient-agent node` in `node`'s namespace, on the project's interpreter or on `python`;
    its log goes to the cluster's log directory, one file per start (`agent-<node>-<n>.log`)."""
    log_path = cluster.layout.log_dir / f"agent-{node.name}-{next(_starts)}.log"
    with open(log_path, "w") as log_file:
        process = cluster.spawn_in(
            node.netns,
            [python, "-m", "agent", "node", "--config", str(config), "--node-name", node.name],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    return Agent(node, process, log_path)


def remove_capture(cluster: Cluster, node: NodeHandle) -> None:
    """`ambient-agent cleanup` in the node: the agent leaves its capture installed when it stops."""
    cluster.run_in(node.netns, ["python", "-m", "agent", "cleanup"])


def stop_agents(cluster: Cluster, agents: Iterable[Agent]) -> None:
    """Stops every agent and removes its node's capture, even when one of them fails to stop (so one
    stuck agent cannot break the tests after it); then raises the first failure."""
    failures: list[AgentFailed] = []
    for agent in agents:
        try:
            agent.stop()
        except AgentFailed as failure:
            failures.append(failure)
        finally:
            remove_capture(cluster, agent.node)
    if failures:
        raise failures[0]


def eventually(condition: Callable[[], bool], timeout: float = 15.0, interval: float = 0.2) -> bool:
    """Whether `condition` holds within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True
