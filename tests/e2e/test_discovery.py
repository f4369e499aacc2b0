"""The lean discovery watcher keeps a snapshot in step with the real API server."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable

from agent.operator.discovery import ClusterIndex, Discovery
from agent.operator.kubeapi import load_api_access
from agent.state import Snapshot, Workload
from tests.e2e.cluster import Cluster

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
