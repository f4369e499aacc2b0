"""Names, addresses and paths of one local cluster, all derived from its prefix and state directory.

Everything a cluster creates on the machine carries the prefix (network namespaces `<prefix>-cp`,
`<prefix>-node-<i>`, `<prefix>-pod-<namespace>.<name>`, the root link `<prefix>-api`), so two
clusters with different prefixes run side by side and a stale one is found by name alone.

Addressing: the fabric (bridge, control plane, nodes) and the pod CIDRs live only inside the
cluster's own namespaces, so every cluster uses the same ranges. The only address in the root
namespace is one end of a point-to-point /30 to the control plane; it is the one range that must be
unique per cluster, so it is chosen when the cluster starts (see `fabric.choose_root_link`).
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
"""The checkout; pod processes run with it as working directory so `python -m agent...` works."""

DEFAULT_PREFIX = "aae"
PREFIX_ENV = "AMBIENT_E2E_PREFIX"
_PREFIX_PATTERN = re.compile(r"^[a-z][a-z0-9]{1,7}$")

FABRIC = ipaddress.IPv4Network("10.99.0.0/24")
"""The bridge segment shared by the control plane and the nodes (inside the cluster only)."""

CONTROL_PLANE_IP = ipaddress.IPv4Address("10.99.0.1")
"""The API server's address on the fabric: what nodes, kubelets and pods use."""

ROOT_LINK_RANGE = ipaddress.IPv4Network("10.201.0.0/16")
"""Where the root namespace's /30 to the control plane is taken from, one /30 per cluster."""

POD_GATEWAY = ipaddress.IPv4Address("169.254.1.1")
"""Every pod's default gateway: answered by proxy ARP on the node's side of the pod's veth."""

API_PORT = 6443
SERVICE_CIDR = "10.96.0.0/16"
FIRST_SERVICE_IP = "10.96.0.1"
CLUSTER_DOMAIN = "cluster.local"
SERVICE_ACCOUNT_ISSUER = f"https://kubernetes.default.svc.{CLUSTER_DOMAIN}"
K8S_VERSION = "v1.20.2"


def cache_dir() -> Path:
    """Where the control-plane build is cached (the build script honours the same variable)."""
    default = Path.home() / ".cache" / "ambient-agent"
    return Path(os.environ.get("AMBIENT_CACHE_DIR", default))


def control_plane_bin_dir() -> Path:
    """The directory holding kube-apiserver, kube-controller-manager and kube-scheduler."""
    return cache_dir() / f"kubernetes-{K8S_VERSION}" / "bin"


def prefix_from_env() -> str:
    """The cluster prefix: `AMBIENT_E2E_PREFIX` or the default."""
    return os.environ.get(PREFIX_ENV) or DEFAULT_PREFIX


@dataclass(frozen=True)
class NodeLayout:
    """One node: its Kubernetes name, network namespace, fabric address and pod CIDR."""

    index: int
    name: str
    netns: str
    ip: str
    pod_cidr: str
    fabric_port: str
    """The bridge port in the control-plane namespace that leads to this node's `eth0`."""


@dataclass(frozen=True)
class Layout:
    """The static shape of one cluster."""

    prefix: str
    state_dir: Path
    node_count: int = 2

    def __post_init__(self) -> None:
        if not _PREFIX_PATTERN.match(self.prefix):
            raise ValueError(
                f"cluster prefix {self.prefix!r}: must be 2-8 lowercase letters/digits starting with a letter"
            )
        if not 1 <= self.node_count <= 9:
            raise ValueError(f"node count must be 1-9, got {self.node_count}")

    @property
    def netns_prefix(self) -> str:
        """Every network namespace of this cluster starts with this."""
        return f"{self.prefix}-"

    @property
    def control_plane_netns(self) -> str:
        return f"{self.prefix}-cp"

    @property
    def root_link(self) -> str:
        """The root namespace's end of the link to the control plane."""
        return f"{self.prefix}-api"

    @property
    def nodes(self) -> list[NodeLayout]:
        return [
            NodeLayout(
                index=i,
                name=f"node-{i}",
                netns=f"{self.prefix}-node-{i}",
                ip=str(FABRIC.network_address + 10 + i),
                pod_cidr=f"10.244.{i}.0/24",
                fabric_port=f"port{i}",
            )
            for i in range(1, self.node_count + 1)
        ]

    def pod_netns(self, namespace: str, name: str, uid: str) -> str:
        """The network namespace of a pod (unique: `.` cannot appear in a namespace name)."""
        readable = f"{self.prefix}-pod-{namespace}.{name}"
        return readable if len(readable) <= 200 else f"{self.prefix}-pod-{uid}"

    @property
    def etcd_data_dir(self) -> Path:
        """On tmpfs: etcd's fsyncs on disk would dominate bring-up and every write."""
        return Path("/dev/shm") / f"ambient-e2e-{self.prefix}-etcd"

    @property
    def pki_dir(self) -> Path:
        return self.state_dir / "pki"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def pod_log_dir(self) -> Path:
        return self.state_dir / "pods"

    @property
    def pid_dir(self) -> Path:
        return self.state_dir / "pids"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "cluster.json"

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig for the root namespace (the test process, kubectl)."""
        return self.state_dir / "kubeconfig"

    @property
    def in_cluster_kubeconfig(self) -> Path:
        """Admin kubeconfig for processes inside node and pod namespaces (API on the fabric)."""
        return self.state_dir / "kubeconfig-in-cluster"

    def pod_log(self, namespace: str, name: str) -> Path:
        return self.pod_log_dir / f"{namespace}.{name}.log"


def venv_python() -> str:
    """The interpreter pod commands named `python`/`python3` run with: the one running the harness."""
    return sys.executable
