"""The running local cluster as tests see it: bring-up, teardown, pods, and commands in namespaces.

`Cluster.up` removes stale leftovers of the same prefix, builds the network, issues certificates,
starts the control plane and one kubelet per node, and returns once the API server is ready, every
Node is Ready and the token controller has given the `default` namespace its ServiceAccount token.
`Cluster.down` kills every process in the cluster's namespaces and removes everything it created.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from tests.e2e.cluster import controlplane, fabric, netns
from tests.e2e.cluster.kubeapi import JsonObject
from tests.e2e.cluster.layout import API_PORT, CONTROL_PLANE_IP, REPO_ROOT, Layout, venv_python
from tests.e2e.cluster.pki import issue_cluster_pki, write_kubeconfig


class ClusterError(RuntimeError):
    """The cluster did not reach the state asked for; the message carries the evidence (logs, status)."""


class CommandFailed(subprocess.CalledProcessError):
    """A command run in a namespace exited non-zero; unlike its base class, str() shows the output."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


@dataclass(frozen=True)
class NodeHandle:
    name: str
    netns: str
    ip: str
    pod_cidr: str


@dataclass(frozen=True)
class PodHandle:
    name: str
    namespace: str
    node: NodeHandle
    ip: str
    netns: str | None
    """None for hostNetwork pods (they run in `node.netns`)."""
    uid: str
    pid: int
    """The process the kubelet started for the pod's container (at the time the handle was made)."""


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"({path} does not exist)"


def _python_first(argv: Sequence[str]) -> list[str]:
    """`python`/`python3` as first word means the project's interpreter, as in pods."""
    argv = list(argv)
    if argv and argv[0] in ("python", "python3"):
        argv[0] = venv_python()
    return argv


class Cluster:
    """A running cluster; made by `Cluster.up` or, for one already running, `Cluster.attach`."""

    def __init__(self, layout: Layout, api_server: str) -> None:
        self.layout = layout
        self.api_server = api_server
        self.kubeconfig = layout.kubeconfig
        self.in_cluster_kubeconfig = layout.in_cluster_kubeconfig
        self.nodes = [NodeHandle(n.name, n.netns, n.ip, n.pod_cidr) for n in layout.nodes]
        self._spawned: list[subprocess.Popen[str]] = []
        pki = layout.pki_dir
        self._tls = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        self._tls.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))

    @functools.cached_property
    def api_client(self) -> k8s.ApiClient:
        """Admin client of the kubernetes package (made on first use: its classes take seconds to import)."""
        api_client: k8s.ApiClient = k8s_config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(self.kubeconfig)
        )
        return api_client

    @functools.cached_property
    def core(self) -> k8s.CoreV1Api:
        return k8s.CoreV1Api(self.api_client)

    def api(self, method: str, path: str, body: JsonObject | None = None) -> tuple[int, Any]:
        """One admin API call with the standard library: (status, decoded body); status 0 if unreachable.

        PATCH bodies are JSON merge patches.

        The harness's own calls use this rather than `core`: plain JSON, no model classes to import.
        """
        host = self.api_server.removeprefix("https://").rsplit(":", 1)[0]
        connection = http.client.HTTPSConnection(host, API_PORT, context=self._tls, timeout=10)
        content_type = "application/merge-patch+json" if method == "PATCH" else "application/json"
        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            connection.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
            response = connection.getresponse()
            raw = response.read()
        except OSError:
            return 0, None
        finally:
            connection.close()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw.decode(errors="replace")

    def _create(self, path: str, body: JsonObject) -> None:
        """POSTs `body`; an object that already exists is fine."""
        status, reply = self.api("POST", path, body)
        if status not in (200, 201, 409):
            raise ClusterError(f"POST {path}: {status} {reply}")

    # -- lifecycle -------------------------------------------------------------------------------

    @classmethod
    def up(cls, layout: Layout, timeout: float = 120.0) -> Cluster:
        """Starts a fresh cluster (after removing leftovers of the same prefix) and waits until usable."""
        missing = controlplane.missing_binaries()
        if missing:
            raise ClusterError(
                "control-plane binaries missing: "
                + ", ".join(missing)
                + " (run scripts/build-control-plane.sh)"
            )
        fabric.teardown(layout)
        shutil.rmtree(layout.state_dir, ignore_errors=True)
        for directory in (layout.state_dir, layout.log_dir, layout.pod_log_dir):
            directory.mkdir(parents=True, exist_ok=True)

        root_link = fabric.choose_root_link(layout.prefix)
        _, cp_link_ip = fabric.root_link_addresses(root_link)
        api_server = f"https://{cp_link_ip}:{API_PORT}"
        pki = issue_cluster_pki(layout.pki_dir, [str(CONTROL_PLANE_IP), cp_link_ip])
        write_kubeconfig(layout.kubeconfig, api_server, pki.ca_cert, pki.admin)
        write_kubeconfig(
            layout.in_cluster_kubeconfig, f"https://{CONTROL_PLANE_IP}:{API_PORT}", pki.ca_cert, pki.admin
        )
        layout.state_file.write_text(
            json.dumps(
                {
                    "prefix": layout.prefix,
                    "node_count": layout.node_count,
                    "root_link": str(root_link),
                    "api_server": api_server,
                },
                indent=2,
            )
        )
        try:
            fabric.build(layout, root_link)
            controlplane.start(layout, pki)
            for node in layout.nodes:
                controlplane.spawn_detached(
                    layout,
                    node.netns,
                    f"kubelet-{node.name}",
                    [
                        venv_python(),
                        "-m",
                        "tests.e2e.cluster.kubelet",
                        "--state-dir",
                        str(layout.state_dir),
                        "--node",
                        node.name,
                    ],
                )
            cluster = cls(layout, api_server)
            cluster._wait_usable(timeout)
        except BaseException:
            fabric.teardown(layout)
            raise
        return cluster

    @classmethod
    def attach(cls, state_dir: Path) -> Cluster:
        """The cluster whose state is in `state_dir` (started earlier, e.g. by `make cluster-up`)."""
        state = json.loads((state_dir / "cluster.json").read_text())
        layout = Layout(prefix=state["prefix"], state_dir=state_dir, node_count=state["node_count"])
        return cls(layout, state["api_server"])

    def down(self, keep_logs: bool = False) -> None:
        """Kills every process of the cluster and removes its namespaces, links, data (and state dir)."""
        for process in self._spawned:
            _kill_group(process)
        self._spawned.clear()
        if "api_client" in self.__dict__:
            self.api_client.close()  # type: ignore[no-untyped-call]
        fabric.teardown(self.layout)
        if keep_logs:
            for item in self.layout.state_dir.iterdir():
                if item in (self.layout.log_dir, self.layout.pod_log_dir):
                    continue
                if item.is_dir():
                    shutil.rmtree(item)
                else:
                    item.unlink()
        else:
            shutil.rmtree(self.layout.state_dir, ignore_errors=True)

    def _wait_usable(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self._wait(lambda: self.api("GET", "/readyz")[0] == 200, deadline, "the API server", "kube-apiserver")

        def nodes_ready() -> bool:
            status, nodes = self.api("GET", "/api/v1/nodes")
            ready = {
                n["metadata"]["name"]
                for n in (nodes["items"] if status == 200 else [])
                if not n["spec"].get("taints")
                and any(
                    c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", [])
                )
            }
            return ready >= {n.name for n in self.nodes}

        self._wait(nodes_ready, deadline, "every node to be Ready and untainted", "kubelet-node-1")
        self._wait(
            lambda: self._service_account_has_token("default", "default"),
            deadline,
            "the token controller to create the default ServiceAccount token",
            "kube-controller-manager",
        )

    def _wait(self, condition: Callable[[], bool], deadline: float, what: str, log_name: str) -> None:
        missing_since: dict[str, float] = {}
        while not condition():
            now = time.monotonic()
            missing = self._dead_components()
            missing_since = {name: missing_since.get(name, now) for name in missing}
            # A process just started runs `nsenter` in the host namespace for a moment before it
            # enters its own: missing once is not dead.
            dead = [name for name in missing if now - missing_since[name] >= _DEATH_CONFIRMATION_S]
            if dead:
                raise ClusterError(
                    f"{', '.join(dead)} exited while waiting for {what}; last log lines of {dead[0]}:\n"
                    + _tail(self.layout.log_dir / f"{dead[0]}.log")
                )
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"timed out waiting for {what}; last lines of {log_name}.log:\n"
                    + _tail(self.layout.log_dir / f"{log_name}.log")
                )
            time.sleep(0.1)

    def _dead_components(self) -> list[str]:
        """Components whose namespace no longer runs them (by executable name)."""
        expected = {self.layout.control_plane_netns: ["etcd", *controlplane.BINARIES]}
        for node in self.layout.nodes:
            expected[node.netns] = [f"kubelet-{node.name}"]
        dead = []
        for ns, names in expected.items():
            cmdlines = [_cmdline(pid) for pid in netns.pids_in(ns)]
            for name in names:
                needle = (
                    "--node " + name.removeprefix("kubelet-") if name.startswith("kubelet-") else "/" + name
                )
                if not any(needle in c for c in cmdlines):
                    dead.append(name)
        return dead

    # -- objects -----------------------------------------------------------------------------------

    def collection_path(self, api_version: str, kind: str, namespace: str | None = None) -> str:
        """The REST collection path of `kind`, found through API discovery (plural, scope)."""
        base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        status, listing = self.api("GET", base)
        if status != 200:
            raise ClusterError(f"GET {base}: {status} {listing}")
        for resource in listing["resources"]:
            if resource["kind"] == kind and "/" not in resource["name"]:
                if resource["namespaced"]:
                    return f"{base}/namespaces/{namespace or 'default'}/{resource['name']}"
                return f"{base}/{resource['name']}"
        raise ClusterError(f"the API server does not serve {kind} in {api_version}")

    def apply(
        self, documents: Path | Sequence[JsonObject], *, dry_run: bool = False
    ) -> list[tuple[int, Any]]:
        """Creates every object of a YAML file (or list of objects); existing objects are replaced.

        Returns (status, reply) per object; `dry_run` asks the server to validate without persisting.
        CRDs are waited on until Established, so objects of their kinds can follow at once.
        """
        if isinstance(documents, Path):
            documents = [doc for doc in yaml.safe_load_all(documents.read_text()) if doc]
        suffix = "?dryRun=All" if dry_run else ""
        results = []
        for obj in documents:
            metadata = obj["metadata"]
            path = self.collection_path(obj["apiVersion"], obj["kind"], metadata.get("namespace"))
            status, reply = self.api("POST", path + suffix, obj)
            if status == 409:
                status, current = self.api("GET", f"{path}/{metadata['name']}")
                if status == 200:
                    replacement = {
                        **obj,
                        "metadata": {**metadata, "resourceVersion": current["metadata"]["resourceVersion"]},
                    }
                    status, reply = self.api("PUT", f"{path}/{metadata['name']}{suffix}", replacement)
            results.append((status, reply))
            if obj["kind"] == "CustomResourceDefinition" and status in (200, 201) and not dry_run:
                self._wait(
                    functools.partial(self._crd_established, metadata["name"]),
                    time.monotonic() + 30,
                    f"CRD {metadata['name']} established",
                    "kube-apiserver",
                )
        return results

    def _crd_established(self, name: str) -> bool:
        status, crd = self.api("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
        # A CRD just created may have no status yet, or a status with `conditions: null`.
        conditions = ((crd.get("status") or {}).get("conditions") or []) if status == 200 else []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    # -- pods --------------------------------------------------------------------------------------

    def node(self, node: NodeHandle | str) -> NodeHandle:
        """The node handle for a handle or a node name."""
        if isinstance(node, NodeHandle):
            return node
        for handle in self.nodes:
            if handle.name == node:
                return handle
        raise KeyError(f"no node {node!r}; nodes: {[n.name for n in self.nodes]}")

    def ensure_namespace(self, namespace: str) -> None:
        self._create("/api/v1/namespaces", {"metadata": {"name": namespace}})

    def ensure_service_account(self, namespace: str, name: str, timeout: float = 60.0) -> None:
        """Creates the ServiceAccount if needed and waits for its token (pods are refused before)."""
        self.ensure_namespace(namespace)
        self._create(f"/api/v1/namespaces/{namespace}/serviceaccounts", {"metadata": {"name": name}})
        self._wait(
            lambda: self._service_account_has_token(namespace, name),
            time.monotonic() + timeout,
            f"a token for ServiceAccount {namespace}/{name}",
            "kube-controller-manager",
        )

    def _service_account_has_token(self, namespace: str, name: str) -> bool:
        status, account = self.api("GET", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}")
        return status == 200 and bool(account.get("secrets"))

    def create_pod(  # noqa: PLR0917 (the fixture API names these parameters in this order)
        self,
        name: str,
        namespace: str = "default",
        node: NodeHandle | str | None = None,
        command: Sequence[str] = ("sleep", "infinity"),
        labels: Mapping[str, str] | None = None,
        host_network: bool = False,
        service_account: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
        restart_policy: str = "Always",
    ) -> PodHandle:
        """Creates a pod (on `node`, or where the scheduler puts it when None) and waits until it runs."""
        self.ensure_service_account(namespace, service_account or "default", timeout)
        spec: JsonObject = {
            "containers": [
                {
                    "name": "main",
                    "image": "harness.invalid/none",
                    "command": list(command),
                    "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
                }
            ],
            "restartPolicy": restart_policy,
            "hostNetwork": host_network,
        }
        if node is not None:
            spec["nodeName"] = self.node(node).name
        if service_account is not None:
            spec["serviceAccountName"] = service_account
        pod = {"metadata": {"name": name, "labels": dict(labels or {})}, "spec": spec}
        path = f"/api/v1/namespaces/{namespace}/pods"
        status, reply = self.api("POST", path, pod)
        if status != 201:
            raise ClusterError(f"creating pod {namespace}/{name}: {status} {reply}")
        return self.wait_pod_running(name, namespace, timeout)

    def wait_pod_running(self, name: str, namespace: str = "default", timeout: float = 60.0) -> PodHandle:
        """Waits until the pod is Running with an IP; its handle. Raises with its status and log if not."""
        deadline = time.monotonic() + timeout
        path = f"/api/v1/namespaces/{namespace}/pods/{name}"
        while True:
            code, pod = self.api("GET", path)
            if code != 200:
                raise ClusterError(f"GET {path}: {code} {pod}")
            status = pod.get("status", {})
            container_id = (status.get("containerStatuses") or [{}])[0].get("containerID", "")
            if status.get("phase") == "Running" and status.get("podIP") and container_id:
                uid = pod["metadata"]["uid"]
                host_network = pod["spec"].get("hostNetwork", False)
                return PodHandle(
                    name=name,
                    namespace=namespace,
                    node=self.node(pod["spec"]["nodeName"]),
                    ip=status["podIP"],
                    netns=None if host_network else self.layout.pod_netns(namespace, name, uid),
                    uid=uid,
                    pid=int(container_id.removeprefix("harness://")),
                )
            if status.get("phase") in ("Succeeded", "Failed") or time.monotonic() > deadline:
                raise ClusterError(
                    f"pod {namespace}/{name} is not running:\n{json.dumps(status, indent=1)}\n"
                    f"log:\n{_tail(self.layout.pod_log(namespace, name))}"
                )
            time.sleep(0.05)

    def delete_pod(self, pod: PodHandle, wait: bool = True, timeout: float = 60.0) -> None:
        """Deletes the pod through the API, gracefully; `wait`: until object, process and netns are gone."""
        path = f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}"
        status, reply = self.api("DELETE", path, {"preconditions": {"uid": pod.uid}})
        if status not in (200, 202, 404, 409):
            raise ClusterError(f"DELETE {path}: {status} {reply}")
        if not wait:
            return
        self._wait(
            lambda: self._pod_gone(pod),
            time.monotonic() + timeout,
            f"pod {pod.namespace}/{pod.name} to be removed",
            "kubelet-" + pod.node.name,
        )

    def _pod_gone(self, pod: PodHandle) -> bool:
        status, current = self.api("GET", f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}")
        if status == 200 and current["metadata"]["uid"] == pod.uid:
            return False
        return not netns.alive(pod.pid) and not (pod.netns and netns.exists(pod.netns))

    def pod_log(self, pod: PodHandle) -> str:
        """What the pod's process wrote so far (stdout and stderr)."""
        return self.layout.pod_log(pod.namespace, pod.name).read_text(errors="replace")

    # -- commands in namespaces ---------------------------------------------------------------------

    def run_in(
        self, netns_name: str | None, argv: Sequence[str], timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Runs a command to completion inside a namespace (None: the root namespace)."""
        result = subprocess.run(
            netns.enter(netns_name, _python_first(argv)),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO_ROOT,
            check=False,
        )
        if check and result.returncode != 0:
            raise CommandFailed(result.returncode, result.args, result.stdout, result.stderr)
        return result

    def spawn_in(self, netns_name: str | None, argv: Sequence[str], **popen: Any) -> subprocess.Popen[str]:
        """Starts a command inside a namespace and leaves it running (killed at teardown).

        stdout and stderr are pipes unless `popen` says otherwise: give a long-running, chatty
        process a file (`stdout=f, stderr=subprocess.STDOUT`) so it cannot block on a full pipe.
        """
        options: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "cwd": REPO_ROOT}
        options.update(popen)
        process: subprocess.Popen[str] = subprocess.Popen(
            netns.enter(netns_name, _python_first(argv)), text=True, start_new_session=True, **options
        )
        self._spawned.append(process)
        return process

    def describe(self) -> str:
        """How to use this cluster from a shell."""
        return (
            f"KUBECONFIG={self.kubeconfig} kubectl get nodes\n"
            f"in node/pod namespaces: KUBECONFIG={self.in_cluster_kubeconfig} "
            f"(API at https://{CONTROL_PLANE_IP}:{API_PORT})\n"
            f"nodes: "
            + ", ".join(f"{n.name} ({n.ip}, pods {n.pod_cidr}, netns {n.netns})" for n in self.nodes)
            + "\n"
            f"logs: {self.layout.log_dir} (components), {self.layout.pod_log_dir} (pods)\n"
            f"run in a node: nsenter --net=/run/netns/{self.nodes[0].netns} -- ip addr"
        )


_DEATH_CONFIRMATION_S = 1.0
"""How long a component must stay absent from its namespace before the cluster counts it dead."""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill_group(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    for stream in (process.stdout, process.stderr, process.stdin):
        if stream is not None:
            stream.close()
