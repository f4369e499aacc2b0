"""Cluster-wide discovery: watched objects in, immutable routing snapshots out.

`ClusterIndex` holds what the lean watchers (`agent.operator.watch`) report, already parsed into
`agent.state` values as each change arrives, so building a snapshot never re-parses the cluster. A
namespace's labels decide its pods' enrolment, so a namespace change re-parses only that namespace's
pods. `Discovery` runs one watcher per kind and publishes a new snapshot after each burst of changes
(a short batching window keeps a 1,000-pod rollout from building 1,000 snapshots).

The pod trim keeps exactly the fields `agent.state.kube.parse_pod` reads; everything else of a pod
(most of its 4.6 KB) is dropped as it arrives.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from agent.operator.kubeapi import ApiAccess
from agent.operator.watch import (
    Deleted,
    JsonObject,
    ListWatcher,
    Replaced,
    Upserted,
    WatchChange,
    WatchedResource,
)
from agent.state import (
    AuthorizationPolicy,
    MeshConfig,
    ParseError,
    PeerAuthentication,
    Service,
    Snapshot,
    Workload,
    build_snapshot,
    parse_authorization_policy,
    parse_peer_authentication,
    parse_pod,
    parse_service,
)

log = logging.getLogger(__name__)

_Parsed = TypeVar("_Parsed", Service, AuthorizationPolicy, PeerAuthentication)

PODS = "/api/v1/pods"
SERVICES = "/api/v1/services"
NAMESPACES = "/api/v1/namespaces"
AUTHORIZATION_POLICIES = "/apis/security.istio.io/v1/authorizationpolicies"
PEER_AUTHENTICATIONS = "/apis/security.istio.io/v1/peerauthentications"


def _pick(obj: Mapping[str, Any], *keys: str) -> JsonObject:
    return {key: obj[key] for key in keys if key in obj}


def trim_pod(pod: JsonObject) -> JsonObject:
    """The fields of a pod that routing and enrolment read."""
    spec, status = pod.get("spec", {}), pod.get("status", {})
    containers = [
        {"ports": container["ports"]} for container in spec.get("containers", ()) if container.get("ports")
    ]
    ready = [c for c in status.get("conditions", ()) if c.get("type") == "Ready"]
    return {
        "metadata": _pick(pod.get("metadata", {}), "name", "namespace", "uid", "labels"),
        "spec": {
            **_pick(spec, "nodeName", "serviceAccountName", "serviceAccount", "hostNetwork"),
            "containers": containers,
        },
        "status": {**_pick(status, "phase", "podIP", "podIPs", "hostIP"), "conditions": ready},
    }


def trim_namespace(namespace: JsonObject) -> JsonObject:
    """A namespace's name and labels (its labels decide its pods' enrolment)."""
    return {"metadata": _pick(namespace.get("metadata", {}), "name", "labels")}


def trim_whole(obj: JsonObject) -> JsonObject:
    """Services and policies are small and read whole, minus bookkeeping fields."""
    metadata = {k: v for k, v in obj.get("metadata", {}).items() if k != "managedFields"}
    return {**obj, "metadata": metadata}


@dataclass
class ClusterIndex:
    """The parsed cluster state; `apply` one watch change at a time, `snapshot` when needed."""

    mesh: MeshConfig = field(default_factory=MeshConfig)
    """Trust domain, root namespace and HBONE port stamped into every snapshot."""

    exclude: Mapping[str, str] | None = None
    """Labels of the agent's own pods, which are never enrolled."""

    on_parse_error: Callable[[ParseError], None] = lambda error: log.warning("ignoring %s", error)
    """Told about every object that could not be read (the operator turns them into Events)."""

    _pods: dict[str, JsonObject] = field(default_factory=dict)
    _workloads: dict[str, Workload] = field(default_factory=dict)
    _pods_by_namespace: defaultdict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    _namespace_labels: dict[str, Mapping[str, str]] = field(default_factory=dict)
    _services: dict[str, Service] = field(default_factory=dict)
    _authorization: dict[str, AuthorizationPolicy] = field(default_factory=dict)
    _peer_authentication: dict[str, PeerAuthentication] = field(default_factory=dict)
    _version: int = 0

    def apply(self, change: WatchChange) -> None:
        """Folds one watch change into the index."""
        match change.path:
            case path if path == PODS:
                self._apply_pods(change)
            case path if path == NAMESPACES:
                self._apply_namespaces(change)
            case path if path == SERVICES:
                self._apply_parsed(change, self._services, parse_service)
            case path if path == AUTHORIZATION_POLICIES:
                self._apply_parsed(change, self._authorization, parse_authorization_policy)
            case path if path == PEER_AUTHENTICATIONS:
                self._apply_parsed(change, self._peer_authentication, parse_peer_authentication)
            case other:
                raise ValueError(f"no index for watched path {other}")
        self._version += 1

    def snapshot(self, created_at: float) -> Snapshot:
        """An immutable snapshot of everything indexed so far."""
        return build_snapshot(
            version=self._version,
            created_at=created_at,
            workloads=self._workloads.values(),
            services=self._services.values(),
            authorization_policies=self._authorization.values(),
            peer_authentications=self._peer_authentication.values(),
            mesh=self.mesh,
        )

    def namespace_labels(self, namespace: str) -> Mapping[str, str]:
        """The labels of `namespace` as indexed (empty when unknown): what its pods' enrolment reads."""
        return self._namespace_labels.get(namespace, {})

    def _apply_pods(self, change: WatchChange) -> None:
        match change:
            case Replaced(objects=objects):
                self._pods.clear()
                self._workloads.clear()
                self._pods_by_namespace.clear()
                for key, pod in objects.items():
                    self._put_pod(key, pod)
            case Upserted(key=key, obj=pod):
                self._put_pod(key, pod)
            case Deleted(key=key):
                self._pods.pop(key, None)
                self._workloads.pop(key, None)
                self._pods_by_namespace[_namespace_of(key)].discard(key)

    def _put_pod(self, key: str, pod: JsonObject) -> None:
        self._pods[key] = pod
        self._pods_by_namespace[_namespace_of(key)].add(key)
        self._parse_pod(key)

    def _parse_pod(self, key: str) -> None:
        labels = self._namespace_labels.get(_namespace_of(key), {})
        parsed = parse_pod(self._pods[key], namespace_labels=labels, exclude=self.exclude)
        if isinstance(parsed, Workload):
            self._workloads[key] = parsed
            return
        self._workloads.pop(key, None)
        if isinstance(parsed, ParseError):
            self.on_parse_error(parsed)

    def _apply_namespaces(self, change: WatchChange) -> None:
        match change:
            case Replaced(objects=objects):
                before = self._namespace_labels
                self._namespace_labels = {
                    name: obj.get("metadata", {}).get("labels") or {} for name, obj in objects.items()
                }
                changed = {
                    name
                    for name in before.keys() | self._namespace_labels.keys()
                    if before.get(name) != self._namespace_labels.get(name)
                }
            case Upserted(key=name, obj=obj):
                labels = obj.get("metadata", {}).get("labels") or {}
                changed = set() if self._namespace_labels.get(name) == labels else {name}
                self._namespace_labels[name] = labels
            case Deleted(key=name):
                changed = {name} if self._namespace_labels.pop(name, None) is not None else set()
        for name in changed:
            for key in self._pods_by_namespace.get(name, ()):
                self._parse_pod(key)

    def _apply_parsed(
        self,
        change: WatchChange,
        into: dict[str, _Parsed],
        parse: Callable[[Mapping[str, object]], _Parsed | ParseError],
    ) -> None:
        def put(key: str, obj: JsonObject) -> None:
            parsed = parse(obj)
            if isinstance(parsed, ParseError):
                into.pop(key, None)
                self.on_parse_error(parsed)
            else:
                into[key] = parsed

        match change:
            case Replaced(objects=objects):
                into.clear()
                for key, obj in objects.items():
                    put(key, obj)
            case Upserted(key=key, obj=obj):
                put(key, obj)
            case Deleted(key=key):
                into.pop(key, None)


def _namespace_of(key: str) -> str:
    return key.partition("/")[0]


class Discovery:
    """Watches pods, namespaces, services and the policy kinds; publishes snapshots in batches."""

    def __init__(
        self,
        access: ApiAccess,
        index: ClusterIndex,
        publish: Callable[[Snapshot], None],
        *,
        batch_s: float = 0.05,
        watch_policies: bool = True,
    ) -> None:
        self._index = index
        self._publish = publish
        self._batch_s = batch_s
        self._dirty = asyncio.Event()
        resources = [
            WatchedResource(PODS, trim_pod),
            WatchedResource(NAMESPACES, trim_namespace),
            WatchedResource(SERVICES, trim_whole),
        ]
        if watch_policies:
            resources += [
                WatchedResource(AUTHORIZATION_POLICIES, trim_whole),
                WatchedResource(PEER_AUTHENTICATIONS, trim_whole),
            ]
        self._watchers = [ListWatcher(access, resource, self._changed) for resource in resources]

    def _changed(self, change: WatchChange) -> None:
        self._index.apply(change)
        self._dirty.set()

    @property
    def synced(self) -> bool:
        """Every watched kind has been listed at least once."""
        return all(watcher.synced.is_set() for watcher in self._watchers)

    async def run(self) -> None:
        """Runs the watchers and publishes a snapshot after each batch of changes, forever."""
        async with asyncio.TaskGroup() as tasks:
            for watcher in self._watchers:
                tasks.create_task(watcher.run(), name=f"watch {watcher.path}")
            tasks.create_task(self._publish_loop(), name="publish snapshots")

    async def _publish_loop(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self._batch_s)
            self._dirty.clear()
            if self.synced:
                self._publish(self._index.snapshot(created_at=time.time()))
