"""Starts etcd, kube-apiserver, kube-controller-manager and kube-scheduler in the control-plane namespace.

Each runs detached (its own session, output in `<state>/logs/<name>.log`) so a cluster started by
`python -m tests.e2e.cluster up` outlives that command; teardown finds them by namespace.
The flags are the ones FACTS.md records as working with this 1.20 build.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.e2e.cluster import netns
from tests.e2e.cluster.layout import (
    API_PORT,
    CONTROL_PLANE_IP,
    REPO_ROOT,
    SERVICE_ACCOUNT_ISSUER,
    SERVICE_CIDR,
    Layout,
    control_plane_bin_dir,
)
from tests.e2e.cluster.pki import ClusterPki, write_kubeconfig

_CONTROLLERS_NOT_NEEDED = (
    "nodeipam",
    "cloud-node-lifecycle",
    "attachdetach",
    "persistentvolume-binder",
    "persistentvolume-expander",
    "pv-protection",
    "pvc-protection",
    "ephemeral-volume",
    "horizontalpodautoscaling",
    "resourcequota",
    "replicationcontroller",
    "endpointslicemirroring",
    "cronjob",
    "statefulset",
    "disruption",
)
"""Storage, autoscaling and workload kinds no test uses: each controller started costs the
controller-manager a ServiceAccount token round trip (~0.25 s) before anything syncs."""

BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
ETCD = "/usr/bin/etcd"
ETCD_URL = "https://127.0.0.1:2379"
"""etcd's client URL, on loopback in the control-plane namespace (TLS, client certificates)."""


def missing_binaries() -> list[str]:
    """Control-plane executables that are not there (empty when the cluster can start)."""
    bin_dir = control_plane_bin_dir()
    missing = [str(bin_dir / b) for b in BINARIES if not (bin_dir / b).is_file()]
    if not Path(ETCD).is_file():
        missing.append(f"{ETCD} (Debian package etcd-server)")
    return missing


def spawn_detached(layout: Layout, netns_name: str | None, name: str, argv: Sequence[str]) -> int:
    """Starts a long-running process in `netns_name`, logging to `<state>/logs/<name>.log`; its pid."""
    layout.log_dir.mkdir(parents=True, exist_ok=True)
    with (layout.log_dir / f"{name}.log").open("ab") as log:
        process = subprocess.Popen(
            netns.enter(netns_name, argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=REPO_ROOT,
        )
    return process.pid


def start(layout: Layout, pki: ClusterPki) -> None:
    """Writes the component kubeconfigs and starts the four processes (they find each other by retrying)."""
    cp = layout.control_plane_netns
    bin_dir = control_plane_bin_dir()
    local_api = f"https://127.0.0.1:{API_PORT}"
    cm_kubeconfig = layout.pki_dir / "controller-manager.kubeconfig"
    scheduler_kubeconfig = layout.pki_dir / "scheduler.kubeconfig"
    write_kubeconfig(cm_kubeconfig, local_api, pki.ca_cert, pki.controller_manager)
    write_kubeconfig(scheduler_kubeconfig, local_api, pki.ca_cert, pki.scheduler)

    layout.etcd_data_dir.mkdir(parents=True, exist_ok=True)
    spawn_detached(
        layout,
        cp,
        "etcd",
        [
            ETCD,
            "--name=etcd",
            f"--data-dir={layout.etcd_data_dir}",
            f"--listen-client-urls={ETCD_URL}",
            f"--advertise-client-urls={ETCD_URL}",
            "--listen-peer-urls=https://127.0.0.1:2380",
            "--initial-advertise-peer-urls=https://127.0.0.1:2380",
            "--initial-cluster=etcd=https://127.0.0.1:2380",
            # TLS with client certificates on both ports, as kubeadm sets etcd up.
            f"--cert-file={pki.etcd.cert}",
            f"--key-file={pki.etcd.key}",
            "--client-cert-auth",
            f"--trusted-ca-file={pki.etcd_ca_cert}",
            f"--peer-cert-file={pki.etcd.cert}",
            f"--peer-key-file={pki.etcd.key}",
            "--peer-client-cert-auth",
            f"--peer-trusted-ca-file={pki.etcd_ca_cert}",
            "--log-level=warn",
            "--logger=zap",
        ],
    )
    spawn_detached(
        layout,
        cp,
        "kube-apiserver",
        [
            str(bin_dir / "kube-apiserver"),
            f"--etcd-servers={ETCD_URL}",
            f"--etcd-cafile={pki.etcd_ca_cert}",
            f"--etcd-certfile={pki.apiserver_etcd_client.cert}",
            f"--etcd-keyfile={pki.apiserver_etcd_client.key}",
            "--bind-address=0.0.0.0",
            f"--secure-port={API_PORT}",
            "--insecure-port=0",
            f"--advertise-address={CONTROL_PLANE_IP}",
            "--endpoint-reconciler-type=none",
            f"--cert-dir={layout.pki_dir}",
            f"--tls-cert-file={pki.apiserver_cert}",
            f"--tls-private-key-file={pki.apiserver_key}",
            f"--client-ca-file={pki.ca_cert}",
            "--authorization-mode=RBAC",
            "--allow-privileged=true",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--service-account-key-file={pki.service_account_public_key}",
            f"--service-account-signing-key-file={pki.service_account_key}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--api-audiences={SERVICE_ACCOUNT_ISSUER}",
            "--profiling=false",
            "--v=1",
        ],
    )
    spawn_detached(
        layout,
        cp,
        "kube-controller-manager",
        [
            str(bin_dir / "kube-controller-manager"),
            f"--kubeconfig={cm_kubeconfig}",
            # Each controller acts as its own ServiceAccount with the bootstrap RBAC roles (as kubeadm
            # runs it); the controller-manager's own user may do little more than mint their tokens.
            "--use-service-account-credentials=true",
            "--leader-elect=false",
            "--port=0",
            "--bind-address=127.0.0.1",
            f"--service-account-private-key-file={pki.service_account_key}",
            f"--root-ca-file={pki.ca_cert}",
            f"--cluster-signing-cert-file={pki.ca_cert}",
            f"--cluster-signing-key-file={pki.ca_key}",
            "--controllers=" + ",".join(["*", *(f"-{c}" for c in _CONTROLLERS_NOT_NEEDED)]),
            # Lifts the not-ready taint every new Node gets at admission within a second, not five.
            "--node-monitor-period=1s",
            "--profiling=false",
            "--v=1",
        ],
    )
    spawn_detached(
        layout,
        cp,
        "kube-scheduler",
        [
            str(bin_dir / "kube-scheduler"),
            f"--kubeconfig={scheduler_kubeconfig}",
            "--leader-elect=false",
            "--port=0",
            "--bind-address=127.0.0.1",
            "--profiling=false",
            "--v=1",
        ],
    )


def stop_component(layout: Layout, binary: str) -> list[str]:
    """Kills `binary` (one of `BINARIES`, e.g. an API server outage) in the control-plane namespace;
    its command line, for `start_component`."""
    for pid in netns.pids_in(layout.control_plane_netns):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].decode().endswith(f"/{binary}"):
            netns.signal_all({pid}, signal.SIGKILL)
            netns.wait_gone({pid}, 10.0)
            return [arg.decode() for arg in argv if arg]
    raise RuntimeError(f"{binary} is not running in {layout.control_plane_netns}")


def start_component(layout: Layout, binary: str, argv: Sequence[str]) -> int:
    """Starts `binary` again with the command line `stop_component` returned; its pid."""
    return spawn_detached(layout, layout.control_plane_netns, binary, argv)
