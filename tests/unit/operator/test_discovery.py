"""The cluster index parses changes as they arrive and snapshots what it holds."""

from __future__ import annotations

import ipaddress
from typing import Any

from agent.operator.discovery import (
    AUTHORIZATION_POLICIES,
    NAMESPACES,
    PODS,
    SERVICES,
    ClusterIndex,
    trim_namespace,
    trim_pod,
    trim_whole,
)
from agent.operator.watch import Deleted, Listed, Upserted
from agent.state import ParseError, parse_pod
from tests.unit.state.factories import pod_dict, policy_dict

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels or {}, "uid": "x", "managedFields": [{}]}}


def full_pod(name: str, ip: str, namespace: str = "demo", **spec: Any) -> dict[str, Any]:
    pod = pod_dict(name, namespace=namespace, ip=ip, **spec)
    pod["metadata"]["managedFields"] = [{"manager": "kubelet"}] * 20
    pod["metadata"]["annotations"] = {"big": "x" * 4000}
    pod["spec"]["containers"] = [
        {"name": "app", "image": "app:1", "ports": [{"name": "http", "containerPort": 8080}], "env": []}
    ]
    pod["status"]["conditions"].append({"type": "PodScheduled", "status": "True"})
    pod["status"]["containerStatuses"] = [{"name": "app", "ready": True}]
    return pod


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def test_trimmed_pod_parses_exactly_like_the_full_pod() -> None:
    pod = full_pod("web-1", "10.244.1.5")
    trimmed = trim_pod(pod)
    assert parse_pod(trimmed, namespace_labels=AMBIENT) == parse_pod(pod, namespace_labels=AMBIENT)
    assert "managedFields" not in trimmed["metadata"]
    assert "annotations" not in trimmed["metadata"]
    assert len(repr(trimmed)) < len(repr(pod)) / 5


def test_trims_drop_bookkeeping() -> None:
    assert trim_namespace(namespace("demo", AMBIENT)) == {"metadata": {"name": "demo", "labels": AMBIENT}}
    assert "managedFields" not in trim_whole(namespace("demo"))["metadata"]


def test_pods_are_indexed_and_enrolled_by_their_namespace_label() -> None:
    index = ClusterIndex()
    index.apply(Upserted(NAMESPACES, "demo", trim_namespace(namespace("demo", AMBIENT))))
    index.apply(Upserted(PODS, "demo/web-1", trim_pod(full_pod("web-1", "10.244.1.5"))))
    workload = index.snapshot(created_at=0).workload(ip("10.244.1.5"))
    assert workload is not None
    assert (workload.name, workload.enrolled) == ("web-1", True)


def test_labelling_a_namespace_enrols_its_running_pods_and_unlabelling_releases_them() -> None:
    index = ClusterIndex()
    index.apply(Upserted(NAMESPACES, "demo", trim_namespace(namespace("demo"))))
    index.apply(Upserted(PODS, "demo/web-1", trim_pod(full_pod("web-1", "10.244.1.5"))))

    def enrolled() -> bool:
        workload = index.snapshot(created_at=0).workload(ip("10.244.1.5"))
        assert workload is not None
        return workload.enrolled

    assert not enrolled()
    index.apply(Upserted(NAMESPACES, "demo", trim_namespace(namespace("demo", AMBIENT))))
    assert enrolled()
    index.apply(Upserted(NAMESPACES, "demo", trim_namespace(namespace("demo"))))
    assert not enrolled()


def test_deleted_pod_leaves_the_snapshot_and_its_ip_can_be_reused() -> None:
    index = ClusterIndex()
    index.apply(Upserted(PODS, "a/old", trim_pod(full_pod("old", "10.244.1.9", namespace="a"))))
    index.apply(Deleted(PODS, "a/old"))
    assert index.snapshot(created_at=0).workload(ip("10.244.1.9")) is None
    index.apply(Upserted(PODS, "b/new", trim_pod(full_pod("new", "10.244.1.9", namespace="b"))))
    workload = index.snapshot(created_at=0).workload(ip("10.244.1.9"))
    assert workload is not None
    assert (workload.namespace, workload.name) == ("b", "new")


def test_unreadable_objects_are_reported_and_left_out() -> None:
    errors: list[ParseError] = []
    index = ClusterIndex(on_parse_error=errors.append)
    bad_policy = policy_dict("AuthorizationPolicy", {"action": "CUSTOM"}, name="bad")
    index.apply(Upserted(AUTHORIZATION_POLICIES, "default/bad", bad_policy))
    bad_service = {"metadata": {"name": "svc", "namespace": "default"}, "spec": {"ports": "nope"}}
    index.apply(Upserted(SERVICES, "default/svc", bad_service))
    assert [(e.kind, e.name) for e in errors] == [("AuthorizationPolicy", "bad"), ("Service", "svc")]
    snapshot = index.snapshot(created_at=0)
    assert not any(snapshot.authorization_policies.values())


def test_snapshot_versions_increase_with_every_change() -> None:
    index = ClusterIndex()
    first = index.snapshot(created_at=0).version
    index.apply(Upserted(PODS, "demo/web-1", trim_pod(full_pod("web-1", "10.244.1.5"))))
    assert index.snapshot(created_at=0).version > first


def test_a_relist_removes_what_it_no_longer_lists() -> None:
    index = ClusterIndex()
    index.apply(Upserted(NAMESPACES, "demo", trim_namespace(namespace("demo", AMBIENT))))
    for name, address in (("kept", "10.244.1.5"), ("gone", "10.244.1.6")):
        index.apply(Upserted(PODS, f"demo/{name}", trim_pod(full_pod(name, address))))
    web = {
        "metadata": {"name": "web", "namespace": "demo"},
        "spec": {"clusterIP": "10.96.0.9", "ports": [{"port": 80}]},
    }
    index.apply(Upserted(SERVICES, "demo/web", trim_whole(web)))

    index.apply(Listed(PODS, frozenset({"demo/kept"})))
    index.apply(Listed(SERVICES, frozenset()))
    index.apply(Listed(NAMESPACES, frozenset()))

    snapshot = index.snapshot(created_at=0)
    kept = snapshot.workload(ip("10.244.1.5"))
    assert kept is not None
    assert snapshot.workload(ip("10.244.1.6")) is None
    assert not snapshot.services_by_address
    assert index.namespace_labels("demo") == {}
    assert not kept.enrolled  # its namespace, and with it the enrolling label, is gone


def test_pods_with_equal_labels_ports_and_node_share_one_object_of_each() -> None:
    index = ClusterIndex()
    for name, pod_ip in (("web-1", "10.244.1.5"), ("web-2", "10.244.1.6")):
        index.apply(Upserted(PODS, f"demo/{name}", trim_pod(full_pod(name, pod_ip))))
    snapshot = index.snapshot(created_at=0)
    first, second = snapshot.workload(ip("10.244.1.5")), snapshot.workload(ip("10.244.1.6"))
    assert first is not None
    assert second is not None
    assert first.labels is second.labels
    assert first.named_ports is second.named_ports
    assert first.named_ports == {"http": 8080}
    assert first.node_ip is second.node_ip
