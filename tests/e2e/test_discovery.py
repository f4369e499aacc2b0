"""The lean discovery watcher keeps a snapshot in step with the real API server."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable

from agent.operator.discovery import ClusterIndex, Discovery
from agent.operator.kubeapi import load_api_access
from agent.state import Snapshot, Workload
from tests.e2e.cluster import Cluster
from tests.e2e.cluster.layout import REPO_ROOT

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


async def _until(
    snapshots: list[Snapshot], check: Callable[[Snapshot], bool], what: str, timeout: float = 20.0
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if snapshots and check(snapshots[-1]):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {what}")


def _workload(snapshot: Snapshot, ip: str) -> Workload | None:
    return snapshot.workload(ipaddress.ip_address(ip))


async def test_snapshot_follows_pods_and_namespace_labels(cluster: Cluster) -> None:
    namespace = "disco"
    cluster.ensure_namespace(namespace)
    snapshots: list[Snapshot] = []
    discovery = Discovery(
        load_api_access(str(cluster.kubeconfig)), ClusterIndex(), snapshots.append, watch_policies=False
    )
    task = asyncio.create_task(discovery.run())
    try:
        pod = await asyncio.to_thread(
            cluster.create_pod,
            "web",
            namespace=namespace,
            node=cluster.nodes[0],
            command=["python", "-m", "agent.testing.echo", "--port", "8080"],
        )
        await _until(snapshots, lambda s: _workload(s, pod.ip) is not None, "the pod in the snapshot")
        workload = _workload(snapshots[-1], pod.ip)
        assert workload is not None
        assert (workload.namespace, workload.name, workload.node) == (namespace, "web", cluster.nodes[0].name)
        assert not workload.enrolled

        status, _ = await asyncio.to_thread(
            cluster.api,
            "PATCH",
            f"/api/v1/namespaces/{namespace}",
            {"metadata": {"labels": AMBIENT}},
        )
        assert status == 200
        await _until(
            snapshots,
            lambda s: (w := _workload(s, pod.ip)) is not None and w.enrolled,
            "enrolment after labelling the namespace",
        )

        await asyncio.to_thread(cluster.delete_pod, pod)
        await _until(snapshots, lambda s: _workload(s, pod.ip) is None, "the deleted pod to leave")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


CRDS = REPO_ROOT / "manifests" / "crds"


def _policy(name: str, ports: list[str]) -> dict[str, object]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "disco-policy"},
        "spec": {
            "action": "DENY",
            "rules": [{"to": [{"operation": {"ports": ports, "methods": ["GET"]}}]}],
        },
    }


async def test_shipped_crds_validate_policies_and_discovery_indexes_them(cluster: Cluster) -> None:
    for crd in sorted(CRDS.glob("*.yaml")):
        assert all(status in (200, 201) for status, _ in cluster.apply(crd)), crd
    cluster.ensure_namespace("disco-policy")
    [(status, reply)] = cluster.apply([_policy("bad-port", ["http"])])
    assert status == 422, reply
    [(status, reply)] = cluster.apply([_policy("deny-9000", ["9000"])])
    assert status == 201, reply
    beta = {**_policy("deny-9001", ["9001"]), "apiVersion": "security.istio.io/v1beta1"}
    [(status, reply)] = cluster.apply([beta])
    assert status == 201, reply
    peer = {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "strict", "namespace": "disco-policy"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "mtls": {"mode": "STRICT"},
            "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}},
        },
    }
    [(status, reply)] = cluster.apply([peer])
    assert status == 201, reply

    snapshots: list[Snapshot] = []
    discovery = Discovery(load_api_access(str(cluster.kubeconfig)), ClusterIndex(), snapshots.append)
    task = asyncio.create_task(discovery.run())
    try:
        await _until(
            snapshots,
            lambda s: (
                {p.name for p in s.authorization_policies.get("disco-policy", ())}
                == {"deny-9000", "deny-9001"}
                and len(s.peer_authentications.get("disco-policy", ())) == 1
            ),
            "both policies and the PeerAuthentication in the snapshot",
        )
        [deny] = [p for p in snapshots[-1].authorization_policies["disco-policy"] if p.name == "deny-9000"]
        assert deny.unsupported_fields  # the HTTP-only `methods` is recorded, for the warning Event
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
